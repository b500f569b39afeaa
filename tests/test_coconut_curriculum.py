"""The curriculum: each stage's and each mode's layout of a real-format example, its tokens and labels, and batching."""

from __future__ import annotations

import random

import pytest
from helpers import tiny_tokenizer

from quietstar.coconut.config import MODES, CoconutConfig
from quietstar.coconut.curriculum import collate, collate_prompts, encode, epoch_stage, example_stage, inference_prompt, layout
from quietstar.coconut.data import Example
from quietstar.coconut.markers import BOT, EOT, LATENT, PAUSE
from quietstar.coconut.model import IGNORE
from quietstar.core.cli_config import ConfigError

# GSM8k-Aug format: the calculator equations are the steps.
GSM = Example("the sum of 2 and 3 is", ("<<4-2=2>>", "<<2/.5=4>>", "<<12/4=3>>", "<<100*3=300>>"), "300")
SHORT = Example("x plus y", ("<<1+1=2>>",), "2")
L = (LATENT,)


def test_stages_replace_the_first_k_steps_with_k_times_c_latents():
    cfg = CoconutConfig(c=2, max_latent_stage=3)
    got = {k: layout(GSM, k, cfg) for k in range(6)}
    assert got[0].markers and got[0].thought == () and got[0].steps == GSM.steps  # stage 0: CoT with an empty thought
    assert (got[1].thought, got[1].steps) == (L * 2, GSM.steps[1:])
    assert (got[2].thought, got[2].steps) == (L * 4, GSM.steps[2:])
    assert (got[3].thought, got[3].steps) == (L * 6, GSM.steps[3:])
    for k in (4, 5):  # past max_latent_stage: every step removed, max_latent_stage * c latents
        assert (got[k].thought, got[k].steps) == (L * 6, ())
    assert all(g.answer == "300" and g.question == GSM.question for g in got.values())


def test_short_examples_get_one_set_of_latents_per_step_unless_padded_to_the_max():
    assert layout(SHORT, 3, CoconutConfig(c=2, max_latent_stage=3)).thought == L * 2
    assert layout(SHORT, 3, CoconutConfig(c=2, max_latent_stage=3, pad_latent_to_max=True)).thought == L * 6
    assert layout(SHORT, 9, CoconutConfig(c=2, max_latent_stage=3, pad_latent_to_max=True)).thought == L * 6
    assert layout(Example("q", (), "a"), 2, CoconutConfig()).thought == ()  # GSM8K items may have no steps


def test_every_mode_is_a_form_of_the_same_transform():
    def at(mode, stage, **kw):
        return layout(GSM, stage, CoconutConfig(mode=mode, c=1, max_latent_stage=2, **kw))

    assert (at("cot", 2).markers, at("cot", 2).thought, at("cot", 2).steps) == (False, (), GSM.steps)
    assert (at("no_cot", 0).markers, at("no_cot", 0).thought, at("no_cot", 0).steps) == (False, (), ())
    assert (at("no_thought", 2).markers, at("no_thought", 2).thought, at("no_thought", 2).steps) == (True, (), GSM.steps[2:])
    assert (at("pause_as_thought", 2).thought, at("pause_as_thought", 2).steps) == ((PAUSE, PAUSE), GSM.steps[2:])
    assert (at("pause_token", 0).markers, at("pause_token", 0).thought, at("pause_token", 0).steps) == (False, (PAUSE, PAUSE), ())
    cfg = CoconutConfig(mode="no_curriculum", max_latent_stage=2, epochs_per_stage=3)
    assert epoch_stage(0, cfg) == 3 and layout(GSM, epoch_stage(0, cfg), cfg).steps == ()
    coconut = CoconutConfig(max_latent_stage=2, epochs_per_stage=3)
    assert [epoch_stage(e, coconut) for e in range(13)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]  # one last stage
    assert {epoch_stage(7, CoconutConfig(mode=m)) for m in ("cot", "no_cot", "pause_token")} == {0}
    assert set(MODES) == {"coconut", "cot", "no_cot", "no_curriculum", "no_thought", "pause_as_thought", "pause_token"}


def test_uniform_prob_mixes_stages_between_zero_and_the_step_count():
    cfg = CoconutConfig(uniform_prob=0.5)
    rng = random.Random(0)
    drawn = [example_stage(GSM, 1, cfg, rng) for _ in range(400)]
    assert set(drawn) == {0, 1, 2, 3, 4}
    assert 0.45 < sum(d != 1 for d in drawn) / len(drawn) / 0.8 < 0.6  # 4 of the 5 random stages differ from 1
    assert {example_stage(GSM, 1, CoconutConfig(), rng) for _ in range(50)} == {1}


def test_tokens_and_labels_mask_the_question_markers_and_latents():
    tok = tiny_tokenizer()
    q = Example("the sum of 2 and 3", ("2 plus 3", "equals 5"), "5")
    ids, labels = encode(layout(q, 1, CoconutConfig(c=2)), tok)
    question = tok("the sum of 2 and 3\n")["input_ids"]
    assert ids[: len(question)] == question
    assert ids[len(question): len(question) + 4] == [BOT, LATENT, LATENT, EOT]
    rest = tok("equals 5\n", add_special_tokens=False)["input_ids"] + tok("### 5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids[len(question) + 4:] == rest
    assert labels == [IGNORE] * (len(question) + 4) + rest
    prompt, prompt_labels = encode(inference_prompt(q.question, CoconutConfig(c=2, max_latent_stage=3)), tok, with_answer=False)
    assert prompt == question + [BOT] + [LATENT] * 6 + [EOT] and set(prompt_labels) == {IGNORE}
    assert encode(inference_prompt(q.question, CoconutConfig(mode="cot")), tok, with_answer=False)[0] == question


def test_collate_aligns_the_first_latent_and_pads_with_ignored_labels():
    rows = [([5, 6, 7, BOT, LATENT, LATENT, EOT, 8, 2], [IGNORE] * 7 + [8, 2]),
            ([5, BOT, LATENT, EOT, 9, 9, 2], [IGNORE] * 4 + [9, 9, 2]),
            ([5, 6, 8, 2], [IGNORE, IGNORE, 8, 2])]
    batch = collate(rows, pad_id=0)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert (ids[:2] == LATENT).int().argmax(dim=1).tolist() == [4, 4]
    assert mask.sum(dim=1).tolist() == [9, 7, 4]
    assert ids[1, :2].tolist() == [0, 0] and mask[1, :2].tolist() == [0, 0]  # left padding of the shorter question
    assert (labels[mask == 0] == IGNORE).all()
    for b, (row, _) in enumerate(rows):
        assert ids[b][mask[b].bool()].tolist() == row
    prompts = collate_prompts([[5, BOT, LATENT, EOT], [5, 6, 7, BOT, LATENT, EOT]], pad_id=0)
    assert prompts["input_ids"][:, -2].tolist() == [LATENT, LATENT] and prompts["attention_mask"][0].tolist() == [0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("field,value", [("mode", "latent"), ("c", 0), ("max_latent_stage", 0), ("epochs_per_stage", 0),
                                         ("uniform_prob", 1.5), ("inference_latents", -1), ("optimizer_reset", "step"),
                                         ("pad_latent_to_max", "yes"), ("marker_init_text", " ")])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"^CoconutConfig.{field}:"):
        CoconutConfig(**{field: value})
    assert CoconutConfig(c=2, max_latent_stage=3).inference_latents == 6

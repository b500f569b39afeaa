"""The lm-evaluation-harness model ``quietstar`` against this project's own scoring and generation, and the task YAMLs."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("lm_eval", reason="lm_eval is not installed (the optional extra: pip install -e '.[lm-eval]')")

import torch  # noqa: E402
from helpers import WORDS, move_off_init, tiny_lm, tiny_tokenizer  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from quietstar import QuietStarConfig, QuietStarModel  # noqa: E402
from quietstar.coconut.config import CoconutConfig  # noqa: E402
from quietstar.coconut.curriculum import collate_prompts, encode, inference_prompt  # noqa: E402
from quietstar.coconut.generation import generate as coconut_generate  # noqa: E402
from quietstar.coconut.model import CoconutModel  # noqa: E402
from quietstar.evaluation.lm_eval_adapter import QuietStarLM, continuation_score  # noqa: E402
from quietstar.evaluation.lm_eval_cli import lm_eval_argv, write_task_dir  # noqa: E402
from quietstar.evaluation.tasks import EvalItem, csqa_item, gsm8k_item  # noqa: E402
from quietstar.evaluation.zero_shot import completions, gold_logprobs  # noqa: E402

VOCAB = WORDS + ["A", "B", "C", "D", "E", "<<"]  # the choice letters, one token each; Coconut's marker init text
GSM8K = [{"question": "the sum of 3 and 4 is", "answer": "3 plus 4 #### 7"},
         {"question": "half of 8", "answer": "#### 4"},
         {"question": "x times y equals the number we get so then", "answer": "#### 2"},
         {"question": "twice 3", "answer": "#### 6"}]
CSQA = [{"answerKey": key, "id": str(i), "question": {"stem": stem, "choices": [{"label": label, "text": text} for label, text in
         zip("ABCDE", ["the sum", "a number", "half", "twice", "x"])]}}
        for i, (key, stem) in enumerate([("A", "what is 3 plus 4"), ("C", "half of 8 is"), ("E", "x or y"), ("B", "we get")])]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny saved QuietStarModel (thought_len 2) whose thoughts change its predictions, and a tiny CoconutModel."""
    root = tmp_path_factory.mktemp("lm_eval_adapter")
    torch.manual_seed(0)
    model = QuietStarModel(tiny_lm("llama", vocab_size=len(VOCAB)), tiny_tokenizer(VOCAB), QuietStarConfig(thought_len=2))
    move_off_init(model, head_scale=0.5).save_pretrained(root / "quietstar")
    coconut = CoconutModel(tiny_lm("gpt2", vocab_size=len(VOCAB)), tiny_tokenizer(VOCAB), CoconutConfig(max_latent_stage=2))
    coconut.save_pretrained(root / "coconut")
    return root


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


def longest_first(lm: QuietStarLM, texts: list[str]) -> list[int]:
    """The order in which the adapter batches requests of these (context + continuation) texts."""
    return sorted(range(len(texts)), key=lambda i: (-len(lm.tok_encode(texts[i])), tuple(lm.tok_encode(texts[i]))))


@pytest.mark.parametrize("thoughts", ["on", "off"])
def test_loglikelihood_is_our_evals_log_probability_of_the_gold_answer(saved, thoughts):
    lm = QuietStarLM(pretrained=str(saved / "quietstar"), thoughts=thoughts, thought_samples=3, seed=5, batch_size=8,
                     device="cpu")
    items = [gsm8k_item(r, f"line {i}") for i, r in enumerate(GSM8K)]
    items.append(EvalItem(id="many tokens", question="", gold="3 plus 4 equals 7", prompt="Q: the sum of 3 and 4\nA:"))
    got = lm.loglikelihood(requests("loglikelihood", [(item.prompt, " " + item.gold) for item in items]))
    order = longest_first(lm, [item.prompt + " " + item.gold for item in items])
    ours = gold_logprobs(lm.model, [items[i] for i in order], 3, generator=torch.Generator().manual_seed(5))
    expected = ours["thoughts" if thoughts == "on" else "base"]
    torch.testing.assert_close(torch.tensor([got[i][0] for i in order]), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours["thoughts"], ours["base"])  # the thoughts matter for this model


def test_continuation_score_averages_the_draws_probability_and_checks_the_averaged_argmax():
    steps = torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]], [[0.5, 0.4, 0.1], [0.1, 0.1, 0.8]]]).log()  # [T=2, S=2, V=3]
    tokens = [1, 2]
    per_draw = [steps[0, s, 1].exp() * steps[1, s, 2].exp() for s in range(2)]
    logprob, greedy = continuation_score(steps, tokens)
    assert logprob == pytest.approx(math.log(sum(per_draw) / 2), abs=1e-6)
    assert greedy  # step 0: mean P(v) = (.4, .5, .1); step 1 after token 1: (.3*.5 + .7*.1, .3*.4 + .7*.1, .3*.1 + .7*.8) / 2
    assert not continuation_score(steps, [0, 2])[1]


@pytest.mark.parametrize("thoughts", ["on", "off"])
def test_generate_until_is_our_generate_cut_at_the_stop_string(saved, thoughts):
    lm = QuietStarLM(pretrained=str(saved / "quietstar"), thoughts=thoughts, seed=3, batch_size=8, device="cpu")
    prompts = ["Q: the sum of 3 and 4 is\nA:", "Q: half of 8\nA:", "Q: twice 3 plus x\nA:"]
    got = lm.generate_until(requests("generate_until", [(p, {"until": ["x"], "max_gen_toks": 6}) for p in prompts]))
    order = longest_first(lm, prompts)
    texts, _ = completions(lm.model, [prompts[i] for i in order], thoughts == "on", greedy=True, temperature=1.0,
                           max_new_tokens=6, stop_token_ids=[VOCAB.index("x")], greedy_thoughts=False,
                           generator=torch.Generator().manual_seed(3), device=torch.device("cpu"))
    assert [got[i] for i in order] == [text.split("x")[0] for text in texts]


def test_coconut_generates_and_scores_after_its_latents(saved):
    lm = QuietStarLM(pretrained=str(saved / "coconut"), latents=3, batch_size=4, device="cpu")
    model = lm.model
    prompts = ["the sum of 3 and 4", "half of 8 is the number"]
    got = lm.generate_until(requests("generate_until", [(p, {"max_gen_toks": 4}) for p in prompts]))
    ids = [encode(inference_prompt(p, model.config), model.tokenizer, with_answer=False)[0] for p in prompts]
    assert sum(t < 0 for t in ids[0]) == 3 + 2  # <bot>, 3 latents, <eot>
    for prompt_ids, text in zip(ids, got):
        batch = collate_prompts([prompt_ids], model.tokenizer.pad_token_id)
        tokens = coconut_generate(model, **batch, max_new_tokens=4).tokens[0]
        assert text == model.tokenizer.decode(tokens, skip_special_tokens=True)
    (logprob, _), = lm.loglikelihood(requests("loglikelihood", [(prompts[0], " 7 plus")]))
    answer = model.tokenizer(" 7 plus", add_special_tokens=False)["input_ids"]
    full = torch.tensor([ids[0] + answer])
    with torch.no_grad():
        logits = model(full, torch.ones_like(full)).logits[0, len(ids[0]) - 1:-1].log_softmax(-1)
    assert logprob == pytest.approx(float(logits.gather(1, torch.tensor(answer)[:, None]).sum()), abs=1e-5)


def test_loglikelihood_rolling_sums_lm_evals_windows_of_a_long_document(saved):
    lm = QuietStarLM(pretrained=str(saved / "quietstar"), thoughts="off", max_length=8, device="cpu")
    document = " ".join(VOCAB[4:24])
    (total,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(document,)]))
    expected = 0.0
    windows = get_rolling_token_windows(lm.tok_encode(document), lm.prefix_token_id, max_seq_len=8, context_len=1)
    for context, continuation in map(make_disjoint_window, windows):
        window = context + continuation[:-1]
        assert len(window) <= 8
        logprobs = lm.model.lm(torch.tensor([window])).logits[0, -len(continuation):].log_softmax(-1)
        expected += float(logprobs.gather(1, torch.tensor(continuation)[:, None]).sum())
    assert total == pytest.approx(expected, abs=1e-4)


def test_simple_evaluate_runs_the_task_yamls_offline_with_thoughts_on_and_off(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "gsm8k_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    (tmp_path / "commonsenseqa_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CSQA))
    (tmp_path / "tasks").mkdir()
    tasks = write_task_dir(tmp_path, tmp_path / "tasks")
    assert tasks == ["quietstar_gsm8k", "quietstar_gsm8k_score", "quietstar_csqa"]
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    gsm8k = [gsm8k_item(r, "x") for r in GSM8K]
    csqa = [csqa_item(r, "x") for r in CSQA]
    for thoughts in ("off", "on"):
        lm = QuietStarLM(pretrained=str(saved / "quietstar"), thoughts=thoughts, batch_size=4, device="cpu")
        results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=4)["results"]
        assert results["quietstar_gsm8k"]["exact_match,none"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert 0 < results["quietstar_gsm8k_score"]["score,none"] < 1 and 0 < results["quietstar_csqa"]["score,none"] < 1
        if thoughts == "off":  # deterministic: the numbers of our own eval
            ours = gold_logprobs(lm.model, gsm8k, 1)
            assert results["quietstar_gsm8k_score"]["gold_logprob,none"] == pytest.approx(float(ours["base"].mean()), abs=1e-5)
            ours = gold_logprobs(lm.model, csqa, 1)
            assert results["quietstar_csqa"]["score,none"] == pytest.approx(float(ours["base"].exp().mean()), abs=1e-5)
            assert results["quietstar_csqa"]["acc,none"] == pytest.approx(float(ours["base_correct"].float().mean()))


def test_model_args_fail_in_one_line(saved):
    with pytest.raises(ValueError, match="unknown model arg.*thought_lenght"):
        QuietStarLM(pretrained=str(saved / "quietstar"), thought_lenght=4)
    with pytest.raises(ValueError, match="thoughts='maybe': expected on or off"):
        QuietStarLM(pretrained=str(saved / "quietstar"), thoughts="maybe")
    with pytest.raises(ValueError, match="mixing_head_width of a saved QuietStarModel"):
        QuietStarLM(pretrained=str(saved / "quietstar"), mixing_head_width=8)
    with pytest.raises(ValueError, match="a Coconut model takes latents"):
        QuietStarLM(pretrained=str(saved / "coconut"), thoughts="off")
    assert QuietStarLM(pretrained=str(saved / "quietstar"), thought_len=5, device="cpu").model.config.thought_len == 5


def test_the_command_hands_lm_eval_our_model_and_the_include_dir():
    class Args:
        model, model_args = "runs/x", ["thoughts=off", "thought_len=4"]
        lm_eval_args = ["--tasks", "quietstar_csqa", "--limit", "2"]

    assert lm_eval_argv(Args, "/tmp/tasks") == ["lm-eval", "--model", "quietstar", "--model_args",
                                               "pretrained=runs/x,thoughts=off,thought_len=4", "--include_path", "/tmp/tasks",
                                               "--tasks", "quietstar_csqa", "--limit", "2"]

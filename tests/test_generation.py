"""Cached generation with thoughts against plain HF generation and a step-by-step recomputation."""

import pytest
import torch
from helpers import NEW_FAMILIES, independent_greedy_thought, move_off_init, sequence_hidden, tiny_lm, tiny_tokenizer

from quietstar import QuietStarConfig, QuietStarModel
from quietstar.quiet_star.generation import generate


def model_with_live_head(family="llama", **config):
    torch.manual_seed(5)
    return move_off_init(QuietStarModel(tiny_lm(family), tiny_tokenizer(), QuietStarConfig(**config)), head_scale=0.5)


def left_padded_prompts():
    ids = torch.tensor([[0, 0, 7, 12, 5], [9, 4, 4, 30, 18], [0, 0, 0, 21, 3]])
    return ids, (ids != 0).long()


@pytest.mark.parametrize("family", ["llama", "qwen2", *NEW_FAMILIES])
def test_without_thoughts_it_is_hf_greedy_generate(family):
    model = model_with_live_head(family)
    ids, mask = left_padded_prompts()
    ours = generate(model, ids, mask, max_new_tokens=6, thoughts=False).sequences
    model.lm.generation_config.eos_token_id = None  # ours is given no eos either: neither stops early
    hf = model.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, hf)


def test_with_thoughts_it_matches_a_step_by_step_recomputation():
    M = 3
    model = model_with_live_head(thought_len=M)
    ids, mask = left_padded_prompts()
    out = generate(model, ids, mask, max_new_tokens=4, greedy_thoughts=True)
    assert out.sequences.shape == (3, 9) and out.thoughts.shape == (3, 4, M)
    embed, lm_head = model.lm.get_input_embeddings(), model.lm.get_output_embeddings()
    with torch.no_grad():
        for b in range(3):
            text = ids[b][mask[b].bool()].tolist()
            for step in range(4):
                prefix = torch.tensor(text)
                thought = independent_greedy_thought(model.lm, model.start_embedding, prefix, M)
                assert out.thoughts[b, step].tolist() == thought, (b, step)
                h_base = sequence_hidden(model.lm, embed(prefix))[-1]
                seq = torch.cat([embed(prefix), model.start_embedding[None], embed(torch.tensor(thought)), model.end_embedding[None]])
                h_thought = sequence_hidden(model.lm, seq)[-1]
                talk, _ = model.mixing_head(h_base, h_thought)
                token = int(lm_head(talk).argmax())
                assert int(out.sequences[b, 5 + step]) == token, (b, step)
                text.append(token)
    # the thoughts change the output here (the head is far from zero), so the test is not vacuous
    assert not torch.equal(out.sequences, generate(model, ids, mask, max_new_tokens=4, thoughts=False).sequences)


def test_right_padded_prompts_are_rejected():
    model = model_with_live_head()
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match="left padded"):
        generate(model, ids, mask.flip(dims=[1]))


def test_rows_stop_at_a_stop_token_and_are_filled_with_eos():
    model = model_with_live_head()
    ids, mask = left_padded_prompts()
    free = generate(model, ids, mask, max_new_tokens=8, thoughts=False).sequences[:, 5:]
    stop = int(free[0, 2])  # row 0 emits this token third
    out = generate(model, ids, mask, max_new_tokens=8, thoughts=False, eos_token_id=2, stop_token_ids=[stop]).sequences[:, 5:]
    for row, new in zip(free.tolist(), out.tolist()):
        end = row.index(stop) + 1 if stop in row else len(row)
        assert new[:end] == row[:end] and all(token == 2 for token in new[end:])
    with pytest.raises(ValueError, match="needs eos_token_id"):
        generate(model, ids, mask, stop_token_ids=[stop])

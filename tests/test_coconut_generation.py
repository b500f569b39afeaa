"""Coconut generation: batched and cached against per-example decoding that re-runs the whole sequence for each token."""

from __future__ import annotations

import pytest
import torch
from helpers import NEW_FAMILIES, WORDS, independent_coconut_logits, tiny_lm, tiny_tokenizer

from quietstar.coconut.config import CoconutConfig
from quietstar.coconut.curriculum import collate_prompts, encode, inference_prompt
from quietstar.coconut.generation import generate, nearest_tokens
from quietstar.coconut.model import CoconutModel

QUESTIONS = ["the sum of 2 and 3 is", "x plus y", "twice the number 4 minus 1 then half of it"]
NEW = 6


def model_for(family: str, **config) -> CoconutModel:
    torch.manual_seed(0)
    model = CoconutModel(tiny_lm(family, vocab_size=len(WORDS)), tiny_tokenizer(), CoconutConfig(**config)).eval()
    with torch.no_grad():
        for p in model.marker_parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def prompts(model: CoconutModel) -> list[list[int]]:
    return [encode(inference_prompt(q, model.config), model.tokenizer, with_answer=False)[0] for q in QUESTIONS]


def rerun_decoding(model: CoconutModel, prompt: list[int], new_tokens: int) -> list[int]:
    """The official pattern: one example, and for each new token the whole sequence again from scratch (no cache)."""
    sequence, out = list(prompt), []
    with torch.no_grad():
        for _ in range(new_tokens):
            token = int(independent_coconut_logits(model, sequence)[-1].argmax())
            if token == model.tokenizer.eos_token_id:
                break
            out.append(token)
            sequence.append(token)
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama", *NEW_FAMILIES])
def test_batched_cached_generation_equals_per_example_full_reruns(family):
    model = model_for(family, c=1, max_latent_stage=3)  # 3 latents at inference
    rows = prompts(model)
    batch = collate_prompts(rows, pad_id=0)
    assert batch["attention_mask"][:, 0].tolist().count(0) == 2  # left padding in two rows
    out = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW)
    for row, prompt in zip(out.tokens, rows):
        assert row == rerun_decoding(model, prompt, NEW)
    assert out.latents.shape == (3, 3, 32)
    # the vector fed to the first latent is the hidden state at <bot>, the last prompt position before it
    alone = model.hidden_states(torch.tensor([rows[0]]), torch.ones(1, len(rows[0]), dtype=torch.long))
    torch.testing.assert_close(out.latents[0, 0], alone[0, len(rows[0]) - 5], rtol=1e-4, atol=1e-5)
    shown = nearest_tokens(model, out.latents, k=2)
    assert len(shown) == 3 and len(shown[0]) == 3 and len(shown[0][0]) == 2 and 0 < shown[0][0][0][1] <= 1


@pytest.mark.parametrize("family", ["gpt2", "llama", *NEW_FAMILIES])
def test_without_latents_it_equals_transformers_greedy_generate(family):
    model = model_for(family, mode="no_cot")
    rows = prompts(model)
    batch = collate_prompts(rows, pad_id=0)
    out = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW)
    positions = (batch["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
    reference = model.lm.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=NEW, do_sample=False,
                                  pad_token_id=0, eos_token_id=model.tokenizer.eos_token_id, position_ids=positions)
    eos = model.tokenizer.eos_token_id
    for row, ref in zip(out.tokens, reference[:, batch["input_ids"].shape[1]:].tolist()):
        assert row == (ref[: ref.index(eos)] if eos in ref else ref)
    assert out.latents.shape == (3, 0, 32)


def test_stop_strings_and_seeded_sampling():
    model = model_for("llama", c=1, max_latent_stage=2)
    batch = collate_prompts(prompts(model), pad_id=0)
    free = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW).tokens
    word = model.tokenizer.decode([free[0][1]])
    stopped = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW, stop_strings=(word,)).tokens
    assert stopped[0] == free[0][: free[0].index(free[0][1]) + 1]
    draws = [generate(model, batch["input_ids"], batch["attention_mask"], NEW, temperature=1.0,
                      generator=torch.Generator().manual_seed(s)).tokens for s in (1, 1, 2)]
    assert draws[0] == draws[1] and draws[0] != draws[2]


def test_a_sliding_window_shorter_than_the_sequence_is_kept_by_the_buffer_cache():
    """Gemma 3's local layer with a 4-token window: the in-place buffers hold every key and the mask limits the
    window, so generation still equals the per-example re-runs."""
    torch.manual_seed(0)
    model = CoconutModel(tiny_lm("gemma3_text", vocab_size=len(WORDS), sliding_window=4), tiny_tokenizer(),
                         CoconutConfig(c=1, max_latent_stage=3)).eval()
    rows = prompts(model)
    batch = collate_prompts(rows, pad_id=0)
    out = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW)
    for row, prompt in zip(out.tokens, rows):
        assert row == rerun_decoding(model, prompt, NEW)


def test_the_buffer_cache_refuses_more_positions_than_it_holds():
    from quietstar.core.kv_buffer import BufferCache

    cache = BufferCache(num_layers=1, max_length=3)
    keys = torch.zeros(1, 2, 2, 4)
    cache.update(keys, keys, 0)
    assert cache.get_seq_length() == 2
    with pytest.raises(ValueError, match="4 positions do not fit the 3 allocated"):
        cache.update(keys, keys, 0)

"""CoconutModel: the batched latent forward on a KV cache against an independent one-position-at-a-time computation."""

from __future__ import annotations

import pytest
import torch
from helpers import NEW_FAMILIES, WORDS, independent_coconut, tiny_lm, tiny_tokenizer

from quietstar.coconut.config import CoconutConfig
from quietstar.coconut.curriculum import collate
from quietstar.coconut.markers import BOT, EOT, LATENT, PAUSE
from quietstar.coconut.model import IGNORE, CoconutModel, latent_span

EOS = WORDS.index("<eos>")


def example_row(seed: int, question: int, latents: int, answer: int, pauses: int = 0) -> tuple[list[int], list[int]]:
    """question tokens, <bot> latents (or pauses) <eot>, answer tokens, <eos>; labels on the answer and <eos> only."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(4, len(WORDS), (question,), generator=g).tolist()
    a = torch.randint(4, len(WORDS), (answer,), generator=g).tolist()
    thought = [BOT] + [LATENT] * latents + [PAUSE] * pauses + [EOT]
    ids = q + thought + a + [EOS]
    return ids, [IGNORE] * (len(q) + len(thought)) + a + [EOS]


def perturbed(model: CoconutModel) -> CoconutModel:
    """Markers moved apart so that each one matters."""
    with torch.no_grad():
        for p in model.marker_parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


ROWS = [example_row(1, 5, 3, 4), example_row(2, 7, 1, 2), example_row(3, 3, 0, 5), example_row(4, 6, 2, 3, pauses=1)]


@pytest.mark.parametrize("family", ["gpt2", "llama", *NEW_FAMILIES])
def test_batched_latent_forward_matches_the_one_position_at_a_time_loop(family):
    torch.manual_seed(0)
    model = perturbed(CoconutModel(tiny_lm(family), tiny_tokenizer(), CoconutConfig()))
    batch = collate(ROWS, pad_id=0)
    # rows of different latent counts (3, 1, 0, 2) and question lengths, so both left and right padding
    assert (batch["attention_mask"][:, 0] == 0).any() and (batch["attention_mask"][:, -1] == 0).any()

    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    ref_logits, ref_loss = independent_coconut(model, ROWS)
    ref_loss.backward()

    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert int(out.tokens) == sum(sum(label != IGNORE for label in labels[1:]) for _, labels in ROWS)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"]).logits
    for b, ((ids, _), ref) in enumerate(zip(ROWS, ref_logits)):
        where = batch["attention_mask"][b].bool()
        torch.testing.assert_close(logits[b, where], ref.detach(), rtol=1e-4, atol=1e-5)
    for name, p in model.named_parameters():
        scale = p.grad.norm().clamp(min=1e-8)
        assert (grads[name] - p.grad).norm() <= 1e-4 * scale + 1e-7, name
    # the gradient reaches the markers and flows through the latent steps into the question's embeddings
    assert model.markers.bot.grad.abs().sum() > 0 and model.markers.pause.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_families_run_batched_latents_and_match_the_loop_loss(family):
    model = perturbed(CoconutModel(tiny_lm(family), tiny_tokenizer(), CoconutConfig()))
    batch = collate(ROWS, pad_id=0)
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        _, ref_loss = independent_coconut(model, ROWS)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)


def test_latents_change_the_answer_logits_and_unaligned_latents_are_refused():
    model = perturbed(CoconutModel(tiny_lm("llama"), tiny_tokenizer(), CoconutConfig()))
    ids, labels = example_row(5, 4, 2, 3)
    as_pause = [PAUSE if t == LATENT else t for t in ids]
    with torch.no_grad():
        a = model(torch.tensor([ids])).logits
        b = model(torch.tensor([as_pause])).logits
    assert not torch.allclose(a[0, -4:], b[0, -4:])  # the fed-back hidden states are not the pause vector
    two = torch.tensor([ids, [0] + ids[:-1]])  # second row's latents one column later
    with pytest.raises(ValueError, match="contiguous span starting at the same column"):
        model(two)
    assert latent_span(torch.tensor([[False, True, True, False], [False, False, False, False]])) == (1, 2)


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", *NEW_FAMILIES, "gemma3_window4"])
def test_activation_checkpointing_through_the_latent_passes_is_exact(family):
    """Checkpointed layers replay the latent passes from a SegmentCache: the loss and every gradient are the
    unchecked run's, and the replay recomputed the layers (fewer tensors are kept for the backward).
    ``gemma3_window4``: Gemma 3's local layer with a window shorter than the rows."""
    torch.manual_seed(0)
    lm = tiny_lm("gemma3_text", sliding_window=4) if family == "gemma3_window4" else tiny_lm(family)
    model = perturbed(CoconutModel(lm, tiny_tokenizer(), CoconutConfig())).train()
    batch = collate(ROWS, pad_id=0)

    def loss_grads_and_saved() -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in both runs (GPT-2 has dropout)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)

    plain_loss, plain_grads, plain_saved = loss_grads_and_saved()
    model.lm.activation_checkpointing_enable()
    loss, grads, saved = loss_grads_and_saved()

    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    assert grads.keys() == plain_grads.keys() and model.markers.bot.grad.abs().sum() > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert saved < plain_saved / 2
    assert all(not hasattr(m, "_can_checkpoint_with_cache") or not m._can_checkpoint_with_cache
               for m in model.lm.modules())  # the layers are unmarked after the forward


def test_saved_model_is_a_stock_checkpoint_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = perturbed(CoconutModel(tiny_lm("gpt2"), tiny_tokenizer(), CoconutConfig(c=2, max_latent_stage=2)))
    model.save_pretrained(tmp_path)
    again = CoconutModel.from_pretrained(tmp_path)
    assert again.config == model.config
    torch.testing.assert_close(again.markers.bot, model.markers.bot)
    AutoModelForCausalLM.from_pretrained(tmp_path)  # the base weights alone: no custom class needed
    with pytest.raises(FileNotFoundError, match="not a saved QuietStarModel"):
        from quietstar import QuietStarModel

        QuietStarModel.from_pretrained(tmp_path)

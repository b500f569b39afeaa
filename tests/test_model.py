"""Behaviour of QuietStarModel at initialisation, its rewards, sampling, parameter groups and input errors."""

import pytest
import torch
from helpers import WORDS, padded_batch, tiny_lm, tiny_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config

from quietstar import QuietStarConfig, QuietStarModel, build_param_groups
from quietstar.quiet_star.model import sliding_window
from quietstar.quiet_star.thought_embeddings import ThoughtEmbeddings


@pytest.fixture
def model():
    torch.manual_seed(0)
    return QuietStarModel(tiny_lm("llama"), tiny_tokenizer(), QuietStarConfig(thought_len=3, n_true=2))


def test_markers_are_initialised_from_the_init_text(model):
    embedding = model.lm.get_input_embeddings().weight
    dashes = WORDS.index("---")
    assert model.start_embedding.shape == model.end_embedding.shape == (32,)
    assert torch.equal(model.start_embedding.data, embedding[dashes])
    assert torch.equal(model.end_embedding.data, embedding[dashes])
    assert isinstance(model.start_embedding, torch.nn.Parameter)


def test_talk_equals_base_at_initialisation(model):
    ids, mask = padded_batch()
    out = model(ids, mask, generator=torch.Generator().manual_seed(0))
    valid = out.target_mask[:, :, None, :].expand_as(out.talk_logprobs)
    base = out.base_logprobs[:, :, None, :].expand_as(out.talk_logprobs)
    assert valid.sum() > 0
    assert torch.equal(out.talk_logprobs[valid], base[valid])
    assert float(out.mixing_weight_mean) == 0.0
    assert torch.isfinite(out.loss)
    # base NLL is the plain model's next-token NLL
    logits = model.lm(input_ids=ids, attention_mask=mask).logits
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    keep = mask[:, 1:].bool()
    torch.testing.assert_close(out.base_nll, -lp[keep].mean())


def test_backward_reaches_lm_markers_and_head(model):
    ids, mask = padded_batch()
    model(ids, mask, generator=torch.Generator().manual_seed(0)).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert model.lm.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.mixing_head.mlp[-1].weight.grad.abs().sum() > 0  # at init, through the last layer

    # Once the head is off zero the thought matters: markers and the whole head get gradients.
    model.zero_grad()
    with torch.no_grad():
        model.mixing_head.mlp[-1].weight.normal_(0, 0.1)
    out = model(ids, mask, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert model.start_embedding.grad.abs().sum() > 0
    assert model.end_embedding.grad.abs().sum() > 0
    assert model.mixing_head.mlp[0].weight.grad.abs().sum() > 0
    assert out.policy_loss != 0


def test_rewards_sum_to_zero_over_thoughts(model):
    model.config = QuietStarConfig(thought_len=3, n_true=2, n_thoughts=3)
    with torch.no_grad():
        model.mixing_head.mlp[-1].weight.normal_(0, 0.5)
    ids, mask = padded_batch()
    out = model(ids, mask, generator=torch.Generator().manual_seed(0))
    assert out.rewards.shape == (2, 8, 3)
    assert out.rewards.abs().max() > 1e-3
    torch.testing.assert_close(out.rewards.sum(dim=-1), torch.zeros(2, 8), atol=1e-5, rtol=0)
    assert out.reward_mean > 0  # positive rewards only: the mean of max(r, 0)


def test_sampling_is_reproducible_and_varies(model):
    ids, mask = padded_batch()
    a = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(7))
    b = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(7))
    c = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, 8, 2, 3) and int(a.min()) >= 0 and int(a.max()) < len(WORDS)


def test_forward_metrics_are_floats(model):
    ids, mask = padded_batch()
    metrics = model(ids, mask).metrics()
    assert set(metrics) == {"loss", "base_nll", "talk_nll", "policy_loss", "reward_mean", "mixing_weight_mean"}
    assert all(isinstance(v, float) for v in metrics.values())


def test_param_groups_put_the_multiplier_on_the_markers(model):
    groups = build_param_groups(model, lr=1e-6, weight_decay=0.001)
    by_name = {g["name"]: g for g in groups}
    assert by_name["markers"]["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in by_name["markers"]["params"]} == {id(model.start_embedding), id(model.end_embedding)}
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(model.parameters()))
    optimizer = torch.optim.AdamW(groups)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-6, pytest.approx(1e-4)]


def test_unsupported_family_is_rejected():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="unsupported model family 'gpt2'.*llama, mistral, qwen2, qwen3, gemma3_text, phi3, olmo2"):
        QuietStarModel(gpt2, tiny_tokenizer())


def test_tokenizer_model_mismatch_is_rejected():
    with pytest.raises(ValueError, match="tokenizer/model mismatch"):
        QuietStarModel(tiny_lm("llama", vocab_size=10), tiny_tokenizer())


def test_marker_text_that_tokenizes_to_nothing_is_rejected():
    def empty_tokenizer(text, add_special_tokens):
        return {"input_ids": []}

    with pytest.raises(ValueError, match="QuietStarConfig.marker_init_text: '@@' tokenizes to no tokens"):
        ThoughtEmbeddings.from_text(tiny_lm("llama").get_input_embeddings(), empty_tokenizer, "@@")


def test_markers_start_at_their_own_texts():
    """``<sot>`` at the mean embedding of ``marker_init_text``, ``<eot>`` at that of ``end_marker_init_text``."""
    lm, tokenizer = tiny_lm("llama"), tiny_tokenizer()
    rows = lm.get_input_embeddings().weight.detach()
    both = QuietStarModel(lm, tokenizer, QuietStarConfig(marker_init_text="the sum"))
    torch.testing.assert_close(both.start_embedding.detach(), rows[[WORDS.index("the"), WORDS.index("sum")]].mean(0))
    torch.testing.assert_close(both.end_embedding.detach(), both.start_embedding.detach())
    apart = QuietStarModel(tiny_lm("llama"), tokenizer, QuietStarConfig(marker_init_text="x", end_marker_init_text="y"))
    torch.testing.assert_close(apart.start_embedding.detach(), rows[WORDS.index("x")])
    torch.testing.assert_close(apart.end_embedding.detach(), rows[WORDS.index("y")])


def test_bad_inputs_are_rejected(model):
    ids, mask = padded_batch()
    left = mask.flip(dims=[1])
    with pytest.raises(ValueError, match="right padded"):
        model(ids, left)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="row 1 of attention_mask has no tokens"):
        model(ids, empty)
    with pytest.raises(ValueError, match=r"thoughts must have shape"):
        model(ids, mask, thoughts=torch.zeros(2, 8, 2, 5, dtype=torch.long))


@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
def test_sliding_window_overflow_is_rejected(family):
    """Mistral slides in every layer; Gemma 3 in its local layers only (its tiny config: one local, one global)."""
    model = QuietStarModel(tiny_lm(family, sliding_window=12), tiny_tokenizer(), QuietStarConfig(thought_len=3, n_true=2))
    ids, mask = padded_batch()  # 8 + 3 + 2 = 13 positions of reach
    with pytest.raises(ValueError, match=r"= 13 reaches the model's sliding window \(12\)"):
        model(ids, mask)
    model(ids[:, :6], mask[:, :6])  # 11 < 12: every layer sees the whole text


def test_a_window_no_layer_uses_is_no_limit():
    """Qwen3 (and Qwen2) carry ``sliding_window`` even when every layer is global."""
    model = QuietStarModel(tiny_lm("qwen3", sliding_window=4, use_sliding_window=False), tiny_tokenizer(), QuietStarConfig())
    assert set(model.lm.config.layer_types) == {"full_attention"} and sliding_window(model.lm.config) is None
    model(*padded_batch())


def test_soft_capping_is_refused_in_one_line():
    with pytest.raises(ValueError, match="soft-caps its logits"):
        QuietStarModel(tiny_lm("gemma3_text", final_logit_softcapping=30.0), tiny_tokenizer())
    with pytest.raises(ValueError, match="soft-caps its attention scores"):
        QuietStarModel(tiny_lm("gemma3_text", attn_logit_softcapping=50.0), tiny_tokenizer())


def test_markers_start_from_the_embeddings_the_model_sees():
    """Gemma 3 multiplies its embedding rows by sqrt(hidden) in the embedding's forward; the markers start at that scale."""
    model = QuietStarModel(tiny_lm("gemma3_text"), tiny_tokenizer(), QuietStarConfig())
    embedding = model.lm.get_input_embeddings()
    seen = embedding(torch.tensor([WORDS.index("---")]))[0]
    assert float(embedding.embed_scale) == pytest.approx(32**0.5)
    torch.testing.assert_close(model.start_embedding.data, seen)

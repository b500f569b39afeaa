"""Token-parallel thoughts against an independent one-position-at-a-time computation with the plain HF model."""

import pytest
import torch
from helpers import (
    assert_step_matches_oracle,
    independent_greedy_thought,
    independent_thought_pass,
    NEW_FAMILIES,
    move_off_init,
    padded_batch,
    tiny_lm,
    tiny_tokenizer,
)

from quietstar import QuietStarConfig, QuietStarModel

ATOL = 2e-5


def make_model(family, attn="sdpa", **config):
    torch.manual_seed(1)
    return move_off_init(QuietStarModel(tiny_lm(family, attn=attn), tiny_tokenizer(), QuietStarConfig(**config)))


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("mistral", "sdpa"), ("qwen2", "sdpa"), ("llama", "eager"),
                                         *[(family, "sdpa") for family in NEW_FAMILIES]])
def test_greedy_parallel_thoughts_match_one_position_at_a_time(family, attn):
    model = make_model(family, attn, thought_len=4, n_thoughts=2)
    ids, mask = padded_batch(lengths=(8, 5, 6))
    thoughts = model.sample_thoughts(ids, mask, greedy=True)
    assert thoughts.shape == (3, 8, 2, 4) and thoughts.dtype == torch.long
    with torch.no_grad():
        for b in range(ids.shape[0]):
            for t in range(int(mask[b].sum())):
                expected = independent_greedy_thought(model.lm, model.start_embedding, ids[b, : t + 1], 4)
                for r in range(2):
                    assert thoughts[b, t, r].tolist() == expected, (b, t, r)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", *NEW_FAMILIES])
@pytest.mark.parametrize("thought_len,n_true", [(3, 2), (1, 4)])
def test_post_thought_logits_and_policy_logprobs_match(family, thought_len, n_true):
    model = make_model(family, thought_len=thought_len, n_true=n_true, n_thoughts=2, policy_temperature=1.7)
    ids, mask = padded_batch(seed=3, lengths=(7, 4))
    thoughts = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(0))
    lm_head = model.lm.get_output_embeddings()
    with torch.no_grad():
        _, rollout = model.rollout(ids, mask, thoughts=thoughts)
        assert torch.equal(rollout.thoughts, thoughts)
        parallel_logits = lm_head(rollout.post_hidden)  # [B, L, R, K, V]
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            for t in range(n - 1):
                k = min(n_true, n - 1 - t)
                for r in range(2):
                    post, policy_hidden = independent_thought_pass(model, ids[b, :n], t, thoughts[b, t, r], k)
                    torch.testing.assert_close(parallel_logits[b, t, r, :k], lm_head(post), atol=ATOL, rtol=0)
                    policy = torch.log_softmax(lm_head(policy_hidden) / 1.7, dim=-1)
                    expected = policy[torch.arange(thought_len), thoughts[b, t, r]]
                    torch.testing.assert_close(rollout.thought_logprobs[b, t, r], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "family,positive_only,reduction",
    [("llama", True, "token"), ("qwen2", False, "token"), ("llama", True, "reference"), ("qwen2", False, "reference")],
)
def test_losses_and_gradients_match_independent_computation(family, positive_only, reduction):
    config = dict(thought_len=2, n_true=3, n_thoughts=3, base_loss_weight=0.5, talk_loss_weight=1.0, policy_loss_weight=1.0,
                  positive_rewards_only=positive_only, policy_temperature=2.0, loss_reduction=reduction)
    model = make_model(family, **config)
    with torch.no_grad():  # a trained-looking head, so thoughts matter and rewards are non-zero
        model.mixing_head.mlp[-1].weight.normal_(0, 0.5)
    ids, mask = padded_batch(seed=5, lengths=(6, 4))
    thoughts = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(1))

    out = assert_step_matches_oracle(model, ids, mask, thoughts, atol=ATOL)
    assert out.policy_loss.abs() > 1e-4  # the comparison is not vacuous
    assert all(p.grad is not None for p in model.parameters())  # every parameter was compared

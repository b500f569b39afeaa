"""The reference code's objective, built by hand in the reference's own layout, and its preset (launch/configs/paper.yaml)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import move_off_init, padded_batch, step_with_grads, tiny_lm, tiny_tokenizer
from torch import nn

from quietstar import QuietStarConfig, QuietStarModel
from quietstar.core.cli_config import load_yaml
from quietstar.training.pretrain import CONFIGS
from quietstar.training.train_config import check_yaml_keys

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = dict(base_loss_weight=0.5, talk_loss_weight=0.5, policy_loss_weight=1e6, policy_temperature=3.0,
                 loss_reduction="reference", mixing_head_layers=2, mixing_head_width=None)  # launch/configs/paper.yaml


def reference_loss(model, ids, mask, thoughts):
    """``0.5 * base + 0.5 * (1/K) sum_j talk_j + 1e6 * policy`` as the reference code reduces it.

    Built from our rollout's tensors, in the reference's layout: rows are the B * R
    (example, pass) pairs, each loss is an unreduced [rows, L - shift] cross-entropy
    with padding ignored and averaged by ``loss_mean`` (sum over non-zero entries), the
    reward is summed over the K talk targets and centred over the passes, and the
    policy term is ``-r+ * log p(z_i)`` at temperature 3 over every row and the first
    L - 1 - K positions, averaged per thought token, then over the M tokens.
    """
    cfg = model.config
    B, L = ids.shape
    R, M, K = cfg.n_thoughts, cfg.thought_len, cfg.n_true
    lm_head = model.lm.get_output_embeddings()
    base_hidden, rollout = model.rollout(ids, mask, thoughts=thoughts)
    rows = B * R
    labels = ids.masked_fill(mask == 0, -100).repeat_interleave(R, dim=0)  # [rows, L]

    def loss_mean(x):
        return x.sum() / (x != 0).sum()

    def unreduced(hidden_rows, shift):  # hidden [rows, L, H] predicting labels[:, t + shift]
        logits = lm_head(hidden_rows)[:, : L - shift]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, shift:].reshape(-1), reduction="none").view(rows, -1)

    base_rows = base_hidden.repeat_interleave(R, dim=0)
    base_loss = unreduced(base_rows, 1)
    talk_losses = []
    for j in range(K):  # target x_{t+1+j}: base hidden at t+j, post-thought hidden (t, r, j)
        h_base = F.pad(base_hidden[:, j:], (0, 0, 0, j)).repeat_interleave(R, dim=0)  # [rows, L, H]
        h_post = rollout.post_hidden[:, :, :, j].transpose(1, 2).reshape(rows, L, -1)
        w = model.mixing_head.mlp(torch.cat([h_base, h_post], dim=-1))
        talk_losses.append(unreduced(h_base * (1 - w) + h_post * w, j + 1))
    reward = sum((base_loss.detach()[:, j:] - talk_losses[j].detach())[:, : L - 1 - K] for j in range(K))  # [rows, L-1-K]
    reward = reward.view(B, R, -1)
    reward = (reward - reward.mean(dim=1, keepdim=True)).view(rows, -1).clamp(min=0)
    logp = rollout.thought_logprobs.transpose(1, 2).reshape(rows, L, M)  # at policy_temperature, [rows, L, M]
    policy = sum((-reward * logp[:, : L - 1 - K, i]).mean() for i in range(M)) / M
    talk = sum(loss_mean(x) for x in talk_losses) / K
    return 0.5 * loss_mean(base_loss) + 0.5 * talk + 1e6 * policy, policy


def test_defaults_are_the_token_objective_chosen_by_the_comparison():
    cfg = QuietStarConfig()
    assert (cfg.base_loss_weight, cfg.talk_loss_weight, cfg.policy_loss_weight) == (0.0, 1.0, 1.0)
    assert (cfg.sample_temperature, cfg.policy_temperature, cfg.loss_reduction) == (1.0, 1.0, "token")
    assert (cfg.mixing_head_layers, cfg.mixing_head_width) == (1, 256)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reference_setting_matches_the_hand_built_reference_loss(family):
    torch.manual_seed(1)
    model = move_off_init(QuietStarModel(tiny_lm(family), tiny_tokenizer(), QuietStarConfig(thought_len=3, n_true=2, **REFERENCE)))
    with torch.no_grad():  # a trained-looking head, so rewards are non-zero
        model.mixing_head.mlp[-1].weight.normal_(0, 0.5)
    ids, mask = padded_batch(seed=5, lengths=(9, 6))
    thoughts = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(1))

    out, grads = step_with_grads(model, ids, mask, thoughts)
    expected, policy = reference_loss(model, ids, mask, thoughts)
    expected.backward()

    assert policy.abs() > 1e-5  # not vacuous
    torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.policy_loss, policy.detach(), rtol=1e-5, atol=0)
    for name, p in model.named_parameters():  # the 1e6 policy weight makes these large: compare relative to the norm
        assert (grads[name] - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-6, name


def test_token_and_reference_reductions_weigh_the_same_terms_differently():
    torch.manual_seed(1)
    settings = dict(thought_len=2, n_true=2, base_loss_weight=0.0, talk_loss_weight=1.0, policy_loss_weight=1.0, policy_temperature=1.0)
    model = move_off_init(QuietStarModel(tiny_lm(), tiny_tokenizer(), QuietStarConfig(**settings, loss_reduction="token")))
    with torch.no_grad():
        model.mixing_head.mlp[-1].weight.normal_(0, 0.5)
    ids = padded_batch(seed=2, lengths=(8, 8))[0]
    thoughts = model.sample_thoughts(ids, generator=torch.Generator().manual_seed(0))
    token = model(ids, thoughts=thoughts)
    model.config = QuietStarConfig(**settings, loss_reduction="reference")
    reference = model(ids, thoughts=thoughts)
    # Token: one mean over all (t, r, j); reference: a mean per j (target j has L - j positions), then over j.
    lp, valid = token.talk_logprobs, token.target_mask[:, :, None, :].expand_as(token.talk_logprobs)
    torch.testing.assert_close(token.talk_nll, -lp[valid].mean(), rtol=1e-6, atol=0)
    per_j = torch.stack([-lp[..., j][valid[..., j]].mean() for j in range(2)])
    torch.testing.assert_close(reference.talk_nll, per_j.mean(), rtol=1e-6, atol=0)
    # Token: -r+ * sum_i log p(z_i) over all positions; reference: per-token mean over the first L-1-K positions.
    L, K = 8, 2
    used = token.rewards.clamp(min=0)[:, : L - 1 - K]
    _, rollout = model.rollout(ids, thoughts=thoughts)
    expected = -(used[..., None] * rollout.thought_logprobs[:, : L - 1 - K]).mean()
    torch.testing.assert_close(reference.policy_loss, expected.detach(), rtol=1e-5, atol=0)
    all_positions = -(token.rewards.clamp(min=0)[:, : L - 1] * rollout.thought_logprobs[:, : L - 1].sum(dim=-1)).mean()
    torch.testing.assert_close(token.policy_loss, all_positions.detach(), rtol=1e-5, atol=0)
    assert not torch.isclose(reference.policy_loss, token.policy_loss)


def test_reference_policy_on_a_sequence_too_short_for_it_is_zero():
    torch.manual_seed(0)
    model = QuietStarModel(tiny_lm(), tiny_tokenizer(), QuietStarConfig(thought_len=2, n_true=4, **REFERENCE))
    out = model(padded_batch(lengths=(5, 5))[0])
    assert out.policy_loss == 0 and torch.isfinite(out.loss)
    out.loss.backward()


def test_mixing_head_has_the_reference_shape():
    torch.manual_seed(0)
    lm = tiny_lm()
    hidden = lm.config.hidden_size
    mlp = QuietStarModel(lm, tiny_tokenizer(), QuietStarConfig(**REFERENCE)).mixing_head.mlp
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2 * hidden, hidden), (hidden, hidden), (hidden, 1)]
    assert [m.bias is not None for m in linears] == [True, True, False]
    assert sum(isinstance(m, nn.ReLU) for m in mlp) == 2
    assert torch.count_nonzero(linears[-1].weight) == 0

    small = QuietStarModel(tiny_lm(), tiny_tokenizer(), QuietStarConfig(mixing_head_layers=1, mixing_head_width=8)).mixing_head.mlp
    assert [(m.in_features, m.out_features) for m in small if isinstance(m, nn.Linear)] == [(2 * hidden, 8), (8, 1)]


def test_paper_config_reproduces_the_reference_settings():
    values = load_yaml(ROOT / "launch/configs/paper.yaml")
    check_yaml_keys(values, CONFIGS)
    fields = {f for f in QuietStarConfig.__dataclass_fields__}
    cfg = QuietStarConfig(**{k: v for k, v in values.items() if k in fields})
    assert (cfg.thought_len, cfg.n_true, cfg.n_thoughts) == (9, 4, 2)  # n_ahead 12, n_ahead_talk 4, n_passes 2
    assert all(getattr(cfg, name) == value for name, value in REFERENCE.items())
    assert cfg.sample_temperature == 1.0
    assert (values["lr"], values["weight_decay"], values["warmup_steps"], values["grad_clip"]) == (1e-6, 0.001, 20, 1.0)
    assert values["seq_len"] == 256

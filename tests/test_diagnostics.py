"""Gradient diagnostics: the LM and policy parts of the loss, measured apart without touching .grad."""

import math

import pytest

import torch
from helpers import move_off_init, padded_batch, tiny_lm, tiny_tokenizer

from quietstar import QuietStarConfig, QuietStarModel
from quietstar.quiet_star.diagnostics import gradient_norms


def norm_of_backward(model, loss) -> float:
    model.zero_grad()
    loss.backward(retain_graph=True)
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))


def test_gradient_norms_equal_separate_backward_passes_and_leave_grads_alone():
    torch.manual_seed(0)
    reference = dict(base_loss_weight=0.5, talk_loss_weight=0.5, policy_loss_weight=1e6, policy_temperature=3.0, loss_reduction="reference")
    model = move_off_init(QuietStarModel(tiny_lm(), tiny_tokenizer(), QuietStarConfig(thought_len=2, n_true=2, **reference)))
    with torch.no_grad():
        model.mixing_head.mlp[-1].weight.normal_(0, 0.5)
    ids, mask = padded_batch(lengths=(8, 6))
    norms = gradient_norms(model, ids, mask, generator=torch.Generator().manual_seed(4))
    assert all(p.grad is None for p in model.parameters())

    out = model(ids, mask, generator=torch.Generator().manual_seed(4))  # the same thoughts
    lm, policy = norm_of_backward(model, out.lm_loss), norm_of_backward(model, out.policy_term)
    assert norms["grad_norm_lm"] == pytest.approx(lm, rel=1e-5)
    assert norms["grad_norm_policy"] == pytest.approx(policy, rel=1e-5)
    assert norms["grad_ratio"] == pytest.approx(policy / lm)
    assert policy > lm  # the reference's 1e6 policy weight makes REINFORCE dominate


def test_at_initialisation_the_policy_gradient_is_zero():
    torch.manual_seed(0)
    model = QuietStarModel(tiny_lm(), tiny_tokenizer(), QuietStarConfig(thought_len=2, n_true=2))
    norms = gradient_norms(model, *padded_batch(lengths=(8, 6)), generator=torch.Generator().manual_seed(0))
    assert norms["grad_norm_lm"] > 0 and norms["grad_norm_policy"] == 0.0 and norms["grad_ratio"] == 0.0

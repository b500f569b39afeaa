"""Gradient diagnostics: how hard each part of the Quiet-STaR objective pulls on the weights.

The objective is ``lm_loss + policy_term`` (``QuietStarOutput``): the weighted base
and talk NLLs, and the weighted REINFORCE loss. If the policy term's gradient is
tiny beside the LM terms', the thoughts barely learn; the reference code scales
the policy by 1e6 for that reason. ``gradient_norms`` measures both gradients on
the same batch and the same sampled thoughts, without touching ``.grad`` (it
uses ``torch.autograd.grad``), so it can run inside a training step.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _norm(grads: tuple[torch.Tensor | None, ...]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))


def gradient_norms(
    model: nn.Module, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, generator: torch.Generator | None = None
) -> dict[str, float]:
    """L2 norms over all trainable parameters of the gradients of the two parts of the loss.

    Args:
        model: a ``QuietStarModel`` (not a DeepSpeed engine: its parameters must be whole,
            i.e. ZeRO stage 0-2).
        input_ids, attention_mask: one right-padded batch [B, L].
        generator: RNG of the thought sampler.
    Returns:
        ``grad_norm_lm`` (base and talk NLL terms), ``grad_norm_policy`` (the REINFORCE
        term, weight included) and ``grad_ratio`` = policy / LM (inf when the LM norm is 0).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(input_ids, attention_mask, generator=generator)
    lm = _norm(torch.autograd.grad(out.lm_loss, params, retain_graph=True, allow_unused=True))
    policy = _norm(torch.autograd.grad(out.policy_term, params, allow_unused=True))
    return {"grad_norm_lm": lm, "grad_norm_policy": policy, "grad_ratio": policy / lm if lm > 0 else math.inf}

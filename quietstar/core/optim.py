"""Optimizer parameter groups: a method's learned markers apart from the rest of the model."""

from __future__ import annotations

from quietstar.core.latent_model import LatentReasoningModel


def build_param_groups(model: LatentReasoningModel, lr: float, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups for a ``LatentReasoningModel``.

    - ``model``: the base LM and the method's other modules, at ``lr`` with ``weight_decay``;
    - ``markers``: the learned marker embeddings (``model.marker_parameters()``: Quiet-STaR's
      <sot>/<eot>, Coconut's <bot>/<eot>/<pause>) at ``lr * model.marker_lr_multiplier``
      with no weight decay (decay would pull them towards zero, away from the tokens they start as).

    LR schedulers scale every group by the same factor, so the ratio holds throughout.
    Frozen parameters (``requires_grad=False``) are left out.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    markers = [p for p in model.marker_parameters() if p.requires_grad]
    marker_ids = {id(p) for p in markers}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in marker_ids]
    return [
        {"name": "model", "params": rest, "lr": lr, "weight_decay": weight_decay},
        {"name": "markers", "params": markers, "lr": lr * model.marker_lr_multiplier, "weight_decay": 0.0},
    ]

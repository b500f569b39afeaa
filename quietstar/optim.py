"""Optimizer parameter groups: the thought embeddings learn faster than the rest."""

from __future__ import annotations

from torch import nn


def build_param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups for a QuietStarModel.

    - ``model``: the base LM and the mixing head, at ``lr`` with ``weight_decay``;
    - ``thought_embeddings``: ``<sot>``/``<eot>`` at ``lr * config.thought_lr_multiplier``
      with no weight decay (decay would also be multiplied).

    LR schedulers scale every group by the same factor, so the ratio holds throughout.
    Frozen parameters (``requires_grad=False``) are left out.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    thought = [p for p in model.thought_embeddings.parameters() if p.requires_grad]
    thought_ids = {id(p) for p in thought}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in thought_ids]
    return [
        {"name": "model", "params": rest, "lr": lr, "weight_decay": weight_decay},
        {"name": "thought_embeddings", "params": thought, "lr": lr * model.config.thought_lr_multiplier, "weight_decay": 0.0},
    ]

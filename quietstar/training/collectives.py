"""The two small collectives the recipes use to keep every rank deciding alike."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_ranks_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a list of numbers over ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_ranks_ok(ok: bool, device: torch.device) -> bool:
    """True when ``ok`` holds on every rank (a collective call: every rank gets the same answer)."""
    failed = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    return failed.item() == 0.0

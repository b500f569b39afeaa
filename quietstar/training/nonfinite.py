"""The non-finite guard: a step whose loss or gradient norm is NaN/inf changes no weight, and a run that keeps
producing them stops instead of training on silently.

DeepSpeed's ZeRO optimizers (stages 1-3) compute the global gradient norm before each update and
skip the update, on every rank alike, when it is not finite: the weights, the AdamW moments and
the LR schedule stay as they were (``engine.skipped_steps`` counts these). A non-finite loss term
gives non-finite gradients, so it is skipped the same way. The guard, called once per optimizer
step with the step's terms averaged over ranks (the same numbers on every rank), names what went
bad, checks that the update was indeed skipped, and ends the run after ``max_bad_steps`` bad steps
in a row. Before a checkpoint is written, ``weights_finite`` checks every rank's share of the
weights, so no NaN or inf ever reaches a checkpoint or ``final/``.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

from quietstar.core.cli_config import RunError
from quietstar.training.collectives import all_ranks_ok


class NonFiniteGuard:
    """Counts consecutive bad optimizer steps of one run.

    Args:
        max_bad_steps: the run stops (``RunError``, exit code 2) at this many bad steps in a row.
        last_good: a callable giving the last complete checkpoint's description, for the message.
    """

    def __init__(self, max_bad_steps: int, last_good) -> None:
        self.max_bad_steps, self.last_good = max_bad_steps, last_good
        self.in_a_row, self.bad = 0, []

    def check(self, step: int, terms: dict[str, float], grad_norm: float | None, skipped: bool) -> bool:
        """Whether optimizer step ``step`` was good. ``terms`` are its loss terms (averaged over ranks),
        ``grad_norm`` DeepSpeed's global gradient norm (None when not computed), ``skipped`` whether
        DeepSpeed skipped its update. A bad step is reported on stderr (rank 0) and must have been skipped."""
        bad = [name for name, value in terms.items() if not math.isfinite(value)]
        if grad_norm is not None and not math.isfinite(grad_norm):
            bad.append("grad norm")
        if not bad:
            self.in_a_row = 0
            return True
        if not skipped:
            raise RunError(f"step {step}: {', '.join(bad)} not finite and the update was applied (ZeRO stage 0 does not "
                           f"skip it); nothing was saved after it, the last good checkpoint is {self.last_good()}; "
                           "use a ZeRO stage 1-3 config")
        self.in_a_row, self.bad = self.in_a_row + 1, bad
        if dist.get_rank() == 0 and self.in_a_row < self.max_bad_steps:
            tqdm.write(f"step {step}: {', '.join(bad)} not finite; the update was skipped ({self.in_a_row} bad step(s) in a row, "
                       f"the run stops at {self.max_bad_steps})", file=sys.stderr)
        return False

    def stop_if_exhausted(self, step: int) -> None:
        """End the run (``RunError``) once ``max_bad_steps`` bad steps came in a row; call it after logging the step."""
        if self.in_a_row >= self.max_bad_steps:
            raise RunError(f"step {step}: {self.in_a_row} optimizer steps in a row had a non-finite {', '.join(self.bad)}; "
                           f"stopped without saving; the last good checkpoint is {self.last_good()} (lower --lr, "
                           "or resume from it with --resume)")


def weights_finite(module: torch.nn.Module, device: torch.device) -> bool:
    """True when every weight of ``module`` is finite on every rank (a collective call).

    Under ZeRO-3 each rank checks its own partition (``ds_tensor``); otherwise its whole copy.
    """
    ok = all(bool(torch.isfinite(getattr(p, "ds_tensor", p).detach()).all()) for p in module.parameters())
    return all_ranks_ok(ok, device)

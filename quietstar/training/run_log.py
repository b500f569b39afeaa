"""The training run's logs: ``metrics.jsonl`` (one JSON object per optimizer step) and TensorBoard events.

Only rank 0 writes. On resume from step k, records after k (written by the run
that was interrupted after its last checkpoint) are dropped from ``metrics.jsonl``
and TensorBoard purges its events after k, so each step appears once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

METRICS = "metrics.jsonl"


class RunLog:
    """Append-only step log under ``output_dir``; ``resume_step`` > 0 truncates what came after it."""

    def __init__(self, output_dir: Path, resume_step: int = 0) -> None:
        self.path = output_dir / METRICS
        if resume_step and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif not resume_step:
            self.path.write_text("")
        self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def step(self, record: dict[str, Any]) -> None:
        """Write one step's record: every numeric field also becomes a TensorBoard scalar under ``train/``."""
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                group = "heldout" if name.startswith("heldout_") else "train"
                self.writer.add_scalar(f"{group}/{name.removeprefix('heldout_')}", value, record["step"])

    def heldout(self, step: int, values: dict[str, float]) -> None:
        """Held-out NLLs measured at ``step`` (0: before training) as TensorBoard scalars."""
        for name, value in values.items():
            self.writer.add_scalar(f"heldout/{name}", value, step)

    def close(self) -> None:
        self.writer.close()


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``<output_dir>/metrics.jsonl``."""
    path = Path(output_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""Training checkpoints: DeepSpeed state plus each rank's data position and RNG, written first, then switched to.

Layout under ``<output-dir>/checkpoints``:

    step-000050/                  one checkpoint (DeepSpeed's model, optimizer and scheduler files)
        rank00000_state.pt        rank 0's data-stream position and RNG states (one file per rank)
    latest                        the tag of the newest complete checkpoint, e.g. ``step-000050``

A checkpoint is written under ``step-N.partial`` and renamed once every rank has
finished; ``latest`` is then replaced atomically. A save killed midway therefore
leaves ``latest`` on the previous good checkpoint. The directory must be on a file
system that every rank sees.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

LATEST = "latest"
BEST = "best"  # a recipe that validates (Coconut) points this at its best checkpoint; pruning keeps it


def tag(step: int) -> str:
    return f"step-{step:06d}"


def _rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank{rank:05d}_state.pt"


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG the step draws from: the recipe's own generator (Quiet-STaR's thought sampler), torch's and Python's global ones."""
    state = {"generator": generator.get_state() if generator is not None else None, "torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    if generator is not None:
        generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_tag(root: Path, pointer_name: str = LATEST) -> str | None:
    """The tag ``latest`` (or another pointer, e.g. ``best``) points to, or None when there is no complete checkpoint."""
    pointer = root / pointer_name
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    return name if (root / name).is_dir() else None


def save(engine, root: Path, step: int, rank_state: dict[str, Any], keep: int) -> Path:
    """Save a checkpoint of ``step`` on every rank (a collective call) and return its directory."""
    final = root / tag(step)
    partial = root / f"{tag(step)}.partial"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left over by a save that was killed
    dist.barrier()
    engine.save_checkpoint(str(root), tag=partial.name, client_state={"step": step}, save_latest=False)
    torch.save(rank_state, _rank_file(partial, rank))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        pointer = root / f"{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
        _prune(root, keep)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (0 keeps all)."""
    if keep == 0:
        return
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".partial"))
    best = latest_tag(root, BEST)
    for old in done[:-keep]:
        if old.name != best:
            shutil.rmtree(old)


def mark_best(root: Path, name: str) -> None:
    """Point ``best`` at checkpoint ``name`` (rank 0 only; atomic like ``latest``)."""
    pointer = root / f"{BEST}.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / BEST)


def load(engine, root: Path) -> tuple[int, dict[str, Any]]:
    """Load the checkpoint ``latest`` points to: (its step, this rank's saved data and RNG state)."""
    name = latest_tag(root)
    if name is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {root} (no '{LATEST}' pointer)")
    rank_path = _rank_file(root / name, dist.get_rank())
    if not rank_path.is_file():
        raise FileNotFoundError(f"--resume: {rank_path} is missing; was the checkpoint written with a different number of ranks?")
    loaded, client = engine.load_checkpoint(str(root), tag=name, load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise FileNotFoundError(f"--resume: DeepSpeed could not load {root / name}")
    return int(client["step"]), torch.load(rank_path, weights_only=False)


def consolidated_state_dict(root: Path, name: str) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint, gathered from the ZeRO shards of every rank (any stage)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=name)

"""Training checkpoints: DeepSpeed state plus each rank's data position and RNG, written first, then switched to.

Layout under ``<output-dir>/checkpoints``:

    step-000050/                  one checkpoint (DeepSpeed's model, optimizer and scheduler files)
        rank00000_state.pt        rank 0's data-stream position and RNG states (one file per rank)
        complete.json             written last: every file of the checkpoint with its size and CRC-32
    latest                        the tag of the newest complete checkpoint, e.g. ``step-000050``

A checkpoint is written under ``step-N.partial`` and renamed once every rank has
finished; ``latest`` is then replaced atomically. A save killed midway therefore
leaves ``latest`` on the previous good checkpoint, and a save that fails (disk full,
permission denied) ends the run with one line naming that checkpoint, touching nothing
already saved.

On resume a checkpoint counts only if every file its ``complete.json`` lists is there
at its size and, read back, has its CRC-32 (``checksums``: taken beside the save). An empty or garbage ``latest``, or a newest checkpoint with a missing, truncated or
corrupted file, falls back to the newest good one, with a warning. ``quietstar
verify-checkpoint DIR`` checks checkpoints the same way without loading them. The directory
must be on a file system that every rank sees.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from quietstar.core.cli_config import RunError, one_line
from quietstar.training.checksums import checksummed_saves, file_digest
from quietstar.training.collectives import all_ranks_ok
from quietstar.training.nonfinite import weights_finite

LATEST = "latest"
MANIFEST = "complete.json"
TAG = re.compile(r"step-(\d{6,})")
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
    """The tag ``latest`` (or another pointer, e.g. ``best``) points to, or None when there is no checkpoint to use.

    When ``latest`` is missing, empty, garbage or names a checkpoint that is not complete, this is the
    newest complete checkpoint instead (``resume_tag`` says so); for another pointer, None.
    """
    name = _pointed(root / pointer_name)
    if TAG.fullmatch(name) and complete(root / name):
        return name
    found = complete_tags(root) if pointer_name == LATEST else []
    return found[-1] if found else None


def _pointed(pointer: Path) -> str:
    return pointer.read_text(errors="replace").strip() if pointer.is_file() else ""


def any_saved(root: Path) -> bool:
    """True when ``root`` holds a ``latest`` pointer or any checkpoint, complete or not (a run not to overwrite)."""
    return (root / LATEST).exists() or any(TAG.fullmatch(p.name) for p in root.glob("step-*"))


def last_good(root: Path) -> str:
    """The newest complete checkpoint's directory, for messages ("none" when there is none)."""
    name = latest_tag(root)
    return str(root / name) if name else "none (no checkpoint was completed)"


def complete_tags(root: Path) -> list[str]:
    """The tags of the complete checkpoints under ``root``, oldest first."""
    tags = [p.name for p in root.glob("step-*") if TAG.fullmatch(p.name) and p.is_dir()] if root.is_dir() else []
    return sorted(name for name in tags if complete(root / name))


def complete(directory: Path) -> bool:
    """True when ``directory`` is a whole checkpoint: every file its manifest lists is there at its size."""
    return problem(directory) is None


def problem(directory: Path, checksums: bool = False) -> str | None:
    """What is wrong with checkpoint ``directory`` (a missing manifest or file, a truncated file, and with
    ``checksums`` a file whose CRC-32 is not the one recorded when it was written), or None."""
    manifest = directory / MANIFEST
    try:
        recorded = json.loads(manifest.read_text())
        files, digests = recorded["files"], recorded.get("crc32", {}) if checksums else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{manifest} is missing or unreadable"
    if not isinstance(files, dict) or not isinstance(digests, dict):
        return f"{manifest} is missing or unreadable"
    for name, size in files.items():
        path = directory / name
        try:
            actual = path.stat().st_size if path.is_file() else None
        except FileNotFoundError:  # deleted (by hand) while this looked
            actual = None
        if actual is None:
            return f"{path} is missing"
        if actual != size:
            return f"{path} is truncated ({actual} of {size} bytes)"
    for name, digest in digests.items():
        if (directory / name).is_file() and file_digest(directory / name) != digest:
            return f"{directory / name} is corrupted (its CRC-32 is not the one recorded when it was written)"
    return None


def has_checksums(directory: Path) -> bool:
    """True when the checkpoint's manifest records checksums (manifests written before them hold sizes only)."""
    try:
        return bool(json.loads((directory / MANIFEST).read_text()).get("crc32"))
    except (OSError, ValueError, AttributeError):
        return False


def warn(message: str) -> None:
    """A warning on stderr, once (rank 0)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        tqdm.write(message, file=sys.stderr)


def _write_manifest(directory: Path, digests: dict[str, str] | None = None) -> None:
    """complete.json: each file's size, and its CRC-32 from ``digests`` (absolute path -> checksum, taken beside
    the save) or, for a file written otherwise, read from the disk."""
    paths = [p for p in sorted(directory.rglob("*")) if p.is_file()]
    files = {str(p.relative_to(directory)): p.stat().st_size for p in paths}
    crc32 = {str(p.relative_to(directory)): (digests or {}).get(str(p.resolve())) or file_digest(p) for p in paths}
    tmp = directory / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files, "crc32": crc32}, indent=1) + "\n")
    os.replace(tmp, directory / MANIFEST)


def save(engine, root: Path, step: int, rank_state: dict[str, Any], keep: int) -> Path:
    """Save a checkpoint of ``step`` on every rank (a collective call) and return its directory.

    Weights that are not finite are refused (``RunError``) and not written. If writing fails on any
    rank (``OSError``: disk full, permission denied), the partial directory is removed and
    ``RunError`` names the last good checkpoint; nothing else is touched.
    """
    if not weights_finite(engine.module, engine.device):
        raise RunError(f"step {step}: the weights are not finite, so they were not saved; the last good checkpoint is {last_good(root)}")
    final = root / tag(step)
    partial = root / f"{tag(step)}.partial"
    rank = dist.get_rank()
    good = last_good(root)
    error = None
    try:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # left over by a save that was killed
            root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        error = e
    digests: dict[str, str] = {}  # this rank's files, absolute path -> CRC-32, taken beside the save
    if all_ranks_ok(error is None, engine.device):
        try:
            with checksummed_saves(engine, digests) as checksum:
                engine.save_checkpoint(str(root), tag=partial.name, client_state={"step": step}, save_latest=False)
                torch.save(rank_state, _rank_file(partial, rank))
                checksum(_rank_file(partial, rank))
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            error = e
    saved_everywhere = all_ranks_ok(error is None, engine.device)
    if saved_everywhere:
        every_rank: list[dict[str, str]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(every_rank, digests)
    if saved_everywhere and rank == 0:
        try:
            _write_manifest(partial, {path: digest for ranks in every_rank for path, digest in ranks.items()})
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            pointer = root / f"{LATEST}.tmp"
            pointer.write_text(final.name + "\n")
            os.replace(pointer, root / LATEST)
        except OSError as e:
            error = e
    if not all_ranks_ok(error is None, engine.device):
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            (root / f"{LATEST}.tmp").unlink(missing_ok=True)
        reason = disk_full(root) or (one_line(error) if error else "it failed on another rank")
        raise RunError(f"saving the checkpoint of step {step} failed ({reason}); the last good checkpoint is {good}; "
                       "free space or fix the directory, then rerun with --resume")
    if rank == 0:
        _prune(root, keep)
    dist.barrier()
    return final


def disk_full(root: Path) -> str | None:
    """"the disk is full (...)" when ``root``'s file system has less room than a checkpoint takes, else None.
    (torch.save reports a full disk only as "unexpected pos ...".)"""
    sizes = [sum(f.stat().st_size for f in (root / name).rglob("*") if f.is_file()) for name in complete_tags(root)[-1:]]
    need, free = (sizes[0] if sizes else 1 << 20), shutil.disk_usage(root).free
    if free >= need:
        return None
    return f"the disk is full: {free / 1e6:.2f} MB free on the file system of {root}, a checkpoint takes {need / 1e6:.2f} MB"


def _prune(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (0 keeps all).

    Pruning never stops a run: a checkpoint someone deleted (or is deleting) by hand meanwhile is
    passed over, and one that cannot be deleted stays, with a warning.
    """
    if keep == 0:
        return
    best = latest_tag(root, BEST)
    for old in complete_tags(root)[:-keep]:
        if old != best:
            try:
                shutil.rmtree(root / old)
            except FileNotFoundError:  # someone else is deleting it: what is left goes too
                shutil.rmtree(root / old, ignore_errors=True)
            except OSError as error:
                warn(f"warning: could not delete the old checkpoint {root / old} ({one_line(error)}); it stays")


def mark_best(root: Path, name: str) -> None:
    """Point ``best`` at checkpoint ``name`` (rank 0 only; atomic like ``latest``)."""
    pointer = root / f"{BEST}.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / BEST)


def resume_tag(root: Path) -> str:
    """The checkpoint ``--resume`` continues from: ``latest`` if whole (every file there, at its size and checksum),
    else the newest whole one, with a warning for each one passed over; one line when there is none."""
    pointed = _pointed(root / LATEST)
    if not TAG.fullmatch(pointed):
        why = f"{root / LATEST} reads {pointed[:40]!r}, not a checkpoint's name"
    elif not (root / pointed).is_dir():
        why = f"{root / LATEST} names {pointed}, which does not exist"
    else:
        trouble = problem(root / pointed, checksums=True)
        why = None if trouble is None else f"checkpoint {pointed} is incomplete: {trouble}"
    if why is None:
        return pointed
    passed_over = []
    for name in reversed(complete_tags(root)):
        if name == pointed:
            continue
        trouble = problem(root / name, checksums=True)
        if trouble is not None:
            passed_over.append(f"{name} is incomplete: {trouble}")
            continue
        if (root / LATEST).exists():
            for line in passed_over:
                warn(f"warning: checkpoint {line}; passed over")
            warn(f"warning: {why}; resuming from {name}, the newest complete checkpoint")
        return name
    details = "; ".join(([why] if (root / LATEST).exists() else []) + passed_over)
    raise RunError(f"--resume: no complete checkpoint in {root}" + (f" ({details})" if details else ""))


def part_of_a_run(path: Path) -> tuple[str, Path] | None:
    """When ``path`` is a piece of a training run's output rather than a model: (what it is, the run's output
    directory); else None. For the message when one is given where a model is expected (``--model``)."""
    if (path / MANIFEST).is_file() or (TAG.fullmatch(path.name.removesuffix(".partial")) and path.parent.name == "checkpoints"):
        return "a training checkpoint (DeepSpeed's shards, not a model)", path.parent.parent
    if path.name == "checkpoints" and ((path / LATEST).exists() or any(TAG.fullmatch(p.name) for p in path.glob("step-*"))):
        return "a training run's checkpoints", path.parent
    if (path / "checkpoints").is_dir():
        return "a training run's output directory", path
    return None


def ranks_saved(directory: Path) -> int:
    """How many ranks wrote checkpoint ``directory`` (one state file each)."""
    return len(list(directory.glob("rank?????_state.pt")))


def saved_state(root: Path, name: str) -> dict[str, Any]:
    """This rank's saved state (data position, RNGs, the run's settings) in checkpoint ``name``."""
    rank_path = _rank_file(root / name, dist.get_rank())
    if not rank_path.is_file():
        raise RunError(f"--resume: {rank_path} is missing; was the checkpoint written with a different number of ranks?")
    return torch.load(rank_path, weights_only=False)


def load(engine, root: Path, name: str) -> int:
    """Load checkpoint ``name`` (weights, optimizer, LR schedule) into ``engine``; returns its step."""
    loaded, client = engine.load_checkpoint(str(root), tag=name, load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise RunError(f"--resume: DeepSpeed could not load {root / name}")
    return int(client["step"])


def consolidated_state_dict(root: Path, name: str) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint, gathered from the ZeRO shards of every rank (any stage)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=name)

"""``quietstar verify-checkpoint DIR``: check checkpoints without loading them.

DIR is one checkpoint (``.../checkpoints/step-000050``), a run's ``checkpoints`` directory, or a run's
output directory. Every checkpoint found is checked as ``--resume`` checks it (``checkpoints.problem``):
its manifest, every file there at its size, and every file read back with the CRC-32 recorded when it
was written. One line per checkpoint; the exit status is 0 when all are whole, 1 when any is not.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from quietstar.training import checkpoints


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="a checkpoint, a run's checkpoints directory, or a run's output directory")


def found(directory: Path) -> list[Path]:
    """The checkpoints ``directory`` is or holds, oldest first."""
    if (directory / checkpoints.MANIFEST).exists() or checkpoints.TAG.fullmatch(directory.name.removesuffix(".partial")):
        return [directory]
    root = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
    return sorted(p for p in root.glob("step-*") if p.is_dir())


def run(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    found_here = found(directory)
    if not found_here:
        raise ValueError(f"no checkpoint in {directory} (expected step-NNNNNN directories)")
    bad = 0
    for checkpoint in found_here:
        trouble = checkpoints.problem(checkpoint, checksums=True)
        if trouble is None and not checkpoints.has_checksums(checkpoint):
            print(f"{checkpoint}: ok (sizes only: its manifest predates checksums)")
        else:
            print(f"{checkpoint}: {'ok' if trouble is None else trouble}")
        bad += trouble is not None
    print(f"{len(found_here) - bad} of {len(found_here)} checkpoint(s) whole")
    return 1 if bad else 0

"""Evaluations that resume: each finished batch's items are kept beside the report while it runs.

An evaluation with a report file ``OUT`` (``coconut-eval`` and ``eval``: ``--output``; ``perplexity``:
``report.json`` in ``--output-dir``) writes ``OUT.partial.jsonl`` as it goes: a first line with the run's
settings, then one line per finished item (each batch appended, flushed and synced at once; every line
records the size of its batch). When the run ends, the report is written and the partial file removed. A
run that dies (killed, preempted, out of memory) leaves the file; the same command with ``--resume`` reads
the items back and continues after them, and its report is the one an uninterrupted run writes. A torn last
line (a kill during the write) is dropped, and so are the other lines of its batch: that batch is done again,
so the batches of the resumed run are those of an uninterrupted one. Resuming refuses, in one line, when the
settings differ (another model, data file, batch size, ...) or the items read back are not the first items
of the data; without ``--resume`` a run refuses to start over a partial file, so that nothing finished is
lost.

A batch that samples (thoughts, chains of thought) draws from ``batch_generator(seed, first)``, a generator
seeded from the run's seed and the position of the batch's first item alone: its draws do not depend on the
batches run before it in the same process, so the resumed run samples what the uninterrupted one sampled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial.jsonl")


def batch_generator(seed: int, first: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` for the batch whose first item is number ``first`` (0-based, in evaluation order).

    Seeded with 63 bits of SHA-256 of (seed, first): every batch of a run gets its own stream, and it is the
    same whichever batches ran before it (none, when a resumed run starts with it).
    """
    digest = hashlib.sha256(f"{seed} {first}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class ItemLog:
    """The finished items of one evaluation: read back with ``resume``, appended with ``add``, removed by ``close``.

    Args:
        output: the report's path; the log is ``<output>.partial.jsonl``.
        settings: what must match for a resume (JSON values).
        keys: the value of each item's ``key`` field, in evaluation order; the items read back must have the first ones.
        resume: continue from an existing log.
        key: the item field that identifies an item (``question``; the perplexity report's windows: their token ids).

    Attributes:
        items: the finished items, in evaluation order.
        seconds: their seconds (of generation or scoring: what ``add`` was given), summed.
        phases: the same per named phase, summed, when ``add`` was given phases (else empty).
    """

    def __init__(self, output: Path, settings: dict[str, Any], keys: list[Any], resume: bool, key: str = "question") -> None:
        self.path, self.key = partial_path(Path(output)), key
        self.settings = json.loads(json.dumps(settings))  # as they read back (a tuple as a list)
        self.items: list[dict] = []
        self.seconds = 0.0
        self.phases: dict[str, float] = {}
        if self.path.exists() and not resume and self._holds_items():
            raise ValueError(f"{self.path} holds the items of an unfinished evaluation; pass --resume to continue it, "
                             "or delete the file to start again")
        if self.path.exists() and resume:
            self._read(keys)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)  # a log of no items (a run that stopped before its first batch)
            self._append([{"settings": self.settings}])

    def _holds_items(self) -> bool:
        with self.path.open("rb") as f:
            return sum(1 for line in f if line.strip()) > 1

    def _read(self, keys: list[Any]) -> None:
        records, ends, offset = [], [], 0
        for line in self.path.read_bytes().split(b"\n")[:-1]:  # what follows the last newline is a line torn by a kill
            offset += len(line) + 1
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{self.path} is not a partial evaluation (a line is not JSON); "
                                 "delete it to start again") from None
            ends.append(offset)
        if not records or records[0].get("settings") is None:
            raise ValueError(f"{self.path} is not a partial evaluation (no settings line); delete it to start again")
        saved = records[0]["settings"]
        differ = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
        if differ:
            details = ", ".join(f"{k} (then {saved.get(k)!r}, now {self.settings.get(k)!r})" for k in differ)
            raise ValueError(f"--resume: {self.path} was written with other settings: {details}")
        # records[1:kept] are the items kept: whole batches, as a kill while a batch was written may have left only its
        # first lines (in a log written before batch sizes were recorded, each line stands alone)
        kept = 1
        while kept < len(records):
            size = records[kept].get("batch", 1)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"{self.path} is not a partial evaluation (a batch size is not a positive integer); "
                                 "delete it to start again")
            if kept + size > len(records):
                break
            kept += size
        items = [r["item"] for r in records[1:kept]]
        if [item[self.key] for item in items] != keys[: len(items)]:
            raise ValueError(f"--resume: the items in {self.path} are not the first items of the data "
                             "(was the data file changed?)")
        self.items = items
        for record in records[1:kept]:
            self.seconds += record["seconds"]
            for name, seconds in record.get("phases", {}).items():
                self.phases[name] = self.phases.get(name, 0.0) + seconds
        with self.path.open("r+b") as f:  # drop what follows the kept batches, so that the next batch starts on a line of its own
            f.truncate(ends[kept - 1])

    def _append(self, records: list[dict]) -> None:
        with self.path.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())

    def add(self, items: list[dict], seconds: float, phases: dict[str, float] | None = None) -> None:
        """Keep a finished batch: its items and its seconds, in all and per named phase (each split evenly over its items)."""
        share = {"seconds": seconds / len(items), "batch": len(items)}
        if phases:
            share["phases"] = {name: value / len(items) for name, value in phases.items()}
        self._append([{"item": item, **share} for item in items])
        self.items += items
        self.seconds += seconds
        for name, value in (phases or {}).items():
            self.phases[name] = self.phases.get(name, 0.0) + value

    def close(self) -> None:
        """The report is written: the log goes."""
        self.path.unlink(missing_ok=True)

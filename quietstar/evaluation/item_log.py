"""Evaluations that resume: each finished batch's items are kept beside the report while it runs.

An evaluation with an output file ``OUT`` writes ``OUT.partial.jsonl`` as it goes: a first line with the
run's settings, then one line per finished item (each batch appended, flushed and synced at once). When the
run ends, the report is written and the partial file removed. A run that dies (killed, preempted, out of
memory) leaves the file; the same command with ``--resume`` reads the items back and continues after them,
and its report is the one an uninterrupted run writes. A torn last line (a kill during the write) is dropped
and its batch done again. Resuming refuses, in one line, when the settings differ (another model, data
file, batch size, ...) or the items read back are not the first questions of the data; without
``--resume`` a run refuses to start over a partial file, so that nothing finished is lost.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial.jsonl")


class ItemLog:
    """The finished items of one evaluation: read back with ``resume``, appended with ``add``, removed by ``close``.

    Args:
        output: the report's path; the log is ``<output>.partial.jsonl``.
        settings: what must match for a resume (JSON values).
        questions: the questions in evaluation order; items read back must be their first ones.
        resume: continue from an existing log.
    """

    def __init__(self, output: Path, settings: dict[str, Any], questions: list[str], resume: bool) -> None:
        self.path, self.settings = partial_path(Path(output)), settings
        self.items: list[dict] = []
        self.seconds = 0.0
        if self.path.exists() and not resume and self._holds_items():
            raise ValueError(f"{self.path} holds the items of an unfinished evaluation; pass --resume to continue it, "
                             "or delete the file to start again")
        if self.path.exists() and resume:
            self._read(questions)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)  # a log of no items (a run that stopped before its first batch)
            self._append([{"settings": settings}])

    def _holds_items(self) -> bool:
        with self.path.open("rb") as f:
            return sum(1 for line in f if line.strip()) > 1

    def _read(self, questions: list[str]) -> None:
        lines = self.path.read_bytes().split(b"\n")
        if lines and lines[-1] != b"":  # no newline after the last line: torn by a kill during the write
            lines = lines[:-1]
        try:
            records = [json.loads(line) for line in lines if line.strip()]
        except ValueError:
            raise ValueError(f"{self.path} is not a partial evaluation (a line is not JSON); delete it to start again") from None
        if not records or records[0].get("settings") is None:
            raise ValueError(f"{self.path} is not a partial evaluation (no settings line); delete it to start again")
        saved = records[0]["settings"]
        differ = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
        if differ:
            details = ", ".join(f"{k} (then {saved.get(k)!r}, now {self.settings.get(k)!r})" for k in differ)
            raise ValueError(f"--resume: {self.path} was written with other settings: {details}")
        items = [r["item"] for r in records[1:]]
        if [i["question"] for i in items] != questions[: len(items)]:
            raise ValueError(f"--resume: the items in {self.path} are not the first questions of the data file")
        self.items = items
        self.seconds = sum(r["seconds"] for r in records[1:])
        with self.path.open("r+b") as f:  # drop a torn last line, so that the next batch starts on a line of its own
            f.truncate(sum(len(line) + 1 for line in lines))

    def _append(self, records: list[dict]) -> None:
        with self.path.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())

    def add(self, items: list[dict], seconds: float) -> None:
        """Keep a finished batch: its items and its generation seconds (split evenly over its items)."""
        self._append([{"item": item, "seconds": seconds / len(items)} for item in items])
        self.items += items
        self.seconds += seconds

    def close(self) -> None:
        """The report is written: the log goes."""
        self.path.unlink(missing_ok=True)

"""Reading the input files every entry point is given: the checks before reading, and jsonl lines.

Each bad file fails in one line that names the file and what is wrong with it, so that
``run_command`` and ``run_recipe`` can show it as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


def input_file(path: str | Path, what: str = "data file") -> Path:
    """``path``, checked to be a file this process can read.

    ``what`` names the input in the messages ("eval data file", "DataConfig.dataset"):
    ``<what> not found: <path>``, ``<what> is a directory, not a file: <path>`` or
    ``<what> cannot be read (<reason>): <path>``, raised as the matching ``OSError``.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} is a directory, not a file: {path}")
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise type(error)(f"{what} cannot be read ({error.strerror or error}): {path}") from None
    return path


def json_lines(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Each non-blank line of a jsonl file as (line number, parsed value, problem).

    ``problem`` is None for a line that parses, else it starts with "not UTF-8" or "not valid JSON"
    and says where (the value is then None).
    """
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig")  # a byte-order mark at the start of the file is not part of the JSON
            except UnicodeDecodeError as error:
                yield number, None, f"not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
                continue
            if line.strip():
                try:
                    yield number, json.loads(line), None
                except json.JSONDecodeError as error:
                    yield number, None, f"not valid JSON ({error.msg} at column {error.colno})"

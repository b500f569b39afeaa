"""The files every entry point reads and writes: the checks before reading, whole UTF-8 text files, jsonl lines,
and whole writes.

Each bad file fails in one line that names the file and what is wrong with it, so that
``run_command`` and ``run_recipe`` can show it as it is. Reports and run summaries are written
whole or not at all (``written_whole``): a kill, Ctrl-C or a full disk while one is written leaves
the previous version as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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


def read_utf8(path: Path) -> str:
    """The text of a whole file, decoded as UTF-8 (a byte-order mark at its start dropped).

    A file that is not UTF-8 raises ``ValueError``: ``<path>: not UTF-8 (byte 0x.. at offset N)``,
    rather than reading as replacement characters.
    """
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 (byte 0x{raw[error.start]:02x} at offset {error.start})") from None


JSON_WHITESPACE = " \t\r\n"  # what JSON allows around a value; str.strip() would also take \x0c, \x1c, NBSP...
# A \uXXXX escape of a UTF-16 surrogate: in a pair it is one character, alone it is a string no UTF-8 can hold.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate in a parsed JSON value's strings (keys included), or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = next((c for c in item if "\ud800" <= c <= "\udfff"), None)
            if found is not None:
                return found
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def json_lines(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Each non-blank line of a jsonl file as (line number, parsed value, problem).

    ``problem`` is None for a line that parses, else it starts with "not UTF-8" or "not valid JSON"
    and says where (the value is then None). A line holding only JSON whitespace (spaces, tabs,
    carriage returns) is blank; any other character, a form feed say, makes a line that is not
    JSON. A string escape of half a surrogate pair (``"\\ud800"``) is not UTF-8; an integer past
    Python's digit limit or nesting past its recursion limit is not valid JSON.
    """
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig")  # a byte-order mark at the start of the file is not part of the JSON
            except UnicodeDecodeError as error:
                yield number, None, f"not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
                continue
            if line.strip(JSON_WHITESPACE):
                yield number, *_parse_line(line)


def _parse_line(line: str) -> tuple[Any, str | None]:
    """(value, None) for a line of JSON, else (None, why it is not one)."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error.msg} at column {error.colno})"
    except ValueError as error:  # an integer of more digits than int() reads (sys.get_int_max_str_digits)
        return None, f"not valid JSON ({str(error).split(';')[0]})"
    except RecursionError:
        return None, "not valid JSON (nested deeper than Python's recursion limit)"
    surrogate = _lone_surrogate(value) if SURROGATE_ESCAPE.search(line) else None
    if surrogate is not None:
        return None, f"not UTF-8 (a string holds the lone surrogate \\u{ord(surrogate):04x})"
    return value, None


@contextlib.contextmanager
def written_whole(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to. When the block ends, the file is synced to disk and renamed
    over ``path`` (atomic on one file system); when it fails or is interrupted, the temporary file goes and
    ``path`` is untouched."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield staging
        with open(staging, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_text_whole(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all (``written_whole``)."""
    with written_whole(path) as staging:
        staging.write_text(text, encoding="utf-8")


def not_an_input(output: str | Path, flag: str, inputs: dict[str, str | Path]) -> None:
    """Refuse an ``output`` that is one of the ``inputs`` (flag -> path), e.g. ``--output`` given the data file's
    name, which the report would overwrite."""
    for name, path in inputs.items():
        if Path(output).resolve() == Path(path).resolve():
            raise FileExistsError(f"{flag} {output} is the {name} file, which the report would overwrite; "
                                  "give the report another name")

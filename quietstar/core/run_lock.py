"""One run at a time per output: a lock file beside what a run writes.

A training run holds ``<output-dir>/run.lock`` (rank 0 takes it for every rank), an evaluation
``<report>.lock`` beside its report (``perplexity``: ``<output-dir>/report.json.lock``). A second
run started into the same output (a second terminal, the same command run twice) is refused in
one line that names the first: its process id, host, start time and command.

The lock file is written whole before it appears (a hard link to a finished temporary file, which
fails when a lock is already there), and it goes when the run ends: ``release_held`` (called by
``run_command`` and ``engine.run_recipe`` when their command ends, however it ends) or, failing that,
at interpreter exit. A lock left by a process that is gone (killed with SIGKILL, a machine that
rebooted) is stale and taken over without a word. On the lock's own host that is certain: the
process id is checked together with the process's start time and the boot, so a reused id does not
count. Another host's process cannot be checked; its lock refuses, and the message says which file
to delete if that run is gone. A lock inside a copy of a directory (``cp -r``, a file manager) is
stale too: the lock records its directory's inode, which a copy does not share (a move keeps it).

Taking the lock creates the directory it lives in; if the run then ends without writing anything
there, ``release_held`` removes the directories it created, so a run refused at start-up leaves nothing.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOCK = "run.lock"
FRESH_SECONDS = 10  # an unreadable lock younger than this may be one being written


class RunLocked(OSError):
    """The output is in use by another run (the message names it). An ``OSError``, as the output cannot be
    written, so every entry point shows it as it shows the other reasons: in one line, with exit code 2."""


@dataclass
class _Held:
    """A lock this process took: its file, its record and the directories created for it (topmost first)."""

    path: Path
    record: dict
    created: list[Path]


_held: list[_Held] = []


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), "" where /proc cannot tell, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if not Path("/proc/self/stat").exists():  # no /proc here: ask the kernel whether the id is in use
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
            return ""
        return None
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (command)": state, ppid, ..., starttime (field 22)
    return None if fields[0] in ("Z", "X") else fields[19]


def _alive(record: dict) -> bool:
    """Whether the process that wrote ``record`` may still be running (another host's: assumed so)."""
    if record.get("host") != socket.gethostname():
        return True
    if record.get("boot") and _boot_id() and record["boot"] != _boot_id():
        return False
    pid = record.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    started = _start_time(pid)
    return started is not None and (not started or not record.get("start") or started == record["start"])


def _read(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _stale(path: Path, record: dict | None) -> bool:
    """A lock whose run is gone: written by a process that is no more, copied from another directory, or
    unreadable and not just being written (``_create``'s fallback writes after creating)."""
    if record is None:
        try:
            return time.time() - path.stat().st_mtime > FRESH_SECONDS
        except FileNotFoundError:
            return True
    try:
        directory = path.parent.stat().st_ino
    except OSError:
        return True
    return record.get("directory") != directory or not _alive(record)


def _create(lock: Path, staging: Path) -> None:
    """``lock`` with ``staging``'s content, or ``FileExistsError`` when there is one: a hard link, so that the file is
    whole when it appears; where the file system has no hard links, created exclusively, then written."""
    try:
        os.link(staging, lock)
    except FileExistsError:
        raise
    except OSError:
        with os.fdopen(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as f:
            f.write(staging.read_text())


def _missing_ancestors(directory: Path) -> list[Path]:
    """The directories ``mkdir(parents=True)`` would create for ``directory``, topmost first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    return missing[::-1]


def _make_directory(directory: Path, target: Path, flag: str) -> list[Path]:
    created = _missing_ancestors(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(f"{flag} {target}: {directory} is a file, not a directory") from None
    except OSError as error:
        raise type(error)(f"{flag} {target} cannot be written ({error.strerror or error})") from None
    return created


def _hold(lock: Path, target: Path, flag: str) -> None:
    created = _make_directory(lock.parent, target, flag)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "boot": _boot_id(), "start": _start_time(os.getpid()),
              "directory": lock.parent.stat().st_ino, "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:120]}
    staging = lock.with_name(f".{lock.name}.{os.getpid()}")
    try:
        staging.write_text(json.dumps(record) + "\n")
        for _ in range(2):
            try:
                _create(lock, staging)
                break
            except FileExistsError:
                other = _read(lock)
                if not _stale(lock, other):
                    raise RunLocked(_in_use(target, flag, lock, other or {})) from None
                lock.unlink(missing_ok=True)  # a run that is gone: its lock is taken over
        else:
            raise RunLocked(_in_use(target, flag, lock, _read(lock) or {}))
    except RunLocked:
        _remove_created(created)
        raise
    except OSError as error:
        _remove_created(created)
        raise type(error)(f"{flag} {target} cannot be written ({error.strerror or error})") from None
    finally:
        staging.unlink(missing_ok=True)
    _held.append(_Held(lock, record, created))


def _in_use(target: Path, flag: str, lock: Path, other: dict) -> str:
    where = f"pid {other.get('pid')} on {other.get('host')}, since {other.get('since')}: {other.get('command')}"
    gone = "" if other.get("host") == socket.gethostname() else f" (if that run is gone, delete {lock})"
    return f"{flag} {target} is in use by another run ({where}); wait for it to end, or choose another {flag}{gone}"


def hold_directory(directory: Path, flag: str = "--output-dir") -> None:
    """Take ``<directory>/run.lock`` for this process, creating ``directory``; ``RunLocked`` names the run that
    holds it. A ``directory`` that is a file, or cannot be created or written, fails with an ``OSError`` saying
    so in one line, before anything else is written."""
    directory = Path(directory)
    if directory.is_file():
        raise NotADirectoryError(f"{flag} {directory} is a file, not a directory")
    _hold(directory / LOCK, directory, flag)


def hold_file(report: Path, flag: str = "--output") -> None:
    """Take ``<report>.lock`` for this process, creating the report's directory; as ``hold_directory`` otherwise.
    A ``report`` that is a directory is refused."""
    report = Path(report)
    if report.is_dir():
        raise IsADirectoryError(f"{flag} {report} is a directory; give the report's file name, e.g. {report / 'report.json'}")
    _hold(report.with_name(report.name + ".lock"), report, flag)


def _remove_created(created: list[Path]) -> None:
    for directory in reversed(created):
        try:
            directory.rmdir()
        except OSError:  # something was written there: it stays
            return


def release_held() -> None:
    """Remove the locks this process holds (each only while it still holds this process's record), and the
    directories taking them created, where they are empty."""
    while _held:
        held = _held.pop()
        if held.record["pid"] != os.getpid():  # a forked child's copy of the list: the parent's locks
            continue
        if _read(held.path) == held.record:
            held.path.unlink(missing_ok=True)
        _remove_created(held.created)


atexit.register(release_held)  # a process that ends without its entry point's own release (a library caller's)

"""SHA-256 checksums of checkpoint files, computed while the files are written.

A checkpoint's manifest (``checkpoints.MANIFEST``) records each file's size and digest. Sizes catch a
truncated file; digests catch the rest (a flipped bit, a file overwritten by another run's). The digests
cost no second read of what was just written: DeepSpeed writes its files through its checkpoint engine
(``engine.checkpoint_engine.save(state_dict, path)``, a ``torch.save``), and ``hashing_engine`` puts a
wrapper in front of it for one save, whose ``torch.save`` writes through ``HashingFile``: every block
updates the digest on its way to the disk. Files written otherwise (DeepSpeed's copy of its
``zero_to_fp32.py``) are read once for their digest when the manifest is written; they are small.

Checking a checkpoint (``verify``, ``--resume``, ``quietstar verify-checkpoint``) reads every file once.
"""

from __future__ import annotations

import hashlib
import io
from contextlib import contextmanager
from pathlib import Path

import torch

CHUNK = 1 << 22  # bytes read at a time when a file's digest is computed from the disk


class HashingFile(io.RawIOBase):
    """A write-only file that passes every write to ``raw`` and adds it to a SHA-256."""

    def __init__(self, raw) -> None:
        super().__init__()
        self.raw, self.digest = raw, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = self.raw.write(view)
        written = len(view) if written is None else written
        self.digest.update(view[:written])
        return written

    def flush(self) -> None:
        self.raw.flush()


def file_digest(path: Path) -> str:
    """The SHA-256 of a file on disk (read in chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class _HashingEngine:
    """DeepSpeed's torch checkpoint engine with its ``save`` writing through ``HashingFile``; the rest delegated."""

    def __init__(self, inner, digests: dict[str, str]) -> None:
        self._inner, self._digests = inner, digests

    def save(self, state_dict, path: str) -> None:
        with open(path, "wb") as raw:
            hashing = HashingFile(raw)
            torch.save(state_dict, hashing, _use_new_zipfile_serialization=self._inner.zipfile_serialization)
        self._digests[str(Path(path).resolve())] = hashing.digest.hexdigest()

    def __getattr__(self, name):
        return getattr(self._inner, name)


@contextmanager
def hashing_engine(engine, digests: dict[str, str]):
    """While the block runs, files ``engine`` saves through its checkpoint engine get their digest in ``digests``
    (absolute path -> hex SHA-256). Another kind of checkpoint engine than DeepSpeed's torch one is left as it is,
    and its files are digested from the disk when the manifest is written."""
    inner = engine.checkpoint_engine
    if type(inner).__name__ != "TorchCheckpointEngine":
        yield
        return
    engine.checkpoint_engine = _HashingEngine(inner, digests)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner


def save_hashed(obj, path: Path, digests: dict[str, str]) -> None:
    """``torch.save(obj, path)``, recording the file's digest in ``digests`` as it is written."""
    with open(path, "wb") as raw:
        hashing = HashingFile(raw)
        torch.save(obj, hashing)
    digests[str(Path(path).resolve())] = hashing.digest.hexdigest()

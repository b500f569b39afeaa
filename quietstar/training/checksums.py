"""CRC-32 checksums of checkpoint files, computed while the files are written.

A checkpoint's manifest (``checkpoints.MANIFEST``) records each file's size and CRC-32. Sizes catch a
truncated file; checksums catch the rest (a flipped bit, a file overwritten by another run's), missing one
change in 2^32. CRC-32 (``zlib``, about 4 GB/s here) rather than SHA-256 (1.4 GB/s): the checksum is for
accidents, not adversaries, and object stores check their transfers the same way (CRC-32C). The checksums
cost no second read of what was just written: DeepSpeed writes its files through its checkpoint engine
(``engine.checkpoint_engine.save(state_dict, path)``, a ``torch.save``), and ``hashing_engine`` puts a
wrapper in front of it for one save, whose ``torch.save`` writes through ``HashingFile``: every block
updates the checksum on its way to the disk. Files written otherwise (DeepSpeed's copy of its
``zero_to_fp32.py``) are read once for theirs when the manifest is written; they are small.

Checking a checkpoint (``verify``, ``--resume``, ``quietstar verify-checkpoint``) reads every file once.
"""

from __future__ import annotations

import io
import zlib
from contextlib import contextmanager
from pathlib import Path

import torch

CHUNK = 1 << 22  # bytes read at a time when a file's digest is computed from the disk


def hex_crc(crc: int) -> str:
    return f"{crc:08x}"


class HashingFile(io.RawIOBase):
    """A write-only file that passes every write to ``raw`` and adds it to a running CRC-32 (``hexdigest``)."""

    def __init__(self, raw) -> None:
        super().__init__()
        self.raw, self.crc = raw, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = self.raw.write(view)
        written = len(view) if written is None else written
        self.crc = zlib.crc32(view[:written], self.crc)
        return written

    def hexdigest(self) -> str:
        return hex_crc(self.crc)

    def flush(self) -> None:
        self.raw.flush()


def file_digest(path: Path) -> str:
    """The CRC-32 of a file on disk (read in chunks), as 8 hex digits."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            crc = zlib.crc32(block, crc)
    return hex_crc(crc)


class _HashingEngine:
    """DeepSpeed's torch checkpoint engine with its ``save`` writing through ``HashingFile``; the rest delegated."""

    def __init__(self, inner, digests: dict[str, str]) -> None:
        self._inner, self._digests = inner, digests

    def save(self, state_dict, path: str) -> None:
        with open(path, "wb") as raw:
            hashing = HashingFile(raw)
            torch.save(state_dict, hashing, _use_new_zipfile_serialization=self._inner.zipfile_serialization)
        self._digests[str(Path(path).resolve())] = hashing.hexdigest()

    def __getattr__(self, name):
        return getattr(self._inner, name)


@contextmanager
def hashing_engine(engine, digests: dict[str, str]):
    """While the block runs, files ``engine`` saves through its checkpoint engine get their digest in ``digests``
    (absolute path -> hex CRC-32). Another kind of checkpoint engine than DeepSpeed's torch one is left as it is,
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
    digests[str(Path(path).resolve())] = hashing.hexdigest()

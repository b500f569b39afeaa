"""CRC-32 checksums of checkpoint files, taken beside the save.

A checkpoint's manifest (``checkpoints.MANIFEST``) records each file's size and CRC-32. Sizes catch a
truncated file; checksums catch the rest (a flipped bit, a file overwritten by another run's), missing one
change in 2^32. CRC-32 (``zlib``, about 3 GB/s here) rather than SHA-256 (1.4 GB/s): the checksum is for
accidents, not adversaries, and object stores check their transfers the same way (CRC-32C).

How they are taken, so that saves do not get slower: DeepSpeed writes a checkpoint's files one after the
other through its checkpoint engine (``engine.checkpoint_engine.save(state_dict, path)``, a ``torch.save``).
``checksummed_saves`` puts a wrapper in front of it for one save: once a file is written, a worker thread
reads it back (from the page cache it was just written through) and checksums it while the engine writes
the next file; ``zlib.crc32`` releases the GIL, so the two run side by side. Feeding ``torch.save`` a
checksumming file object instead, which checksums the bytes on their way to the disk, was measured slower:
``torch.save`` to a Python file object is slower than to a path (``benchmarks/checkpoint_checksums.py``,
1 GB in 4 files into the page cache: +175 % that way, +36 % this way, 0.3 s per GB). Files written otherwise (DeepSpeed's copy of its
``zero_to_fp32.py``) are read for their checksum when the manifest is written; they are small.

Checking a checkpoint (``checkpoints.problem``, ``--resume``, ``quietstar verify-checkpoint``) reads every
file once.
"""

from __future__ import annotations

import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

CHUNK = 1 << 22  # bytes read at a time when a file's digest is computed from the disk


def hex_crc(crc: int) -> str:
    return f"{crc:08x}"


def file_digest(path: Path) -> str:
    """The CRC-32 of a file on disk (read in chunks), as 8 hex digits."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            crc = zlib.crc32(block, crc)
    return hex_crc(crc)


class _ChecksummingEngine:
    """DeepSpeed's torch checkpoint engine, its ``save`` followed by a checksum of the file on a worker thread."""

    def __init__(self, inner, checksum) -> None:
        self._inner, self._checksum = inner, checksum

    def save(self, state_dict, path: str) -> None:
        self._inner.save(state_dict, path)
        self._checksum(Path(path))

    def __getattr__(self, name):
        return getattr(self._inner, name)


@contextmanager
def checksummed_saves(engine, digests: dict[str, str]):
    """While the block runs, every file ``engine`` saves through its checkpoint engine, and every path passed to
    the function the block receives, is checksummed on a worker thread; when the block ends, ``digests``
    holds them (absolute path -> CRC-32 as hex). Another kind of checkpoint engine than DeepSpeed's torch one
    (which may still be writing when ``save`` returns) is left as it is; its files are checksummed from the
    disk when the manifest is written."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checksum") as pool:
        futures: dict[str, Future] = {}

        def checksum(path: Path) -> None:
            futures[str(path.resolve())] = pool.submit(file_digest, path)

        inner = engine.checkpoint_engine
        wrap = type(inner).__name__ == "TorchCheckpointEngine"
        if wrap:
            engine.checkpoint_engine = _ChecksummingEngine(inner, checksum)
        try:
            yield checksum
        finally:
            if wrap:
                engine.checkpoint_engine = inner
        digests.update({path: future.result() for path, future in futures.items()})

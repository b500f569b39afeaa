"""What the checkpoint checksums cost: a checkpoint's files saved through DeepSpeed's torch checkpoint engine,
with and without ``checksums.checksummed_saves``, and a check of the files.

    python benchmarks/checkpoint_checksums.py --mb 1024 --files 4 --json benchmarks/results/checkpoint_checksums_cpu.json

A state of ``--mb`` MB of fp32 tensors, split over ``--files`` files (a checkpoint is several: model states,
each rank's optimizer shard), is saved ``--repeats`` times to ``--dir`` by ``TorchCheckpointEngine.save``
one file after the other, as ``engine.save_checkpoint`` does: plainly, and inside ``checksummed_saves``
(each file checksummed on a worker thread while the next is written; the time includes waiting for the
last checksum). Then the files are checked with ``checksums.file_digest``, as ``--resume`` and
``verify-checkpoint`` do. Also timed, for the record: ``torch.save`` through a Python file object that
checksums each write on its way to the disk (the design not taken). Prints medians; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import torch

from quietstar.training.checksums import checksummed_saves, file_digest


class _InlineChecksumFile(io.RawIOBase):
    """A write-only file that checksums every write before passing it on (the design not taken)."""

    def __init__(self, raw) -> None:
        super().__init__()
        self.raw, self.crc = raw, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        return self.raw.write(view)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=512, help="state size in MB (default 512)")
    parser.add_argument("--files", type=int, default=4, help="files it is split over (default 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to write (default: a temporary directory)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class Engine:  # what checksummed_saves needs of a DeepSpeed engine
        checkpoint_engine = TorchCheckpointEngine()

    per_file = args.mb * 2**20 // 4 // args.files
    parts = [{"tensor": torch.randn(per_file)} for _ in range(args.files)]
    engine = Engine()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        paths = [Path(tmp) / f"part{i}.pt" for i in range(args.files)]

        def plain() -> None:
            for part, path in zip(parts, paths):
                engine.checkpoint_engine.save(part, str(path))

        def checksummed() -> None:
            with checksummed_saves(engine, {}):
                for part, path in zip(parts, paths):
                    engine.checkpoint_engine.save(part, str(path))

        def inline() -> None:
            for part, path in zip(parts, paths):
                with open(path, "wb") as raw:
                    torch.save(part, _InlineChecksumFile(raw))

        rows = {"plain_save_s": [], "checksummed_save_s": [], "inline_checksum_save_s": []}
        for _ in range(args.repeats):  # interleaved, so that drift in the disk's speed hits all three
            rows["plain_save_s"].append(timed(plain))
            rows["checksummed_save_s"].append(timed(checksummed))
            rows["inline_checksum_save_s"].append(timed(inline))
        verify = statistics.median(timed(lambda: [file_digest(p) for p in paths]) for _ in range(args.repeats))
        size = sum(p.stat().st_size for p in paths)
    result = {"mb": size / 2**20, "files": args.files, "repeats": args.repeats,
              **{k: statistics.median(v) for k, v in rows.items()}, "verify_s": verify, "torch": torch.__version__}
    result["overhead"] = result["checksummed_save_s"] / result["plain_save_s"] - 1
    result["inline_overhead"] = result["inline_checksum_save_s"] / result["plain_save_s"] - 1
    result["check_gb_per_s"] = size / 1e9 / verify
    print(f"{result['mb']:.0f} MB in {args.files} files: saved {result['plain_save_s']:.2f} s; with CRC-32s beside the save "
          f"{result['checksummed_save_s']:.2f} s ({result['overhead']:+.0%}); checksummed inline "
          f"{result['inline_checksum_save_s']:.2f} s ({result['inline_overhead']:+.0%}); checking the files {verify:.2f} s "
          f"({result['check_gb_per_s']:.2f} GB/s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

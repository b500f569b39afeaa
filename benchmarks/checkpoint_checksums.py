"""What the checkpoint checksums cost: torch.save with and without the CRC-32 taken while writing, and a check.

    python benchmarks/checkpoint_checksums.py --mb 1024 --json benchmarks/results/checkpoint_checksums_cpu.json

A state dict of ``--mb`` MB of fp32 tensors (the cost is per byte, so any size will do) is saved ``--repeats`` times to ``--dir`` with plain ``torch.save`` and with
``checksums.save_hashed``; each save ends with an ``fsync``, so the disk's write is inside the time. Then the
saved file is checked with ``checksums.file_digest`` (what ``--resume`` and ``verify-checkpoint`` do), the
page cache warm as it is right after a save. Prints medians and the overhead; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from quietstar.training.checksums import file_digest, save_hashed


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=512, help="state size in MB (default 512)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to write (default: a temporary directory)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    state = {f"w{i}": torch.randn(args.mb * 2**20 // 4 // 16) for i in range(16)}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "state.pt"

        def plain() -> None:
            with open(path, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

        def hashed() -> None:
            save_hashed(state, path, {})
            with open(path, "rb+") as f:
                os.fsync(f.fileno())

        rows = {"plain_save_s": [], "hashed_save_s": []}
        for _ in range(args.repeats):  # interleaved, so that drift in the disk's speed hits both
            rows["plain_save_s"].append(timed(plain))
            rows["hashed_save_s"].append(timed(hashed))
        verify = statistics.median(timed(lambda: file_digest(path)) for _ in range(args.repeats))
        size = path.stat().st_size
    result = {"mb": size / 2**20, "repeats": args.repeats, **{k: statistics.median(v) for k, v in rows.items()},
              "verify_s": verify, "torch": torch.__version__}
    result["overhead"] = result["hashed_save_s"] / result["plain_save_s"] - 1
    result["hash_gb_per_s"] = size / 1e9 / verify
    print(f"{result['mb']:.0f} MB: torch.save {result['plain_save_s']:.2f} s, with CRC-32 while writing "
          f"{result['hashed_save_s']:.2f} s ({result['overhead']:+.0%}); checking the file {verify:.2f} s "
          f"({result['hash_gb_per_s']:.2f} GB/s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

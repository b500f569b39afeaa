"""The FlexAttention block mask of a thought forward: built from its tiles vs evaluated densely.

    python benchmarks/block_mask.py                      # L = 512, M = 24 (25 segments), 4 rows, on the CPU
    python benchmarks/block_mask.py --device cuda --json block_mask.json

``thought_block_mask`` (``quiet_star.thought_attention``) derives which 128 x 128 tiles the diagonal rule
leaves empty, full or partial from the rule's structure. The alternative is ``create_block_mask`` uncompiled,
which evaluates the rule on every (query, key) pair: a dense [rows, Q, KV] mask per call. Each construction runs
in a forked child, so its peak memory is its own (process RSS on the CPU, ``torch.cuda.max_memory_allocated``
on a GPU); time is the median of ``--repeats`` calls after one untimed call. Both must give the same tiles.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time


def build(kind: str, length: int, segments: int, rows: int, device: str):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    from quietstar.quiet_star.thought_attention import ThoughtLayout, thought_block_mask

    text_mask = torch.ones(rows, length, dtype=torch.bool, device=device)
    text_mask[1:, : length // 8] = False  # some rows left padded
    layout = ThoughtLayout(length, 0, "flex")
    tiles = thought_block_mask(text_mask, layout, segments, segments)
    if kind == "tiles":
        return tiles
    return create_block_mask(tiles.mask_mod, rows, None, segments * length, segments * length, device=device)


def child(kind: str, args, conn) -> None:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401  (imported before measuring)

    from quietstar.quiet_star.thought_attention import thought_block_mask  # noqa: F401

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    mask = build(kind, args.seq_len, args.thought_len + 1, args.rows, args.device)  # untimed
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        mask = build(kind, args.seq_len, args.thought_len + 1, args.rows, args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if args.device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    conn.send({"construction": kind, "seconds": statistics.median(times), "peak_mem_mb": peak_mb,
               "partial_tiles": int(mask.kv_num_blocks.sum()), "full_tiles": int(mask.full_kv_num_blocks.sum())})
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--thought-len", type=int, default=24)
    parser.add_argument("--rows", type=int, default=4, help="batch x R")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    import multiprocessing

    import torch

    torch.set_num_threads(args.threads)
    context = multiprocessing.get_context("fork")
    results = []
    for kind in ("tiles", "dense"):
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=child, args=(kind, args, send))
        process.start()
        results.append(receive.recv())
        process.join()
    if results[0]["partial_tiles"] != results[1]["partial_tiles"] or results[0]["full_tiles"] != results[1]["full_tiles"]:
        raise SystemExit(f"the two constructions disagree: {results}")
    print(f"L={args.seq_len} M={args.thought_len} rows={args.rows} ({(args.thought_len + 1) * args.seq_len} queries "
          f"and keys), {args.device}, {args.threads} thread(s)")
    print(f"{'construction':<14}{'s/call':>10}{'peak MB':>10}{'partial':>9}{'full':>7}")
    for r in results:
        print(f"{r['construction']:<14}{r['seconds']:>10.4f}{r['peak_mem_mb']:>10.0f}{r['partial_tiles']:>9}{r['full_tiles']:>7}")
    if args.json:
        meta = {"seq_len": args.seq_len, "thought_len": args.thought_len, "rows": args.rows, "device": args.device,
                "threads": args.threads, "cpu_count": os.cpu_count()}
        with open(args.json, "w") as f:
            json.dump([{**meta, **r} for r in results], f, indent=1)


if __name__ == "__main__":
    main()

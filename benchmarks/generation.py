"""Generation speed of a real model, with and without thoughts.

    python benchmarks/generation.py --model runs/demo/final --data-file ../shared/data/gsm8k_test.jsonl --json gen.json

For each batch size, the first ``batch`` GSM8K prompts ("Q: ...\\nA:", left padded)
are continued greedily for exactly ``--new-tokens`` tokens (no stop at EOS, so every
row counts), once with thoughts (M+3 single-token forwards per new token on the
cached context) and once without. Reported: new tokens per second over the batch,
the median of ``--repeats`` timed runs after one warm-up run. Without ``--data-file``
a fixed set of arithmetic prompts is used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from quietstar.core.loading import load_model
from quietstar.evaluation.tasks import read_jsonl
from quietstar.evaluation.zero_shot import left_padded
from quietstar.quiet_star.config import QuietStarConfig
from quietstar.quiet_star.generation import generate
from quietstar.quiet_star.model import QuietStarModel

PROMPTS = [f"Q: What is {a} times {b} plus {a + b}?\nA:" for a, b in [(3, 4), (12, 7), (25, 4), (9, 9), (14, 3), (6, 8), (11, 5), (2, 50)]]


def tokens_per_second(model, prompts: list[str], thoughts: bool, new_tokens: int, repeats: int) -> float:
    ids, mask = left_padded(model.tokenizer, prompts, next(model.parameters()).device)
    times = []
    for run in range(repeats + 1):
        generator = torch.Generator().manual_seed(run)
        started = time.perf_counter()
        out = generate(model, ids, mask, max_new_tokens=new_tokens, thoughts=thoughts, generator=generator)
        if run > 0:  # the first run warms up
            times.append(time.perf_counter() - started)
        assert out.sequences.shape[1] == ids.shape[1] + new_tokens
    return len(prompts) * new_tokens / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a saved QuietStarModel dir, a plain HF dir, or smollm2-135m")
    parser.add_argument("--data-file", help="a GSM8K jsonl whose questions are the prompts")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(QuietStarModel, args.model, QuietStarConfig()).eval()
    if torch.cuda.is_available():
        model.cuda()
    pool = [item.prompt for item in read_jsonl(args.data_file, "gsm8k", max(args.batch_sizes))] if args.data_file else PROMPTS
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    rows = []
    print(f"{args.model}: M={model.config.thought_len}, {args.new_tokens} new tokens, greedy, {device}")
    print(f"{'batch':>5} {'no thoughts tok/s':>18} {'thoughts tok/s':>15} {'ratio':>6}")
    for batch in args.batch_sizes:
        prompts = [pool[i % len(pool)] for i in range(batch)]
        plain = tokens_per_second(model, prompts, False, args.new_tokens, args.repeats)
        thinking = tokens_per_second(model, prompts, True, args.new_tokens, args.repeats)
        rows.append({"model": args.model, "device": device, "thought_len": model.config.thought_len, "batch": batch,
                     "new_tokens": args.new_tokens, "tokens_per_s_no_thoughts": plain, "tokens_per_s_thoughts": thinking})
        print(f"{batch:>5} {plain:>18.2f} {thinking:>15.2f} {plain / thinking:>6.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

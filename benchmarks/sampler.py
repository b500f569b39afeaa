"""Thought-token sampler: speed and exactness of ``choose_tokens`` against a single fp32 CDF and ``torch.multinomial``.

    python benchmarks/sampler.py [--json FILE]

For each (rows, vocabulary) shape, on logits shaped like a language model's
(a few likely tokens, a long thin tail), it reports:
  - the median time of one call (ms) of each sampler;
  - the total variation between the softmax (fp64) and the distribution each
    inverse-CDF sampler really draws from, computed from its CDF (no sampling
    noise), and the number of tokens it can never draw although their
    probability is positive.
``fp32_cdf`` is the sampler this project used before: one fp32 softmax, its
cumulative sum, one uniform per row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from quietstar.quiet_star.thought_sampler import SAMPLING_BLOCK, choose_tokens

SHAPES = [(512, 8192), (128, 49152), (64, 152064)]  # the CPU benchmark model; SmolLM2; Qwen2


def fp32_cdf(logits: torch.Tensor, generator: torch.Generator) -> torch.LongTensor:
    cdf = torch.softmax(logits.float(), dim=-1).cumsum(dim=-1)
    uniform = torch.rand(cdf.shape[:-1] + (1,), generator=generator)
    return torch.searchsorted(cdf, uniform * cdf[..., -1:], right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)


def multinomial(logits: torch.Tensor, generator: torch.Generator) -> torch.LongTensor:
    return torch.multinomial(torch.softmax(logits.float(), dim=-1), 1, generator=generator).squeeze(-1)


def two_level(logits: torch.Tensor, generator: torch.Generator) -> torch.LongTensor:
    return choose_tokens(logits, False, 1.0, generator)


def lm_like_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 2.5
    logits[:, :5] += 12.0  # a handful of likely tokens
    return logits


def drawn_distribution(name: str, logits: torch.Tensor) -> torch.Tensor:
    """The distribution [V] a sampler draws from for one row of logits, from its own CDF arithmetic (fp64 result)."""
    probs = torch.softmax(logits.float(), dim=-1)
    if name == "fp32_cdf":
        cdf = probs.cumsum(dim=-1).double()
        return torch.diff(cdf, prepend=torch.zeros(1, dtype=torch.float64)) / cdf[-1]
    vocab = probs.shape[-1]
    blocks = [probs[i : i + SAMPLING_BLOCK] for i in range(0, vocab, SAMPLING_BLOCK)]
    masses = torch.stack([b.sum() for b in blocks]).double()
    block_p = torch.diff(masses.cumsum(0), prepend=torch.zeros(1, dtype=torch.float64)) / masses.sum()
    inside = [torch.diff(b.double().cumsum(0), prepend=torch.zeros(1, dtype=torch.float64)) / b.double().sum() for b in blocks]
    return torch.cat([p * q for p, q in zip(block_p, inside)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per sampler and shape (median reported)")
    args = parser.parse_args()
    samplers = {"two_level": two_level, "fp32_cdf": fp32_cdf, "multinomial": multinomial}
    results = []
    print(f"{'rows':>5} {'vocab':>7} | {'two_level ms':>12} {'fp32_cdf ms':>11} {'multinomial ms':>14} | "
          f"{'TV two_level':>12} {'TV fp32_cdf':>11} | {'undrawable two_level':>20} {'fp32_cdf':>8}")
    for rows, vocab in SHAPES:
        logits = lm_like_logits(rows, vocab, seed=0)
        times = {name: [] for name in samplers}
        for _ in range(args.repeats + 1):  # interleaved, so that load on the machine hits every sampler alike
            for name, sample in samplers.items():
                g = torch.Generator().manual_seed(0)
                start = time.perf_counter()
                sample(logits, g)
                times[name].append(time.perf_counter() - start)
        row = {"rows": rows, "vocab": vocab, **{f"{n}_ms": 1000 * statistics.median(t[1:]) for n, t in times.items()}}
        exact = torch.softmax(logits[0].double(), dim=-1)
        for name in ("two_level", "fp32_cdf"):
            drawn = drawn_distribution(name, logits[0])
            row[f"{name}_tv"] = 0.5 * float((drawn - exact).abs().sum())
            row[f"{name}_undrawable"] = int(((drawn == 0) & (exact > 0)).sum())
        results.append(row)
        print(f"{rows:>5} {vocab:>7} | {row['two_level_ms']:>12.1f} {row['fp32_cdf_ms']:>11.1f} {row['multinomial_ms']:>14.1f} | "
              f"{row['two_level_tv']:>12.2e} {row['fp32_cdf_tv']:>11.2e} | {row['two_level_undrawable']:>20} {row['fp32_cdf_undrawable']:>8}")
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()

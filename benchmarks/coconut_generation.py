"""Coconut generation speed: batched and cached (``coconut.generation.generate``) against the official pattern.

    python benchmarks/coconut_generation.py --out benchmarks/results/coconut_generation_cpu.json

The official code answers one question at a time and, for each new token, runs the whole
sequence again (question, latents, the tokens so far) with no cache. Here that pattern is
batch 1 and ``CoconutModel.forward`` over the full sequence per token (our latent loop inside,
so the baseline is if anything faster than the official code). Ours: the questions in left-padded
batches of ``--batch-size``, the prompt forwarded once, then one cached single-position step per token.

Same model (a random GPT-2 124M, ``GPT2Config()``), same prompts: ``--items`` questions of about
``--question-tokens`` random token ids, ``<bot>``, ``--latents`` latents, ``<eot>``; exactly
``--new-tokens`` tokens each (EOS is an id the model never emits first, so no row stops early).
Both paths' greedy tokens are checked equal on the first items before timing. Reports items per
second of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

from quietstar.coconut.config import CoconutConfig
from quietstar.coconut.curriculum import collate_prompts
from quietstar.coconut.generation import generate
from quietstar.coconut.markers import BOT, EOT, LATENT
from quietstar.coconut.model import CoconutModel


def build(model: str, latents: int) -> CoconutModel:
    torch.manual_seed(0)
    config = GPT2Config() if model == "gpt2" else GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512)
    lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    words = ["<pad>", "<eos>", "<<"] + [f"w{i}" for i in range(3, config.vocab_size)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    return CoconutModel(lm, tokenizer, CoconutConfig(c=1, max_latent_stage=latents, marker_init_text="<<")).eval()


def prompts(count: int, question_tokens: int, latents: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    spread = max(1, question_tokens // 5)
    return [[rng.randrange(3, vocab) for _ in range(question_tokens + rng.randint(-spread, spread))] + [BOT] + [LATENT] * latents + [EOT]
            for _ in range(count)]


@torch.no_grad()
def rerun_one(model: CoconutModel, prompt: list[int], new_tokens: int) -> list[int]:
    """Batch 1, no cache: the whole sequence through ``CoconutModel.forward`` for each new token."""
    sequence = list(prompt)
    for _ in range(new_tokens):
        sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(prompt):]


@torch.no_grad()
def batched(model: CoconutModel, rows: list[list[int]], batch_size: int, new_tokens: int) -> list[list[int]]:
    out = []
    for start in range(0, len(rows), batch_size):
        batch = collate_prompts(rows[start:start + batch_size], pad_id=0)
        out += generate(model, batch["input_ids"], batch["attention_mask"], new_tokens).tokens
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", choices=["gpt2", "tiny"], help="random GPT-2 124M, or a 2-layer one for smoke runs")
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--question-tokens", type=int, default=100)
    parser.add_argument("--latents", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--check-items", type=int, default=2, help="items whose tokens are checked equal on both paths")
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    args = parser.parse_args(argv)
    model = build(args.model, args.latents)
    model.tokenizer.eos_token = "<pad>"  # an id no row emits first: every row runs the full --new-tokens
    rows = prompts(args.items, args.question_tokens, args.latents, model.lm.config.vocab_size)
    ours_tokens = batched(model, rows[: args.check_items], args.batch_size, args.new_tokens)
    for row, got in zip(rows[: args.check_items], ours_tokens):
        assert got == rerun_one(model, row, args.new_tokens), "batched cached tokens differ from the full re-run"

    began = time.perf_counter()
    batched(model, rows, args.batch_size, args.new_tokens)
    ours = time.perf_counter() - began
    began = time.perf_counter()
    for row in rows:
        rerun_one(model, row, args.new_tokens)
    official = time.perf_counter() - began
    result = {
        "model": args.model, "device": f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)", "items": args.items,
        "batch_size": args.batch_size, "question_tokens": args.question_tokens, "latents": args.latents, "new_tokens": args.new_tokens,
        "batched_cached_items_per_s": args.items / ours, "batch1_rerun_items_per_s": args.items / official,
        "speedup": official / ours, "seconds": {"batched_cached": ours, "batch1_rerun": official}, "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }
    print(f"| path | items/s | seconds for {args.items} items |\n| --- | --- | --- |\n"
          f"| batched ({args.batch_size}) + KV cache | {result['batched_cached_items_per_s']:.2f} | {ours:.1f} |\n"
          f"| batch 1, full re-run per token | {result['batch1_rerun_items_per_s']:.3f} | {official:.1f} |\n"
          f"\nspeedup {result['speedup']:.1f}x")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

"""``quietstar generate``: complete prompts with a trained model, thinking before each token.

    quietstar generate --model runs/demo/final "Q: 12 * 7 =" [--show-thoughts] [--no-thoughts]

Several prompts are generated as one left-padded batch. ``--show-thoughts`` prints,
for each new token, the thought sampled before it.
"""

from __future__ import annotations

import argparse
import time

import torch

from quietstar.core.loading import load_model
from quietstar.core.offline import SMOLLM2
from quietstar.quiet_star.config import QuietStarConfig
from quietstar.quiet_star.generation import generate
from quietstar.quiet_star.model import QuietStarModel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="text to continue (several prompts form one batch)")
    parser.add_argument("--model", default=SMOLLM2, help=f"a saved QuietStarModel dir (e.g. <output-dir>/final), a plain HF model dir, or '{SMOLLM2}'")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate per prompt (default 48)")
    parser.add_argument("--thoughts", action=argparse.BooleanOptionalAction, default=True, help="think before each token (default: on)")
    parser.add_argument("--show-thoughts", action="store_true", help="print the thought sampled before each new token")
    parser.add_argument("--sample", action="store_true", help="sample the tokens at --temperature instead of taking the argmax")
    parser.add_argument("--temperature", type=float, default=1.0, help="temperature of --sample (default 1.0)")
    parser.add_argument("--greedy-thoughts", action="store_true", help="argmax thought tokens instead of sampling them")
    parser.add_argument("--seed", type=int, default=0, help="seed of every sample (default 0)")


def run(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    model = load_model(QuietStarModel, args.model, QuietStarConfig()).eval()
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(args.prompts, return_tensors="pt", padding=True)  # with its own specials (Gemma's <bos>)
    started = time.perf_counter()
    out = generate(
        model, batch["input_ids"], batch["attention_mask"], max_new_tokens=args.max_new_tokens, thoughts=args.thoughts,
        greedy=not args.sample, temperature=args.temperature, greedy_thoughts=args.greedy_thoughts,
        eos_token_id=tokenizer.eos_token_id, generator=torch.Generator().manual_seed(args.seed),
    )
    seconds = time.perf_counter() - started
    prompt_len = batch["input_ids"].shape[1]
    new_tokens = 0
    for row, prompt in enumerate(args.prompts):
        ids = out.sequences[row, prompt_len:].tolist()
        if tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(tokenizer.eos_token_id)]
        new_tokens += len(ids)
        print(prompt + tokenizer.decode(ids))
        if args.show_thoughts and out.thoughts is not None:
            for step, token in enumerate(ids):
                thought = tokenizer.decode(out.thoughts[row, step].tolist()).replace("\n", "\\n")
                print(f"  {tokenizer.decode([token])!r:>14}  <sot>{thought}<eot>")
        if row < len(args.prompts) - 1:
            print()
    mode = f"with thoughts (M={model.config.thought_len})" if args.thoughts else "without thoughts"
    print(f"\n{new_tokens} tokens in {seconds:.1f} s ({new_tokens / seconds:.1f} tokens/s, {mode})")

"""``quietstar coconut-generate``: answer questions with a trained Coconut model, thinking in continuous thoughts.

    quietstar coconut-generate --model runs/prosqa/best "Every wumpus is a ... Is Tom a lempus or a zhorpus?" [--show-latents]

Several questions are generated as one left-padded batch; each prompt is the question, a
newline and the model's thought (``<bot>``, N latents, ``<eot>`` for Coconut). ``--show-latents``
prints, for each latent, the vocabulary tokens the LM head ranks highest for the vector fed
back there, as the paper reads its continuous thoughts.
"""

from __future__ import annotations

import argparse
import time

import torch

from quietstar.coconut.config import CoconutConfig
from quietstar.coconut.curriculum import collate_prompts, encode, inference_prompt
from quietstar.coconut.generation import generate, nearest_tokens
from quietstar.coconut.model import CoconutModel
from quietstar.core.loading import load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("questions", nargs="+", metavar="QUESTION", help="questions to answer (several form one batch)")
    parser.add_argument("--model", required=True, help="a saved CoconutModel dir (e.g. <output-dir>/best)")
    parser.add_argument("--latents", type=int, help="latents between <bot> and <eot> (default: the model's inference_latents)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per question (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) takes the argmax; above 0 samples")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop a row once its output contains TEXT (repeatable)")
    parser.add_argument("--show-latents", action="store_true", help="print the nearest vocabulary tokens of each latent")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling (default 0)")


def run(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    model = load_model(CoconutModel, args.model, CoconutConfig()).eval()
    if args.latents is not None:
        model.config = CoconutConfig(**{**model.config.to_dict(), "inference_latents": args.latents})
    tokenizer = model.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [encode(inference_prompt(q, model.config), tokenizer, with_answer=False)[0] for q in args.questions]
    batch = collate_prompts(prompts, tokenizer.pad_token_id)
    started = time.perf_counter()
    out = generate(model, batch["input_ids"], batch["attention_mask"], args.max_new_tokens, temperature=args.temperature,
                   generator=torch.Generator().manual_seed(args.seed), stop_strings=tuple(args.stop))
    seconds = time.perf_counter() - started
    shown = nearest_tokens(model, out.latents) if args.show_latents else None
    for row, question in enumerate(args.questions):
        print(question)
        if shown is not None:
            for j, candidates in enumerate(shown[row]):
                print(f"  latent {j + 1}: " + "  ".join(f"{text!r} {p:.2f}" for text, p in candidates))
        print(tokenizer.decode(out.tokens[row], skip_special_tokens=True))
        if row < len(args.questions) - 1:
            print()
    new = sum(len(t) for t in out.tokens)
    print(f"\n{len(args.questions)} question(s), mode {model.config.mode}, {model.config.inference_latents} latent(s), "
          f"{new} new tokens in {seconds:.2f} s")

"""Our Coconut generation against the official code's ``Coconut.generate``, same weights and prompts, same tokens.

    python benchmarks/coconut_reference_generation.py --official-code ~/src/coconut \
        --official-python ~/cocovenv/bin/python --json benchmarks/results/coconut_reference_generation.json

The official environment is the one ``coconut_reference_step.py`` describes (transformers 4.46). The official
``generate`` takes one question at a time: it runs the prompt through its latent passes, then for every new token
runs the base model over the whole sequence again (no cache). Ours (``coconut.generation.generate``) takes the
questions in left-padded batches of ``--batch-size``, forwards the prompt once and then one cached position per
token per batch.

Prompts: ``--items`` questions of about ``--question-tokens`` random words, ``<bot>``, ``--latents`` latents,
``<eot>``, on a random GPT-2 of ``coconut_reference_step.SHAPES`` (dropout off, as there). Both generate
``--new-tokens`` greedy tokens (the EOS id is one no row emits, so no row stops early). The official side runs
``--official-items`` of the items (it is batch 1, so its items/s does not depend on how many); every one of them
must get the same tokens from both sides. Each side runs in its own process: items/s and the ratio are printed
and written to ``--json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from coconut_reference_step import MARKER_TEXT, NO_DROPOUT, SHAPES  # noqa: E402

NO_EOS = 1  # an id of the synthetic vocabulary that a random GPT-2 never emits first here (checked: no row stops)


def write_inputs(work: Path, args) -> None:
    """The shared weights and prompts (with our placeholders: BOT -1, LATENT -4, EOT -2)."""
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**SHAPES[args.model], **NO_DROPOUT)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(config)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items() if k != "lm_head.weight"}, work / "weights.safetensors")
    rng = random.Random(args.seed)
    spread = max(1, args.question_tokens // 5)
    prompts = [[rng.randrange(5, config.vocab_size) for _ in range(args.question_tokens + rng.randint(-spread, spread))]
               + [-1] + [-4] * args.latents + [-2] for _ in range(args.items)]
    (work / "prompts.json").write_text(json.dumps(prompts))


def load_lm(work: Path, args):
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = GPT2LMHeadModel(GPT2Config(**SHAPES[args.model], **NO_DROPOUT))
    lm.load_state_dict(load_file(work / "weights.safetensors"), strict=False)
    lm.tie_weights()
    return lm.eval()


def ours(work: Path, args) -> dict:
    import torch

    from coconut_step import synthetic_tokenizer
    from quietstar.coconut.config import CoconutConfig
    from quietstar.coconut.curriculum import collate_prompts
    from quietstar.coconut.generation import generate
    from quietstar.coconut.model import CoconutModel

    lm = load_lm(work, args)
    tokenizer = synthetic_tokenizer(lm.config.vocab_size)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(NO_EOS)
    model = CoconutModel(lm, tokenizer, CoconutConfig(c=1, max_latent_stage=args.latents, marker_init_text=MARKER_TEXT)).eval()
    prompts = json.loads((work / "prompts.json").read_text())
    tokens = []
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(prompts), args.batch_size):
            batch = collate_prompts(prompts[first:first + args.batch_size], pad_id=0)
            tokens += generate(model, batch["input_ids"], batch["attention_mask"], args.new_tokens).tokens
    seconds = time.perf_counter() - start
    return dict(side="ours", items=len(prompts), seconds=seconds, items_per_s=len(prompts) / seconds, tokens=tokens)


def official(work: Path, args) -> dict:
    import torch

    spec = importlib.util.spec_from_file_location("official_coconut", args.official_code / "coconut.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lm = load_lm(work, args)
    vocab = lm.config.vocab_size
    lm.resize_token_embeddings(vocab + 3)
    with torch.no_grad():
        embeddings = lm.get_input_embeddings().weight
        embeddings[vocab:] = embeddings[4]  # "<<", as our markers start (coconut_step's synthetic vocabulary)
    model = module.Coconut(lm, vocab + 2, vocab, vocab + 1, eos_token_id=NO_EOS)
    model.eval()
    placeholders = {-1: vocab, -2: vocab + 1, -4: vocab + 2}
    prompts = json.loads((work / "prompts.json").read_text())[: args.official_items]
    tokens = []
    start = time.perf_counter()
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([[placeholders.get(t, t) for t in prompt]])
            out = model.generate(ids, torch.ones_like(ids), max_new_tokens=args.new_tokens)
            tokens.append(out[0, len(prompt):].tolist())
    seconds = time.perf_counter() - start
    return dict(side="official", items=len(prompts), seconds=seconds, items_per_s=len(prompts) / seconds, tokens=tokens)


def drive(args) -> None:
    sides = {}
    with tempfile.TemporaryDirectory() as work:
        write_inputs(Path(work), args)
        common = ["--work", work, "--official-code", str(args.official_code), "--model", args.model, "--items", str(args.items),
                  "--official-items", str(args.official_items), "--batch-size", str(args.batch_size), "--latents",
                  str(args.latents), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).parent), str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))
        for name, python in (("official", args.official_python), ("ours", sys.executable)):
            out = subprocess.run([python, __file__, "--side", name, *common], env=env, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"the {name} side failed:\n{out.stderr[-3000:]}")
            sides[name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name:<9} {sides[name]['items']} items in {sides[name]['seconds']:.1f} s: "
                  f"{sides[name]['items_per_s']:.3f} items/s", flush=True)
    checked = sides["official"]["tokens"]
    same = [a == b for a, b in zip(checked, sides["ours"]["tokens"])]
    lengths = sorted({len(t) for t in checked + sides["ours"]["tokens"]})
    speedup = sides["ours"]["items_per_s"] / sides["official"]["items_per_s"]
    print(f"tokens identical on {sum(same)}/{len(same)} items (lengths {lengths}); ours {speedup:.1f}x the official's items/s")
    if not all(same) or lengths != [args.new_tokens]:
        sys.exit("the two sides' tokens differ (or a row stopped early)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            model=args.model, items=args.items, official_items=args.official_items, batch_size=args.batch_size,
            latents=args.latents, new_tokens=args.new_tokens, threads=args.threads, question_tokens=args.question_tokens,
            items_per_s={k: v["items_per_s"] for k, v in sides.items()}, seconds={k: v["seconds"] for k, v in sides.items()},
            speedup=speedup, tokens_identical=f"{sum(same)}/{len(same)}"), indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-code", type=Path, required=True, help="a clone of facebookresearch/coconut")
    parser.add_argument("--official-python", help="the official code's environment's python (transformers 4.46)")
    parser.add_argument("--model", choices=sorted(SHAPES), default="gpt2-20m")
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--official-items", type=int, default=4, help="items the official code generates (batch 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--question-tokens", type=int, default=100)
    parser.add_argument("--latents", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--side", choices=("ours", "official"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.official_items > args.items:
        parser.error("--official-items is at most --items")
    if args.side:
        import torch

        torch.set_num_threads(args.threads)
        result = (official if args.side == "official" else ours)(Path(args.work), args)
        print(json.dumps(result))
    elif not args.official_python:
        parser.error("--official-python is required (the official code's own environment)")
    else:
        drive(args)


if __name__ == "__main__":
    main()

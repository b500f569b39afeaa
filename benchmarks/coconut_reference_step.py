"""Our Coconut training step against the official code's, on the same weights and batch, each in its own process.

    python benchmarks/coconut_reference_step.py --official-code ~/src/coconut --official-python ~/cocovenv/bin/python \
        --model gpt2-20m --stage 3 --batch-size 32 --threads 2 --json benchmarks/results/coconut_reference_step.json

The official code (facebookresearch/coconut) pins transformers 4.46 and passes the KV cache as legacy tuples, which
transformers 5 no longer takes, so it runs in its own virtual environment, made once:

    python3 -m venv ~/cocovenv
    ~/cocovenv/bin/pip install torch==<this venv's torch> transformers==4.46.2 tqdm safetensors
    git clone https://github.com/facebookresearch/coconut ~/src/coconut

Nothing is copied from it: the harness imports the clone's ``coconut.py`` (its ``Coconut`` class) as it is.

The batch is GSM8K-shaped synthetic text (a question of about ``--question-tokens`` random words, 3 steps of about
``--step-tokens`` (``--stage`` steps if more), a 4-word answer) at stage ``--stage`` with c = ``--c``: each
example is ``question <bot> [latent] x stage*c <eot> (the steps left) ### answer <eos>``, left-padded so that the
first latents share a column (our ``curriculum.collate``; the official collator aligns them the same way). Both
sides get the same token ids (the official's three new vocabulary rows for our marker placeholders), mask, labels
and positions, and the same base weights (a random GPT-2 of ``SHAPES``; the official's three new rows and our
markers start from the embedding of ``<<``, as both codes do).

A step is forward, backward and an AdamW update (lr 1e-4, as the official GSM8K config). Rows:

    official        the official ``Coconut.forward`` (loss over full-vocabulary logits of every position)
    coconut         ``CoconutModel``
    coconut+ckpt    ``CoconutModel`` with activation checkpointing (exact through the latent passes)

Each row runs in a fresh process (the driver alternates them, ``--repeats`` times): ``step_s`` is the median of
``--steps`` steps after ``--warmup``; ``fwd_s``/``bwd_s``/``opt_s`` split it; ``peak_mb`` is the peak RSS and
``step_mb`` the peak less the RSS before the first step (activations, gradients, optimizer state).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # so that both sides compute the same loss
SHAPES = {  # GPT-2 configs (the paper's family); vocabulary and positions as GPT-2's
    "gpt2-20m": dict(n_embd=256, n_layer=8, n_head=8),  # 19.5M parameters, two thirds of them the embedding
    "gpt2-124m": dict(),  # GPT-2 small, the paper's model
}
N_STEPS, MARKER_TEXT = 3, "<<"  # GSM8K-like: 3 steps (more when --stage is higher)
ROWS = ("official", "coconut", "coconut+ckpt")


def synthetic_examples(count: int, question_tokens: int, step_tokens: int, n_steps: int, vocab: int, seed: int):
    """``count`` (question, steps, answer) texts of random words ``w<id>``; each length varies by about +-20%."""
    import random

    rng = random.Random(seed)

    def text(mean: int) -> str:
        spread = max(1, mean // 5)
        return " ".join(f"w{rng.randrange(5, vocab)}" for _ in range(max(1, mean + rng.randint(-spread, spread))))

    return [(text(question_tokens), tuple(text(step_tokens) for _ in range(n_steps)), text(4)) for _ in range(count)]


def build_batch(path: Path, args) -> None:
    """The shared batch (ids with our placeholders, mask, labels, positions) and weights, written to ``path``."""
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from coconut_step import synthetic_tokenizer
    from quietstar.coconut.curriculum import Layout, collate, encode
    from quietstar.coconut.markers import LATENT

    config = GPT2Config(**SHAPES[args.model], **NO_DROPOUT)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(config)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items() if k != "lm_head.weight"}, path / "weights.safetensors")
    tokenizer = synthetic_tokenizer(config.vocab_size)
    examples = synthetic_examples(args.batch_size, args.question_tokens, args.step_tokens, max(args.stage, N_STEPS),
                                  config.vocab_size, args.seed)
    latents = (LATENT,) * (args.stage * args.c)
    rows = [encode(Layout(q, True, latents, steps[args.stage:], a), tokenizer) for q, steps, a in examples]
    batch = collate(rows, tokenizer.pad_token_id)
    batch["position_ids"] = (batch["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
    torch.save(batch, path / "batch.pt")


def ours(path: Path, row: str, args):
    """CoconutModel on the shared weights; returns (model, loss function)."""
    import torch
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from coconut_step import synthetic_tokenizer
    from quietstar.coconut.config import CoconutConfig
    from quietstar.coconut.model import CoconutModel

    config = GPT2Config(**SHAPES[args.model], **NO_DROPOUT)
    lm = GPT2LMHeadModel(config)
    lm.load_state_dict(load_file(path / "weights.safetensors"), strict=False)  # lm_head is tied to the embedding
    lm.tie_weights()
    model = CoconutModel(lm, synthetic_tokenizer(config.vocab_size),
                         CoconutConfig(c=args.c, max_latent_stage=args.stage, marker_init_text=MARKER_TEXT))
    if row == "coconut+ckpt":
        lm.activation_checkpointing_enable()
    batch = torch.load(path / "batch.pt")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    return model, lambda: model(**inputs).loss


def official(path: Path, args):
    """The official ``Coconut`` on the shared weights, set up as its ``run.py`` does; returns (model, loss function)."""
    import torch
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    spec = importlib.util.spec_from_file_location("official_coconut", args.official_code / "coconut.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = GPT2Config(**SHAPES[args.model], **NO_DROPOUT)
    lm = GPT2LMHeadModel(config)
    lm.load_state_dict(load_file(path / "weights.safetensors"), strict=False)
    lm.tie_weights()
    vocab = config.vocab_size
    lm.resize_token_embeddings(vocab + 3)  # <|start-latent|>, <|end-latent|>, <|latent|>
    marker_id = 4  # "<<" in coconut_step's synthetic vocabulary
    with torch.no_grad():
        embeddings = lm.get_input_embeddings().weight
        embeddings[vocab:] = embeddings[marker_id]  # run.py initialises the new rows from "<<"
    start_id, end_id, latent_id = vocab, vocab + 1, vocab + 2
    model = module.Coconut(lm, latent_id, start_id, end_id, eos_token_id=2)
    batch = torch.load(path / "batch.pt")
    ids = batch["input_ids"].clone()
    ids[ids == -1], ids[ids == -2], ids[ids == -4] = start_id, end_id, latent_id  # our BOT, EOT, LATENT placeholders
    inputs = dict(input_ids=ids, attention_mask=batch["attention_mask"], labels=batch["labels"],
                  position_ids=batch["position_ids"])
    return model, lambda: model(**inputs).loss


def side(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    path = Path(args.work)
    model, loss_fn = official(path, args) if args.row == "official" else ours(path, args.row, args)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.01)
    torch.manual_seed(0)

    losses = []

    def step() -> tuple[float, float, float]:
        start = time.perf_counter()
        loss = loss_fn()
        losses.append(float(loss))
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return forward - start, backward - forward, time.perf_counter() - backward

    before_mb = _rss_mb()
    splits = [step() for _ in range(args.warmup + args.steps)][args.warmup:]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(row=args.row, first_loss=losses[0], step_s=statistics.median(sum(s) for s in splits),
                fwd_s=statistics.median(s[0] for s in splits), bwd_s=statistics.median(s[1] for s in splits),
                opt_s=statistics.median(s[2] for s in splits), peak_mb=peak_mb, step_mb=peak_mb - before_mb,
                params_m=sum(p.numel() for p in parameters) / 1e6, torch=torch.__version__,
                transformers=sys.modules["transformers"].__version__)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def drive(args) -> None:
    import torch

    results = []
    with tempfile.TemporaryDirectory() as work:
        build_batch(Path(work), args)
        batch = torch.load(Path(work) / "batch.pt")
        shape = list(batch["input_ids"].shape)
        common = ["--work", work, "--official-code", str(args.official_code), "--model", args.model, "--stage", str(args.stage),
                  "--c", str(args.c), "--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).parent), str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))
        for repeat in range(args.repeats):
            for row in args.rows:
                python = args.official_python if row == "official" else sys.executable
                out = subprocess.run([python, __file__, "--row", row, *common], env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"the {row} row failed:\n{out.stderr[-3000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                results.append(dict(result, repeat=repeat))
                print(f"{row:<13} repeat {repeat}: {result['step_s']:.3f} s/step (fwd {result['fwd_s']:.3f}, bwd "
                      f"{result['bwd_s']:.3f}, opt {result['opt_s']:.3f}), peak {result['peak_mb']:.0f} MB, step "
                      f"{result['step_mb']:.0f} MB", flush=True)

    first = {r["row"]: r["first_loss"] for r in results}
    if "official" in first and any(abs(v - first["official"]) > 1e-5 * abs(first["official"]) for v in first.values()):
        sys.exit(f"the rows' first losses differ (not the same model and batch): {first}")
    print(f"first-step loss, every row: {first}")

    def best(row: str, key: str) -> float:
        return min(r[key] for r in results if r["row"] == row)

    ratios = {row: {key: best(row, key) / best("official", key) for key in ("step_s", "fwd_s", "bwd_s", "peak_mb", "step_mb")}
              for row in args.rows if row != "official"}
    for row, r in ratios.items():
        print(f"{row} / official: step {r['step_s']:.2f}x (forward {r['fwd_s']:.2f}x, backward {r['bwd_s']:.2f}x), "
              f"peak memory {r['peak_mb']:.2f}x, step memory {r['step_mb']:.2f}x (best of {args.repeats})")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=args.model, stage=args.stage, c=args.c, batch=shape,
                                                   threads=args.threads, rows=results, ratios=ratios), indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-code", type=Path, required=True, help="a clone of facebookresearch/coconut")
    parser.add_argument("--official-python", help="the official code's environment's python (transformers 4.46)")
    parser.add_argument("--model", choices=sorted(SHAPES), default="gpt2-20m")
    parser.add_argument("--stage", type=int, default=3, help="curriculum stage: this many steps replaced by latents")
    parser.add_argument("--c", type=int, default=1, help="latents per replaced step")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--question-tokens", type=int, default=60)
    parser.add_argument("--step-tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--json")
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(side(args)))
    elif not args.official_python:
        parser.error("--official-python is required (the official code's own environment)")
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        drive(args)


if __name__ == "__main__":
    main()

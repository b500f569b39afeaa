"""Coconut training-step speed: CoconutModel vs a CoT step vs the official code's forward pattern.

    python benchmarks/coconut_step.py --out benchmarks/results/coconut_cpu.json          # GPT-2 124M, fp32, CPU
    python benchmarks/coconut_step.py --device cuda --dtype bf16 --out coconut_gpu.json  # on a GPU
    python benchmarks/coconut_step.py --model tiny --steps 1 --warmup 0 --batch-size 2   # smoke run

One step is forward + backward (no optimizer update) of one batch, timed three ways on
the same model and the same synthetic GSM8K-like examples (a question of about
``--question-tokens`` random token ids, 3 steps of about ``--step-tokens``, an answer of
about 4; lengths vary a little per example, so padding is exercised):

    coconut   CoconutModel.forward with labels, stage 3 with c = 2: the 6 latents replace
              all 3 steps (question <bot> [latent] x 6 <eot> ### answer <eos>)
    cot       CoconutModel.forward on the same examples written as CoT, no markers
              (question step1 step2 step3 ### answer <eos>); one plain pass
    official  the official Coconut code's forward pattern, restated here: n + 1 HF calls
              (prefix, one per latent column on the KV cache, the rest), each with
              ``output_hidden_states=True`` and the LM head's logits over all its positions;
              the input embeddings rebuilt per pass by ``torch.stack`` of Python lists of
              per-position vectors, and the positions to fill read back to the host per pass

Before timing, the official-pattern loss is checked against CoconutModel's on the
Coconut batch (fp32, eval mode, relative difference <= 1e-4). Steps are timed in train
mode, the three methods interleaved step by step (so a busy machine slows them alike);
the report is the median over ``--steps`` steps after ``--warmup`` untimed ones.

``--model gpt2`` is a randomly initialised GPT-2 124M (``GPT2Config()``, the paper's model;
no download), ``--model tiny`` a 2-layer GPT-2 of width 64, anything else a local HF
directory. Token ids are synthetic; a word-level tokenizer over the model's vocabulary
(words ``w<id>``) turns them into text for ``coconut.curriculum.encode``.

Prints a markdown table; ``--out`` writes the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config, PreTrainedTokenizerFast

from quietstar.coconut.config import CoconutConfig
from quietstar.coconut.curriculum import Layout, collate, encode
from quietstar.coconut.markers import LATENT
from quietstar.coconut.model import IGNORE, CoconutModel

SPECIALS = ["<pad>", "<unk>", "<eos>", "###", "<<"]  # ids 0..4; the content words w5, w6, ... follow
N_STEPS, ANSWER_TOKENS = 3, 4
STAGE, C = 3, 2  # GSM8K: c = 2 latents per step, max_latent_stage = 3, so stage 3 replaces all 3 steps with 6 latents
REL_TOL = 1e-4
METHODS = ("coconut", "cot", "official")


def build_lm(name: str) -> torch.nn.Module:
    """A fp32 causal LM: ``gpt2`` (random GPT-2 124M), ``tiny`` (random 2-layer GPT-2, width 64) or a local HF directory."""
    torch.manual_seed(0)
    if name == "gpt2":
        config = GPT2Config()
    elif name == "tiny":
        config = GPT2Config(vocab_size=512, n_positions=512, n_embd=64, n_layer=2, n_head=4,
                            bos_token_id=SPECIALS.index("<eos>"), eos_token_id=SPECIALS.index("<eos>"))
    else:
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, attn_implementation="sdpa")
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def synthetic_tokenizer(rows: int) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with one word per embedding row: the specials, then ``w<id>``."""
    vocab = {word: i for i, word in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), rows)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def synthetic_examples(count: int, question_tokens: int, step_tokens: int, rows: int, seed: int = 0):
    """``count`` (question, steps, answer) texts of random words; each length varies by about +-20%."""
    rng = random.Random(seed)

    def text(mean: int) -> str:
        spread = max(1, mean // 5)
        n = max(1, mean + rng.randint(-spread, spread))
        return " ".join(f"w{rng.randrange(len(SPECIALS), rows)}" for _ in range(n))

    return [(text(question_tokens), tuple(text(step_tokens) for _ in range(N_STEPS)), text(ANSWER_TOKENS)) for _ in range(count)]


def batches(examples, tokenizer, device: str) -> dict[str, dict[str, torch.Tensor]]:
    """The Coconut batch (stage 3, c = 2: 6 latents, no steps) and the CoT batch of the same examples."""
    latents = (LATENT,) * (STAGE * C)
    coconut = [encode(Layout(q, True, latents, (), a), tokenizer) for q, _, a in examples]
    cot = [encode(Layout(q, False, (), steps, a), tokenizer) for q, steps, a in examples]
    pad = tokenizer.pad_token_id
    return {name: {k: v.to(device) for k, v in collate(rows, pad).items()} for name, rows in (("coconut", coconut), ("cot", cot))}


def official_pattern_loss(model: CoconutModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          labels: torch.Tensor) -> torch.Tensor:
    """The loss of CoconutModel.forward, computed the way the official Coconut code runs its forward.

    Pass 0 covers the columns before the first latent; pass k (1..n) the k-th latent column
    alone, on the KV cache; pass n + 1 the rest. Every pass calls the HF causal LM with
    ``output_hidden_states=True`` (all layers' states kept) and takes its logits over the
    pass's positions. Between passes the whole [B, L, H] input embedding is rebuilt from
    Python lists of per-position vectors, with the last layer's state before each k-th
    latent written in, and the rows and columns to fill are read back to the host.
    The loss is the mean cross-entropy of the concatenated logits over the labelled targets.
    """
    lm = model.lm
    batch, length = input_ids.shape
    is_latent = input_ids == LATENT
    latent_rank = is_latent.long().cumsum(dim=1)  # k at a row's k-th latent (1-based)
    per_row = [[] for _ in range(batch)]
    for row, col in is_latent.nonzero().tolist():
        per_row[row].append(col)
    n_latents = max(len(cols) for cols in per_row)
    embeds = model.embed(input_ids)
    positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    start, stop = 0, (min(cols[0] for cols in per_row if cols) if n_latents else length)
    cache = DynamicCache(config=lm.config)
    logits = []
    for k in range(n_latents + 1):
        assert cache.get_seq_length() == start  # the official code slices its cache to [:start] here
        out = lm(inputs_embeds=embeds[:, start:stop], attention_mask=attention_mask[:, :stop],
                 position_ids=positions[:, start:stop], cache=cache, use_cache=True, output_hidden_states=True)
        logits.append(out.logits)
        if k == n_latents:
            break
        last_layer = out.hidden_states[-1]  # after the final norm
        to_fill = (is_latent & (latent_rank == k + 1)).nonzero().tolist()  # host sync, once per pass
        vectors = [[embeds[row, col] for col in range(length)] for row in range(batch)]
        for row, col in to_fill:
            vectors[row][col] = last_layer[row, col - 1 - start]
        embeds = torch.stack([torch.stack(row_vectors) for row_vectors in vectors])
        start, stop = stop, (stop + 1 if k + 1 < n_latents else length)
    logits = torch.cat(logits, dim=1)  # [B, L, V]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def check_losses(model: CoconutModel, batch: dict[str, torch.Tensor]) -> dict:
    """CoconutModel's loss and the official pattern's on one batch, in eval mode (no dropout); raises if they differ."""
    model.eval()
    with torch.no_grad():
        ours = float(model(**batch).loss)
        official = float(official_pattern_loss(model, **batch))
    rel = abs(ours - official) / max(abs(ours), 1e-12)
    if rel > REL_TOL:
        raise AssertionError(f"official-pattern loss {official:.6f} != CoconutModel loss {ours:.6f} (relative {rel:.2e} > {REL_TOL})")
    return {"coconut_loss": ours, "official_loss": official, "relative_diff": rel, "tolerance": REL_TOL, "passed": True}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def batch_tokens(batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Real positions (tokens, markers, latents), padded positions B * L, and scored targets of a batch."""
    return {"real": int(batch["attention_mask"].sum()), "padded": batch["input_ids"].numel(),
            "length": batch["input_ids"].shape[1], "scored": int((batch["labels"][:, 1:] != IGNORE).sum())}


def format_table(result: dict) -> str:
    times, tokens = result["times_s"], result["tokens"]
    fastest = {name: min(ts) for name, ts in result["all_times_s"].items()}
    lines = ["| method | s/step (median) | s/step (min) | tokens real / padded (L) | scored | median vs coconut |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in METHODS:
        t = tokens["cot" if name == "cot" else "coconut"]
        lines.append(f"| {name} | {times[name]:.3f} | {fastest[name]:.3f} | {t['real']} / {t['padded']} ({t['length']}) | "
                     f"{t['scored']} | {times[name] / times['coconut']:.2f}x |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", help="gpt2 (random GPT-2 124M), tiny (2-layer, width 64) or a local HF dir")
    parser.add_argument("--device", default="auto", help="cpu, cuda (or cuda:N) or auto (cuda when available)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="timed dtype; bf16 only on CUDA")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--question-tokens", type=int, default=60, help="mean question length")
    parser.add_argument("--step-tokens", type=int, default=12, help="mean length of each of the 3 steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (per method)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "bf16" and not args.device.startswith("cuda"):
        parser.error("--dtype bf16 is for CUDA; the CPU runs fp32")
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    lm = build_lm(args.model).to(device)
    rows = lm.get_input_embeddings().num_embeddings
    tokenizer = synthetic_tokenizer(rows)
    model = CoconutModel(lm, tokenizer, CoconutConfig(c=C, max_latent_stage=STAGE, marker_init_text="<<")).to(device)
    examples = synthetic_examples(args.batch_size, args.question_tokens, args.step_tokens, rows, args.seed)
    data = batches(examples, tokenizer, device)

    loss_check = check_losses(model, data["coconut"])  # fp32, before any cast
    if args.dtype == "bf16":
        model.to(torch.bfloat16)
    model.train()

    step_fns = {
        "coconut": lambda: model(**data["coconut"]).loss,
        "cot": lambda: model(**data["cot"]).loss,
        "official": lambda: official_pattern_loss(model, **data["coconut"]),
    }
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def one_step(name: str) -> float:
        sync()
        started = time.perf_counter()
        step_fns[name]().backward()
        model.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - started

    load_before = os.getloadavg()
    times = {name: [] for name in METHODS}
    for i in range(args.warmup + args.steps):
        for name in METHODS:  # interleaved, so load changes on a shared machine hit every method alike
            seconds = one_step(name)
            if i >= args.warmup:
                times[name].append(seconds)
    median = {name: statistics.median(ts) for name, ts in times.items()}

    import transformers

    result = {
        "benchmark": "coconut_step",
        "model": args.model,
        "params_m": sum(p.numel() for p in lm.parameters()) / 1e6,
        "device": device_name(device),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "latents": STAGE * C,
        "question_tokens": args.question_tokens,
        "step_tokens": args.step_tokens,
        "warmup": args.warmup,
        "steps": args.steps,
        "times_s": median,
        "all_times_s": times,
        "ratios": {"coconut/cot": median["coconut"] / median["cot"], "official/coconut": median["official"] / median["coconut"]},
        "tokens": {"coconut": batch_tokens(data["coconut"]), "cot": batch_tokens(data["cot"])},
        "loss_check": loss_check,
        "load_avg_1min": {"before": load_before[0], "after": os.getloadavg()[0]},  # other jobs on a shared machine
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print(f"{args.model} ({result['params_m']:.1f}M params), {result['device']}, {args.dtype}, batch {args.batch_size}, "
          f"{result['latents']} latents; forward + backward, median of {args.steps} after {args.warmup} warm-up")
    print(f"loss check: CoconutModel {loss_check['coconut_loss']:.6f}, official pattern {loss_check['official_loss']:.6f} "
          f"(relative {loss_check['relative_diff']:.1e})")
    print()
    print(format_table(result))
    print()
    print(f"coconut/cot {result['ratios']['coconut/cot']:.2f}, official/coconut {result['ratios']['official/coconut']:.2f} "
          f"(medians); 1-min load average {result['load_avg_1min']['before']:.2f} before, {result['load_avg_1min']['after']:.2f} after")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

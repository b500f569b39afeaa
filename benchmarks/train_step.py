"""Quiet-STaR training-step speed and memory: the one-pass and efficient formulations vs the sequential oracle.

    python benchmarks/train_step.py --json results.json          # CPU grid (~20M-parameter Llama)
    python benchmarks/train_step.py --device cuda --json gpu.json  # GPU grid (1B-class Llama, bf16)
    python benchmarks/train_step.py --device cuda --model smollm2-135m --seq-lens 256 --thought-lens 9 \
        --batch-size 8 --formulations efficient --generation-tokens 0        # SmolLM2-135M's shape, the paper's L, M, K, R

Every row runs in a forked child process, so its peak memory is its own: process RSS
(``ru_maxrss``) on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU. A step
is forward, backward and an AdamW update; ``step_s`` is the median over
``--steps`` steps after ``--warmup`` untimed ones. Random token ids stand in for
text (speed does not depend on them). Generation rows compare tokens/s of
``quietstar.generation.generate`` with thoughts on and off.

On the CPU the first row measures the machine's matmul rate (a square ``--gemm-size`` GEMM in the
grid's dtype and thread count), and every row's MFU is its model FLOP/s over that rate: the
CPU's roofline. ``plain_step`` rows run the LM alone (forward, backward, AdamW) on as many tokens
as the grid point's step trains (``plain_tokens``): the MFU a Quiet-STaR step should match.

``--lora-ranks 0 16`` adds, for the one-pass and efficient formulations, rows where the base LM is frozen and
rank-16 LoRA adapters (``core.lora``, every linear layer) train instead: the LoRA column.

Prints a table and writes a JSON list of rows:
    kind ("gemm" | "train_step" | "plain_step" | "generation"), formulation ("one_pass" | "efficient" | "oracle"; for
    generation "thoughts" | "no thoughts"), checkpointing (activation checkpointing on),
    lora_rank (0: every weight trains), model (the shape: ``MODELS``),
    seq_len, thought_len, n_true, n_thoughts, batch_size, step_s, peak_mem_mb,
    tokens_per_s, tflops, mfu, device, status ("ok" | "skipped: ...").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

GRIDS = {
    "cpu": {"seq_len": [64, 128, 256], "thought_len": [4, 8, 16], "n_true": 4, "n_thoughts": 2, "batch_size": 1, "dtype": "float32"},
    "cuda": {"seq_len": [256, 512], "thought_len": [8, 16, 24], "n_true": 4, "n_thoughts": 2, "batch_size": 2, "dtype": "bfloat16"},
}
MODELS = {  # fixed, randomly initialised Llama configs (speed and memory do not depend on the weights)
    # 23M parameters. An 8k vocabulary keeps the LM head a modest share of the FLOPs, as it is in 1B-7B models.
    "llama-23m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=8192, tie_word_embeddings=True),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),  # SmolLM2-135M's shape
}
DEFAULT_MODEL = {"cpu": "llama-23m", "cuda": "tinyllama-1.1b"}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, per GPU


def build(device: str, model_name: str, dtype_name: str, formulation: str, thought_len: int, n_true: int, n_thoughts: int,
          lora_rank: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from quietstar import QuietStarConfig, QuietStarModel

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, **MODELS[model_name])
    dtype = getattr(torch, dtype_name)
    with torch.device(device):  # initialised where it runs: a 1B model's random init takes seconds on a CPU
        lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    if lora_rank:
        from quietstar.core.lora import add_lora, lora_config

        add_lora(lm, lora_config(lora_rank, alpha=2.0 * lora_rank, dropout=0.0, target_modules="all-linear"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"---": 0, "<unk>": 1}, unk_token="<unk>")))
    method = QuietStarConfig(thought_len=thought_len, n_true=n_true, n_thoughts=n_thoughts,
                             formulation="sequential" if formulation == "oracle" else formulation)
    model = QuietStarModel(lm, tokenizer, method).to(device)
    return model, config


def forward_flops(cfg):
    """``forward(tokens, keys, logit_tokens)``: model FLOPs of a forward over ``tokens`` tokens that attend to ``keys``
    keys in all and compute ``logit_tokens`` rows of logits (2 per token per weight, attention and logits counted)."""
    h, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    head_dim = h // cfg.num_attention_heads
    q_width, kv_width = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    per_token = 2 * layers * (2 * h * q_width + 2 * h * kv_width + 3 * h * cfg.intermediate_size)
    attention_per_key = 4 * layers * q_width

    def forward(tokens: float, keys: float, logit_tokens: float) -> float:
        return tokens * per_token + keys * attention_per_key + logit_tokens * 2 * h * vocab

    return forward


def step_flops(cfg, batch: int, length: int, M: int, K: int, R: int, formulation: str = "efficient") -> float:
    """Model FLOPs of one step: 2/token/parameter forward (x3 with backward) plus attention and logits.

    Counts every token forwarded, with the keys each query really attends to under the diagonal
    mask: the trained pass, and for the formulations that sample apart from it (``efficient``,
    ``oracle``) the sampling forwards too; ``one_pass`` samples inside the trained pass.
    """
    forward, h, vocab = forward_flops(cfg), cfg.hidden_size, cfg.vocab_size
    text_keys = (length + 1) / 2  # mean causal keys over positions
    rows = batch * R

    sampling = forward(batch * length, batch * length * text_keys, 0)
    sampling += sum(forward(rows * length, rows * length * (text_keys + k + 1), rows * length) for k in range(M))
    n_blocks = M + K + 1
    trained = forward(batch * length, batch * length * text_keys, batch * length)
    trained += sum(forward(rows * length, rows * length * (text_keys + k + 1), 0) for k in range(n_blocks))
    trained += (M + K) * rows * length * 2 * h * vocab  # policy and talk logits
    if formulation == "one_pass":  # its sampling logits are forward-only; the forwards are the trained ones
        return M * rows * length * 2 * h * vocab + 3 * trained
    return sampling + 3 * trained


def timed_steps(one_step, spec: dict) -> tuple[float, float]:
    """Run ``one_step`` ``spec['warmup']`` times untimed, then ``spec['steps']`` times: the median seconds and the
    peak memory in MB (``torch.cuda.max_memory_allocated`` over the timed steps on a GPU, process RSS on the CPU)."""
    import torch

    cuda = spec["device"].startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed() -> float:
        sync()
        start = time.perf_counter()
        one_step()
        sync()
        return time.perf_counter() - start

    for _ in range(spec["warmup"]):
        timed()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step_s = statistics.median(timed() for _ in range(spec["steps"]))
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return step_s, peak


def run_train_row(spec: dict) -> dict:
    import torch

    from quietstar import build_param_groups

    device = spec["device"]
    model, cfg = build(device, spec["model"], spec["dtype"], spec["formulation"], spec["thought_len"], spec["n_true"], spec["n_thoughts"],
                       spec.get("lora_rank", 0))
    model.train()
    if spec["checkpointing"]:
        model.lm.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(build_param_groups(model, lr=1e-6, weight_decay=0.0))
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(2, cfg.vocab_size, (spec["batch_size"], spec["seq_len"]), generator=g).to(device)

    def one_step() -> None:
        model(ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s, peak = timed_steps(one_step, spec)
    flops = step_flops(cfg, spec["batch_size"], spec["seq_len"], spec["thought_len"], spec["n_true"], spec["n_thoughts"],
                       spec["formulation"])
    row = dict(spec, step_s=step_s, peak_mem_mb=peak, tokens_per_s=spec["batch_size"] * spec["seq_len"] / step_s,
               tflops=flops / step_s / 1e12, mfu=None, device=device_name(device), status="ok",
               params_m=sum(p.numel() for p in model.lm.parameters()) / 1e6)
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in row["device"]), None)
    if peak_flops and spec["dtype"] == "bfloat16":
        row["mfu"] = flops / step_s / peak_flops
    return row


def plain_tokens(spec: dict) -> int:
    """Tokens of the plain row matched to a Quiet-STaR grid point: every token the step trains on,
    ``batch * L * (1 + R * (M + K + 1))`` (the text, and R thoughts of M tokens plus K+1 talk positions per token)."""
    return spec["batch_size"] * spec["seq_len"] * (1 + spec["n_thoughts"] * (spec["thought_len"] + spec["n_true"] + 1))


def run_plain_row(spec: dict) -> dict:
    """The LM alone, forward + backward + AdamW, on ``plain_tokens(spec)`` tokens as rows of L: the MFU to match."""
    import torch

    device = spec["device"]
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(max_position_embeddings=4096, **MODELS[spec["model"]])
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=getattr(torch, spec["dtype"]))
    lm.train()
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-6)
    rows = plain_tokens(spec) // spec["seq_len"]
    ids = torch.randint(2, cfg.vocab_size, (rows, spec["seq_len"]), generator=torch.Generator().manual_seed(0)).to(device)

    def one_step() -> None:
        lm(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s, peak = timed_steps(one_step, spec)
    flops = plain_flops(cfg, rows, spec["seq_len"])
    return dict(spec, step_s=step_s, peak_mem_mb=peak, tokens_per_s=rows * spec["seq_len"] / step_s,
                tflops=flops / step_s / 1e12, mfu=None, device=device_name(device), status="ok")


def plain_flops(cfg, rows: int, length: int) -> float:
    """Model FLOPs of a plain causal-LM training step on ``rows`` x ``length`` tokens (``forward_flops``, x3)."""
    tokens = rows * length
    return 3 * forward_flops(cfg)(tokens, tokens * (length + 1) / 2, tokens)


def run_gemm_row(spec: dict) -> dict:
    """The machine's matmul rate: a square GEMM of ``spec['gemm_size']`` in the grid's dtype, median of 5 after 2."""
    import torch

    n, device = spec["gemm_size"], spec["device"]
    a, b = (torch.randn(n, n, dtype=getattr(torch, spec["dtype"]), device=device) for _ in range(2))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def once() -> float:
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        return time.perf_counter() - start

    for _ in range(2):
        once()
    seconds = statistics.median(once() for _ in range(5))
    return dict(spec, step_s=seconds, tflops=2 * n**3 / seconds / 1e12, device=device_name(device), status="ok")


def run_generation_row(spec: dict) -> dict:
    import torch

    from quietstar.quiet_star.generation import generate

    device = spec["device"]
    model, cfg = build(device, spec["model"], spec["dtype"], "efficient", spec["thought_len"], spec["n_true"], spec["n_thoughts"])
    model.eval()
    g = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(2, cfg.vocab_size, (spec["batch_size"], spec["seq_len"]), generator=g).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    new_tokens = spec["new_tokens"]

    def once() -> float:
        sync()
        start = time.perf_counter()
        generate(model, prompt, max_new_tokens=new_tokens, thoughts=spec["thoughts"], greedy=True)
        sync()
        return time.perf_counter() - start

    once()
    seconds = statistics.median(once() for _ in range(spec["steps"]))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(spec, formulation="thoughts" if spec["thoughts"] else "no thoughts", step_s=seconds, peak_mem_mb=peak,
                tokens_per_s=spec["batch_size"] * new_tokens / seconds, tflops=None, mfu=None, device=device_name(device),
                status="ok")


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads)"


def _child(spec: dict, conn) -> None:
    try:
        import torch

        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        run = {"train_step": run_train_row, "plain_step": run_plain_row, "gemm": run_gemm_row}.get(spec["kind"], run_generation_row)
        row = run(spec)
        conn.send(("ok", row))
    except Exception as error:  # reported as the row's status
        conn.send(("error", f"{type(error).__name__}: {error}"))


def run_row_in_child(spec: dict, timeout: float) -> dict:
    """One row in a forked child (imports already done), so peak memory is this row's alone."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(spec, child))
    process.start()
    child.close()
    if not parent.poll(timeout):
        process.kill()
        process.join()
        return dict(spec, status=f"skipped: over the {timeout:.0f} s row limit")
    try:
        status, payload = parent.recv()
    except EOFError:  # killed, most likely by the kernel's OOM killer
        process.join()
        return dict(spec, status=f"skipped: does not fit in memory (exit {process.exitcode})")
    process.join()
    if status == "ok":
        return payload
    if "out of memory" in payload.lower():
        return dict(spec, status="skipped: does not fit in memory")
    return dict(spec, status=f"failed: {payload}")


def label(row: dict) -> str:
    return row["formulation"] + ("+ckpt" if row.get("checkpointing") else "") + (f"+lora{row['lora_rank']}" if row.get("lora_rank") else "")


def format_table(rows: list[dict]) -> str:
    head = f"{'kind':<11} {'formulation':<15} {'L':>4} {'M':>3} {'step_s':>8} {'peak_mb':>8} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        def num(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "-"
        lines.append(
            f"{r['kind']:<11} {label(r):<15} {r['seq_len']:>4} {r['thought_len']:>3} {num('step_s', '8.3f')} "
            f"{num('peak_mem_mb', '8.0f')} {num('tokens_per_s', '9.1f')} {num('tflops', '8.3f')} {num('mfu', '6.1%')}  {r['status']}"
        )
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    """Ratios to the oracle (and LoRA rows' to full fine-tuning) for every grid point where both ran."""
    out = []
    for r in rows:
        if r["kind"] != "train_step" or r["formulation"] == "oracle" or r["status"] != "ok":
            continue
        if r.get("lora_rank"):
            full = next((f for f in rows if f["kind"] == "train_step" and f["formulation"] == r["formulation"] and f["status"] == "ok"
                         and not f.get("lora_rank") and f["checkpointing"] == r["checkpointing"]
                         and f["seq_len"] == r["seq_len"] and f["thought_len"] == r["thought_len"]), None)
            if full:
                out.append(f"L={r['seq_len']:>4} M={r['thought_len']:>2} {label(r):<15}: /full fine-tuning time "
                           f"{r['step_s'] / full['step_s']:.2f}, peak memory {r['peak_mem_mb'] / full['peak_mem_mb']:.2f}")
            continue
        oracle = next((o for o in rows if o["kind"] == "train_step" and o["formulation"] == "oracle" and o["status"] == "ok"
                       and o["seq_len"] == r["seq_len"] and o["thought_len"] == r["thought_len"]), None)
        if oracle:
            out.append(f"L={r['seq_len']:>4} M={r['thought_len']:>2} {label(r):<15}: /oracle time {r['step_s'] / oracle['step_s']:.2f}, "
                       f"peak memory {r['peak_mem_mb'] / oracle['peak_mem_mb']:.2f}")
        plain = next((p for p in rows if p["kind"] == "plain_step" and p["status"] == "ok" and p["seq_len"] == r["seq_len"]
                      and p["thought_len"] == r["thought_len"]), None)
        if plain and r.get("mfu") and plain.get("mfu"):
            out.append(f"L={r['seq_len']:>4} M={r['thought_len']:>2} {label(r):<15}: MFU {r['mfu']:.1%} against the plain "
                       f"LM step's {plain['mfu']:.1%} on the same tokens ({r['mfu'] / plain['mfu']:.2f}x)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--model", choices=sorted(MODELS), help="the model's shape (default: llama-23m on the CPU, tinyllama-1.1b on CUDA)")
    parser.add_argument("--seq-lens", type=int, nargs="+", help="override the grid's L values")
    parser.add_argument("--thought-lens", type=int, nargs="+", help="override the grid's M values")
    parser.add_argument("--n-true", type=int, help="override K")
    parser.add_argument("--batch-size", type=int, help="override the batch size")
    parser.add_argument("--formulations", nargs="+", default=["one_pass", "efficient", "oracle"],
                        choices=["one_pass", "efficient", "oracle"])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--row-timeout", type=float, default=300.0, help="seconds before a row is skipped")
    parser.add_argument("--generation-tokens", type=int, default=32, help="new tokens per generation row; 0 skips them")
    parser.add_argument("--lora-ranks", type=int, nargs="+", default=[0],
                        help="LoRA ranks of the efficient rows; 0 trains every weight (e.g. --lora-ranks 0 16)")
    parser.add_argument("--checkpointing-rows", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the efficient step with activation checkpointing at the longest L")
    parser.add_argument("--plain-rows", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the LM alone (forward + backward + AdamW) on as many tokens as each grid point trains")
    parser.add_argument("--threads", type=int, help="torch threads of every row (default: torch's own choice)")
    parser.add_argument("--gemm-size", type=int, default=2048, help="edge of the square GEMM that measures the CPU's matmul rate")
    args = parser.parse_args()

    import torch

    import quietstar  # noqa: F401  (imported once here; every row runs in a forked child)

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    grid = dict(GRIDS["cuda" if device.startswith("cuda") else "cpu"])
    grid["seq_len"] = args.seq_lens or grid["seq_len"]
    grid["thought_len"] = args.thought_lens or grid["thought_len"]
    grid["n_true"] = args.n_true or grid["n_true"]
    grid["batch_size"] = args.batch_size or grid["batch_size"]
    model = args.model or DEFAULT_MODEL["cuda" if device.startswith("cuda") else "cpu"]
    common = dict(device=device, model=model, dtype=grid["dtype"], n_true=grid["n_true"], n_thoughts=grid["n_thoughts"],
                  batch_size=grid["batch_size"], steps=args.steps, warmup=args.warmup, threads=args.threads)
    # Activation checkpointing (which the oracle cannot use) is measured at the longest L.
    specs = [dict(common, kind="train_step", formulation=f, checkpointing=ckpt, seq_len=L, thought_len=M, lora_rank=rank)
             for L in grid["seq_len"] for M in grid["thought_len"] for f in args.formulations
             for ckpt in ([False, True] if f == "efficient" and L == max(grid["seq_len"]) and args.checkpointing_rows else [False])
             for rank in (args.lora_ranks if f != "oracle" else [0])]
    if args.plain_rows:
        specs += [dict(common, kind="plain_step", formulation="plain", checkpointing=False, seq_len=L, thought_len=M)
                  for L in grid["seq_len"] for M in grid["thought_len"]]
    if args.generation_tokens > 0:
        M = grid["thought_len"][len(grid["thought_len"]) // 2]
        specs += [dict(common, kind="generation", formulation="", checkpointing=False, seq_len=grid["seq_len"][0],
                       thought_len=M, thoughts=on, new_tokens=args.generation_tokens) for on in (False, True)]

    rows = []
    started = time.perf_counter()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    gemm = None
    if not device.startswith("cuda"):  # the CPU's roofline: its measured matmul rate, in the rows' dtype and threads
        gemm = run_row_in_child(dict(common, kind="gemm", gemm_size=args.gemm_size), args.row_timeout)
        rows.append(gemm)
        print(f"GEMM {args.gemm_size}x{args.gemm_size} {grid['dtype']}: {gemm.get('tflops', 0) * 1e3:.1f} GFLOP/s "
              f"({gemm['status']}); CPU MFU below is model FLOP/s over this rate", flush=True)
    for spec in specs:
        row = run_row_in_child(spec, args.row_timeout)
        if gemm and gemm["status"] == "ok" and row.get("tflops"):
            row["mfu"] = row["tflops"] / gemm["tflops"]
        row.setdefault("formulation", spec["formulation"])
        rows.append(row)
        print(format_table([row]).splitlines()[-1], flush=True)
        if args.json:  # after every row, so that a run stopped early keeps the rows it finished
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print()
    print(format_table([r for r in rows if r["kind"] != "gemm"]))
    for line in ratios(rows):
        print(line)
    print(f"device: {rows[0].get('device', device)}; total {time.perf_counter() - started:.0f} s")
    if args.json:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

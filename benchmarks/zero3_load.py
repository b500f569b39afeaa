"""Per-rank host memory while loading a model for ZeRO training: the old whole fp32 load vs the recipes' load.

    python benchmarks/zero3_load.py --json benchmarks/results/zero3_load_cpu.json     # ~300M Llama, 2 ranks, ZeRO-3
    python benchmarks/zero3_load.py --precision bf16 --deepspeed ds_configs/zero2.json --methods quietstar
    python benchmarks/zero3_load.py --layers 2 --hidden 64 --vocab 512 --ranks 2       # smoke run

A randomly initialised Llama (default: hidden 1024, MLP 2816, 18 layers, 16 heads, an untied
32,000-row vocabulary: 296M parameters, 1.2 GB in fp32, saved in bf16 as released checkpoints
are) is saved once as a plain HF directory. Then, for each method (Quiet-STaR, Coconut) and each
way of loading, ``deepspeed --num_gpus RANKS`` starts fresh processes that load it with the
DeepSpeed config (default ``ds_configs/zero3.json``) and ``--precision``:

    whole    ``core.loading.load_model``: every rank builds and fills the full fp32 model
             (what the recipes did before, whatever the stage and precision)
    recipe   ``training.engine.load_for_training``: under ZeRO-3 the LM is built inside
             ``deepspeed.zero.Init`` and only rank 0 reads the checkpoint; under ZeRO-0/1/2
             every rank loads it whole, in the training precision

Each rank reports its peak anonymous and total resident memory after loading and after
``deepspeed.initialize``, its memory just before loading (imports, process group), the
parameter elements it holds and their dtype. The table gives the worst rank of each row and
the ratio recipe / whole.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("quietstar", "coconut")
PEAKS = ("peak_anon_loaded_mb", "peak_rss_loaded_mb", "peak_anon_initialized_mb", "peak_rss_initialized_mb")  # the worst rank's
MODES = ("whole", "recipe")


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``RssAnon``, ``VmHWM``) in MB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


class AnonPeak:
    """The peak of this process's anonymous resident memory (``RssAnon``: heap and tensors, not mapped files),
    sampled every 5 ms on a thread; the kernel keeps no peak of it."""

    def __init__(self) -> None:
        self.peak, self._stop = status_mb("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, status_mb("RssAnon"))

    def read(self) -> float:
        self.peak = max(self.peak, status_mb("RssAnon"))
        return self.peak


def save_model(directory: Path, args: argparse.Namespace) -> int:
    """A random Llama and a word-level tokenizer over its vocabulary in ``directory``; returns the parameter count."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate or int(args.hidden * 2.75),
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         vocab_size=args.vocab, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # stored in bf16, as released checkpoints are
    model.save_pretrained(directory)
    words = ["<pad>", "<eos>", "---"] + [f"w{i}" for i in range(3, args.vocab)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>").save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def worker(model_dir: str, method: str, mode: str, out_dir: str, precision: str, ds_path: str) -> None:
    """One rank: load, then ``deepspeed.initialize``; write its memory figures to ``out_dir/rank<N>.json``.

    The body runs inside ``run_recipe``, as the recipes' does, so that torch's process group and DeepSpeed's references
    to it are torn down before the interpreter exits (a rank exiting with them alive can abort in gloo's threads:
    "terminate called without an active exception")."""
    from quietstar.training.engine import run_recipe

    if run_recipe("zero3_load worker", lambda: measure_rank(model_dir, method, mode, out_dir, precision, ds_path)) != 0:
        raise SystemExit(2)


def measure_rank(model_dir: str, method: str, mode: str, out_dir: str, precision: str, ds_path: str) -> None:
    """The worker's body: one rank's load and ``deepspeed.initialize``, measured."""
    import torch.distributed as dist

    from quietstar.coconut.config import CoconutConfig
    from quietstar.coconut.model import CoconutModel
    from quietstar.core.loading import load_model
    from quietstar.core.zero3 import parameter_counts
    from quietstar.quiet_star.config import QuietStarConfig
    from quietstar.quiet_star.model import QuietStarModel
    from quietstar.training.engine import init_distributed, initialize, load_for_training
    from quietstar.training.train_config import TrainConfig, deepspeed_config

    rank, world, device = init_distributed()
    model_class, method_config = {"quietstar": (QuietStarModel, QuietStarConfig(marker_init_text="---")),
                                  "coconut": (CoconutModel, CoconutConfig(marker_init_text="---"))}[method]
    cfg = TrainConfig(model=model_dir, deepspeed=ds_path, precision=precision)
    ds_config = deepspeed_config(cfg, device.type, world)
    row = {"method": method, "mode": mode, "precision": precision, "rank": rank, "anon_before_load_mb": round(status_mb("RssAnon"), 1)}
    anon = AnonPeak()
    if mode == "whole":
        model = load_model(model_class, model_dir, method_config)
        row["loaded"] = {"partitioned": False, "dtype": "float32"}
    else:
        model, record = load_for_training(model_class, cfg, method_config, ds_config)
        row["loaded"] = {key: record[key] for key in ("partitioned", "dtype")}
    row["held_parameters"], row["parameters"] = parameter_counts(model.lm)
    row["held_dtypes"] = sorted({str(getattr(p, "ds_tensor", p).dtype) for p in model.lm.parameters()})
    row.update(peak_anon_loaded_mb=round(anon.read(), 1), peak_rss_loaded_mb=round(status_mb("VmHWM"), 1))
    engine = initialize(model, cfg, ds_config, total_steps=1)
    row.update(peak_anon_initialized_mb=round(anon.read(), 1), peak_rss_initialized_mb=round(status_mb("VmHWM"), 1),
               held_after_initialize=parameter_counts(engine.module.lm)[0])
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(row) + "\n")
    dist.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="ratios need both")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="the recipes' --precision; with bf16 the recipe loads (or zero.Init makes) bf16 weights (default: fp32)")
    parser.add_argument("--deepspeed", type=Path, default=ROOT / "ds_configs" / "zero3.json", help="DeepSpeed config (default: zero3.json)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--worker", nargs=6, metavar=("MODEL_DIR", "METHOD", "MODE", "OUT_DIR", "PRECISION", "DS_CONFIG"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return []

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        parameters = save_model(Path(tmp) / "model", args)
        print(f"random Llama: {parameters / 1e6:.1f}M parameters ({parameters * 4 / 2**30:.2f} GiB fp32), {args.ranks} ranks, {args.deepspeed.name}, {args.precision}")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        for method in args.methods:
            for mode in args.modes:
                out_dir = Path(tmp) / f"{method}-{mode}"
                out_dir.mkdir()
                command = ["deepspeed", "--num_gpus", str(args.ranks), "--master_port", str(free_port()), __file__,
                           "--worker", str(Path(tmp) / "model"), method, mode, str(out_dir), args.precision,
                           str(args.deepspeed.resolve())]
                result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
                if result.returncode != 0:
                    raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
                ranks = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(args.ranks)]
                rows.append({"method": method, "mode": mode, "ranks": ranks,
                             **{f"max_{k}": max(r[k] for r in ranks) for k in PEAKS}})
    print("\n| method | loading | held per rank | peak anon MB, loaded | VmHWM MB, loaded | anon loaded / whole "
          "| peak anon MB, after deepspeed.initialize | VmHWM MB, after initialize |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        whole = next((r for r in rows if r["method"] == row["method"] and r["mode"] == "whole"), None)
        loaded = row["ranks"][0]["loaded"]
        how = f"{row['mode']} ({'partitioned' if loaded['partitioned'] else 'whole'}, {loaded['dtype']})"
        held = ", ".join(f"{r['held_parameters'] / 1e6:.1f}M" for r in row["ranks"])
        ratio = f"{row['max_peak_anon_loaded_mb'] / whole['max_peak_anon_loaded_mb']:.2f}" if whole else ""
        print(f"| {row['method']} | {how} | {held} | {row['max_peak_anon_loaded_mb']:.0f} | {row['max_peak_rss_loaded_mb']:.0f} | "
              f"{ratio} | {row['max_peak_anon_initialized_mb']:.0f} | {row['max_peak_rss_initialized_mb']:.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"parameters": parameters, "ranks": args.ranks, "precision": args.precision,
                                                "deepspeed": args.deepspeed.name, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()

"""ZeRO-3 with the optimizer offloaded (``ds_configs/zero3_offload.json``, DeepSpeedCPUAdam) against plain ZeRO-3.

    python benchmarks/zero3_offload.py --json benchmarks/results/zero3_offload_cpu.json

Two 2-rank Quiet-STaR runs through ``bash launch/pretrain.sh``, the same in everything but the
DeepSpeed config, on a random Llama (hidden 256, 4 layers, a 512-word vocabulary) and a
synthetic corpus: ``zero3.json`` (torch's AdamW) and ``zero3_offload.json`` (the optimizer
state and step on the host, in DeepSpeed's C++ ``DeepSpeedCPUAdam``, compiled on first use).
Both run to ``final/``. Reported: the optimizer each run used (from its ``config.json``), the
losses of every step side by side, seconds per step, and the largest difference between the
two ``final/`` models' weights, loaded with a stock ``AutoModelForCausalLM``. On this CPU the
parameters live on the host either way, so memory is not compared: what this shows is that the
offload path runs, exports, and takes the same steps.

This lives here rather than in the tests because the first use compiles DeepSpeedCPUAdam
(about two minutes on two cores).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("zero3", "zero3_offload")


def fixture(root: Path, vocab: int = 512) -> None:
    words = ["<pad>", "<eos>", "---"] + [f"w{i}" for i in range(3, vocab)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=vocab)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>").save_pretrained(root / "model")
    rng = random.Random(0)
    with (root / "text.jsonl").open("w") as f:
        for _ in range(80):
            f.write(json.dumps({"text": " ".join(rng.choice(words[3:]) for _ in range(rng.randint(20, 80)))}) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(root: Path, config: str, steps: int) -> dict:
    out = root / config
    command = ["bash", str(ROOT / "launch" / "pretrain.sh"), "--num-gpus", "2", "--master-port", str(free_port()),
               "--model", str(root / "model"), "--dataset", str(root / "text.jsonl"), "--output-dir", str(out),
               "--deepspeed", str(ROOT / "ds_configs" / f"{config}.json"), "--max-steps", str(steps), "--seed", "3",
               "--seq-len", "32", "--thought-len", "3", "--n-true", "2", "--micro-batch-size", "2", "--lr", "1e-3",
               "--warmup-steps", "0", "--heldout-documents", "4", "--eval-every", str(steps), "--save-every", str(steps),
               "--precision", "fp32"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if "loss" in r]
    return {"config": config, "optimizer": json.loads((out / "config.json").read_text())["optimizer"],
            "losses": [r["loss"] for r in steps_], "seconds_per_step": sum(r["step_s"] for r in steps_) / len(steps_),
            "final": str(out / "final")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fixture(root)
        runs = {config: train(root, config, args.steps) for config in CONFIGS}
        finals = [AutoModelForCausalLM.from_pretrained(runs[c]["final"]).state_dict() for c in CONFIGS]
        weight_diff = max(float((finals[0][k] - finals[1][k]).abs().max()) for k in finals[0])
        moved = max(float((finals[0][k] - AutoModelForCausalLM.from_pretrained(root / "model").state_dict()[k]).abs().max())
                    for k in finals[0])
    loss_diff = max(abs(a - b) for a, b in zip(runs["zero3"]["losses"], runs["zero3_offload"]["losses"]))
    print("| config | optimizer | losses by step | s/step |")
    print("| --- | --- | --- | --- |")
    for run in runs.values():
        print(f"| {run['config']}.json | {run['optimizer']} | {', '.join(f'{x:.5f}' for x in run['losses'])} | {run['seconds_per_step']:.2f} |")
    print(f"\nlargest loss difference {loss_diff:.2e}; largest final/ weight difference {weight_diff:.2e} "
          f"(the weights moved by up to {moved:.2e} from their start)")
    result = {"runs": runs, "max_loss_difference": loss_diff, "max_final_weight_difference": weight_diff,
              "max_weight_change": moved}
    for run in result["runs"].values():
        run.pop("final")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

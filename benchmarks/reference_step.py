"""Our Quiet-STaR training step against the paper's reference code, on the same weights and batch.

    python benchmarks/reference_step.py --reference-code ~/src/quiet-star --reference-python ~/refvenv/bin/python \
        --threads 1 --json benchmarks/results/reference_step_cpu.json

The reference (ezelikman/quiet-star) is a patched ``modeling_mistral.py`` for transformers 4.37, so it runs in
its own virtual environment, made once:

    python3 -m venv ~/refvenv
    ~/refvenv/bin/pip install torch==<this venv's torch> transformers==4.37.2 "numpy<2" pandas matplotlib termcolor \
        tqdm safetensors
    git clone https://github.com/ezelikman/quiet-star ~/src/quiet-star

Nothing is copied into that environment: the harness loads the clone's ``modeling_mistral.py`` as a submodule of
``transformers.models.mistral`` (its relative imports resolve there) and passes the settings the reference's
``configuration_mistral.py`` adds as config attributes. Its plotting imports (seaborn, wandb, reportlab) are
never called in a training step; they are stood in for by empty modules.

The setting is the reference's own (``quiet-star-train.py``): n_ahead 12, n_ahead_talk 4, n_passes 2, the
merged, weighted, concatenating talk head, Gumbel temperature 1, the policy loss on. Ours runs the same objective
(``launch/configs/paper.yaml``'s fields: thought_len 9 = n_ahead less <sot>, <eot> and the base pass; n_true 4;
n_thoughts 2; the reference loss reduction and weights; the two-layer mixing head) in the one-pass formulation.

Our rows (``--ours``) are the one pass (the default formulation) and the replay formulation with activation
checkpointing (what ``launch/configs/paper.yaml`` trains); the reference trains without checkpointing.

Both sides load the same base weights (a random ~28M Mistral written here as safetensors), run one micro-batch of
``--batch-size`` random sequences of ``--seq-len`` tokens, and take the same step: forward, backward, gradient
clipping at 1.0 and an AdamW update over every parameter. Each side runs in its own fresh process (the driver
alternates them), so its memory is its own:

    step_s       median seconds of ``--steps`` steps after ``--warmup`` untimed ones;
    peak_mb      the process's peak RSS;
    step_mb      peak RSS less the RSS before the first step (model, optimizer object and batch built): what the
                 step itself adds (activations, gradients, optimizer state).

The added pieces (the reference's talk head and thought embeddings, our mixing head and markers) are initialised
by each code as it does; the two heads differ in shape only by the reference's two extra vocabulary rows.
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
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # train_step's FLOP counts

# A Mistral of ~28M parameters: benchmarks/train_step.py's llama-23m widths, untied as Mistral is.
SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
             vocab_size=8192, tie_word_embeddings=False, max_position_embeddings=4096, sliding_window=4096)
N_AHEAD, N_AHEAD_TALK, N_PASSES = 12, 4, 2  # the reference's; ours: thought_len = N_AHEAD - 3
MARKER_TEXT = "---"
VARIANTS = {  # our side's rows: (formulation, activation checkpointing)
    "one_pass": ("one_pass", False),  # the default: the thought tokens go through the network once
    "efficient+ckpt": ("efficient", True),  # sample, then replay with every layer recomputed in the backward
}


def tokenizer(transformers):
    """A word-level tokenizer over the model's vocabulary, ``---`` (the markers' initial text) among its words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(SHAPE["vocab_size"])}
    vocab[MARKER_TEXT] = vocab.pop("w3")
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", bos_token="w1", eos_token="w2")


def batch(torch, batch_size: int, seq_len: int):
    """The same random token ids on both sides (ids 4 and up: no special token)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, SHAPE["vocab_size"], (batch_size, seq_len), generator=g)


def ours(weights: Path, variant: str):
    """Our QuietStarModel on the weights, with the reference's objective, as ``variant`` (``VARIANTS``)."""
    import torch
    import transformers
    from safetensors.torch import load_file

    from quietstar import QuietStarConfig, QuietStarModel

    lm = transformers.MistralForCausalLM(transformers.MistralConfig(**SHAPE))
    lm.load_state_dict(load_file(weights))
    method = QuietStarConfig(thought_len=N_AHEAD - 3, n_true=N_AHEAD_TALK, n_thoughts=N_PASSES, sample_temperature=1.0,
                             policy_temperature=3.0, base_loss_weight=0.5, talk_loss_weight=0.5, policy_loss_weight=1e6,
                             loss_reduction="reference", mixing_head_layers=2, mixing_head_width=None,
                             marker_init_text=MARKER_TEXT, formulation=VARIANTS[variant][0])
    if VARIANTS[variant][1]:
        lm.activation_checkpointing_enable()
    return QuietStarModel(lm, tokenizer(transformers), method), torch


def reference(weights: Path, code: Path):
    """The reference's MistralForCausalLM on the weights, set up as its ``quiet-star-train.py``'s ``model_init``."""
    for name in ("seaborn", "wandb", "reportlab", "reportlab.pdfgen", "reportlab.lib", "reportlab.lib.pagesizes",
                 "reportlab.lib.colors"):  # plotting and logging only: never called in a step
        module = sys.modules.setdefault(name, types.ModuleType(name))
        module.canvas = module.letter = module.HexColor = None
    import torch
    import transformers
    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location("transformers.models.mistral.reference_modeling_mistral",
                                                  code / "modeling_mistral.py")
    modeling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(modeling)
    config = transformers.MistralConfig(
        **SHAPE, max_thoughts=N_AHEAD + N_AHEAD_TALK + 1, merged_talk_heads=True, merged_lm_and_talk_heads=False,
        merged_lm_and_think_heads=True, use_concat_talk_head=True, use_shallow_think=True, use_shallow_talk=False,
        use_complex_think_head=False, use_complex_talk_head=True, use_weighted_talk_head=True)
    config._attn_implementation = "sdpa"
    model = modeling.MistralForCausalLM(config)
    missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    assert not unexpected and all(k.startswith(("talk_head", "start_embedding", "end_embedding")) for k in missing), missing
    tok = tokenizer(transformers)
    tok.padding_side, tok.pad_token = "right", tok.eos_token  # as model_init sets them (no id of the batch is one)
    tok.add_special_tokens({"additional_special_tokens": ["<|startthought|>", "<|endthought|>"]})
    model.resize_token_embeddings(len(tok))
    model.tokenizer = tok
    settings = dict(gumbel_detach=True, include_policy_loss=True, use_end_thought_token=True, use_start_thought_token=True,
                    n_ahead=N_AHEAD, n_ahead_talk=N_AHEAD_TALK, n_passes=N_PASSES, n_tokens_print=1,
                    gradient_accumulation_steps=1, residual_think_head=False, optimize_lm_head_only_at_start=False,
                    gumbel_temperature=1, wandb_enabled=False, original_mode=False, config_params={}, run_start=0,
                    kill_after=None)
    for name, value in settings.items():
        setattr(model, name, value)
    return model, torch


def side(args) -> dict:
    """One side's measurement, in this process (the driver starts one process per side)."""
    model, torch = ours(args.weights, args.variant) if args.side == "ours" else reference(args.weights, args.reference_code)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model.train()
    ids = batch(torch, args.batch_size, args.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.001)

    def step() -> float:
        start = time.perf_counter()
        if args.side == "ours":
            loss = model(ids).loss
        else:
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    before_mb = _rss_mb()
    times = [step() for _ in range(args.warmup + args.steps)][args.warmup:]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(side=args.side if args.side == "reference" else args.variant, step_s=statistics.median(times), times=times, peak_mb=peak_mb, step_mb=peak_mb - before_mb,
                threads=args.threads, batch_size=args.batch_size, seq_len=args.seq_len,
                torch=torch.__version__, transformers=sys.modules["transformers"].__version__)


def _rss_mb() -> float:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_weights(path: Path) -> None:
    """The shared base weights: a randomly initialised Mistral of ``SHAPE`` (seed 0), as safetensors."""
    import torch
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    lm = transformers.MistralForCausalLM(transformers.MistralConfig(**SHAPE))
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, path)


def drive(args) -> None:
    """Write the weights, run each side ``--repeats`` times alternating, print and save the rows and ratios."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.safetensors"
        write_weights(weights)
        common = ["--weights", str(weights), "--threads", str(args.threads), "--batch-size", str(args.batch_size),
                  "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
                  "--reference-code", str(args.reference_code)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        sides = [(v, sys.executable, ["--side", "ours", "--variant", v]) for v in args.ours]
        sides.append(("reference", args.reference_python, ["--side", "reference"]))
        for repeat in range(args.repeats):
            for name, python, which in sides:
                out = subprocess.run([python, __file__, *which, *common], env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"the {name} side failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(dict(row, repeat=repeat))
                print(f"{name:<15} repeat {repeat}: {row['step_s']:.2f} s/step, peak {row['peak_mb']:.0f} MB, "
                      f"step {row['step_mb']:.0f} MB", flush=True)

    def best(name: str, key: str) -> float:
        return min(r[key] for r in rows if r["side"] == name)

    ratios = {v: {key: best(v, key) / best("reference", key) for key in ("step_s", "peak_mb", "step_mb")} for v in args.ours}
    flops = {"reference": reference_flops(args.batch_size, args.seq_len), **{v: ours_flops(v, args.batch_size, args.seq_len)
                                                                             for v in args.ours}}
    for v, r in ratios.items():
        print(f"{v} / reference: time {r['step_s']:.2f}x, peak memory {r['peak_mb']:.2f}x, step memory {r['step_mb']:.2f}x "
              f"(best of {args.repeats} each); model FLOPs {flops[v] / flops['reference']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, ratios=ratios, tflop=flops_in_t(flops), shape=SHAPE,
                                                   n_ahead=N_AHEAD, n_ahead_talk=N_AHEAD_TALK, n_passes=N_PASSES),
                                              indent=1) + "\n")


def flops_in_t(flops: dict[str, float]) -> dict[str, float]:
    return {k: v / 1e12 for k, v in flops.items()}


def _shape_config():
    from types import SimpleNamespace

    return SimpleNamespace(**SHAPE)


def reference_flops(batch_size: int, seq_len: int) -> float:
    """Model FLOPs of the reference's step (forward x3): n_ahead + n_ahead_talk - 1 forwards of all B x n_passes rows,
    each attending densely to the keys of every pass so far (its 4D mask is applied to all of them) and computing
    one row of LM logits per position (its extra talk-head logits are not counted: a lower bound)."""
    from train_step import forward_flops

    forward, rows = forward_flops(_shape_config()), batch_size * N_PASSES
    passes = N_AHEAD + N_AHEAD_TALK - 1
    return 3 * sum(forward(rows * seq_len, rows * seq_len * (k + 1) * seq_len, rows * seq_len) for k in range(passes))


def ours_flops(variant: str, batch_size: int, seq_len: int) -> float:
    """Model FLOPs of our step (``train_step.step_flops``: only the keys each query attends to); checkpointing
    adds one more forward of the trained pass."""
    from train_step import step_flops

    formulation, checkpointing = VARIANTS[variant]
    cfg, M = _shape_config(), N_AHEAD - 3
    total = step_flops(cfg, batch_size, seq_len, M, N_AHEAD_TALK, N_PASSES, formulation)
    if checkpointing:  # the trained forward once more: one_pass's count is its sampling logits + 3x that forward
        sampling_logits = M * batch_size * N_PASSES * seq_len * 2 * cfg.hidden_size * cfg.vocab_size
        total += (step_flops(cfg, batch_size, seq_len, M, N_AHEAD_TALK, N_PASSES, "one_pass") - sampling_logits) / 3
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-code", type=Path, required=True, help="a clone of ezelikman/quiet-star")
    parser.add_argument("--reference-python", help="the reference environment's python (transformers 4.37)")
    parser.add_argument("--ours", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS), help="our rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="processes per side, alternating (the best is kept)")
    parser.add_argument("--json", help="write the rows and ratios here")
    parser.add_argument("--side", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(side(args)))
    elif not args.reference_python:
        parser.error("--reference-python is required (the reference's own environment)")
    else:
        drive(args)


if __name__ == "__main__":
    main()

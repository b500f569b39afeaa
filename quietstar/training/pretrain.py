"""Quiet-STaR continued pretraining with DeepSpeed ZeRO: the training recipe, top to bottom.

    bash launch/pretrain.sh                                   # the embedded default (offline)
    deepspeed --num_gpus 8 --module quietstar.training.pretrain --config launch/configs/paper.yaml
    python -m quietstar.training.pretrain --max-steps 10                  # one process, no launcher

Settings come from three typed configs (``QuietStarConfig``, ``DataConfig``,
``TrainConfig``): their defaults, then a ``--config`` YAML file, then one flag per
field. ``--help`` lists them all.

What one run does:
  1. read the configs and the DeepSpeed JSON; refuse to overwrite a run that has checkpoints;
  2. load the text (held-out documents first) and the model, wrap it with DeepSpeed
     (AdamW with the markers in their own parameter group, a transformers LR schedule);
  3. measure held-out base vs. talk NLL, then train ``max_steps`` optimizer steps of
     ``grad_accum_steps`` micro-batches each, logging every step to ``metrics.jsonl``
     and TensorBoard, evaluating every ``eval_every`` and checkpointing every ``save_every``;
  4. measure held-out NLL again, export ``<output-dir>/final`` (the full fp32 weights,
     gathered from the ZeRO shards) and write ``summary.json``.

``--resume`` continues from ``<output-dir>/checkpoints/latest``: the weights, optimizer,
LR schedule, data position and every RNG are restored, so the resumed steps are the
steps an uninterrupted run would have taken.

A step whose loss or gradient norm is not finite is skipped (``training.nonfinite``);
SIGTERM, SIGUSR1, Ctrl-C (SIGINT) or a closed terminal (SIGHUP) saves a checkpoint after the current step and exits
(``training.preemption``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import set_seed

from quietstar.core.cli_config import ConfigError
from quietstar.core.files import write_text_whole
from quietstar.core.loading import load_tokenizer
from quietstar.core.text_data import DataConfig, TokenStream, heldout_batches, load_documents, split_heldout
from quietstar.evaluation.perplexity import heldout_nll
from quietstar.quiet_star.config import QuietStarConfig
from quietstar.quiet_star.diagnostics import gradient_norms
from quietstar.quiet_star.model import QuietStarModel
from quietstar.training import checkpoints
from quietstar.training.collectives import all_ranks_sum
from quietstar.training.engine import (
    parse_recipe_args,
    run_recipe,
    StepLog,
    export_final,
    fetch_base_model,
    init_distributed,
    initialize,
    load_for_training,
    resume_state,
    run_identity,
    shared_output_dir,
    start_run,
    torch_optimizer,
    write_run_config,
)
from quietstar.training.nonfinite import NonFiniteGuard
from quietstar.training.preemption import Preemption
from quietstar.training.train_config import TrainConfig, grad_diagnostics_on, zero_stage

CONFIGS = (QuietStarConfig, DataConfig, TrainConfig)
STEP_METRICS = ("loss", "base_nll", "talk_nll", "policy_loss", "reward_mean", "mixing_weight_mean")
GRAD_METRICS = ("grad_norm_lm", "grad_norm_policy")
STREAM_COUNTS = ("documents", "skipped_empty", "skipped_short", "skipped_malformed")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, QuietStarConfig, DataConfig, TrainConfig]:
    """The flags and the three configs: defaults, then the --config YAML, then the flags that were given."""
    return parse_recipe_args("python -m quietstar.training.pretrain", "Quiet-STaR continued pretraining with DeepSpeed ZeRO.", CONFIGS, argv)


def train(args: argparse.Namespace, method: QuietStarConfig, data: DataConfig, cfg: TrainConfig) -> dict:
    if cfg.gradient_checkpointing and method.formulation != "efficient":
        raise ConfigError(f"TrainConfig.gradient_checkpointing: the {method.formulation} formulation keeps each thought "
                          "block's keys for the next and cannot recompute its layers; set formulation: efficient")
    rank, world, device = init_distributed(cfg.dist_timeout_s)
    cfg = shared_output_dir(cfg)
    out_dir, ckpt_root = Path(cfg.output_dir), Path(cfg.output_dir) / "checkpoints"
    ds_config, resume_tag = start_run(cfg, args.resume, device, world)
    diagnose = grad_diagnostics_on(cfg, ds_config)
    set_seed(cfg.seed)

    # Data first (with the tokenizer, to count tokens), so that bad or too little text fails before the model loads.
    documents, heldout_texts = split_heldout(load_documents(data), data.heldout_documents)
    fetch_base_model(cfg.model, device)
    tokenizer = load_tokenizer(QuietStarModel, cfg.model)
    stream = TokenStream(documents, tokenizer, data, seed=cfg.seed, rank=rank, world_size=world)
    heldout = heldout_batches(heldout_texts, tokenizer, data.seq_len, cfg.eval_batch_size)
    model, load = load_for_training(QuietStarModel, cfg, method, ds_config)
    identity = run_identity(cfg, model.config)
    saved = resume_state(ckpt_root, resume_tag, world, identity)
    if cfg.gradient_checkpointing:
        model.lm.activation_checkpointing_enable()
    model.train()
    engine = initialize(model, cfg, ds_config, cfg.max_steps)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + rank)  # thought sampling, distinct per rank

    def evaluate() -> dict[str, float]:
        engine.eval()
        values = heldout_nll(engine, heldout, device, seed=cfg.seed, progress=True) if heldout else {}
        engine.train()
        return values

    def save(step: int, heldout_before: dict) -> None:
        state = {"world_size": world, "data": stream.state_dict(), "rng": checkpoints.rng_state(generator),
                 "heldout_before": heldout_before, "identity": identity}
        checkpoints.save(engine, ckpt_root, step, state, cfg.keep_checkpoints)

    start_step = 0
    if saved is not None:
        start_step = checkpoints.load(engine, ckpt_root, resume_tag)
        stream.load_state_dict(saved["data"])
        checkpoints.set_rng_state(saved["rng"], generator)
        before = saved["heldout_before"]
        if start_step > cfg.max_steps:
            raise ConfigError(f"--resume: the checkpoint is at step {start_step}, beyond TrainConfig.max_steps = {cfg.max_steps}")
    if rank == 0:
        write_run_config(out_dir, {"quietstar": model.config.to_dict(), "data": vars(data), "train": vars(cfg),
                                   "deepspeed": ds_config, "world_size": world, "load": load,
                                   "optimizer": type(torch_optimizer(engine)).__name__})
        print(f"quietstar.training.pretrain: {world} rank(s) on {device.type}, ZeRO-{zero_stage(ds_config)}, "
              f"{'bf16' if ds_config['bf16']['enabled'] else 'fp32'}, global batch {cfg.micro_batch_size * cfg.grad_accum_steps * world} "
              f"x {data.seq_len} tokens, steps {start_step + 1}..{cfg.max_steps} -> {out_dir}", flush=True)
    if not args.resume:
        before = evaluate()
    log = StepLog(out_dir, start_step, cfg.max_steps, rank)
    if not args.resume and before:
        log.heldout(0, before)

    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * data.seq_len * world
    batches = stream.batches(cfg.micro_batch_size)
    guard = NonFiniteGuard(cfg.max_bad_steps, lambda: checkpoints.last_good(ckpt_root))
    train_started, step_seconds, after, stopped_by = time.perf_counter(), 0.0, before, None
    with Preemption() as preemption:
        for step in range(start_step + 1, cfg.max_steps + 1):
            started = time.perf_counter()
            skipped_before = engine.skipped_steps
            lrs = engine.get_lr()  # the rates this step uses (the scheduler advances after it)
            sums = [0.0] * len(STEP_METRICS)
            evaluating = cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.max_steps
            diagnostics = {}
            for micro in range(cfg.grad_accum_steps):
                batch = next(batches).to(device)
                if micro == 0 and evaluating and diagnose:
                    # Its own sampler, so that the training thoughts are those of a run without diagnostics.
                    sampler = torch.Generator(device=device).manual_seed(cfg.seed + 7919 * step + rank)
                    norms = gradient_norms(engine.module, batch, None, generator=sampler)
                    mean = [v / world for v in all_ranks_sum([norms[n] for n in GRAD_METRICS], device)]
                    diagnostics = {**dict(zip(GRAD_METRICS, mean)), "grad_ratio": mean[1] / mean[0] if mean[0] > 0 else None}
                out = engine(batch, generator=generator)
                engine.backward(out.loss)
                engine.step()  # DeepSpeed updates the weights only at the last micro-batch
                sums = [s + v for s, v in zip(sums, out.metrics().values())]
            totals = all_ranks_sum([s / cfg.grad_accum_steps for s in sums] + [getattr(stream.stats, n) for n in STREAM_COUNTS]
                                   + [preemption.requested()], device)
            metrics, counts = [v / world for v in totals[: len(STEP_METRICS)]], totals[len(STEP_METRICS):-1]
            seconds = time.perf_counter() - started
            step_seconds += seconds
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else None
            terms = dict(zip(("loss", "base NLL", "talk NLL", "policy loss"), metrics))
            applied = guard.check(step, terms, grad_norm, skipped=engine.skipped_steps > skipped_before)
            record = {
                "step": step,
                **dict(zip(STEP_METRICS, metrics)),
                "lr": lrs[0],
                "thought_lr": lrs[1],
                "grad_norm": grad_norm,
                "update_skipped": not applied,
                "tokens_per_s": tokens_per_step / seconds,
                "step_s": seconds,
                **{name: int(c) for name, c in zip(STREAM_COUNTS, counts)},
                **diagnostics,
            }
            if evaluating:
                after = evaluate()
                record.update({f"heldout_{k}": v for k, v in after.items() if k != "tokens"})
            log.step(record, loss=f"{record['loss']:.3f}", talk=f"{record['talk_nll']:.3f}", w=f"{record['mixing_weight_mean']:.3f}")
            guard.stop_if_exhausted(step)
            if totals[-1] > 0:  # a signal reached some rank before this step's sums: every rank stops here alike
                stopped_by = preemption.signal_name or "a signal to another rank"
            if cfg.save_every and step % cfg.save_every == 0 or step == cfg.max_steps or stopped_by:
                save(step, before)
            if stopped_by:
                break
    log.close()
    if stopped_by:
        if rank == 0:
            print(f"quietstar.training.pretrain: stopped by {stopped_by} after step {step}; checkpoint "
                  f"{checkpoints.last_good(ckpt_root)} saved; continue with --resume", file=sys.stderr, flush=True)
        return {"stopped_by": stopped_by, "step": step}
    elapsed = time.perf_counter() - train_started
    steps_run = cfg.max_steps - start_step
    if steps_run == 0:  # resumed from the last step's checkpoint: nothing to train
        after = evaluate()

    final = export_final(QuietStarModel, cfg, method, ckpt_root, out_dir, rank)
    summary = {
        "steps": cfg.max_steps,
        "steps_run": steps_run,
        "train_seconds": elapsed,  # wall time of the loop, held-out evaluations and checkpoints included
        "seconds_per_step": step_seconds / steps_run if steps_run else None,  # optimizer steps only
        "heldout_before": before,
        "heldout_after": after,
        "world_size": world,
        "outputs": {
            "metrics": str(out_dir / "metrics.jsonl"),
            "tensorboard": str(out_dir / "tensorboard"),
            "checkpoint": str(ckpt_root / checkpoints.latest_tag(ckpt_root)),
            "final": str(final),
        },
    }
    if rank == 0:
        write_text_whole(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    before, after = summary["heldout_before"], summary["heldout_after"]
    per_step = summary["seconds_per_step"]
    print(f"\ntrained {summary['steps_run']} step(s) in {summary['train_seconds']:.0f} s"
          + (f" ({per_step:.1f} s per optimizer step, evaluations and checkpoints aside)" if per_step else ""))
    if before and after:
        print(f"held-out next-token NLL over {after['tokens']} tokens:")
        for name, values in (("before", before), ("after", after)):
            print(f"  {name + ':':7} base {values['base_nll']:.4f}  talk {values['talk_nll']:.4f}  "
                  f"talk with shuffled thoughts {values['shuffled_talk_nll']:.4f}  "
                  f"(talk - shuffled {values['talk_minus_shuffled']:+.4f} ± {values['talk_minus_shuffled_se']:.4f} SE over tokens)")
        difference, se = after["talk_minus_shuffled"], after["talk_minus_shuffled_se"]
        verdict = "help" if difference < -2 * se else "do not help beyond 2 SE"
        print(f"  the thoughts' content: own thoughts {verdict} against shuffled ones on this held-out text")
    for name, path in summary["outputs"].items():
        print(f"{name:>12}: {path}")


def main(argv: list[str] | None = None) -> int:
    return run_recipe("quietstar.training.pretrain", lambda: train(*parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

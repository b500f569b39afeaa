"""Coconut training with DeepSpeed ZeRO: the recipe, top to bottom.

    bash launch/coconut.sh                                             # the embedded default (offline, CPU)
    bash launch/coconut.sh --config launch/configs/coconut_prosqa.yaml --train-file D/prosqa_train.jsonl ...
    python -m quietstar.training.coconut --num-epochs 2                # one process, no launcher

Settings come from three typed configs (``CoconutConfig``, ``CoconutDataConfig``,
``CoconutTrainConfig``): their defaults, then a ``--config`` YAML file, then one flag
per field. ``--help`` lists them all.

What one run does:
  1. read the configs and the DeepSpeed JSON; refuse to overwrite a run that has checkpoints;
  2. load the ``{question, steps, answer}`` examples (malformed records and examples over
     ``max_tokens`` are skipped and counted) and the model, wrap it with DeepSpeed;
  3. for each epoch: its curriculum stage is ``epoch // epochs_per_stage``
     (``coconut.curriculum``); the AdamW state is reset when the stage changes (or every
     epoch, ``optimizer_reset: epoch``); the examples are shuffled with ``seed + epoch``,
     dealt to the ranks and trained in optimizer steps of ``grad_accum_steps``
     micro-batches, each step logged to ``metrics.jsonl`` and TensorBoard;
  4. at each epoch's end: greedy answers on the validation split (``val_accuracy``), a
     checkpoint, and ``best`` pointed at it when the accuracy is the best so far;
  5. export ``<output-dir>/final`` (the last weights) and ``<output-dir>/best`` and write ``summary.json``.

``--resume`` continues from ``<output-dir>/checkpoints/latest``, mid-epoch or at a stage
change: the weights, optimizer, LR schedule, data position and RNGs are restored, so the
resumed steps are those of an uninterrupted run.

A step whose loss or gradient norm is not finite is skipped (``training.nonfinite``);
SIGTERM, SIGUSR1, Ctrl-C (SIGINT) or a closed terminal (SIGHUP) saves a checkpoint after the current step and exits
(``training.preemption``).
"""

from __future__ import annotations

import argparse
import json
import sys
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import set_seed

from quietstar.coconut import prosqa
from quietstar.coconut.config import PROSQA_MINI, CoconutConfig, CoconutDataConfig
from quietstar.coconut.curriculum import collate, collate_prompts, encode, epoch_stage, example_stage, inference_prompt, layout
from quietstar.coconut.data import Example, answer_of, answers_match, qa_example, read_examples
from quietstar.coconut.generation import generate
from quietstar.coconut.model import CoconutModel
from quietstar.core.cli_config import ConfigError
from quietstar.core.files import write_text_whole
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
    reset_optimizer_state,
    resume_state,
    run_identity,
    shared_output_dir,
    start_run,
    torch_optimizer,
    write_run_config,
)
from quietstar.training.nonfinite import NonFiniteGuard
from quietstar.training.preemption import Preemption
from quietstar.training.train_config import CoconutTrainConfig, zero_stage

CONFIGS = (CoconutConfig, CoconutDataConfig, CoconutTrainConfig)
PROSQA_MINI_SEEDS = (1234, 5678)  # generator seeds of the embedded default's train and validation items
PROSQA_MINI_SETTINGS = {"n_nodes": 12, "min_steps": 2, "max_steps": 3, "vocab_size": 24}  # small graphs: short questions


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, CoconutConfig, CoconutDataConfig, CoconutTrainConfig]:
    """The flags and the three configs: defaults, then the --config YAML, then the flags that were given."""
    return parse_recipe_args("python -m quietstar.training.coconut", "Coconut training with DeepSpeed ZeRO.", CONFIGS, argv)


def load_splits(data: CoconutDataConfig) -> tuple[list[Example], list[Example], int]:
    """(train examples, validation examples, malformed records skipped); ``prosqa-mini`` is generated here."""
    if data.train_file == PROSQA_MINI:
        train = [qa_example(r) for r in prosqa.generate(data.mini_train_items, PROSQA_MINI_SEEDS[0], **PROSQA_MINI_SETTINGS)]
        val = [qa_example(r) for r in prosqa.generate(data.mini_val_items, PROSQA_MINI_SEEDS[1], **PROSQA_MINI_SETTINGS)]
        return train, val, 0
    train, skipped_train = read_examples(data.train_file)
    val, skipped_val = read_examples(data.val_file)
    return train, val, skipped_train + skipped_val


def longest(example: Example, method: CoconutConfig, tokenizer) -> int:
    """The most tokens ``example`` takes at any stage (stage 0 writes every step; the last adds the most latents)."""
    stages = (0, method.max_latent_stage + 1)
    return max(len(encode(layout(example, stage, method), tokenizer)[0]) for stage in stages)


class EpochBatches:
    """The micro-batches of one epoch for one rank: shuffled with ``seed + epoch``, dealt round-robin to the ranks.

    Every rank gets the same number of optimizer steps (``steps_per_epoch``); the few
    examples left over after dealing are not used that epoch.
    """

    def __init__(self, examples: list[Example], method: CoconutConfig, cfg: CoconutTrainConfig, tokenizer, rank: int, world: int) -> None:
        self.examples, self.method, self.cfg, self.tokenizer = examples, method, cfg, tokenizer
        self.rank, self.world = rank, world
        per_step = cfg.micro_batch_size * cfg.grad_accum_steps * world
        self.steps_per_epoch = len(examples) // per_step
        if self.steps_per_epoch == 0:
            raise ConfigError(f"CoconutTrainConfig.micro_batch_size: {len(examples)} training examples are fewer than one "
                              f"optimizer step takes ({cfg.micro_batch_size} x {cfg.grad_accum_steps} x {world} ranks)")

    def step(self, epoch: int, index: int) -> list[dict[str, torch.Tensor]]:
        """The ``grad_accum_steps`` micro-batches of optimizer step ``index`` (0-based) of ``epoch`` on this rank."""
        order = list(range(len(self.examples)))
        random.Random(self.cfg.seed + epoch).shuffle(order)
        mine = order[self.rank::self.world]
        micro, stage = self.cfg.micro_batch_size, epoch_stage(epoch, self.method)
        batches = []
        for m in range(self.cfg.grad_accum_steps):
            start = (index * self.cfg.grad_accum_steps + m) * micro
            rows = []
            for i in mine[start:start + micro]:
                rng = random.Random(f"{self.cfg.seed}/{epoch}/{i}")  # uniform_prob's draw, the same on resume
                example = self.examples[i]
                rows.append(encode(layout(example, example_stage(example, stage, self.method, rng), self.method), self.tokenizer))
            batches.append(collate(rows, self.tokenizer.pad_token_id))
        return batches


def validate(model: CoconutModel, examples: list[Example], cfg: CoconutTrainConfig, device: torch.device) -> dict[str, float]:
    """Greedy answers on ``examples``: accuracy (the text after the last ``#`` equals the gold answer) and mean tokens.

    Every rank answers every item (the same forwards in the same order, as ZeRO-3 needs).
    """
    tokenizer, method = model.tokenizer, model.config
    correct, generated = 0, 0
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(examples), cfg.val_batch_size), desc="validate", unit="batch", leave=False,
                      disable=dist.get_rank() != 0):
        chunk = examples[start:start + cfg.val_batch_size]
        prompts = [encode(inference_prompt(e.question, method), tokenizer, with_answer=False)[0] for e in chunk]
        batch = {k: v.to(device) for k, v in collate_prompts(prompts, tokenizer.pad_token_id).items()}
        outputs = generate(model, batch["input_ids"], batch["attention_mask"], cfg.val_max_new_tokens).tokens
        for example, ids in zip(chunk, outputs):
            correct += answers_match(answer_of(tokenizer.decode(ids, skip_special_tokens=True)), example.answer)
            generated += len(ids)
    model.train(was_training)
    return {"val_accuracy": correct / len(examples), "val_correct": correct, "val_items": len(examples),
            "val_mean_new_tokens": generated / len(examples)}


def train(args: argparse.Namespace, method: CoconutConfig, data: CoconutDataConfig, cfg: CoconutTrainConfig) -> dict:
    rank, world, device = init_distributed(cfg.dist_timeout_s)
    cfg = shared_output_dir(cfg)
    out_dir, ckpt_root = Path(cfg.output_dir), Path(cfg.output_dir) / "checkpoints"
    ds_config, resume_tag = start_run(cfg, args.resume, device, world)
    set_seed(cfg.seed)

    # Data first, so that a bad path fails before the model loads.
    train_examples, val_examples, malformed = load_splits(data)
    fetch_base_model(cfg.model, device)
    model, load = load_for_training(CoconutModel, cfg, method, ds_config)
    identity = run_identity(cfg, model.config)
    saved = resume_state(ckpt_root, resume_tag, world, identity)
    if model.tokenizer.pad_token_id is None:
        model.tokenizer.pad_token = model.tokenizer.eos_token
    kept = [e for e in train_examples if longest(e, method, model.tokenizer) <= data.max_tokens]
    too_long = len(train_examples) - len(kept)
    if cfg.max_val_examples is not None:
        val_examples = val_examples[: cfg.max_val_examples]
    batches = EpochBatches(kept, method, cfg, model.tokenizer, rank, world)
    if cfg.gradient_checkpointing:
        model.lm.activation_checkpointing_enable()
    model.train()
    total_steps = batches.steps_per_epoch * cfg.num_epochs
    engine = initialize(model, cfg, ds_config, total_steps)

    def save(step: int, epoch: int, index: int, best: dict) -> str:
        state = {"world_size": world, "position": {"epoch": epoch, "index": index}, "rng": checkpoints.rng_state(), "best": best,
                 "identity": identity}
        return checkpoints.save(engine, ckpt_root, step, state, cfg.keep_checkpoints).name

    step, epoch, index, best = 0, 0, 0, {"val_accuracy": -1.0, "epoch": None, "tag": None}
    if saved is not None:
        step = checkpoints.load(engine, ckpt_root, resume_tag)
        epoch, index, best = saved["position"]["epoch"], saved["position"]["index"], saved["best"]
        checkpoints.set_rng_state(saved["rng"])
    if rank == 0:
        write_run_config(out_dir, {"coconut": method.to_dict(), "data": vars(data), "train": vars(cfg), "deepspeed": ds_config,
                                   "world_size": world, "load": load,
                                   "optimizer": type(torch_optimizer(engine)).__name__, "train_examples": len(kept), "val_examples": len(val_examples),
                                   "skipped_malformed": malformed, "skipped_too_long": too_long})
        print(f"quietstar.training.coconut: {world} rank(s) on {device.type}, ZeRO-{zero_stage(ds_config)}, mode {method.mode}, "
              f"{len(kept)} train / {len(val_examples)} validation examples ({malformed} malformed, {too_long} over "
              f"{data.max_tokens} tokens skipped), {batches.steps_per_epoch} steps x {cfg.num_epochs} epochs, "
              f"global batch {cfg.micro_batch_size * cfg.grad_accum_steps * world} -> {out_dir}", flush=True)
    log = StepLog(out_dir, step, total_steps, rank)
    guard = NonFiniteGuard(cfg.max_bad_steps, lambda: checkpoints.last_good(ckpt_root))
    started, step_seconds, steps_run, stopped_by = time.perf_counter(), 0.0, 0, None
    history = []
    with Preemption() as preemption:
        while epoch < cfg.num_epochs and not stopped_by:
            stage = epoch_stage(epoch, method)
            reset = index == 0 and epoch > 0 and (method.optimizer_reset == "epoch" or stage != epoch_stage(epoch - 1, method))
            if reset:
                reset_optimizer_state(engine)
            while index < batches.steps_per_epoch:
                begun, skipped_before = time.perf_counter(), engine.skipped_steps
                loss_sum, tokens = 0.0, 0
                for batch in batches.step(epoch, index):
                    out = engine(**{k: v.to(device) for k, v in batch.items()})
                    engine.backward(out.loss)
                    engine.step()
                    loss_sum, tokens = loss_sum + float(out.loss.detach()), tokens + int(out.tokens)
                loss, tokens, signalled = all_ranks_sum([loss_sum / cfg.grad_accum_steps, tokens, preemption.requested()], device)
                seconds = time.perf_counter() - begun
                step, index, steps_run, step_seconds = step + 1, index + 1, steps_run + 1, step_seconds + seconds
                grad_norm = engine.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else None
                applied = guard.check(step, {"loss": loss / world}, grad_norm, skipped=engine.skipped_steps > skipped_before)
                record = {"step": step, "epoch": epoch, "stage": stage, "loss": loss / world, "lr": engine.get_lr()[0],
                          "grad_norm": grad_norm, "update_skipped": not applied, "scored_tokens": int(tokens), "step_s": seconds,
                          "optimizer_reset": reset}
                reset = False
                log.step(record, epoch=str(epoch), stage=str(stage), loss=f"{record['loss']:.3f}")
                guard.stop_if_exhausted(step)
                if signalled > 0:  # a signal reached some rank before this step's sums: every rank stops here alike
                    stopped_by = preemption.signal_name or "a signal to another rank"
                    save(step, epoch, index, best)
                    break
                if cfg.save_every and step % cfg.save_every == 0 and index < batches.steps_per_epoch:
                    save(step, epoch, index, best)
            if stopped_by:
                break
            val = validate(engine.module, val_examples, cfg, device)
            improved = val["val_accuracy"] > best["val_accuracy"]
            epoch, index = epoch + 1, 0
            name = checkpoints.tag(step)
            if improved:
                best = {"val_accuracy": val["val_accuracy"], "epoch": epoch - 1, "tag": name}
            log.event({"step": step, "epoch": epoch - 1, "stage": stage, **val, "best_val_accuracy": best["val_accuracy"]})
            history.append({"epoch": epoch - 1, "stage": stage, **val})
            save(step, epoch, 0, best)
            if rank == 0 and improved:
                checkpoints.mark_best(ckpt_root, name)
            dist.barrier()
    log.close()
    if stopped_by:
        if rank == 0:
            print(f"quietstar.training.coconut: stopped by {stopped_by} after step {step}; checkpoint "
                  f"{checkpoints.last_good(ckpt_root)} saved; continue with --resume", file=sys.stderr, flush=True)
        return {"stopped_by": stopped_by, "step": step}
    elapsed = time.perf_counter() - started

    final = export_final(CoconutModel, cfg, method, ckpt_root, out_dir, rank)
    best_dir = export_final(CoconutModel, cfg, method, ckpt_root, out_dir, rank, tag=best["tag"], target="best")
    summary = {
        "epochs": cfg.num_epochs,
        "steps": step,
        "steps_run": steps_run,
        "train_seconds": elapsed,  # wall time of the loop, validation and checkpoints included
        "seconds_per_step": step_seconds / steps_run if steps_run else None,
        "validation": history,  # this process's epochs (a resumed run lists the epochs it ran)
        "best": best,
        "world_size": world,
        "outputs": {"metrics": str(out_dir / "metrics.jsonl"), "tensorboard": str(out_dir / "tensorboard"),
                    "checkpoint": str(ckpt_root / checkpoints.latest_tag(ckpt_root)), "final": str(final), "best": str(best_dir)},
    }
    if rank == 0:
        write_text_whole(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    per_step = summary["seconds_per_step"]
    print(f"\ntrained {summary['steps_run']} step(s) in {summary['train_seconds']:.0f} s"
          + (f" ({per_step:.2f} s per optimizer step, validation and checkpoints aside)" if per_step else ""))
    for row in summary["validation"]:
        print(f"  epoch {row['epoch']:>3}  stage {row['stage']}  validation accuracy {row['val_accuracy']:.3f} "
              f"({row['val_correct']}/{row['val_items']}), {row['val_mean_new_tokens']:.1f} new tokens per answer")
    best = summary["best"]
    print(f"best: epoch {best['epoch']}, validation accuracy {best['val_accuracy']:.3f}")
    for name, path in summary["outputs"].items():
        print(f"{name:>12}: {path}")


def main(argv: list[str] | None = None) -> int:
    return run_recipe("quietstar.training.coconut", lambda: train(*parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

"""The steps both training recipes share: distributed init, ``deepspeed.initialize``, resume, step logging, export.

A recipe (``training.pretrain`` for Quiet-STaR, ``training.coconut``) reads top to
bottom and calls these in order:

    rank, world, device = init_distributed(cfg.dist_timeout_s)
    cfg = shared_output_dir(cfg)                                 # "{time}" -> rank 0's start time
    ds_config, tag = start_run(cfg, resume, device, world)     # the output's lock, no overwrite, DeepSpeed JSON, checkpoint
    model, load = load_for_training(model_class, cfg, method, ds_config)    # after fetch_base_model(name, device); ZeRO-3: partitioned
    saved = resume_state(ckpt_root, tag, world, run_identity(cfg, model.config))  # same ranks, model and method
    engine = initialize(model, cfg, ds_config, total_steps)      # AdamW groups + transformers LR schedule
    step = checkpoints.load(engine, ckpt_root, tag)              # weights, optimizer, schedule
    log = StepLog(out_dir, start_step, total, rank)              # metrics.jsonl + TensorBoard + progress bar
    ... the recipe's own loop (``nonfinite``, ``preemption``), calling checkpoints.save(...) and log.step(...)
    export_final(model_class, cfg, method, ckpt_root, out_dir, rank)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import get_scheduler
from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

from quietstar.core import run_lock
from quietstar.core.cli_config import (ArgumentParser, ConfigError, RunError, add_dataclass_arguments, build_config,
                                       deepspeed_cpu_notice_hidden, load_yaml, one_line)
from quietstar.core.files import write_text_whole
from quietstar.core.latent_model import LatentReasoningModel
from quietstar.core.loading import load_model
from quietstar.core.lora import add_lora, lora_config
from quietstar.core.offline import resolve_model_path
from quietstar.core.optim import build_param_groups
from quietstar.core.zero3 import full_numel, parameter_counts
from quietstar.training import checkpoints
from quietstar.training.collectives import all_ranks_ok
from quietstar.training.run_log import RunLog
from quietstar.training.train_config import EngineConfig, check_yaml_keys, deepspeed_config, zero_stage


def parse_recipe_args(prog: str, description: str, configs: tuple[type, ...], argv: list[str] | None = None) -> tuple:
    """A recipe's flags and typed configs: (args, one instance per class of ``configs``, in that order).

    Each field is the class default, then the ``--config`` YAML's value, then the flag's when given.
    """
    parser = ArgumentParser(prog=prog, description=f"{description} Flags override --config, which overrides the defaults.")
    parser.add_argument("--config", metavar="YAML", help="a YAML mapping of field: value for any of the fields below")
    parser.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoints/latest")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    for cls in reversed(configs):  # help lists the train config first
        add_dataclass_arguments(parser, cls, cls.__name__)
    args = parser.parse_args(argv)
    values = load_yaml(args.config)
    check_yaml_keys(values, configs)
    return (args, *(build_config(cls, values, args) for cls in configs))


def run_recipe(name: str, main: Callable[[], Any]) -> int:
    """Run a recipe's ``main``: 0 on success, or after a preemption signal saved and stopped it; a bad input or
    config, or a run that cannot go on, prints ``<name>: error: ...`` (one line) and gives 2. Ctrl-C gives 130, as
    an interrupted shell command does, so ``train && eval`` stops there: inside the training loop after the save
    (``preemption``); outside it, or a second one inside it, without, printing ``<name>: interrupted ...`` (rank 0).
    DeepSpeed's notice that it found no GPU is not printed. The output directory's lock goes when the recipe ends."""
    try:
        with deepspeed_cpu_notice_hidden():  # DeepSpeed is first imported inside (init_distributed)
            result = main()
        if isinstance(result, dict) and result.get("stopped_by") == "SIGINT":
            return 130  # saved (the recipe said so); stopped by Ctrl-C all the same
    except (OSError, ValueError, RunError) as error:
        tqdm.write(f"{name}: error: {one_line(error)}", file=sys.stderr)  # on a line of its own, below any progress bar
        return 2
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            tqdm.write(f"{name}: interrupted; stopped without saving (checkpoints already complete are kept)", file=sys.stderr)
        return 130
    except RuntimeError as error:
        if not lost_rank(error):
            raise
        tqdm.write(f"{name}: error: another rank died or stopped answering ({one_line(error)}); stopped; "
                   "once it is fixed, rerun with --resume (the last complete checkpoint is kept)", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            import deepspeed

            deepspeed.comm.destroy_process_group()  # torch's group and DeepSpeed's references to it, so a next run can start
        release_shared_memory()
        run_lock.release_held()
    return 0


LOST_RANK_SIGNS = ("Connection reset by peer", "Connection closed by peer", "pair closure", "Timed out", "timed out",
                   "Broken pipe", "NCCL", "gloo")


def lost_rank(error: RuntimeError) -> bool:
    """Whether ``error`` is a collective that failed because another rank died or did not answer within
    ``EngineConfig.dist_timeout_s`` (gloo and NCCL raise plain ``RuntimeError``s that say so)."""
    return dist.is_initialized() and (isinstance(error, dist.DistError) or any(sign in str(error) for sign in LOST_RANK_SIGNS))


def release_shared_memory() -> None:
    """Remove this rank's ``/dev/shm`` all-reduce buffer, which DeepSpeed's CPU communication op creates and never
    unlinks (67 MB per rank per run, held in RAM until the machine restarts). Every rank maps the others' buffers
    at start-up, so removing the names at the end is safe; a rank's own mapping goes with its process."""
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK")
    if all(name in os.environ for name in names):
        addr, port, rank = (os.environ[name] for name in names)
        Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}").unlink(missing_ok=True)


MPI_WORLD_SIZES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")  # mpirun (OpenMPI, MPICH), srun


def init_distributed(timeout_s: int = 600) -> tuple[int, int, torch.device]:
    """Join the process group set up by the launcher, or make a one-process group: (rank, world size, device).

    The DeepSpeed launcher (local or pdsh) sets ``RANK`` and the rest. Its ``openmpi`` and ``slurm``
    launchers start the processes through ``mpirun``/``srun``, and DeepSpeed reads the ranks from MPI
    (``mpi4py``). With neither, this process is a run of its own. A collective that waits longer than
    ``timeout_s`` (a rank died or hangs) fails, so the other ranks exit instead of waiting forever.
    """
    import deepspeed  # here, not at the top: run_recipe hides its CPU notice while the recipe runs

    by_mpi = any(int(os.environ.get(name, "1")) > 1 for name in MPI_WORLD_SIZES)
    if by_mpi and "RANK" not in os.environ:
        try:
            import mpi4py  # noqa: F401  (DeepSpeed's MPI discovery needs it)
        except ImportError:
            raise ConfigError("started by mpirun/srun, but mpi4py is not installed: pip install mpi4py") from None
    elif "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    accelerator = deepspeed.get_accelerator()
    local_rank = int(os.environ["LOCAL_RANK"])
    if accelerator.device_name() == "cuda":
        accelerator.set_device(local_rank)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    dist.barrier()  # every rank has now mapped every other rank's /dev/shm buffer (CPU), so the names can go
    release_shared_memory()
    return dist.get_rank(), dist.get_world_size(), torch.device(accelerator.device_name(local_rank))


def shared_output_dir(cfg: EngineConfig) -> EngineConfig:
    """``cfg`` with ``{time}`` in ``output_dir`` replaced by rank 0's start time, so that every rank and node writes
    into one directory even when their clocks differ (``runs/demo-{time}`` -> ``runs/demo-20261201-165731``)."""
    if "{time}" not in cfg.output_dir:
        return cfg
    chosen = [cfg.output_dir.replace("{time}", time.strftime("%Y%m%d-%H%M%S"))]
    dist.broadcast_object_list(chosen, src=0)
    return dataclasses.replace(cfg, output_dir=chosen[0])


def hold_output_dir(out_dir: Path) -> None:
    """Rank 0 takes the output directory's lock (``run_lock``), creating it; when that fails (another run is
    writing there, the path is a file or cannot be written), every rank stops with rank 0's line."""
    problem: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            run_lock.hold_directory(out_dir, "--output-dir")
        except OSError as error:
            problem = [one_line(error)]
    dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise RunError(problem[0])


def start_run(cfg: EngineConfig, resume: bool, device: torch.device, world: int) -> tuple[dict[str, Any], str | None]:
    """(the completed DeepSpeed config, the checkpoint ``--resume`` continues from or None).

    Takes the output directory (``hold_output_dir``); refuses to overwrite a run that has checkpoints unless
    resuming, and to resume without one.
    """
    hold_output_dir(Path(cfg.output_dir))
    ckpt_root = Path(cfg.output_dir) / "checkpoints"
    if not resume and checkpoints.any_saved(ckpt_root):
        raise ConfigError(f"output_dir: {cfg.output_dir} already has checkpoints; pass --resume or choose another --output-dir")
    ds_config = deepspeed_config(cfg, device.type, world)
    return ds_config, checkpoints.resume_tag(ckpt_root) if resume else None


def fetch_base_model(name: str, device: torch.device) -> None:
    """Export the offline default once per node, before any rank reads it. If that fails, every rank stops."""
    error = None
    if int(os.environ["LOCAL_RANK"]) == 0:
        try:
            resolve_model_path(name)
        except (OSError, ValueError) as e:
            error = e
    prepared = all_ranks_ok(error is None, device)
    if error is not None:
        raise error
    if not prepared:
        raise RunError(f"--model {name!r}: preparing it failed on another node (see that node's log)")


def load_for_training(model_class: type[LatentReasoningModel], cfg: EngineConfig, method_config,
                      ds_config: dict[str, Any]) -> tuple[LatentReasoningModel, dict[str, Any]]:
    """The model to train (``cfg.model`` with ``method_config``), and a record of what each rank holds after loading.

    Under ZeRO-3 the base LM is built inside ``deepspeed.zero.Init`` (transformers does so while an
    ``HfDeepSpeedConfig`` of the completed config is alive): each parameter is partitioned as it is
    made and only rank 0 reads the checkpoint, so no rank ever holds the whole model. The method's
    own modules (markers, mixing head) are small; ``deepspeed.initialize`` partitions them.
    At other stages every rank loads the whole model, as ZeRO-0/1/2 keep it whole anyway.
    The LM loads in the training precision: a bf16 run's DeepSpeed module is bf16 (its fp32 master
    weights, made from the bf16 ones, live in the optimizer), so an fp32 load only doubled each
    rank's host memory; a bf16 checkpoint maps without a copy.
    With ``cfg.lora_rank`` > 0 the base LM's weights are frozen and LoRA adapters added (``core.lora``).
    """
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    partitioned = zero_stage(ds_config) == 3
    left = _auto_fields(ds_config) if partitioned else []
    if left:
        raise ConfigError(f"TrainConfig.deepspeed: ZeRO-3 loading needs a complete config; still \"auto\": {', '.join(left)}")
    hf_ds_config = HfDeepSpeedConfig(ds_config) if partitioned else None  # transformers keeps only a weak reference
    try:
        model = load_model(model_class, cfg.model, method_config, dtype=dtype)
    finally:
        if hf_ds_config is not None:
            unset_hf_deepspeed_config()  # later loads (the export on rank 0) are whole again
    held, total = parameter_counts(model.lm)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, held)
    record = {"partitioned": partitioned, "dtype": str(dtype).removeprefix("torch."), "base_parameters": total,
              "held_per_rank": per_rank, "lora": None}
    if cfg.lora_rank:
        add_lora(model.lm, _lora_config(cfg))
        trainable = sum(full_numel(p) for p in model.lm.parameters() if p.requires_grad)
        record["lora"] = {"rank": cfg.lora_rank, "adapter_parameters": trainable}
    return model, record


def _lora_config(cfg: EngineConfig):
    return lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)


def _auto_fields(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [name for key, value in node.items() for name in _auto_fields(value, f"{path}.{key}" if path else key)]
    return [path] if node == "auto" else []


def initialize(model: LatentReasoningModel, cfg: EngineConfig, ds_config: dict[str, Any], total_steps: int):
    """``deepspeed.initialize`` with the two AdamW groups (``core.optim``) and a transformers LR schedule."""
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=build_param_groups(model, cfg.lr, cfg.weight_decay),
        config=ds_config,
        lr_scheduler=lambda optimizer: get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps
        ),
    )
    return engine


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside DeepSpeed's wrappers (ZeRO partitions, bf16 master weights):
    ``torch.optim.AdamW``, or ``DeepSpeedCPUAdam`` when the optimizer is offloaded."""
    inner = engine.optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"no torch optimizer inside {type(engine.optimizer).__name__}")
    return inner


def reset_optimizer_state(engine) -> None:
    """Forget AdamW's moments and step counts, as a freshly built optimizer would (same parameters and LR schedule).

    The innermost optimizer (``torch_optimizer``) holds the state, and AdamW rebuilds it from zeros at its next step.
    """
    torch_optimizer(engine).state.clear()


def run_identity(cfg: EngineConfig, method_config) -> dict[str, Any]:
    """The settings a checkpoint can only be resumed with: the model, the method's config and the LoRA layout."""
    lora = {name: getattr(cfg, name) for name in ("lora_rank", "lora_alpha", "lora_target_modules")}
    return {type(cfg).__name__: {"model": cfg.model, **lora}, type(method_config).__name__: method_config.to_dict()}


def resume_state(ckpt_root: Path, tag: str | None, world: int, identity: dict[str, Any]) -> dict[str, Any] | None:
    """This rank's saved state in checkpoint ``tag`` (None when not resuming), after checking that the saving run
    had as many ranks and the same ``run_identity``; a difference is refused with the fields named."""
    if tag is None:
        return None
    written = checkpoints.ranks_saved(ckpt_root / tag)
    if written != world:
        raise ConfigError(f"--resume: {ckpt_root / tag} was written by {written} ranks, this run has {world}; each rank "
                          f"resumes its own data position, so resume it with {written} ranks (the launcher's --num-gpus, "
                          "or a hostfile's slots)")
    saved = checkpoints.saved_state(ckpt_root, tag)
    before = saved.get("identity", identity)
    changed = [f"{group}.{name} (checkpoint {before[group].get(name)!r}, now {value!r})"
               for group, fields in identity.items() for name, value in fields.items()
               if group in before and before[group].get(name) != value]
    if changed:
        raise ConfigError(f"--resume: {ckpt_root / tag} was trained with other settings: {'; '.join(changed)}; "
                          "resume with the same settings, or start a new --output-dir")
    return saved


def write_run_config(out_dir: Path, record: dict[str, Any]) -> None:
    """``<output-dir>/config.json``: every setting the run used."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_whole(out_dir / "config.json", json.dumps(record, indent=2, default=str) + "\n")


class StepLog:
    """Rank 0's step log: ``metrics.jsonl`` and TensorBoard (``RunLog``) plus a tqdm bar; other ranks log nothing."""

    def __init__(self, out_dir: Path, start_step: int, total_steps: int, rank: int, desc: str = "train") -> None:
        self.log = RunLog(out_dir, resume_step=start_step) if rank == 0 else None
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", disable=rank != 0)

    def heldout(self, step: int, values: dict[str, float]) -> None:
        if self.log:
            self.log.heldout(step, values)

    def step(self, record: dict[str, Any], **postfix: str) -> None:
        """One optimizer step's record; the bar advances and shows ``postfix``."""
        if self.log:
            self.log.step(record)
            self.bar.update(1)
            self.bar.set_postfix(**postfix)

    def event(self, record: dict[str, Any]) -> None:
        """A record between steps (e.g. a validation), logged under its ``step`` without advancing the bar."""
        if self.log:
            self.log.step(record)

    def close(self) -> None:
        self.bar.close()
        if self.log:
            self.log.close()


def export_final(model_class: type[LatentReasoningModel], cfg: EngineConfig, method_config, ckpt_root: Path,
                 out_dir: Path, rank: int, tag: str | None = None, target: str = "final") -> Path:
    """Write ``<output-dir>/<target>`` (``model_class.save_pretrained``) from a checkpoint's fp32 weights
    (default: the ``latest`` checkpoint into ``final/``).

    The weights are gathered from the ZeRO shards every rank wrote, so this works at any stage.
    A LoRA run's adapters are saved in ``<target>/adapter`` (peft's format), then merged into the
    base weights, so the base in ``<target>`` is a stock checkpoint either way.
    """
    final = out_dir / target
    if rank == 0:
        weights = checkpoints.consolidated_state_dict(ckpt_root, tag or checkpoints.latest_tag(ckpt_root))
        model = load_model(model_class, cfg.model, method_config)
        adapters = add_lora(model.lm, _lora_config(cfg)) if cfg.lora_rank else None
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = {name for name in missing if name == "lm.lm_head.weight" and model.lm.config.tie_word_embeddings}
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"export: checkpoint and model disagree: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
        staging = out_dir / f"{target}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        if adapters is not None:
            adapters.save_pretrained(staging / "adapter")
            model.lm = adapters.merge_and_unload()
        model.save_pretrained(staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    dist.barrier()
    return final

"""The training recipes' settings, and the DeepSpeed config they complete.

``EngineConfig`` holds what both recipes share (model, output, DeepSpeed JSON, batch,
optimizer, precision, checkpoints); ``TrainConfig`` (Quiet-STaR pretraining) and
``CoconutTrainConfig`` extend it. A recipe reads its typed configs from one flat
namespace (YAML keys or CLI flags): the method's config, the data's and its train
config. Field names are unique across the configs of a recipe.

The DeepSpeed JSON (``TrainConfig.deepspeed``) owns the ZeRO stage, offload and
communication settings. The batch, optimizer, clipping and precision values
belong to ``TrainConfig``: in the JSON they may be absent or ``"auto"`` (the
recipe fills them in), and an explicit value that disagrees is an error rather
than a silent override.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quietstar.core.cli_config import ConfigError, is_int, is_number, key_list, one_line, require
from quietstar.core.offline import SMOLLM2

DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class EngineConfig:
    """What both recipes' engines need: the model, the output, DeepSpeed, the batch and AdamW.

    Attributes:
        model: the starting model: ``smollm2-135m`` (offline default), a local HF
            model dir, a saved model dir of the recipe's method, or a hub id.
        output_dir: checkpoints, ``metrics.jsonl``, TensorBoard events and ``final/``; ``{time}``
            in it becomes the run's start time (rank 0's, the same on every rank).
        deepspeed: the DeepSpeed JSON (ZeRO stage, offload); see ``ds_configs/``.
        seed: fixes the initial weights of the new modules, the data order and any sampling.
        micro_batch_size: sequences per device per forward.
        grad_accum_steps: forwards per optimizer step; the global batch is
            micro_batch_size * grad_accum_steps * number of devices.
        lr: AdamW learning rate of the model (the method's markers get
            ``lr`` times the method's marker multiplier).
        weight_decay: AdamW weight decay (not applied to the markers).
        warmup_steps: linear warmup from 0 to ``lr``.
        lr_scheduler: a ``transformers`` schedule: constant, constant_with_warmup, linear, cosine.
        grad_clip: clip the global gradient norm to this value; 0 disables clipping.
        precision: ``bf16`` (bf16 compute, fp32 master weights), ``fp32``, or
            ``auto`` (bf16 on CUDA, fp32 on CPU).
        gradient_checkpointing: recompute each layer in backward to save memory. Quiet-STaR needs
            ``formulation: efficient`` with it (the default one pass keeps each block's keys for the next);
            Coconut checkpoints through its latent passes exactly (``coconut.segment_cache``).
        save_every: a checkpoint every this many optimizer steps (and at the end); 0
            saves only at the end (and, for Coconut, at each epoch's end).
        keep_checkpoints: how many of the newest checkpoints to keep; 0 keeps all.
        lora_rank: 0 trains every weight of the base LM; r > 0 freezes them and trains rank-r
            LoRA adapters (``peft``) instead. The method's own modules train in full either way.
            ``final/`` then holds the adapters merged into the base weights, and the adapters
            themselves in ``final/adapter``.
        lora_alpha: the adapters' scale is lora_alpha / lora_rank.
        lora_dropout: dropout on the adapters' input.
        lora_target_modules: ``all-linear`` (every linear layer but the output head) or
            comma-separated module names, e.g. ``q_proj,v_proj``.
        max_bad_steps: a step whose loss or gradient norm is NaN/inf is skipped (no weight
            changes); this many such steps in a row stop the run with exit code 2.
        dist_timeout_s: how long a collective waits for the other ranks before failing, so that
            a run whose rank died or hangs exits instead of waiting forever.
    """

    model: str = SMOLLM2
    output_dir: str = "runs/quietstar"
    deepspeed: str = str(DS_CONFIGS / "zero2.json")
    seed: int = 0
    micro_batch_size: int = 1
    grad_accum_steps: int = 8
    lr: float = 1e-6
    weight_decay: float = 0.001
    warmup_steps: int = 20
    lr_scheduler: str = "constant_with_warmup"
    grad_clip: float = 1.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    save_every: int = 50
    keep_checkpoints: int = 2
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    max_bad_steps: int = 5
    dist_timeout_s: int = 600

    def __post_init__(self) -> None:
        for name in ("model", "output_dir", "deepspeed", "lora_target_modules"):
            require(isinstance(getattr(self, name), str) and getattr(self, name).strip() != "", self, name, "must be a non-empty string")
        for name in ("micro_batch_size", "grad_accum_steps", "max_bad_steps", "dist_timeout_s"):
            require(is_int(getattr(self, name)) and getattr(self, name) >= 1, self, name, "must be an integer >= 1")
        for name in ("seed", "warmup_steps", "save_every", "keep_checkpoints", "lora_rank"):
            require(is_int(getattr(self, name)) and getattr(self, name) >= 0, self, name, "must be an integer >= 0")
        require(is_number(self.lr) and self.lr > 0, self, "lr", "must be a finite number > 0")
        require(is_number(self.weight_decay) and self.weight_decay >= 0, self, "weight_decay", "must be a finite number >= 0")
        require(is_number(self.grad_clip) and self.grad_clip >= 0, self, "grad_clip", "must be a finite number >= 0")
        require(self.lr_scheduler in LR_SCHEDULERS, self, "lr_scheduler", f"must be one of {', '.join(LR_SCHEDULERS)}")
        require(
            self.lr_scheduler != "constant" or self.warmup_steps == 0,
            self,
            "lr_scheduler",
            "'constant' has no warmup; use constant_with_warmup or set warmup_steps: 0",
        )
        require(self.precision in PRECISIONS, self, "precision", f"must be one of {', '.join(PRECISIONS)}")
        require(isinstance(self.gradient_checkpointing, bool), self, "gradient_checkpointing", "must be true or false")
        require(is_number(self.lora_alpha) and self.lora_alpha > 0, self, "lora_alpha", "must be a finite number > 0")
        require(is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1, self, "lora_dropout", "must be a number in [0, 1)")


@dataclass(frozen=True)
class TrainConfig(EngineConfig):
    """Settings of ``python -m quietstar.training.pretrain`` (Quiet-STaR): ``EngineConfig`` plus the step budget,
    held-out evaluation and gradient diagnostics. Optimizer defaults follow the paper.

    Attributes:
        max_steps: optimizer steps to train for.
        eval_every: held-out base vs. talk NLL every this many steps (and before
            the first and after the last); 0 evaluates only before and after.
        eval_batch_size: sequences per held-out forward.
        grad_diagnostics: at every held-out evaluation step, also measure the
            gradient norms of the LM terms and of the policy term apart, on that
            step's first micro-batch (``quietstar.quiet_star.diagnostics``). They need whole
            weights on each rank: ``None`` (auto) turns them on for ZeRO stages 0-2
            and off for ZeRO-3; ``true`` under ZeRO-3 is an error.
    """

    max_steps: int = 100
    eval_every: int = 50
    eval_batch_size: int = 4
    grad_diagnostics: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_steps", "eval_batch_size"):
            require(is_int(getattr(self, name)) and getattr(self, name) >= 1, self, name, "must be an integer >= 1")
        require(is_int(self.eval_every) and self.eval_every >= 0, self, "eval_every", "must be an integer >= 0")
        require(self.grad_diagnostics is None or isinstance(self.grad_diagnostics, bool), self, "grad_diagnostics",
                "must be true, false or null (auto)")


@dataclass(frozen=True)
class CoconutTrainConfig(EngineConfig):
    """Settings of ``python -m quietstar.training.coconut``: ``EngineConfig`` with the paper's optimizer
    (AdamW 1e-4, weight decay 0.01, no schedule, no clipping) plus epochs and validation.

    Attributes:
        num_epochs: epochs to train; the curriculum stage is ``epoch // epochs_per_stage``.
        val_batch_size: questions per greedy-decoding batch in validation.
        val_max_new_tokens: tokens generated per validation answer at most.
        max_val_examples: validate on at most this many items (None: the whole split).
    """

    output_dir: str = "runs/coconut"
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    lr_scheduler: str = "constant"
    grad_clip: float = 0.0
    precision: str = "fp32"
    grad_accum_steps: int = 1
    micro_batch_size: int = 8
    save_every: int = 0
    keep_checkpoints: int = 1
    num_epochs: int = 6
    val_batch_size: int = 32
    val_max_new_tokens: int = 64
    max_val_examples: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_epochs", "val_batch_size", "val_max_new_tokens"):
            require(is_int(getattr(self, name)) and getattr(self, name) >= 1, self, name, "must be an integer >= 1")
        require(self.max_val_examples is None or (is_int(self.max_val_examples) and self.max_val_examples >= 1),
                self, "max_val_examples", "must be an integer >= 1 or null (all)")


def check_yaml_keys(values: dict[str, Any], configs: tuple[type, ...]) -> None:
    """Every YAML key must name a field of one of the recipe's configs."""
    known = {f.name for cls in configs for f in dataclasses.fields(cls)}
    unknown = [key for key in values if key not in known]
    if unknown:
        raise ConfigError(f"config file: unknown field(s) {key_list(unknown)}; run with --help for the list")


def use_bf16(train: EngineConfig, device_type: str) -> bool:
    return train.precision == "bf16" or (train.precision == "auto" and device_type == "cuda")


def _fill(ds: dict, keys: tuple[str, ...], value: Any, owner: str, path: Path) -> None:
    """Set ``ds[keys]`` to ``value`` when absent or "auto"; refuse an explicit value that disagrees."""
    node = ds
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    current = node.get(keys[-1], "auto")
    if current == "auto":
        node[keys[-1]] = value
    elif current != value:
        raise ConfigError(
            f"{path}: {'.'.join(keys)} = {current!r} disagrees with {owner} = {value!r}; "
            f'write "auto" in the JSON (the recipe fills it in) or change the setting'
        )


def deepspeed_config(train: EngineConfig, device_type: str, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for this run: ``train.deepspeed`` completed from ``train``."""
    path = Path(train.deepspeed)
    if not path.is_file():
        raise ConfigError(f"TrainConfig.deepspeed: file not found: {path}")
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"TrainConfig.deepspeed: {path} is not valid JSON ({error})") from None
    except (ValueError, RecursionError) as error:  # not UTF-8, an integer past the digit limit, nesting past the recursion limit
        raise ConfigError(f"TrainConfig.deepspeed: {path} is not valid JSON ({one_line(error)})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"TrainConfig.deepspeed: {path} must hold a JSON object")
    for keys in (("fp16",), ("bf16",), ("optimizer",), ("optimizer", "params"), ("zero_optimization",),
                 ("zero_optimization", "offload_optimizer")):
        section = ds
        for key in keys:
            section = section.get(key, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: {'.'.join(keys)} must be a JSON object, got {type(section).__name__}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if not (is_int(stage) and 0 <= stage <= 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if ds.get("fp16", {}).get("enabled") not in (None, False):
        raise ConfigError(f"{path}: fp16 is not supported (its loss scaling is not needed with bf16); use bf16")
    if "scheduler" in ds:
        raise ConfigError(f"{path}: remove 'scheduler'; the LR schedule comes from TrainConfig.lr_scheduler and warmup_steps")
    optimizer_type = ds.setdefault("optimizer", {"type": "AdamW"}).get("type")
    if str(optimizer_type).lower() != "adamw":
        raise ConfigError(f"{path}: optimizer.type must be AdamW, got {optimizer_type!r}")
    _fill(ds, ("train_micro_batch_size_per_gpu",), train.micro_batch_size, "TrainConfig.micro_batch_size", path)
    _fill(ds, ("gradient_accumulation_steps",), train.grad_accum_steps, "TrainConfig.grad_accum_steps", path)
    _fill(ds, ("train_batch_size",), train.micro_batch_size * train.grad_accum_steps * world_size,
          "micro_batch_size * grad_accum_steps * world size", path)
    _fill(ds, ("gradient_clipping",), float(train.grad_clip), "TrainConfig.grad_clip", path)
    _fill(ds, ("optimizer", "params", "lr"), train.lr, "TrainConfig.lr", path)
    _fill(ds, ("optimizer", "params", "weight_decay"), train.weight_decay, "TrainConfig.weight_decay", path)
    _fill(ds, ("bf16", "enabled"), use_bf16(train, device_type), "TrainConfig.precision", path)
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    if device_type == "cpu" and not offload:
        # DeepSpeed's fused Adam would compile a C++ op for the CPU; torch's AdamW is as fast there.
        # An offloaded optimizer keeps DeepSpeedCPUAdam, as it runs on a GPU machine.
        ds["optimizer"]["params"].setdefault("torch_adam", True)
    ds.setdefault("steps_per_print", 10**9)  # the recipe logs every step itself
    return ds


def grad_diagnostics_on(train: TrainConfig, ds: dict[str, Any]) -> bool:
    """Whether this run records gradient diagnostics: as set, or (auto) whenever the weights are whole (ZeRO 0-2)."""
    if train.grad_diagnostics and zero_stage(ds) == 3:
        raise ConfigError(
            f"TrainConfig.grad_diagnostics: needs ZeRO stage 0-2, but {train.deepspeed} is ZeRO-3 (it partitions the weights); "
            "pass --no-grad-diagnostics"
        )
    return train.grad_diagnostics if train.grad_diagnostics is not None else zero_stage(ds) < 3


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))

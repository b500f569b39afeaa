"""TestbedConfig: the task, the tiny base LM, both arms and the table, validated at construction."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from quietstar.core.cli_config import ConfigError, is_int, is_number, require
from quietstar.testbed.task import MAX_HOPS, Problem, mixed_problems, problems

QUIET_STAR_ROWS = ("delimiters", "default_markers", "task_markers", "oracle", "reference_objective")
COCONUT_ROWS = ("cot", "no_cot", "coconut", "no_curriculum", "pause_as_thought")
BASE_FIELDS = ("hops", "min_hops", "earlier_prob", "data_seed", "base_problems", "base_worked_fraction", "layers", "hidden_size",
               "heads", "base_steps", "base_batch_size", "base_lr", "base_seed")


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in str(text).split(",") if x.strip())


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in str(text).split(",") if x.strip())


@dataclass(frozen=True)
class TestbedConfig:
    """Settings of the reasoning testbed (``quietstar testbed``).

    List fields are comma-separated strings on the command line and in YAML ("0,1,2"); one seed may be a number.

    Attributes:
        hops: k, the difficulty the table is about (the hardest): dependent assignments each problem chains.
        min_hops: the easiest difficulty. Training documents (base and arms) are spread evenly over
            ``min_hops..hops``, and every row is scored at each of them (accuracy against difficulty).
        earlier_prob: chance that a hop (from the third variable on) combines with an earlier variable, not a digit.
        data_seed: seed of the problems (train, valid and test alike).
        base_problems: distinct training problems the base LM and the arms draw their documents from.
        eval_problems: held-out problems scored per difficulty (valid while tuning, test for the table).
        eval_split: ``valid`` (to choose settings) or ``test`` (the final table).
        base_worked_fraction: share of the base's documents in the worked form (``e?[b9c6d2e6]6``); the rest unworked.
        layers, hidden_size, heads: the base LM (Llama, from scratch; intermediate size 4 * hidden).
        base_steps, base_batch_size, base_lr, base_seed: its pretraining (AdamW, 5 % warmup, cosine).
        qs_rows: the Quiet-STaR rows to train: ``delimiters`` (markers start at ``[``/``]``), ``default_markers``
            (the library's marker init), ``task_markers`` (``<sot>`` at the chain's first variable, task-specific),
            ``oracle`` (trained and scored with the true chain as the thought), ``reference_objective``
            (delimiters, the reference code's objective).
        qs_steps, qs_batch_size, qs_lr: Quiet-STaR continued pretraining on unworked documents.
        qs_thought_len: M; 0 means the chain's length (2 * hops).
        qs_n_thoughts, qs_n_true: R and K.
        qs_marker_lr_multiplier: the markers' learning-rate multiplier.
        coconut_rows: the Coconut rows (paper Table 1 baselines).
        coconut_latents_per_step: c, the continuous thoughts that replace one hop.
        coconut_epochs_per_stage, coconut_batch_size, coconut_lr, coconut_train_problems: Coconut's training;
            ``max_latent_stage = hops``; CoT and No-CoT train for as many epochs as the curriculum.
        seeds: the arms' seeds (each row trains once per seed, from the same base).
        threads: torch threads per process.
        workers: processes running rows side by side (each with ``threads`` threads).
    """

    hops: int = 4
    min_hops: int = 2
    earlier_prob: float = 0.3
    data_seed: int = 0
    base_problems: int = 20000
    eval_problems: int = 200
    eval_split: str = "valid"
    base_worked_fraction: float = 0.5
    layers: int = 4
    hidden_size: int = 128
    heads: int = 4
    base_steps: int = 3000
    base_batch_size: int = 64
    base_lr: float = 1e-3
    base_seed: int = 0
    qs_rows: str = "delimiters,default_markers,task_markers,oracle,reference_objective"
    qs_steps: int = 100
    qs_batch_size: int = 16
    qs_lr: float = 1e-4
    qs_thought_len: int = 0
    qs_n_thoughts: int = 2
    qs_n_true: int = 4
    qs_marker_lr_multiplier: float = 1.0
    coconut_rows: str = "cot,no_cot,coconut,no_curriculum,pause_as_thought"
    coconut_latents_per_step: int = 1
    coconut_epochs_per_stage: int = 1
    coconut_batch_size: int = 32
    coconut_lr: float = 1e-4
    coconut_train_problems: int = 4000
    seeds: str = "1,2,3"
    threads: int = 1
    workers: int = 2

    def __post_init__(self) -> None:
        require(is_int(self.hops) and 1 <= self.hops <= MAX_HOPS, self, "hops", f"must be an integer in 1..{MAX_HOPS}")
        require(is_int(self.min_hops) and 1 <= self.min_hops <= self.hops, self, "min_hops",
                f"must be an integer in 1..hops ({self.hops})")
        require(is_number(self.earlier_prob) and 0 <= self.earlier_prob <= 1, self, "earlier_prob", "must be a number in [0, 1]")
        for name in ("data_seed", "base_seed"):
            require(is_int(getattr(self, name)), self, name, "must be an integer")
        for name in ("base_problems", "eval_problems", "layers", "hidden_size", "heads", "base_steps", "base_batch_size",
                     "qs_steps", "qs_batch_size", "qs_n_true", "coconut_latents_per_step", "coconut_epochs_per_stage", "coconut_batch_size",
                     "coconut_train_problems", "threads", "workers"):
            require(is_int(getattr(self, name)) and getattr(self, name) >= 1, self, name, "must be an integer >= 1")
        require(self.eval_split in ("valid", "test"), self, "eval_split", "must be valid or test")
        require(is_number(self.base_worked_fraction) and 0 <= self.base_worked_fraction <= 1, self, "base_worked_fraction",
                "must be a number in [0, 1]")
        require(self.hidden_size % self.heads == 0, self, "heads", f"must divide hidden_size ({self.hidden_size})")
        for name in ("base_lr", "qs_lr", "coconut_lr", "qs_marker_lr_multiplier"):
            require(is_number(getattr(self, name)) and getattr(self, name) > 0, self, name, "must be a finite number > 0")
        require(is_int(self.qs_thought_len) and self.qs_thought_len >= 0, self, "qs_thought_len", "must be an integer >= 0")
        require(is_int(self.qs_n_thoughts) and self.qs_n_thoughts >= 2, self, "qs_n_thoughts", "must be an integer >= 2")
        for name, known in (("qs_rows", QUIET_STAR_ROWS), ("coconut_rows", COCONUT_ROWS)):
            rows = _name_list(getattr(self, name))
            unknown = [r for r in rows if r not in known]
            require(not unknown, self, name, f"has unknown row(s) {', '.join(unknown)}; known: {', '.join(known)}")
        if is_int(self.seeds):  # YAML reads "seeds: 7" as a number
            object.__setattr__(self, "seeds", str(self.seeds))
        require(isinstance(self.seeds, str), self, "seeds", "must be comma-separated integers")
        try:
            seeds = _int_list(self.seeds)
        except ValueError:
            raise ConfigError(f"TestbedConfig.seeds: must be comma-separated integers, got {self.seeds!r}") from None
        require(len(seeds) >= 1 and len(set(seeds)) == len(seeds), self, "seeds", "must name at least one seed, each once")

    @property
    def thought_len(self) -> int:
        return self.qs_thought_len or 2 * self.hops

    @property
    def hop_range(self) -> tuple[int, ...]:
        """The difficulties trained on and scored: ``min_hops..hops``."""
        return tuple(range(self.min_hops, self.hops + 1))

    @property
    def seed_list(self) -> tuple[int, ...]:
        return _int_list(self.seeds)

    @property
    def quiet_star_rows(self) -> tuple[str, ...]:
        return _name_list(self.qs_rows)

    @property
    def coconut_row_list(self) -> tuple[str, ...]:
        return _name_list(self.coconut_rows)

    def train_problems(self) -> list[Problem]:
        """The ``base_problems`` training problems, spread evenly over ``hop_range`` and shuffled."""
        return mixed_problems("train", self.base_problems, self.hop_range, self.data_seed, self.earlier_prob)

    def held_out_problems(self, split: str | None = None) -> list[Problem]:
        """``eval_problems`` problems of ``split`` (default ``eval_split``) at each difficulty, easiest first."""
        split = split or self.eval_split
        return [p for k in self.hop_range for p in problems(split, self.eval_problems, k, self.data_seed, self.earlier_prob)]

    def base_key(self) -> str:
        """A short hash of the fields that decide the base LM: runs with equal keys share one cached base."""
        fields = {name: getattr(self, name) for name in BASE_FIELDS}
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

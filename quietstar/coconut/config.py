"""CoconutConfig (the method and its curriculum) and CoconutDataConfig (the files), validated at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from quietstar.core.cli_config import is_int, is_number, require

# The paper's method and its baselines, all modes of one curriculum transform (``coconut.curriculum``).
MODES = ("coconut", "cot", "no_cot", "no_curriculum", "no_thought", "pause_as_thought", "pause_token")
OPTIMIZER_RESETS = ("stage", "epoch")
PROSQA_MINI = "prosqa-mini"  # the embedded default data: a small ProsQA-style set made by ``coconut.prosqa``


@dataclass(frozen=True)
class CoconutConfig:
    """Settings of Coconut (Hao et al., 2024) and of the paper's baselines.

    Attributes:
        mode: ``coconut`` (continuous thoughts, the curriculum); ``cot`` (stage 0 only:
            question, steps, answer); ``no_cot`` (question, answer); ``no_curriculum``
            (the last stage from the first epoch); ``no_thought`` (the curriculum removes
            steps but inserts no latents); ``pause_as_thought`` (the curriculum with learned
            ``<pause>`` embeddings in place of continuous thoughts); ``pause_token``
            (``<pause>`` embeddings after the question, no steps, no curriculum).
        c: latent thoughts per replaced language step (the paper: 2 on GSM8K, 1 on ProntoQA/ProsQA).
        max_latent_stage: the last stage that replaces k steps with k * c latents; past it
            every step is removed and ``max_latent_stage * c`` latents are kept.
        epochs_per_stage: epochs per curriculum stage (stage = epoch // epochs_per_stage).
        pad_latent_to_max: give an example with fewer steps than its stage as many latents
            as the stage has (k * c) instead of one set per step it has.
        uniform_prob: probability that a training example takes a random stage (0..its step
            count) instead of the epoch's, so that earlier stages are not forgotten.
        inference_latents: latents between ``<bot>`` and ``<eot>`` at validation and inference;
            ``None`` means ``max_latent_stage * c`` (6 in the paper's evaluations).
        optimizer_reset: ``stage`` resets the AdamW state when the stage changes (the paper);
            ``epoch`` resets it every epoch (the official code).
        marker_init_text: text whose mean token embedding initialises ``<bot>``, ``<eot>`` and
            ``<pause>`` (the official code copies the embedding of ``<<``).
    """

    mode: str = "coconut"
    c: int = 1
    max_latent_stage: int = 3
    epochs_per_stage: int = 3
    pad_latent_to_max: bool = False
    uniform_prob: float = 0.0
    inference_latents: int | None = None
    optimizer_reset: str = "stage"
    marker_init_text: str = "<<"

    def __post_init__(self) -> None:
        require(self.mode in MODES, self, "mode", f"must be one of {', '.join(MODES)}")
        require(is_int(self.c) and self.c >= 1, self, "c", "must be an integer >= 1")
        require(is_int(self.max_latent_stage) and self.max_latent_stage >= 1, self, "max_latent_stage", "must be an integer >= 1")
        require(is_int(self.epochs_per_stage) and self.epochs_per_stage >= 1, self, "epochs_per_stage", "must be an integer >= 1")
        require(isinstance(self.pad_latent_to_max, bool), self, "pad_latent_to_max", "must be true or false")
        require(is_number(self.uniform_prob) and 0 <= self.uniform_prob <= 1, self, "uniform_prob", "must be a number in [0, 1]")
        if self.inference_latents is None:
            object.__setattr__(self, "inference_latents", self.max_latent_stage * self.c)
        require(is_int(self.inference_latents) and self.inference_latents >= 0, self, "inference_latents", "must be an integer >= 0 or null")
        require(self.optimizer_reset in OPTIMIZER_RESETS, self, "optimizer_reset", f"must be one of {', '.join(OPTIMIZER_RESETS)}")
        require(isinstance(self.marker_init_text, str) and self.marker_init_text.strip() != "", self, "marker_init_text",
                "must be a non-empty string")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CoconutDataConfig:
    """Where the ``{question, steps, answer}`` examples come from.

    Attributes:
        train_file: a local ``.jsonl`` of ``{question, steps, answer}`` records or raw GSM8K
            (``question``, ``answer`` with ``<<...>>`` and ``#### N``), or ``prosqa-mini``:
            a small ProsQA-style set generated on the spot (the offline default).
        val_file: the validation split, same formats; with ``prosqa-mini``, its own held-out items.
        max_tokens: training examples longer than this (question, markers, latents, steps and
            answer) are skipped and counted.
        mini_train_items: items of the generated ``prosqa-mini`` training set.
        mini_val_items: items of the generated ``prosqa-mini`` validation set.
    """

    train_file: str = PROSQA_MINI
    val_file: str = PROSQA_MINI
    max_tokens: int = 1024
    mini_train_items: int = 256
    mini_val_items: int = 32

    def __post_init__(self) -> None:
        for name in ("train_file", "val_file"):
            require(isinstance(getattr(self, name), str) and getattr(self, name).strip() != "", self, name, "must be a non-empty string")
        require((self.train_file == PROSQA_MINI) == (self.val_file == PROSQA_MINI), self, "val_file",
                f"'{PROSQA_MINI}' must be used for both train_file and val_file or for neither")
        for name in ("max_tokens", "mini_train_items", "mini_val_items"):
            require(is_int(getattr(self, name)) and getattr(self, name) >= 1, self, name, "must be an integer >= 1")

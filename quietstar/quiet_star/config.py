"""QuietStarConfig: the method's hyperparameters, validated at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from quietstar.core.cli_config import is_int, is_number, require
from quietstar.quiet_star.thought_attention import BACKENDS

FORMULATIONS = ("one_pass", "efficient", "sequential")
LOSS_REDUCTIONS = ("reference", "token")


@dataclass(frozen=True)
class QuietStarConfig:
    """Settings of Quiet-STaR (Zelikman et al., 2024).

    The defaults are this project's ``token`` objective (talk NLL + REINFORCE at the
    sampling temperature, one mean over the valid terms). They were chosen over
    the public reference code's objective on a side-by-side comparison (README,
    "Which objective"); ``launch/configs/paper.yaml`` sets the reference's objective
    (``0.5 * base NLL + 0.5 * talk NLL + 1e6 * policy``, the policy at temperature 3
    reduced per thought token, a two-layer mixing head of the model's width), and
    the README maps every reference hyperparameter to a field.

    Attributes:
        thought_len: M, sampled tokens between ``<sot>`` and ``<eot>``.
        n_true: K, true tokens after the thought that are predicted (teacher forced).
        n_thoughts: R, thoughts per position; R >= 2 because the reward baseline is
            the mean over the other thoughts at the same position.
        sample_temperature: temperature used to sample thought tokens.
        policy_temperature: temperature of the log-probabilities in the REINFORCE
            loss (the reference: 3, while it samples at 1); ``None`` means "same as
            ``sample_temperature``".
        base_loss_weight: weight of the plain next-token NLL of the unchanged model
            (the reference's ``original_loss_weight``).
        talk_loss_weight: weight of the NLL of the mixed ("talk") prediction
            (the reference: ``1 - original_loss_weight``).
        policy_loss_weight: weight of the REINFORCE loss on the thought tokens
            (the reference's ``policy_loss_beta``).
        loss_reduction: how the talk NLL and the policy loss are averaged.
            ``reference``: the talk NLL is the mean over j = 1..K of the mean NLL
            of target j; the policy loss is ``-r+ * log p(z_i)`` averaged, for each
            thought token i, over all rows and thoughts at the first L - 1 - K
            positions (padding included, as the reference does), then averaged
            over the M tokens. ``token``: the talk NLL is the mean over all valid
            (t, r, j); the policy loss is ``-r+ * sum_i log p(z_i)`` averaged over
            the valid (t, r).
        positive_rewards_only: keep only rewards > 0 in the policy loss (paper).
        thought_lr_multiplier: learning-rate multiplier of the ``<sot>``/``<eot>``
            embeddings relative to the rest of the model. AdamW moves each marker
            coordinate by about ``lr * thought_lr_multiplier`` per step, whatever the
            gradient's size, so that product must stay well below the embedding
            rows' RMS or the markers forget the text they started as. The default
            100 at the recipes' default lr 1e-6 (the paper's) is 1e-4 per step; the
            reasoning testbed (``quietstar testbed``, lr 1e-4) measured that 1e-4
            against an embedding RMS of 0.028 keeps ``<sot>`` within 3 % and ``<eot>``
            within 9 % of their start over 150 steps and the thoughts work, while 1e-2 moves them by 80 %
            of their norm in 15 steps and the thoughts collapse to noise.
        mixing_head_layers: hidden layers of the mixing head's MLP (the reference: 2).
        mixing_head_width: width of those layers; ``None`` means the model's hidden size
            (the reference).
        marker_init_text: text whose mean token embedding initialises ``<sot>``, and ``<eot>``
            unless ``end_marker_init_text`` is set.
        end_marker_init_text: text whose mean token embedding initialises ``<eot>``; ``None``
            means ``marker_init_text``. Markers that open and close an aside the base
            model knows (``[`` and ``]``, say) let the thought read as such an aside.
        formulation: ``one_pass`` samples each thought token from the forward
            that trains it, one forward per thought block, and keeps every
            block's keys apart for the next (``one_pass``; fastest, no activation
            checkpointing, no flex kernel); ``efficient`` samples the thoughts
            without gradients and replays the step in one forward with
            block-structured attention (``thought_sampler``; works with activation
            checkpointing and every kernel); ``sequential`` runs one forward per
            thought block with dense masks (``sequential_thoughts``, the test
            oracle). All three compute the same losses and gradients.
        attention_backend: kernel of the thought attention: ``flex``
            (FlexAttention block masks, ``efficient`` only; compiled on CUDA, where
            heads need 16 or more dimensions), ``cpu_flash`` (the CPU's fused kernel),
            ``torch`` (plain tensor ops; any device) or ``auto`` (cpu_flash on the
            CPU; on CUDA flex for ``efficient`` and torch for ``one_pass``; else torch).
    """

    thought_len: int = 12
    n_true: int = 4
    n_thoughts: int = 2
    sample_temperature: float = 1.0
    policy_temperature: float | None = None
    base_loss_weight: float = 0.0
    talk_loss_weight: float = 1.0
    policy_loss_weight: float = 1.0
    loss_reduction: str = "token"
    positive_rewards_only: bool = True
    thought_lr_multiplier: float = 100.0
    mixing_head_layers: int = 1
    mixing_head_width: int | None = 256
    marker_init_text: str = "---"
    end_marker_init_text: str | None = None
    formulation: str = "one_pass"
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        require(is_int(self.thought_len) and self.thought_len >= 1, self, "thought_len", "must be an integer >= 1")
        require(is_int(self.n_true) and self.n_true >= 1, self, "n_true", "must be an integer >= 1")
        require(
            is_int(self.n_thoughts) and self.n_thoughts >= 2,
            self,
            "n_thoughts",
            "must be an integer >= 2 (the reward baseline is the mean over thoughts)",
        )
        require(is_number(self.sample_temperature) and self.sample_temperature > 0, self, "sample_temperature", "must be a finite number > 0")
        if self.policy_temperature is None:
            object.__setattr__(self, "policy_temperature", float(self.sample_temperature))
        require(is_number(self.policy_temperature) and self.policy_temperature > 0, self, "policy_temperature", "must be a finite number > 0")
        for name in ("base_loss_weight", "talk_loss_weight", "policy_loss_weight"):
            require(is_number(getattr(self, name)) and getattr(self, name) >= 0, self, name, "must be a finite number >= 0")
        require(
            self.base_loss_weight + self.talk_loss_weight + self.policy_loss_weight > 0,
            self,
            "talk_loss_weight",
            "base_loss_weight, talk_loss_weight and policy_loss_weight are all 0, so there is nothing to train",
        )
        require(self.loss_reduction in LOSS_REDUCTIONS, self, "loss_reduction", f"must be one of {', '.join(LOSS_REDUCTIONS)}")
        require(isinstance(self.positive_rewards_only, bool), self, "positive_rewards_only", "must be true or false")
        require(is_number(self.thought_lr_multiplier) and self.thought_lr_multiplier > 0, self, "thought_lr_multiplier", "must be a finite number > 0")
        require(is_int(self.mixing_head_layers) and self.mixing_head_layers >= 1, self, "mixing_head_layers", "must be an integer >= 1")
        require(
            self.mixing_head_width is None or (is_int(self.mixing_head_width) and self.mixing_head_width >= 1),
            self,
            "mixing_head_width",
            "must be an integer >= 1, or null for the model's hidden size",
        )
        require(
            isinstance(self.marker_init_text, str) and self.marker_init_text.strip() != "",
            self,
            "marker_init_text",
            "must be a non-empty string",
        )
        require(
            self.end_marker_init_text is None or (isinstance(self.end_marker_init_text, str) and self.end_marker_init_text.strip() != ""),
            self,
            "end_marker_init_text",
            "must be a non-empty string, or null for marker_init_text",
        )
        require(self.formulation in FORMULATIONS, self, "formulation", f"must be one of {', '.join(FORMULATIONS)}")
        require(self.attention_backend in BACKENDS, self, "attention_backend", f"must be one of {', '.join(BACKENDS)}")
        require(
            not (self.formulation == "one_pass" and self.attention_backend == "flex"),
            self,
            "attention_backend",
            "flex cannot run the one_pass formulation (it takes each layer's keys as one tensor); "
            "use cpu_flash, torch or auto, or formulation='efficient'",
        )

    @property
    def n_blocks(self) -> int:
        """Thought-side blocks forwarded per step: <sot>, z_1..z_M, <eot>, x_{t+1..t+K-1}."""
        return self.thought_len + self.n_true + 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

"""QuietStarModel: a causal LM that samples a thought after every token.

One training step (``forward``), for all positions t of a batch at once:
  1. base pass over the text -> h_base [B, L, H] and the base NLL;
  2. thought blocks: <sot>, z_1..z_M, <eot>, x_{t+1..t+K-1}
     -> policy log-probs of z and post-thought hidden states [B, L, R, K, H];
     by default sampled block by block by the forwards that train them (``one_pass``),
     or sampled without gradients and replayed in one forward (``thought_sampler``),
     or one forward per block with dense masks (``sequential_thoughts``, the oracle);
  3. mixing head: talk hidden = h_base + w * (h_thought - h_base) -> talk log-probs;
  4. losses: talk NLL, rewards with the mean-over-thoughts baseline, REINFORCE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from quietstar.core.latent_model import LatentReasoningModel, base_attention
from quietstar.quiet_star.config import QuietStarConfig
from quietstar.quiet_star.losses import chunked_token_logprobs, future_targets, masked_mean, nll, reinforce_loss, talk_nll, thought_rewards
from quietstar.quiet_star.mixing_head import MixingHead
from quietstar.quiet_star.one_pass import one_pass_backend, one_pass_rollout
from quietstar.quiet_star.sequential_thoughts import sequential_rollout
from quietstar.quiet_star.thought_attention import install_thought_attention
from quietstar.quiet_star.thought_embeddings import ThoughtEmbeddings
from quietstar.quiet_star.thought_sampler import ThoughtRollout, replay_thoughts, sample_thoughts


@dataclass
class QuietStarOutput:
    """Result of one Quiet-STaR forward. Scalars are 0-dim tensors.

    ``loss = lm_loss + policy_term`` carries the graph, and so do its two parts:
    ``lm_loss`` (base_loss_weight * base NLL + talk_loss_weight * talk NLL) and
    ``policy_term`` (policy_loss_weight * policy loss), so that their gradients
    can be measured apart (``quietstar.quiet_star.diagnostics``).

    ``base_nll`` is the next-token NLL of the unchanged model; ``talk_nll`` averages
    over all K targets after each thought, so the two differ even when talk == base.

    Per-position tensors (B batch, L length, R thoughts, K true tokens, M thought length):
        base_logprobs: [B, L, K] log p_base(x_{t+j}) (the base model's prediction at t+j-1).
        talk_logprobs: [B, L, R, K] log p_talk(x_{t+j} | thought r after x_t).
            Both are 0 where ``target_mask`` is False.
        target_mask: [B, L, K] True where x_{t+j} is a real token.
        thoughts: [B, L, R, M] the thought tokens.
        rewards: [B, L, R] reward of each thought (sums to zero over R).
        mixing_weights: [B, L, R, K] the mixing head's w.
    """

    loss: torch.Tensor
    lm_loss: torch.Tensor
    policy_term: torch.Tensor
    base_nll: torch.Tensor
    talk_nll: torch.Tensor
    policy_loss: torch.Tensor
    reward_mean: torch.Tensor
    mixing_weight_mean: torch.Tensor
    base_logprobs: torch.Tensor
    talk_logprobs: torch.Tensor
    target_mask: torch.Tensor
    thoughts: torch.LongTensor
    rewards: torch.Tensor
    mixing_weights: torch.Tensor

    def next_token_nlls(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token next-token NLLs: (base [B, L], talk [B, L], valid [B, L]).

        The entry at t scores x_{t+1}; ``talk`` averages the R thoughts' NLLs; ``valid`` is
        False where there is no next token (the NLLs are 0 there).
        """
        valid = self.target_mask[..., 0]
        base = -self.base_logprobs[..., 0]
        talk = -self.talk_logprobs[..., 0].mean(dim=2)
        return base.masked_fill(~valid, 0.0), talk.masked_fill(~valid, 0.0), valid

    def metrics(self) -> dict[str, float]:
        """The scalar fields as Python floats, for logging."""
        names = ("loss", "base_nll", "talk_nll", "policy_loss", "reward_mean", "mixing_weight_mean")
        return {name: float(getattr(self, name).detach()) for name in names}


def sliding_window(config) -> int | None:
    """The window of the model's sliding-window (local) attention layers, or None when it has none.

    Models with ``layer_types`` (Gemma 3, Qwen2/3) slide only in their ``sliding_attention`` layers;
    older configs (Mistral, Phi-3) slide in every layer whenever ``sliding_window`` is set.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


class QuietStarModel(LatentReasoningModel):
    """Quiet-STaR around any supported ``AutoModelForCausalLM`` (Llama, Mistral, Qwen2, Qwen3, Gemma 3, Phi-3, OLMo 2).

    Args:
        base_model: the causal LM; it is trained in place.
        tokenizer: its tokenizer (used to initialise the markers and saved with the model).
        config: the method's settings.
    """

    method = "quietstar"
    config_class = QuietStarConfig
    format_version = 2  # 2: the mixing head has configurable depth and a bias-free last layer
    supported_families = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "olmo2")

    @classmethod
    def check_base_model(cls, lm: PreTrainedModel, tokenizer) -> None:
        """Also: the attention must take the thought mask, and the LM head must be bias-free (the mixing head mixes states)."""
        super().check_base_model(lm, tokenizer)
        attention = base_attention(lm)
        if attention not in ("eager", "sdpa"):
            raise ValueError(
                f"attention implementation {attention!r} cannot take the thought attention mask; "
                f"load the model with attn_implementation='sdpa' or 'eager'"
            )
        if getattr(lm.config, "attn_logit_softcapping", None) is not None:
            raise ValueError(f"{type(lm).__name__} soft-caps its attention scores (attn_logit_softcapping), "
                             "which the thought attention kernels do not do")
        if getattr(lm.get_output_embeddings(), "bias", None) is not None:
            raise ValueError(f"{type(lm).__name__} has an LM head with a bias; the mixing head needs a bias-free head")

    def __init__(self, base_model: PreTrainedModel, tokenizer, config: QuietStarConfig | None = None) -> None:
        super().__init__(base_model, tokenizer, config if config is not None else QuietStarConfig())
        install_thought_attention(base_model)
        embedding = base_model.get_input_embeddings()
        like = {"device": embedding.weight.device, "dtype": embedding.weight.dtype}
        self.thought_embeddings = ThoughtEmbeddings.from_text(
            embedding, tokenizer, self.config.marker_init_text, self.config.end_marker_init_text
        ).to(**like)
        hidden_size = base_model.config.hidden_size
        width = self.config.mixing_head_width or hidden_size
        self.mixing_head = MixingHead(hidden_size, width, self.config.mixing_head_layers).to(**like)

    def marker_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.thought_embeddings.parameters())

    @property
    def marker_lr_multiplier(self) -> float:
        return self.config.thought_lr_multiplier

    @property
    def start_embedding(self) -> torch.nn.Parameter:
        """The learned ``<sot>`` embedding, shape [hidden]."""
        return self.thought_embeddings.start

    @property
    def end_embedding(self) -> torch.nn.Parameter:
        """The learned ``<eot>`` embedding, shape [hidden]."""
        return self.thought_embeddings.end

    def _validate_inputs(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Validate the inputs and return the [B, L] attention mask (all ones when None)."""
        if self.config.formulation in ("sequential", "one_pass") and self.training and self.lm.is_activation_checkpointing:
            # HF layers drop the KV cache (`cache=`) under checkpointing in training mode, and a recomputed layer would
            # add its keys to the one-pass store again; both formulations keep each block's keys for the next.
            raise ValueError(
                f"gradient checkpointing is not supported by the {self.config.formulation} thought formulation; "
                "disable it or use formulation='efficient'"
            )
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape [B, L], got {list(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {list(attention_mask.shape)} != input_ids shape {list(input_ids.shape)}")
        lengths = attention_mask.long().sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError(f"row {int((lengths == 0).nonzero()[0])} of attention_mask has no tokens")
        right_padded = torch.arange(input_ids.shape[1], device=lengths.device)[None, :] < lengths[:, None]
        if not torch.equal(right_padded, attention_mask.bool()):
            raise ValueError("attention_mask must be right padded (1s then 0s in every row); use tokenizer.padding_side='right'")
        window = sliding_window(self.lm.config)
        reach = input_ids.shape[1] + self.config.thought_len + self.config.n_true
        if window is not None and reach >= window:
            raise ValueError(
                f"sequence length + thought_len + n_true = {reach} reaches the model's sliding window ({window}), "
                "past which its local layers would not let a thought see the text; use shorter sequences or thoughts"
            )
        return attention_mask

    def rollout(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        *,
        thoughts: torch.LongTensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, ThoughtRollout]:
        """Base pass and thought passes, with gradients.

        Returns h_base [B, L, H] and the rollout (thoughts, their policy
        log-probs and the post-thought hidden states [B, L, R, K, H]).
        ``thoughts`` [B, L, R, M], if given, is teacher-forced instead of sampled.
        """
        return self._rollout(input_ids, self._validate_inputs(input_ids, attention_mask), thoughts, generator)

    def _rollout(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        thoughts: torch.LongTensor | None,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, ThoughtRollout]:
        cfg = self.config
        if cfg.formulation == "sequential":
            return sequential_rollout(
                self.lm, self.thought_embeddings, cfg, input_ids, attention_mask, thoughts=thoughts, generator=generator
            )
        if cfg.formulation == "one_pass":
            return one_pass_rollout(
                self.lm, self.thought_embeddings, cfg, input_ids, attention_mask, thoughts=thoughts, generator=generator,
                backend=one_pass_backend(cfg.attention_backend, input_ids.device),
            )
        if thoughts is None:
            thoughts = self._sample(input_ids, attention_mask, greedy=False, generator=generator)
        return replay_thoughts(
            self.lm, self.thought_embeddings, cfg, input_ids, attention_mask, thoughts, backend=cfg.attention_backend
        )

    def _sample(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, greedy: bool, generator: torch.Generator | None
    ) -> torch.LongTensor:
        cfg = self.config
        if cfg.formulation == "sequential":
            with torch.no_grad():
                _, rollout = sequential_rollout(
                    self.lm, self.thought_embeddings, cfg, input_ids, attention_mask,
                    continuation=False, greedy=greedy, generator=generator,
                )
            return rollout.thoughts
        return sample_thoughts(
            self.lm, self.thought_embeddings, cfg, input_ids, attention_mask,
            backend=cfg.attention_backend, greedy=greedy, generator=generator,
        )

    @torch.no_grad()
    def sample_thoughts(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.LongTensor:
        """Sample R thoughts of M tokens after every position: LongTensor [B, L, R, M].

        Entries at padding positions are computed like the others and carry no meaning.
        """
        return self._sample(input_ids, self._validate_inputs(input_ids, attention_mask), greedy, generator)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        *,
        thoughts: torch.LongTensor | None = None,
        generator: torch.Generator | None = None,
    ) -> QuietStarOutput:
        """One Quiet-STaR step on a right-padded batch.

        Args:
            input_ids: [B, L] token ids.
            attention_mask: [B, L], 1 on real tokens, right padded; None means no padding.
            thoughts: [B, L, R, M] thoughts to use instead of sampling (for evaluation and tests).
            generator: RNG for sampling the thoughts.
        """
        cfg = self.config
        attention_mask = self._validate_inputs(input_ids, attention_mask)
        base_hidden, rollout = self._rollout(input_ids, attention_mask, thoughts, generator)
        lm_head = self.lm.get_output_embeddings()
        targets, valid = future_targets(input_ids, attention_mask, cfg.n_true)  # [B, L, K]

        # The base prediction of x_{t+j} is made at position t+j-1.
        base_next = chunked_token_logprobs(lm_head, base_hidden, targets[..., 0])  # [B, L]
        base_logprobs = torch.stack([F.pad(base_next[:, j:], (0, j)) for j in range(cfg.n_true)], dim=-1)  # [B, L, K]
        base_for_target = torch.stack([F.pad(base_hidden[:, j:], (0, 0, 0, j)) for j in range(cfg.n_true)], dim=2)

        post = rollout.post_hidden  # [B, L, R, K, H]
        talk_hidden, weights = self.mixing_head(base_for_target[:, :, None].expand_as(post), post)
        talk_logprobs = chunked_token_logprobs(lm_head, talk_hidden, targets[:, :, None].expand(weights.shape))  # [B, L, R, K]

        base_nll = nll(base_logprobs[..., 0], valid[..., 0])
        talk = talk_nll(talk_logprobs, valid, cfg.loss_reduction)
        rewards = thought_rewards(talk_logprobs.detach(), valid)
        policy_loss, reward_mean = reinforce_loss(
            rewards, rollout.thought_logprobs, valid[..., 0], cfg.positive_rewards_only, cfg.loss_reduction, cfg.n_true
        )
        lm_loss = cfg.base_loss_weight * base_nll + cfg.talk_loss_weight * talk
        policy_term = cfg.policy_loss_weight * policy_loss
        return QuietStarOutput(
            loss=lm_loss + policy_term,
            lm_loss=lm_loss,
            policy_term=policy_term,
            base_nll=base_nll.detach(),
            talk_nll=talk.detach(),
            policy_loss=policy_loss.detach(),
            reward_mean=reward_mean,
            mixing_weight_mean=masked_mean(weights.detach(), valid[:, :, None, :]),
            base_logprobs=base_logprobs.detach(),
            talk_logprobs=talk_logprobs.detach().masked_fill(~valid[:, :, None, :], 0.0),
            target_mask=valid,
            thoughts=rollout.thoughts,
            rewards=rewards,
            mixing_weights=weights.detach(),
        )

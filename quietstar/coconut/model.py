"""CoconutModel: a causal LM that reasons in continuous thoughts between ``<bot>`` and ``<eot>``.

A training sequence (``coconut.curriculum`` builds it) looks like

    question \\n <bot> [latent] x n <eot> remaining steps \\n ... ### answer <eos>

and each ``[latent]``'s input embedding is the last hidden state (after the final
norm) of the position before it. The forward runs it on a KV cache, batched:

    pass 0        the prefix up to the first latent column        one forward over [0, p0)
    pass 1..n     one latent column each: rows with a latent there  n forwards of one position
                  take the previous pass's hidden state, the others
                  their own token's embedding
    pass n+1      the rest of the sequence                           one forward over [p0 + n, L)

so the work is one forward over the sequence, and the n latent passes are serial
(each needs the one before). No detach: the gradient flows through every latent
step and into the cache. Rows must have their latents in one contiguous span that
starts at the same column ``p0`` in every row that has any; ``curriculum.collate``
left-pads rows so. Only the last hidden state of each pass is kept (not every
layer's), embeddings are built once as a tensor, and the loop has no host syncs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Cache, DynamicCache, PreTrainedModel

from quietstar.coconut.config import CoconutConfig
from quietstar.coconut.markers import LATENT, CoconutMarkers
from quietstar.coconut.segment_cache import SegmentCache, cache_kept_under_checkpointing
from quietstar.core.latent_model import LatentReasoningModel
from quietstar.core.marker_init import mean_text_embedding

IGNORE = -100  # labels of positions that are not scored


@dataclass
class CoconutOutput:
    """Result of one Coconut forward.

    loss: mean next-token cross-entropy over the labelled positions (0-dim), None without labels.
    logits: [B, L, V] next-token logits of every position; None when labels are given (the
        loss then takes the logits of the labelled positions only, to save memory).
    tokens: number of scored targets (0-dim long), None without labels.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor | None
    tokens: torch.Tensor | None

    def metrics(self) -> dict[str, float]:
        return {"loss": float(self.loss.detach())}


def latent_span(is_latent: torch.Tensor) -> tuple[int, int]:
    """(first column, width) of the latent span shared by the rows; (0, 0) without latents.

    One host sync. Fails when a row's latents are not contiguous or do not start at the
    shared column (rows without latents are free).
    """
    count = is_latent.sum(dim=1)  # [B]
    first = torch.where(count > 0, is_latent.int().argmax(dim=1), torch.full_like(count, 1 << 30))
    p0 = first.min()
    contiguous = (is_latent.int().diff(dim=1) == 1).sum(dim=1) <= 1  # at most one 0 -> 1 edge per row
    aligned = (count == 0) | (first == p0)
    ok = (contiguous & aligned).all()
    p0, width, ok = torch.stack([p0.clamp(max=is_latent.shape[1]), count.max(), ok.long()]).tolist()
    if not ok:
        raise ValueError("CoconutModel: each row's latents must be one contiguous span starting at the same column "
                         "in every row that has latents; batch examples with coconut.curriculum.collate")
    if width and p0 == 0:
        raise ValueError("CoconutModel: a latent at position 0 has no previous hidden state to take")
    return (p0, width) if width else (0, 0)


class CoconutModel(LatentReasoningModel):
    """Coconut around any ``AutoModelForCausalLM`` that takes ``inputs_embeds`` and a KV cache
    (tested: GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma 3, Phi-3, OLMo 2).

    Args:
        base_model: the causal LM; it is trained in place.
        tokenizer: its tokenizer (initialises the markers; saved with the model).
        config: the method's settings.
    """

    method = "coconut"
    config_class = CoconutConfig
    format_version = 1
    supported_families = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "olmo2")

    def __init__(self, base_model: PreTrainedModel, tokenizer, config: CoconutConfig | None = None) -> None:
        super().__init__(base_model, tokenizer, config if config is not None else CoconutConfig())
        embedding = base_model.get_input_embeddings()
        init = mean_text_embedding(embedding, tokenizer, self.config.marker_init_text, "CoconutConfig.marker_init_text")
        self.markers = CoconutMarkers(init).to(device=embedding.weight.device, dtype=embedding.weight.dtype)

    def marker_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.markers.parameters())

    @property
    def marker_lr_multiplier(self) -> float:
        return 1.0  # the paper trains the new embeddings at the model's rate

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Input embeddings [B, L, H] of ids with placeholders (latent columns not yet filled)."""
        return self.markers(input_ids, self.lm.get_input_embeddings()(input_ids.clamp(min=0)))

    def hidden_states(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, cache: Cache | None = None
    ) -> torch.Tensor:
        """Last hidden states [B, L, H] (after the final norm) with the latent columns fed back.

        ``cache`` (optional) is filled with the keys and values of all L positions, for decoding on.
        """
        is_latent = input_ids == LATENT
        p0, width = latent_span(is_latent)
        embeds = self.embed(input_ids)
        positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # left padding shifts the positions
        decoder = self.lm.base_model
        if not width and cache is None:
            return decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                           use_cache=False).last_hidden_state
        # Under activation checkpointing each layer is replayed in the backward: the passes attend through a
        # SegmentCache, whose views the replay can reuse (a DynamicCache would be appended to twice).
        checkpointed = self.training and torch.is_grad_enabled() and self.lm.is_activation_checkpointing
        if checkpointed and cache is not None:
            raise ValueError("CoconutModel.hidden_states: cache= cannot be filled under activation checkpointing")
        segments = SegmentCache(self.lm.config.get_text_config().num_hidden_layers) if checkpointed else None
        cache = cache if cache is not None or checkpointed else DynamicCache(config=self.lm.config)

        def run(start: int, stop: int, inputs: torch.Tensor) -> torch.Tensor:
            return decoder(inputs_embeds=inputs, attention_mask=attention_mask[:, :stop], position_ids=positions[:, start:stop],
                           cache=segments.next_pass() if checkpointed else cache, use_cache=True).last_hidden_state

        length = input_ids.shape[1]
        p0 = p0 if width else length
        with cache_kept_under_checkpointing(self.lm) if checkpointed else contextlib.nullcontext():
            parts = [run(0, p0, embeds[:, :p0])] if p0 else []
            for col in range(p0, p0 + width):
                fed_back = torch.where(is_latent[:, col, None, None], parts[-1][:, -1:], embeds[:, col:col + 1])
                parts.append(run(col, col + 1, fed_back))
            if p0 + width < length:
                parts.append(run(p0 + width, length, embeds[:, p0 + width:]))
        return torch.cat(parts, dim=1)

    def forward(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, labels: torch.LongTensor | None = None
    ) -> CoconutOutput:
        """
        Args:
            input_ids: [B, L] token ids with placeholders (``coconut.markers``).
            attention_mask: [B, L], 0 at padding (all ones when None).
            labels: [B, L] the token each position holds where it is scored, ``IGNORE`` (-100)
                elsewhere (question, markers, latents, padding); position t's logits predict labels[t + 1].
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape [B, L], got {list(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.hidden_states(input_ids, attention_mask)
        head = self.lm.get_output_embeddings()
        if labels is None:
            return CoconutOutput(loss=None, logits=head(hidden), tokens=None)
        targets = labels[:, 1:]
        scored = targets != IGNORE
        logits = head(hidden[:, :-1][scored])  # [N, V]: the labelled positions only
        loss = F.cross_entropy(logits.float(), targets[scored], reduction="sum")
        tokens = scored.sum()
        return CoconutOutput(loss=loss / tokens.clamp(min=1), logits=None, tokens=tokens)

"""Cached generation with thoughts.

Before each emitted token x_{t+1}, the model thinks off to the side of its KV cache:

    feed <sot>, z_1 .. z_M (each sampled from the previous step), <eot>
      at positions t+1 .. t+M+2, exactly as in training;
    mix:  h_talk = h_base(t) + w * (h_<eot> - h_base(t));  pick x_{t+1} from lm_head(h_talk);
    drop the M+2 thought entries from the cache, and feed x_{t+1} at position t+1.

So each emitted token costs M+3 single-token forwards on the cached context, and
the thought never enters the output or the main cache. With ``thoughts=False``
this is plain greedy (or sampled) decoding with the base model.

Prompts are left padded (``tokenizer.padding_side = "left"``), as for any
decoder-only batched generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from quietstar.model import QuietStarModel
from quietstar.thought_sampler import choose_tokens


@dataclass
class GenerationOutput:
    """sequences: [B, P + N] prompt and new tokens; thoughts: [B, N, M] the thought before each new token (or None)."""

    sequences: torch.LongTensor
    thoughts: torch.LongTensor | None = None


@torch.no_grad()
def generate(
    model: QuietStarModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    thoughts: bool = True,
    greedy: bool = True,
    temperature: float = 1.0,
    greedy_thoughts: bool = False,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Generate ``max_new_tokens`` tokens after each (left-padded) prompt.

    Args:
        model: a QuietStarModel.
        input_ids: [B, P] prompts; attention_mask: [B, P], 0 on left padding.
        thoughts: think before each token (False: the base model alone).
        greedy: argmax over the (mixed) prediction; else sample at ``temperature``.
        greedy_thoughts: argmax thought tokens; else sample them at the config's
            ``sample_temperature``.
        eos_token_id: rows that emit it stop; later tokens are ``eos_token_id``.
        generator: RNG for every sample.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, P], got {list(input_ids.shape)} and {list(attention_mask.shape)}")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left padded (the last column real in every row); use tokenizer.padding_side='left'")
    lm, cfg = model.lm, model.config
    decoder, lm_head, embed = lm.get_decoder(), lm.get_output_embeddings(), lm.get_input_embeddings()
    batch, device = input_ids.shape[0], input_ids.device
    mask = attention_mask.long()
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: real tokens count from 0
    cache = DynamicCache()

    def feed(embeds: torch.Tensor, position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One token per row [B, 1, H] at ``position`` [B] onto the cache -> last hidden [B, H]."""
        out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=position[:, None], past_key_values=cache, use_cache=True)
        return out.last_hidden_state[:, -1]

    h_base = decoder(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                     use_cache=True).last_hidden_state[:, -1]  # [B, H], predicts the first new token
    last = positions[:, -1]  # [B] position t of the last token
    new_tokens, all_thoughts = [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    ones = torch.ones(batch, 1, dtype=mask.dtype, device=device)
    for step in range(max_new_tokens):
        hidden = h_base
        if thoughts:
            thought = []
            think_mask = torch.cat([mask, ones], dim=1)
            h = feed(model.thought_embeddings("start", batch, 1), last + 1, think_mask)
            for i in range(cfg.thought_len):
                z = choose_tokens(lm_head(h), greedy_thoughts, cfg.sample_temperature, generator)  # [B]
                thought.append(z)
                think_mask = torch.cat([think_mask, ones], dim=1)
                h = feed(embed(z[:, None]), last + 2 + i, think_mask)
            think_mask = torch.cat([think_mask, ones], dim=1)
            h_thought = feed(model.thought_embeddings("end", batch, 1), last + 2 + cfg.thought_len, think_mask)
            cache.crop(-(cfg.thought_len + 2))
            hidden, _ = model.mixing_head(h_base, h_thought)
            all_thoughts.append(torch.stack(thought, dim=1))
        token = choose_tokens(lm_head(hidden), greedy, temperature, generator)  # [B]
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
        new_tokens.append(token)
        if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
            break
        mask = torch.cat([mask, ones], dim=1)
        last = last + 1
        h_base = feed(embed(token[:, None]), last, mask)
    sequences = torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1) if new_tokens else input_ids
    return GenerationOutput(sequences=sequences, thoughts=torch.stack(all_thoughts, dim=1) if all_thoughts else None)

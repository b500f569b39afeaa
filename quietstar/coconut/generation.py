"""Greedy answers from a CoconutModel: the prompt (question, <bot>, N latents, <eot>) once, then tokens on a KV cache.

Batched: prompts are left-padded (``curriculum.collate_prompts``), so the latents of
every row sit in the same columns and the decoding steps append one column for all
rows. Finished rows (past EOS) keep emitting padding; decoding stops when every row
has finished or after ``max_new_tokens``.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from quietstar.coconut.model import CoconutModel


@torch.no_grad()
def greedy_generate(
    model: CoconutModel, input_ids: torch.LongTensor, attention_mask: torch.Tensor, max_new_tokens: int
) -> list[list[int]]:
    """The generated token ids of each row [B], EOS excluded.

    Args:
        input_ids: [B, P] left-padded prompts with placeholders.
        attention_mask: [B, P], 0 at the left padding.
    """
    cache = DynamicCache(config=model.lm.config)
    hidden = model.hidden_states(input_ids, attention_mask, cache=cache)
    head, embedding = model.lm.get_output_embeddings(), model.lm.get_input_embeddings()
    decoder = model.lm.base_model
    eos = model.tokenizer.eos_token_id
    batch = input_ids.shape[0]
    mask = attention_mask
    position = attention_mask.long().sum(dim=1, keepdim=True)  # [B, 1]: the next token's position per row
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    generated = []
    last = hidden[:, -1:]
    for _ in range(max_new_tokens):
        token = head(last)[:, -1].argmax(dim=-1)  # [B]
        token = torch.where(done, torch.full_like(token, eos), token)
        generated.append(token)
        done = done | (token == eos)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last = decoder(inputs_embeds=embedding(token[:, None]), attention_mask=mask, position_ids=position,
                       past_key_values=cache, use_cache=True).last_hidden_state
        position = position + 1
    rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(batch)]
    return [row[: row.index(eos)] if eos in row else row for row in rows]

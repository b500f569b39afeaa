"""Generation with continuous thoughts: the prompt (question, <bot>, N latents, <eot>) once, then tokens on a KV cache.

    out = generate(model, input_ids, attention_mask, max_new_tokens=64)          # greedy
    out = generate(model, ..., temperature=0.7, generator=g, stop_strings=["\\n\\n"])  # sampled, with a stop string

Batched: prompts are left-padded (``curriculum.collate_prompts``), so the latents of
every row sit in the same columns and each decoding step appends one column for all
rows. A row stops at EOS, at a stop string or at ``max_new_tokens``; finished rows
keep feeding EOS until every row has stopped. The latent passes and every decoding
step run on one ``core.kv_buffer.BufferCache`` (keys written in place, none re-copied per
token): the prompt is forwarded once, and each new token costs one single-position forward
(the official code re-runs the whole sequence for each token, one example at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from quietstar.coconut.markers import LATENT
from quietstar.coconut.model import CoconutModel
from quietstar.core.kv_buffer import BufferCache


@dataclass
class CoconutGeneration:
    """What ``generate`` returns.

    tokens: each row's new token ids, without the EOS and without what follows a stop string's token.
    latents: [B, N, H] the vector fed back as each latent's input embedding (the hidden state
        of the position before it), for inspection (``nearest_tokens``); N = 0 without latents.
    """

    tokens: list[list[int]]
    latents: torch.Tensor


@torch.no_grad()
def generate(
    model: CoconutModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    stop_strings: tuple[str, ...] = (),
) -> CoconutGeneration:
    """Complete left-padded prompts [B, P] (with placeholders) after their continuous thoughts.

    ``temperature`` 0 takes the argmax; above 0 samples from the softmax at that temperature
    with ``generator``. A row also stops once its decoded text contains one of ``stop_strings``.
    """
    cache = BufferCache(model.lm.config.get_text_config().num_hidden_layers, input_ids.shape[1] + max_new_tokens)
    hidden = model.hidden_states(input_ids, attention_mask, cache=cache)
    is_latent = input_ids == LATENT
    columns = is_latent.any(dim=0).nonzero().flatten()  # the shared latent columns (collate_prompts aligns them)
    latents = hidden[:, (columns - 1).clamp(min=0)] * is_latent[:, columns, None]  # zero for rows without that latent
    head, embedding = model.lm.get_output_embeddings(), model.lm.get_input_embeddings()
    decoder, tokenizer = model.lm.base_model, model.tokenizer
    eos = tokenizer.eos_token_id
    rows = input_ids.shape[0]
    mask = attention_mask
    position = attention_mask.long().sum(dim=1, keepdim=True)  # [B, 1]: each row's next position
    done = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    generated: list[torch.Tensor] = []
    last = hidden[:, -1:]
    for _ in range(max_new_tokens):
        logits = head(last)[:, -1].float()
        if temperature > 0:
            token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(dim=-1)
        token = torch.where(done, torch.full_like(token, eos), token)
        generated.append(token)
        done = done | (token == eos)
        if stop_strings:
            so_far = torch.stack(generated, dim=1).tolist()
            stopped = [any(s in tokenizer.decode(row) for s in stop_strings) for row in so_far]
            done = done | torch.tensor(stopped, device=done.device)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last = decoder(inputs_embeds=embedding(token[:, None]), attention_mask=mask, position_ids=position,
                       cache=cache, use_cache=True).last_hidden_state
        position = position + 1
    tokens = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(rows)]
    return CoconutGeneration([_cut(row, eos, tokenizer, stop_strings) for row in tokens], latents)


def _cut(row: list[int], eos: int, tokenizer, stop_strings: tuple[str, ...]) -> list[int]:
    """A row's tokens up to its EOS, or up to and including the token that completed a stop string."""
    if eos in row:
        row = row[: row.index(eos)]
    for end in range(1, len(row) + 1) if stop_strings else ():
        if any(s in tokenizer.decode(row[:end]) for s in stop_strings):
            return row[:end]
    return row


def nearest_tokens(model: CoconutModel, vectors: torch.Tensor, k: int = 3) -> list[list[list[tuple[str, float]]]]:
    """For each vector [B, N, H], the ``k`` vocabulary tokens the LM head ranks highest, with their probabilities.

    The paper reads continuous thoughts this way ("decoding" a latent with the LM head).
    """
    probs = torch.softmax(model.lm.get_output_embeddings()(vectors).float(), dim=-1)
    top = probs.topk(k, dim=-1)
    decode = model.tokenizer.decode
    return [[[(decode([i]), p) for i, p in zip(ids, ps)] for ids, ps in zip(row_ids, row_ps)]
            for row_ids, row_ps in zip(top.indices.tolist(), top.values.tolist())]

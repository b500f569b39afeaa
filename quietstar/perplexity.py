"""Held-out NLL with and without thoughts.

Both NLLs score the same targets: the next token x_{t+1} after every position t.
``base`` is the model's ordinary prediction; ``talk`` is the prediction mixed with a
sampled thought, averaged over the R thoughts (as an NLL, not as a probability).
An untrained mixing head gives talk == base exactly.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from tqdm import tqdm


def next_token_nlls(out):
    """Per-token next-token NLLs from a ``QuietStarOutput``.

    Returns (base [B, L], talk [B, L], valid [B, L]): the entry at t scores x_{t+1};
    ``talk`` averages the R thoughts' NLLs; ``valid`` is False where there is no next token.
    """
    valid = out.target_mask[..., 0]
    base = -out.base_logprobs[..., 0]
    talk = -out.talk_logprobs[..., 0].mean(dim=2)
    return base.masked_fill(~valid, 0.0), talk.masked_fill(~valid, 0.0), valid


@torch.no_grad()
def token_nlls(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor, generator: torch.Generator | None = None):
    """``next_token_nlls`` of one right-padded batch, with freshly sampled thoughts."""
    return next_token_nlls(model(input_ids, attention_mask, generator=generator))


@torch.no_grad()
def heldout_nll(model, batches, device, seed: int, progress: bool = False) -> dict[str, float]:
    """Token-weighted mean base and talk NLL over ``batches`` of (input_ids, attention_mask).

    Under ``torch.distributed`` the batches are split between ranks and the sums are
    all-reduced. Every rank runs the same number of forwards (ZeRO-3 needs every rank
    in every forward): a rank short of a batch repeats one and does not count it.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # base NLL, talk NLL, tokens
    rounds = math.ceil(len(batches) / world)
    for i in tqdm(range(rounds), desc="held-out NLL", disable=not progress or rank != 0, leave=False):
        index = i * world + rank
        ids, mask = batches[min(index, len(batches) - 1)]
        base, talk, valid = token_nlls(model, ids.to(device), mask.to(device), generator)
        if index < len(batches):
            sums += torch.stack([base.sum().double(), talk.sum().double(), valid.sum().double()])
    if world > 1:
        dist.all_reduce(sums)
    base_sum, talk_sum, tokens = sums.tolist()
    if tokens == 0:
        raise ValueError("held-out NLL: the held-out batches have no token with a next token")
    return {"base_nll": base_sum / tokens, "talk_nll": talk_sum / tokens, "tokens": int(tokens)}

"""Quiet-STaR losses: base NLL, talk NLL, the thought reward, and REINFORCE.

Shapes: B batch, L sequence length, R thoughts per position, K true tokens
predicted after each thought, M thought length, V vocabulary.
Target (t, j), j = 1..K, is the true token x_{t+j}; it is valid when it is a
real (non-padding) token of the sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LOGPROB_CHUNK_ROWS = 1024  # hidden rows turned into [rows, V] logits at a time by chunked_token_logprobs


def future_targets(input_ids: torch.LongTensor, attention_mask: torch.Tensor, n_true: int) -> tuple[torch.LongTensor, torch.Tensor]:
    """The K true tokens after each position.

    Returns:
        targets: [B, L, K], targets[b, t, j-1] = x_{t+j} (0 past the end).
        valid: [B, L, K] bool, True where x_{t+j} exists and is not padding.
    """
    mask = attention_mask.bool()
    targets = torch.stack([F.pad(input_ids[:, j:], (0, j), value=0) for j in range(1, n_true + 1)], dim=-1)
    valid = torch.stack([F.pad(mask[:, j:], (0, j), value=False) for j in range(1, n_true + 1)], dim=-1)
    return targets, valid


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or kept in fp64 when it already is."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_logprobs(logits: torch.Tensor, targets: torch.LongTensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) under ``logits`` [..., V] / ``temperature``, computed in at least fp32; returns [...]."""
    return F.log_softmax(at_least_fp32(logits) / temperature, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def chunked_token_logprobs(
    lm_head: nn.Module, hidden: torch.Tensor, targets: torch.LongTensor, temperature: float = 1.0
) -> torch.Tensor:
    """``token_logprobs(lm_head(hidden), targets, temperature)`` without keeping [..., V] logits.

    The rows of ``hidden`` [..., H] go through the LM head ``LOGPROB_CHUNK_ROWS`` at a
    time; with gradients on, each chunk is activation-checkpointed, so backward keeps
    only ``hidden`` and recomputes one chunk's logits at a time. Returns [...]
    (the shape of ``targets``).
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)

    def piece(h: torch.Tensor, t: torch.LongTensor) -> torch.Tensor:
        # The head is bias-free, so lm_head(h / T) = lm_head(h) / T: divide [rows, H], not [rows, V].
        return token_logprobs(lm_head(h / temperature if temperature != 1.0 else h), t)

    differentiable = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in lm_head.parameters()))
    out = []
    for start in range(0, flat_hidden.shape[0], LOGPROB_CHUNK_ROWS):
        h, t = flat_hidden[start : start + LOGPROB_CHUNK_ROWS], flat_targets[start : start + LOGPROB_CHUNK_ROWS]
        out.append(checkpoint(piece, h, t, use_reentrant=False) if differentiable else piece(h, t))
    return torch.cat(out).view(targets.shape)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is True (``mask`` broadcasts); 0 when nothing is valid."""
    mask = mask.expand_as(values)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def nll(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the valid entries."""
    return -masked_mean(logprobs, mask)


def thought_rewards(talk_logprobs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """How much better each thought predicts the true continuation than the others at its position.

    Args:
        talk_logprobs: [B, L, R, K] log p_talk(x_{t+j} | thought r).
        valid: [B, L, K] valid targets.
    Returns:
        [B, L, R]: ``sum_j log p_talk(x_{t+j} | r) - mean_r' sum_j log p_talk(x_{t+j} | r')``;
        it sums to zero over R at every position.
    """
    score = (talk_logprobs * valid[:, :, None, :]).sum(dim=-1)  # [B, L, R]
    return score - score.mean(dim=-1, keepdim=True)


def talk_nll(talk_logprobs: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """NLL of the talk predictions.

    Args:
        talk_logprobs: [B, L, R, K] log p_talk(x_{t+j} | thought r).
        valid: [B, L, K] valid targets.
        reduction: ``token`` (mean over every valid (t, r, j)) or ``reference``
            (for each j the mean over the valid (t, r), then the mean over the K targets).
    """
    mask = valid[:, :, None, :]
    if reduction == "token":
        return nll(talk_logprobs, mask)
    mask = mask.expand_as(talk_logprobs)
    per_target = -(talk_logprobs * mask).sum(dim=(0, 1, 2)) / mask.sum(dim=(0, 1, 2)).clamp(min=1)  # [K]
    return per_target.mean()


def reinforce_loss(
    rewards: torch.Tensor, thought_logprobs: torch.Tensor, position_valid: torch.Tensor, positive_only: bool, reduction: str, n_true: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE on the thought tokens: ``-r * log p(z_i)`` with r detached.

    Args:
        rewards: [B, L, R].
        thought_logprobs: [B, L, R, M] log-probabilities of the thought tokens.
        position_valid: [B, L] positions that have at least one valid target.
        positive_only: use ``max(r, 0)`` (the paper) instead of r.
        reduction: ``token``: ``-r * sum_i log p(z_i)`` averaged over the valid (t, r).
            ``reference``: ``-r * log p(z_i)`` averaged over every row, thought and
            token i at the first L - 1 - ``n_true`` positions, padding included
            (where r = 0): the reference code's per-token mean.
    Returns:
        (loss, the mean of the rewards that weighted it over valid (t, r)).
    """
    used = rewards.detach().clamp(min=0) if positive_only else rewards.detach()
    mask = position_valid[:, :, None]
    if reduction == "token":
        loss = masked_mean(-used * thought_logprobs.sum(dim=-1), mask)
    else:
        scored = max(rewards.shape[1] - 1 - n_true, 0)
        per_token = -used[:, :scored, :, None] * thought_logprobs[:, :scored]  # [B, scored, R, M]
        loss = per_token.mean() if scored else thought_logprobs.sum() * 0.0
    return loss, masked_mean(used, mask)

"""Quiet-STaR losses: base NLL, talk NLL, the thought reward, and REINFORCE.

Shapes: B batch, L sequence length, R thoughts per position, K true tokens
predicted after each thought, M thought length, V vocabulary.
Target (t, j), j = 1..K, is the true token x_{t+j}; it is valid when it is a
real (non-padding) token of the sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def token_logprobs(logits: torch.Tensor, targets: torch.LongTensor) -> torch.Tensor:
    """log p(target) under ``logits`` [..., V], computed in fp32; returns [...]."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


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


def reinforce_loss(
    rewards: torch.Tensor, thought_logprobs: torch.Tensor, position_valid: torch.Tensor, positive_only: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE on the thought tokens: ``-r * sum_i log p(z_i)`` with r detached.

    Args:
        rewards: [B, L, R].
        thought_logprobs: [B, L, R, M] log-probabilities of the thought tokens.
        position_valid: [B, L] positions that have at least one valid target.
        positive_only: use ``max(r, 0)`` (the paper) instead of r.
    Returns:
        (loss, the mean of the rewards that weighted it over valid (t, r)).
    """
    used = rewards.detach().clamp(min=0) if positive_only else rewards.detach()
    per_thought = -used * thought_logprobs.sum(dim=-1)  # [B, L, R]
    mask = position_valid[:, :, None]
    return masked_mean(per_thought, mask), masked_mean(used, mask)

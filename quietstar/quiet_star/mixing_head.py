"""The mixing head: how much of the post-thought prediction to use.

For a target token it reads ``[h_base ; h_thought]`` (the base model's hidden
state that predicts the token without a thought, and the hidden state that
predicts it after the thought) and outputs a scalar weight ``w``. The talk
hidden state is ``h_base + w * (h_thought - h_base)``. The LM heads of the
supported families have no bias, so this is exactly the interpolation of the
two predictions' logits, and of their log-probabilities up to normalisation
(the paper's formulation).

The MLP has ``layers`` hidden ReLU layers of ``width`` units; the reference code's
head is ``Linear(2H, H) - ReLU - Linear(H, H) - ReLU - Linear(H, 1)`` (two layers of
the model's width H). The last layer has no bias and is zero-initialised, so
``w == 0`` and the talk prediction equals the base prediction exactly before
training. ``w`` is not squashed: 0 means "ignore the thought", 1 means "use only
the post-thought prediction".
"""

from __future__ import annotations

import torch
from torch import nn


class MixingHead(nn.Module):
    """MLP ``[2*hidden] -> ([width] -> ReLU) x layers -> [1]`` with a zero-initialised, bias-free last layer."""

    def __init__(self, hidden_size: int, width: int, layers: int) -> None:
        super().__init__()
        widths = [2 * hidden_size] + [width] * layers
        hidden = [module for a, b in zip(widths, widths[1:]) for module in (nn.Linear(a, b), nn.ReLU())]
        self.mlp = nn.Sequential(*hidden, nn.Linear(width, 1, bias=False))
        nn.init.zeros_(self.mlp[-1].weight)

    def forward(self, base_hidden: torch.Tensor, thought_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            base_hidden: [..., hidden] hidden states predicting the target without a thought.
            thought_hidden: [..., hidden] hidden states predicting the same target after the thought.
        Returns:
            talk_hidden: [..., hidden] the mixed hidden state, to be read by the LM head.
            weight: [...] the mixing weight w.
        """
        weight = self.mlp(torch.cat([base_hidden, thought_hidden], dim=-1))
        talk_hidden = base_hidden + weight * (thought_hidden - base_hidden)
        return talk_hidden, weight.squeeze(-1)

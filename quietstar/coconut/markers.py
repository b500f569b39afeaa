"""Coconut's input placeholders and its learned marker embeddings.

Coconut sequences mix vocabulary tokens with four positions that are not
vocabulary entries. In ``input_ids`` they are negative placeholders:

    BOT = -1      <bot>, begin of thought          learned vector
    EOT = -2      <eot>, end of thought            learned vector
    PAUSE = -3    <pause> (the paper's baselines)  learned vector
    LATENT = -4   a continuous thought             filled in by the model: the last
                                                   hidden state of the position before

The markers are vectors fed through ``inputs_embeds``, so the base model's
vocabulary, embedding matrix and LM head stay untouched and a saved base is a
stock Hugging Face checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

BOT, EOT, PAUSE, LATENT = -1, -2, -3, -4
PLACEHOLDERS = {BOT: "<bot>", EOT: "<eot>", PAUSE: "<pause>", LATENT: "<latent>"}


class CoconutMarkers(nn.Module):
    """``<bot>``, ``<eot>`` and ``<pause>``: three learned vectors of shape [hidden], all starting at ``init``."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        if init.ndim != 1:
            raise ValueError(f"CoconutMarkers: init must have shape [hidden], got {tuple(init.shape)}")
        self.bot = nn.Parameter(init.detach().clone())
        self.eot = nn.Parameter(init.detach().clone())
        self.pause = nn.Parameter(init.detach().clone())

    def forward(self, input_ids: torch.LongTensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """Input embeddings [B, L, H]: ``token_embeds`` at vocabulary ids, the markers at their placeholders.

        LATENT positions hold the ``<pause>`` vector as a stand-in; the model replaces it
        before any layer reads it. A forward (not a plain method) so that ZeRO-3 gathers the vectors.
        """
        table = torch.stack([self.bot, self.eot, self.pause])  # [3, H], in placeholder order -1, -2, -3
        marker = table[(-1 - input_ids).clamp(0, 2)]  # [B, L, H]
        return torch.where((input_ids < 0).unsqueeze(-1), marker.to(token_embeds.dtype), token_embeds)

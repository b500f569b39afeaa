"""The learned start-of-thought / end-of-thought embeddings.

The markers are not vocabulary entries: they are two vectors fed to the model
through ``inputs_embeds``. The base model's vocabulary, embedding matrix and LM
head stay untouched, so the sampler can never emit a marker and the saved base
weights load with a stock ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import torch
from torch import nn

from quietstar.core.marker_init import mean_text_embedding


class ThoughtEmbeddings(nn.Module):
    """``<sot>`` and ``<eot>``, each a learned vector of shape [hidden]."""

    def __init__(self, init: torch.Tensor, end_init: torch.Tensor | None = None) -> None:
        """Both markers start at ``init`` [hidden], or ``<eot>`` at ``end_init`` [hidden] when given."""
        super().__init__()
        end_init = init if end_init is None else end_init
        if init.ndim != 1 or end_init.shape != init.shape:
            raise ValueError(f"ThoughtEmbeddings: init and end_init must have shape [hidden], got {tuple(init.shape)} "
                             f"and {tuple(end_init.shape)}")
        self.start = nn.Parameter(init.detach().clone())
        self.end = nn.Parameter(end_init.detach().clone())

    @classmethod
    def from_text(cls, embedding: nn.Embedding, tokenizer, text: str, end_text: str | None = None) -> "ThoughtEmbeddings":
        """Initialise ``<sot>`` to the mean input embedding of the tokens of ``text``, and ``<eot>`` to that of
        ``end_text`` (``text`` when None)."""
        start = mean_text_embedding(embedding, tokenizer, text, "QuietStarConfig.marker_init_text")
        end = None if end_text is None else mean_text_embedding(embedding, tokenizer, end_text, "QuietStarConfig.end_marker_init_text")
        return cls(start, end)

    def forward(self, which: str, batch: int, length: int) -> torch.Tensor:
        """The ``start`` or ``end`` vector broadcast to [batch, length, hidden].

        A forward (not a plain method) so that DeepSpeed ZeRO-3 gathers the vectors.
        """
        if which not in ("start", "end"):
            raise ValueError(f"ThoughtEmbeddings: which must be 'start' or 'end', got {which!r}")
        vector = self.start if which == "start" else self.end
        return vector.view(1, 1, -1).expand(batch, length, -1)

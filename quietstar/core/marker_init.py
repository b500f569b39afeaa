"""The starting value of a method's learned marker vectors: the mean input embedding of a text."""

from __future__ import annotations

import torch
from torch import nn

from quietstar.core.zero3 import gathered


def mean_text_embedding(embedding: nn.Embedding, tokenizer, text: str, field: str) -> torch.Tensor:
    """The mean input embedding [hidden] of the tokens of ``text`` (a copy; gathered first under ZeRO-3), as the
    model sees it: with the embedding's ``embed_scale`` (Gemma 3 multiplies rows by sqrt(hidden)) applied.

    ``field`` names the config field in errors.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) == 0:
        raise ValueError(f"{field}: {text!r} tokenizes to no tokens")
    if max(ids) >= embedding.num_embeddings:
        raise ValueError(f"{field}: {text!r} has token id {max(ids)} outside the model's "
                         f"{embedding.num_embeddings}-row embedding matrix (tokenizer/model mismatch?)")
    with torch.no_grad(), gathered(embedding.weight) as weight:
        rows = weight[torch.tensor(ids, device=weight.device)]
        return (rows * getattr(embedding, "embed_scale", 1.0)).to(weight.dtype).mean(dim=0).clone()

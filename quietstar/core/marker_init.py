"""The starting value of a method's learned marker vectors: the mean input embedding of a text."""

from __future__ import annotations

import torch
from torch import nn

from quietstar.core.zero3 import gathered


def mean_text_embedding(embedding: nn.Embedding, tokenizer, text: str, field: str) -> torch.Tensor:
    """The mean input embedding [hidden] of the tokens of ``text`` (a copy; gathered first under ZeRO-3).

    ``field`` names the config field in errors.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) == 0:
        raise ValueError(f"{field}: {text!r} tokenizes to no tokens")
    if max(ids) >= embedding.num_embeddings:
        raise ValueError(f"{field}: {text!r} has token id {max(ids)} outside the model's "
                         f"{embedding.num_embeddings}-row embedding matrix (tokenizer/model mismatch?)")
    with torch.no_grad(), gathered(embedding.weight) as weight:
        return weight[torch.tensor(ids, device=weight.device)].mean(dim=0).clone()

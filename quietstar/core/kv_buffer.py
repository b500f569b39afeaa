"""A KV cache written in place into buffers allocated once: decoding without re-copying the cache every token.

Hugging Face's ``DynamicCache`` grows each layer's keys and values by concatenation, so decoding token t copies
all t - 1 earlier keys of every layer (on a 2-core CPU that copy was 40-50 % of Coconut's decoding time at batch
32, 128 tokens). Its ``StaticCache`` writes in place but attends over the whole allocated length at every step.
``BufferCache`` does both halves right: each layer's keys and values are written into a buffer of
``max_length`` positions, and attention gets a view of the filled part only, so every step attends over exactly
the keys a ``DynamicCache`` would hold, and the results are the same.

Every layer is a plain causal layer (a sliding-window layer gets all the keys, and the model's mask, built from
``get_mask_sizes``, limits its window), as in ``DynamicCache()`` without a config.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class _BufferLayer(DynamicLayer):
    """One layer's keys and values [B, kv_heads, max_length, head_dim], filled from the front."""

    def __init__(self, max_length: int) -> None:
        super().__init__()
        self.max_length, self.length = max_length, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.device = key_states.device
        self.buffers = (key_states.new_empty(batch, heads, self.max_length, head_dim),
                        value_states.new_empty(batch, value_states.shape[1], self.max_length, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions in place; the keys and values of every position so far (views of the buffers)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        stop = self.length + key_states.shape[-2]
        if stop > self.max_length:
            raise ValueError(f"BufferCache: {stop} positions do not fit the {self.max_length} allocated")
        keys, values = self.buffers
        keys[:, :, self.length:stop] = key_states
        values[:, :, self.length:stop] = value_states
        self.length = stop
        self.keys, self.values = keys[:, :, :stop], values[:, :, :stop]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


class BufferCache(Cache):
    """A cache for decoding up to ``max_length`` positions in all (prompt and new tokens) with ``num_layers`` layers."""

    def __init__(self, num_layers: int, max_length: int) -> None:
        super().__init__(layers=[_BufferLayer(max_length) for _ in range(num_layers)])

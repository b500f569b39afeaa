"""A KV cache that activation checkpointing can replay: exact checkpointing through Coconut's latent passes.

Under activation checkpointing each decoder layer runs twice: in the forward, with its activations dropped, and
again in the backward, to recompute them. A cache that appends on every ``update`` would append a second time in
that replay and hand the layer the wrong keys, so Hugging Face's layers drop the cache under checkpointing, and
Coconut's latent passes, which attend to the keys and values of every pass before them, could not run.

``SegmentCache`` keeps each layer's keys and values as a list of segments, one per decoder call (a pass), and
gives every pass its own view (``next_pass``), which knows which segment is its own. A view's first ``update``
appends the segment; the replay finds it already there and appends nothing. Both return the segments before the
pass concatenated with the keys they were given, so the replay recomputes exactly the attention inputs of the
forward. The concatenation happens inside the checkpointed layer: only the segments (one key and one value per
token and layer, as in any cache) outlive it, never a pass's concatenated copy.

The views hold every layer as a plain causal layer: a sliding-window layer gets all the keys and its mask (built by
the model from ``get_mask_sizes``) limits the window, which is exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

Segment = tuple[torch.Tensor, torch.Tensor]  # keys, values: [B, kv_heads, width, head_dim] each


class _PassLayer(DynamicLayer):
    """One layer of one pass's view: the segments of the passes before it, and where its own goes."""

    def __init__(self, segments: list[Segment], index: int) -> None:
        super().__init__()
        self.segments, self.index = segments, index

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> Segment:
        """[B, kv_heads, past + width, head_dim] keys and values: the earlier passes' and this call's."""
        if len(self.segments) == self.index:
            self.segments.append((key_states, value_states))
        elif len(self.segments) < self.index:
            raise RuntimeError(f"SegmentCache: pass {self.index} ran before pass {len(self.segments)}")
        if not self.index:
            return key_states, value_states
        past = self.segments[:self.index]
        return (torch.cat([k for k, _ in past] + [key_states], dim=-2),
                torch.cat([v for _, v in past] + [value_states], dim=-2))

    def get_seq_length(self) -> int:
        """The tokens of the passes before this one (what this pass attends to besides itself)."""
        return sum(k.shape[-2] for k, _ in self.segments[:self.index])


class SegmentCache:
    """The keys and values of a sequence of decoder calls, segment by segment, replayable under checkpointing.

    Args:
        num_layers: the decoder's layer count.
    """

    def __init__(self, num_layers: int) -> None:
        self.segments: list[list[Segment]] = [[] for _ in range(num_layers)]
        self.passes = 0

    def next_pass(self) -> Cache:
        """The cache to give the next decoder call (``cache=``): it attends to every earlier call's keys."""
        view = Cache(layers=[_PassLayer(segments, self.passes) for segments in self.segments])
        self.passes += 1
        return view


@contextlib.contextmanager
def cache_kept_under_checkpointing(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s checkpointed decoder layers keep the ``cache=`` they are given.

    Hugging Face drops the cache under checkpointing in two places: each checkpointed layer, unless it is marked
    as safe to replay with it (``_can_checkpoint_with_cache``), and some models' own forward (GPT-2 hands its
    blocks no cache, and the models' ``use_cache`` default turns off) when their ``gradient_checkpointing`` switch
    is on. For calls that pass a ``SegmentCache`` view (no other cache is replay-safe) this marks the layers and
    turns the model-level switches off, leaving the layers checkpointed; both are restored after. The backward's
    replay reuses the arguments of the forward, so it needs neither.
    """
    modules = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    layers = [m for m in modules if isinstance(m, GradientCheckpointingLayer)]
    switches = {m: m.gradient_checkpointing for m in modules if not isinstance(m, GradientCheckpointingLayer)}
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    for module in switches:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class's False
        for module, on in switches.items():
            module.gradient_checkpointing = on

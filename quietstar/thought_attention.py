"""Attention over thought blocks without dense masks.

A thought forward sees its tokens as *segments* of L tokens each (L = text length):

    segment 0        the text x_1 .. x_L
    segment s >= 1   thought block s-1: one token for every position t

The rule of the diagonal attention mask, stated per query: the token of segment s
at position t attends to

    the text tokens at positions t' <= t (padding excluded), and,
    if s >= 1, the tokens of segments 1..s at the *same* position t.

So a query needs L text scores plus at most one score per thought segment. This
module computes exactly those, never an [S*L, S*L] mask or score matrix:

  * ``segment_attention`` (any device): the text part is one batched matmul
    [S_q*L, L]; the per-position part is [L, S_q, S_k-1]. Cost ~ S_q*L^2 + S_q*S_k*L.
  * ``thought_block_mask`` + FlexAttention (GPU): the same rule as a ``mask_mod``;
    the block-sparse kernel skips every 128x128 tile that the rule leaves empty.

``ThoughtLayout`` tells the attention function which segments the queries are.
It travels from the decoder call to every attention layer as a keyword argument
(transformers forwards extra keyword arguments down to the attention function),
and ``install_thought_attention`` registers a dispatcher with transformers'
``AttentionInterface``: calls that carry a layout get the thought attention,
every other call (the plain text pass, ``generate``) the model's own attention.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

PREFIX = "quietstar_"
BACKENDS = ("auto", "torch", "flex")

# Compiled lazily by torch on its first call; FlexAttention is only fast when compiled.
_compiled_flex_attention = torch.compile(flex_attention, dynamic=False)


@dataclass(frozen=True)
class ThoughtLayout:
    """Which segments a thought forward's queries are.

    Attributes:
        length: L, tokens per segment (the text length).
        first_query_segment: segment index of the first query token; the queries
            are segments ``first_query_segment, first_query_segment + 1, ...``.
            0 when the text itself is among the queries (the one-pass replay),
            k + 1 when feeding thought block k onto a cache of the earlier ones.
    """

    length: int
    first_query_segment: int


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``flex`` on CUDA, ``torch`` elsewhere (FlexAttention has no CPU backward)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown thought attention backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "auto":
        return "flex" if device.type == "cuda" else "torch"
    return backend


def thought_block_mask(text_mask: torch.Tensor, layout: ThoughtLayout, n_query_segments: int, n_key_segments: int) -> BlockMask:
    """The diagonal attention rule as a FlexAttention ``BlockMask``.

    Args:
        text_mask: [N, L] bool, True on real (non-padding) text tokens.
        layout: the queries' segments.
        n_query_segments, n_key_segments: query and key lengths in segments.
    """
    length, first = layout.length, layout.first_query_segment

    def mask_mod(b, h, q_idx, kv_idx):
        q_segment, q_pos = q_idx // length + first, q_idx % length
        kv_segment, kv_pos = kv_idx // length, kv_idx % length
        text = (kv_segment == 0) & (kv_pos <= q_pos) & text_mask[b, kv_pos]
        thought = (kv_segment >= 1) & (kv_segment <= q_segment) & (kv_pos == q_pos)
        return text | thought

    rows = text_mask.shape[0]
    return create_block_mask(
        mask_mod, rows, None, n_query_segments * length, n_key_segments * length, device=text_mask.device
    )


def thought_attention_mask(
    text_mask: torch.Tensor, layout: ThoughtLayout, n_query_segments: int, n_key_segments: int, backend: str
) -> torch.Tensor | BlockMask:
    """What to pass as the decoder's ``attention_mask`` for a thought forward.

    transformers hands a 4D mask through to the attention function unchanged, so
    this is either the [N, 1, 1, L] text padding mask (``torch`` backend) or a
    ``BlockMask`` (``flex``). Neither grows with the number of segments squared.
    """
    if resolve_backend(backend, text_mask.device) == "flex":
        return thought_block_mask(text_mask.bool(), layout, n_query_segments, n_key_segments)
    return text_mask.bool()[:, None, None, :]


def segment_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    text_mask: torch.Tensor,
    layout: ThoughtLayout,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Exact attention under the diagonal rule, with plain tensor ops.

    Args:
        query: [N, H, S_q*L, D]; key, value: [N, H_kv, S_k*L, D] (H a multiple of H_kv).
        text_mask: [N, L] bool, True on real text tokens.
    Returns:
        [N, S_q*L, H, D], the layout transformers' attention functions return.
    """
    n, heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], layout.length
    groups, s_q, s_k = heads // kv_heads, q_len // length, key.shape[2] // length
    if s_q * length != q_len or s_k * length != key.shape[2]:
        raise ValueError(f"query/key lengths {q_len}/{key.shape[2]} are not multiples of the segment length {length}")

    q = query.view(n, kv_heads, groups, s_q, length, dim)
    k_text, v_text = key[:, :, None, :length], value[:, :, None, :length]  # [N, Hkv, 1, L, D]
    # Thought keys regrouped per position: [N, Hkv, 1, L, S_k-1, D].
    k_own = key[:, :, None, length:].unflatten(3, (s_k - 1, length)).transpose(3, 4)
    v_own = value[:, :, None, length:].unflatten(3, (s_k - 1, length)).transpose(3, 4)

    text_scores = (q.flatten(3, 4) @ k_text.transpose(-1, -2)).view(n, kv_heads, groups, s_q, length, length)
    own_scores = (q.transpose(3, 4) @ k_own.transpose(-1, -2)).transpose(3, 4)  # [N, Hkv, G, S_q, L, S_k-1]
    scores = torch.cat([text_scores, own_scores], dim=-1)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scaling  # softmax in >= fp32

    positions = torch.arange(length, device=query.device)
    text_allowed = (positions[None, :] <= positions[:, None]) & text_mask[:, None, None, None, None, :].bool()
    q_segments = layout.first_query_segment + torch.arange(s_q, device=query.device)
    k_segments = 1 + torch.arange(s_k - 1, device=query.device)
    own_allowed = (k_segments[None, :] <= q_segments[:, None])[:, None, :]  # [S_q, 1, S_k-1]
    allowed = torch.cat(
        [text_allowed.expand(n, 1, 1, s_q, length, length), own_allowed.expand(n, 1, 1, s_q, length, s_k - 1)], dim=-1
    )
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).to(value.dtype)
    if dropout > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)

    out = (probs[..., :length].flatten(3, 4) @ v_text).view(n, kv_heads, groups, s_q, length, dim)
    out = out + (probs[..., length:].transpose(3, 4) @ v_own).transpose(3, 4)
    return out.reshape(n, heads, q_len, dim).transpose(1, 2)


def _flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, scaling: float) -> torch.Tensor:
    """FlexAttention under a thought ``BlockMask``; returns [N, S_q*L, H, D]."""
    run = _compiled_flex_attention if query.is_cuda else flex_attention  # eager FlexAttention is a CPU reference
    out = run(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


def _eager_of(module: torch.nn.Module):
    """The ``eager_attention_forward`` of the modeling file that defines ``module``."""
    return inspect.getmodule(type(module)).eager_attention_forward


def _dispatcher(base: str):
    """An attention function: thought attention when a layout is given, ``base`` attention otherwise."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, thought_layout=None, **kwargs):
        scaling = module.scaling if scaling is None else scaling
        if thought_layout is None:
            plain = AttentionInterface._global_mapping[base] if base != "eager" else _eager_of(module)
            return plain(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if isinstance(attention_mask, BlockMask):
            if dropout > 0:
                raise ValueError("the flex thought attention does not support attention dropout; use the torch backend")
            return _flex_attention(query, key, value, attention_mask, scaling), None
        text_mask = attention_mask[:, 0, 0, :]
        return segment_attention(query, key, value, text_mask, thought_layout, scaling, dropout), None

    return attention


for _base in ("eager", "sdpa"):
    AttentionInterface.register(PREFIX + _base, _dispatcher(_base))
    AttentionMaskInterface.register(PREFIX + _base, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[_base])


def install_thought_attention(lm: PreTrainedModel) -> None:
    """Route ``lm``'s attention through the thought-aware dispatcher (idempotent).

    Plain calls behave exactly as before; the implementation name is not saved
    with the model's config, so checkpoints stay stock.
    """
    current = lm.config._attn_implementation
    if not current.startswith(PREFIX):
        lm.config._attn_implementation = PREFIX + current


def base_attention(lm: PreTrainedModel) -> str:
    """The model's own attention implementation, with the dispatcher's prefix removed."""
    return lm.config._attn_implementation.removeprefix(PREFIX)

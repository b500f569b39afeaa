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

  * ``cpu_flash`` (CPU): the text part is ordinary causal attention for every
    query segment, run by PyTorch's fused CPU flash-attention kernel (no score
    matrix is stored); the per-position part is small, [S_q, L, S_k-1]. The two
    are merged exactly through their log-sum-exps, forward and backward.
  * ``torch`` (any device): plain tensor ops; the text scores [S_q*L, L] and the
    per-position scores [S_q*L, S_k-1] are materialised per layer and recomputed
    in backward. Cost ~ S_q*L^2 + S_q*S_k*L.
  * ``flex`` (CUDA): the same rule as a FlexAttention ``mask_mod``; the
    block-sparse kernel skips every 128x128 tile that the rule leaves empty.

``ThoughtLayout`` tells the attention function which segments the queries are.
It travels from the decoder call to every attention layer as a keyword argument
(transformers forwards extra keyword arguments down to the attention function),
and ``install_thought_attention`` registers a dispatcher with transformers'
``AttentionInterface``: calls that carry a layout get the thought attention,
every other call (the plain text pass, ``generate``) the model's own attention.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from quietstar.core.latent_model import ATTENTION_PREFIX as PREFIX

BACKENDS = ("auto", "flex", "cpu_flash", "torch")


@functools.cache
def compiled_flex_attention(backend: str = "inductor"):
    """FlexAttention compiled (by ``backend``, on the first call): the fused, block-sparse kernel.

    The key length grows by L with every thought step, so the sequence lengths are left to
    torch's automatic dynamic shapes: the second length seen recompiles once with symbolic
    lengths, and every later one reuses that graph. Compiled with ``dynamic=False``, each
    length was a graph of its own, and past torch's recompile limit of 8 graphs (already at
    M = 8 thought tokens) the calls silently ran the eager version, which materialises every score.
    """
    return torch.compile(flex_attention, backend=backend)


def flex_attention_kernel(device: torch.device):
    """The compiled FlexAttention on CUDA; elsewhere the eager one, a reference that materialises the scores."""
    return compiled_flex_attention() if device.type == "cuda" else flex_attention


@dataclass(frozen=True)
class ThoughtLayout:
    """Which segments a thought forward's queries are.

    Attributes:
        length: L, tokens per segment (the text length).
        first_query_segment: segment index of the first query token; the queries
            are segments ``first_query_segment, first_query_segment + 1, ...``.
            0 when the text itself is among the queries (the one-pass replay),
            k + 1 when feeding thought block k onto a cache of the earlier ones.
        backend: the attention kernel, resolved (``flex``, ``cpu_flash`` or ``torch``).
    """

    length: int
    first_query_segment: int
    backend: str


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``flex`` on CUDA, ``cpu_flash`` on CPU, ``torch`` elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown thought attention backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "auto":
        return {"cuda": "flex", "cpu": "cpu_flash"}.get(device.type, "torch")
    if backend == "cpu_flash" and device.type != "cpu":
        raise ValueError(f"the cpu_flash thought attention backend runs on the CPU only, not {device.type}")
    return backend


def thought_block_mask(text_mask: torch.Tensor, layout: ThoughtLayout, n_query_segments: int, n_key_segments: int,
                       block_size: int = 128) -> BlockMask:
    """The diagonal attention rule as a FlexAttention ``BlockMask``, built from its block structure.

    Which ``block_size`` x ``block_size`` tiles the rule leaves empty, fills, or fills in part follows from the
    rule itself, so no dense [Q, KV] mask is evaluated (``create_block_mask`` uncompiled evaluates one per call:
    about 1 GB at L = 512, M = 24, four rows). The tiles, per row b and query tile i:

        text tiles (keys of segment 0): some pair allowed when the tile's first real (non-padding) key position is
            <= the largest query position in tile i; every pair allowed when the tile is whole, lies in segment 0,
            holds no padding, and its last key position is <= the smallest query position in tile i;
        thought tiles: those holding a key s * L + t with 1 <= s <= the query's segment, for each query (segment,
            t) of tile i; never full (one key per position).

    Memory is O(Q * S_k + tiles). ``mask_mod`` is attached, so partial tiles are masked exactly.

    Args:
        text_mask: [N, L] bool, True on real (non-padding) text tokens.
        layout: the queries' segments.
        n_query_segments, n_key_segments: query and key lengths in segments.
        block_size: the tile edge (FlexAttention's default, 128).
    """
    length, first = layout.length, layout.first_query_segment
    device, rows = text_mask.device, text_mask.shape[0]
    q_len, kv_len = n_query_segments * length, n_key_segments * length
    n_q, n_kv = -(-q_len // block_size), -(-kv_len // block_size)

    def mask_mod(b, h, q_idx, kv_idx):
        q_segment, q_pos = q_idx // length + first, q_idx % length
        kv_segment, kv_pos = kv_idx // length, kv_idx % length
        text = (kv_segment == 0) & (kv_pos <= q_pos) & text_mask[b, kv_pos]
        thought = (kv_segment >= 1) & (kv_segment <= q_segment) & (kv_pos == q_pos)
        return text | thought

    q = torch.arange(q_len, device=device)
    q_tile, q_pos, q_segment = q // block_size, q % length, q // length + first
    max_pos = torch.full((n_q,), -1, device=device).scatter_reduce(0, q_tile, q_pos, "amax")
    min_pos = torch.full((n_q,), length, device=device).scatter_reduce(0, q_tile, q_pos, "amin")
    start = torch.arange(n_kv, device=device) * block_size  # first key of each tile
    stop = torch.clamp(start + block_size, max=kv_len)  # one past its last key
    # Text tiles: the first real key of each tile (length when none), and whether the tile holds padding.
    positions = torch.arange(length, device=device)
    in_tile = (positions[None, :] >= start[:, None]) & (positions[None, :] < stop[:, None])  # [n_kv, L]
    real = text_mask.bool()[:, None, :] & in_tile[None]  # [N, n_kv, L]
    first_real = torch.where(real, positions, length).amin(-1)  # [N, n_kv]
    no_padding = (real.sum(-1) == in_tile.sum(-1)) & (stop <= length) & (stop - start == block_size)  # [N, n_kv]
    text_any = first_real[:, None, :] <= max_pos[None, :, None]  # [N, n_q, n_kv]
    whole_q = (torch.arange(1, n_q + 1, device=device) * block_size) <= q_len
    full = no_padding[:, None, :] & ((stop - 1)[None, None, :] <= min_pos[None, :, None]) & whole_q[None, :, None]
    # Thought tiles: the key s * L + t of each query (segment, t) and key segment 1 <= s <= segment.
    key_segments = torch.arange(1, n_key_segments, device=device)
    allowed = key_segments[None, :] <= q_segment[:, None]  # [Q, S_k - 1]
    key_tile = (key_segments[None, :] * length + q_pos[:, None]) // block_size
    thought_any = torch.zeros(n_q * n_kv, dtype=torch.bool, device=device)
    thought_any[(q_tile[:, None] * n_kv + key_tile)[allowed]] = True
    partial = (text_any | thought_any.view(1, n_q, n_kv)) & ~full

    def blocks(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = tiles.sum(-1, dtype=torch.int32)[:, None]  # [N, 1, n_q]
        index = torch.argsort(~tiles, dim=-1, stable=True).to(torch.int32)[:, None]  # [N, 1, n_q, n_kv], chosen first
        return count, index

    return BlockMask.from_kv_blocks(*blocks(partial), *blocks(full), BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(q_len, kv_len))


def thought_attention_mask(
    text_mask: torch.Tensor, layout: ThoughtLayout, n_query_segments: int, n_key_segments: int
) -> torch.Tensor | BlockMask:
    """What to pass as the decoder's ``attention_mask`` for a thought forward.

    transformers hands a 4D mask through to the attention function unchanged, so
    this is either a ``BlockMask`` (``flex``) or the [N, 1, 1, L] text padding mask.
    Neither grows with the number of segments squared.
    """
    if layout.backend == "flex":
        return thought_block_mask(text_mask.bool(), layout, n_query_segments, n_key_segments)
    return text_mask.bool()[:, None, None, :]


def segment_attention(
    query: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    text_mask: torch.Tensor,
    layout: ThoughtLayout,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Exact attention under the diagonal rule, with plain tensor ops.

    Args:
        query: [N, H, S_q*L, D].
        keys, values: one [N, H_kv, L, D] tensor per key segment (the text first; H a multiple of H_kv).
        text_mask: [N, L] bool, True on real text tokens.
    Returns:
        [N, S_q*L, H, D], the layout transformers' attention functions return.

    With gradients on, the [S_q*L, L + S_k - 1] probabilities are recomputed in
    backward instead of kept (they would be most of a layer's activations, while
    the attention is a small part of its FLOPs).
    """
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in [query, *keys, *values])
    if differentiable and dropout == 0.0:
        return checkpoint(_segment_attention, query, keys, values, text_mask, layout, scaling, dropout, use_reentrant=False)
    return _segment_attention(query, keys, values, text_mask, layout, scaling, dropout)


def _segment_attention(query, keys, values, text_mask, layout, scaling, dropout):
    q, k_text, v_text, k_own, v_own, own_allowed = _own_position_parts(query, keys, values, layout)
    n, heads, s_q, length, dim = q.shape
    text_scores = (q.flatten(2, 3) @ k_text.transpose(-1, -2)).view(n, heads, s_q, length, length)
    text_scores = text_scores.to(torch.promote_types(text_scores.dtype, torch.float32)) * scaling  # softmax in >= fp32
    positions = torch.arange(length, device=query.device)
    text_allowed = (positions[None, :] <= positions[:, None]) & text_mask[:, None, None, None, :].bool()  # [N, 1, 1, L, L]
    scores = torch.cat(
        [text_scores.masked_fill(~text_allowed, float("-inf")), _own_scores(q, k_own, own_allowed, scaling)], dim=-1
    )
    probs = torch.softmax(scores, dim=-1).to(v_text.dtype)  # [N, H, S_q, L, L + S_k-1]
    if dropout > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = (probs[..., :length].flatten(2, 3) @ v_text).view(n, heads, s_q, length, dim)
    out = out + torch.einsum("nhslk,nhlkd->nhsld", probs[..., length:], v_own)
    return out.flatten(2, 3).transpose(1, 2)


def _own_position_parts(query, keys, values, layout):
    """Split a thought forward's attention inputs into its two parts.

    Args:
        query: [N, H, S_q*L, D]; keys, values: one [N, H_kv, L, D] tensor per key segment, the text first.
    Returns q [N, H, S_q, L, D]; the text keys/values [N, H, L, D]; the
    per-position keys/values [N, H, L, S_k-1, D] (K/V heads repeated for GQA);
    and own_allowed [S_q, S_k-1], True where query segment s may see key segment j.
    """
    n, heads, q_len, dim = query.shape
    kv_heads, length, s_k = keys[0].shape[1], layout.length, len(keys)
    s_q = q_len // length
    if s_q * length != q_len or any(k.shape[2] != length for k in keys):
        raise ValueError(f"query length {q_len} or a key segment is not a multiple of the segment length {length}")
    repeat = (lambda x: x.repeat_interleave(heads // kv_heads, dim=1)) if heads != kv_heads else (lambda x: x)
    q = query.view(n, heads, s_q, length, dim)
    k_own, v_own = (repeat(torch.stack(x[1:], dim=3)) for x in (keys, values))
    q_segments = layout.first_query_segment + torch.arange(s_q, device=query.device)
    k_segments = 1 + torch.arange(s_k - 1, device=query.device)
    own_allowed = k_segments[None, :] <= q_segments[:, None]
    return q, repeat(keys[0]), repeat(values[0]), k_own, v_own, own_allowed


def _fold_segments(x: torch.Tensor) -> torch.Tensor:
    """[N, H, S, L, D] -> [N*S, H, L, D]: every segment becomes a batch row of causal attention."""
    return x.transpose(1, 2).flatten(0, 1)


def _unfold_segments(x: torch.Tensor, n: int) -> torch.Tensor:
    """[N*S, H, L, ...] -> [N, H, S, L, ...]."""
    return x.unflatten(0, (n, -1)).transpose(1, 2)


class _CpuFlashSegmentAttention(torch.autograd.Function):
    """The ``cpu_flash`` kernel: fused causal text attention + explicit per-position part.

    For query (s, t) the key set is text[<= t] plus own segments 1..s at t. The
    text part runs through ``aten._scaled_dot_product_flash_attention_for_cpu``
    (blocked, causal, returns its log-sum-exp lse_1); the per-position scores are
    [S_q, L, S_k-1] and give lse_2. The exact output is
    ``exp(lse_1 - lse) * out_1 + softmax-part_2`` with ``lse = logaddexp(lse_1, lse_2)``.
    Backward is flash-attention's: with the merged output O and merged lse, the
    fused backward kernel returns the text part's gradients exactly, and the
    per-position part's are computed the same way by hand.

    The keys and values come as one tensor per segment and are saved as given, so a
    caller that keeps each segment's keys apart (``one_pass``) never has them copied
    into a growing concatenation.

    Padding: text is right padded, so a real position t never reaches a padding
    key through ``t' <= t``; padding positions' outputs carry no meaning.
    """

    @staticmethod
    def forward(ctx, query, layout, scaling, *segments):
        n, s_k = query.shape[0], len(segments) // 2
        keys, values = list(segments[:s_k]), list(segments[s_k:])
        q, k_text, v_text, k_own, v_own, own_allowed = _own_position_parts(query, keys, values, layout)
        s_q = q.shape[2]
        expand = (lambda x: x[:, :, None].expand(-1, -1, s_q, -1, -1))  # text K/V for every query segment
        out_1, lse_1 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _fold_segments(q), _fold_segments(expand(k_text)), _fold_segments(expand(v_text)), 0.0, True, scale=scaling
        )
        out_1, lse_1 = _unfold_segments(out_1, n), _unfold_segments(lse_1, n)  # [N, H, S_q, L, D], [N, H, S_q, L]
        scores_2 = _own_scores(q, k_own, own_allowed, scaling)  # [N, H, S_q, L, S_k-1]
        lse = torch.logaddexp(lse_1, torch.logsumexp(scores_2, dim=-1))
        probs_2 = torch.exp(scores_2 - lse[..., None]).to(q.dtype)
        out = torch.exp(lse_1 - lse)[..., None].to(q.dtype) * out_1 + torch.einsum("nhslk,nhlkd->nhsld", probs_2, v_own)
        ctx.save_for_backward(query, out, lse, *segments)
        ctx.layout, ctx.scaling = layout, scaling
        return out.flatten(2, 3).transpose(1, 2)  # [N, S_q*L, H, D]

    @staticmethod
    def backward(ctx, grad):
        query, out, lse, *segments = ctx.saved_tensors
        s_k = len(segments) // 2
        n, heads, kv_heads = query.shape[0], query.shape[1], segments[0].shape[1]
        q, k_text, v_text, k_own, v_own, own_allowed = _own_position_parts(query, segments[:s_k], segments[s_k:], ctx.layout)
        s_q = q.shape[2]
        grad = grad.transpose(1, 2).unflatten(2, (s_q, -1))  # [N, H, S_q, L, D]
        expand = (lambda x: x[:, :, None].expand(-1, -1, s_q, -1, -1))
        dq_1, dk_1, dv_1 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _fold_segments(grad.contiguous()), _fold_segments(q), _fold_segments(expand(k_text)),
            _fold_segments(expand(v_text)), _fold_segments(out), _fold_segments(lse[..., None]).squeeze(-1),
            0.0, True, scale=ctx.scaling,
        )
        # The per-position part, as flash-attention's backward does it: dS = P * (dP - rowsum(dO * O)).
        probs_2 = torch.exp(_own_scores(q, k_own, own_allowed, ctx.scaling) - lse[..., None]).to(q.dtype)
        d_scores = probs_2 * (torch.einsum("nhsld,nhlkd->nhslk", grad, v_own) - (grad * out).sum(-1, keepdim=True))
        dq = _unfold_segments(dq_1, n) + ctx.scaling * torch.einsum("nhslk,nhlkd->nhsld", d_scores, k_own)
        dk_own = ctx.scaling * torch.einsum("nhslk,nhsld->nhlkd", d_scores, q)  # [N, H, L, S_k-1, D]
        dv_own = torch.einsum("nhslk,nhsld->nhlkd", probs_2, grad)
        dk_text = _unfold_segments(dk_1, n).sum(dim=2)  # [N, H, L, D]
        dv_text = _unfold_segments(dv_1, n).sum(dim=2)
        if heads != kv_heads:  # sum the repeated heads back onto their K/V head
            dk_text, dv_text, dk_own, dv_own = (
                x.unflatten(1, (kv_heads, heads // kv_heads)).sum(dim=2) for x in (dk_text, dv_text, dk_own, dv_own))
        return dq.flatten(2, 3), None, None, dk_text, *dk_own.unbind(dim=3), dv_text, *dv_own.unbind(dim=3)


def _own_scores(q, k_own, own_allowed, scaling):
    """Scores of each query against its own position's thought keys, -inf where not allowed: [N, H, S_q, L, S_k-1]."""
    scores = torch.einsum("nhsld,nhlkd->nhslk", q, k_own)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scaling
    return scores.masked_fill(~own_allowed[:, None, :], float("-inf"))


def _flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, scaling: float) -> torch.Tensor:
    """FlexAttention under a thought ``BlockMask``; returns [N, S_q*L, H, D]."""
    if query.is_cuda and min(query.shape[-1], value.shape[-1]) < 16:  # the compiled kernel's tiles need 16
        raise ValueError(f"the flex thought attention needs attention heads of 16 or more dimensions on CUDA, "
                         f"and this model's have {query.shape[-1]}; use attention_backend='torch'")
    attend = flex_attention_kernel(query.device)
    out = attend(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


def _eager_of(module: torch.nn.Module):
    """The ``eager_attention_forward`` of the modeling file that defines ``module``."""
    return inspect.getmodule(type(module)).eager_attention_forward


def _dispatcher(base: str):
    """An attention function: thought attention when a layout is given, ``base`` attention otherwise.

    With a ``thought_store`` (the one-pass step, ``one_pass.SegmentKVStore``), the call's keys and values
    are first added to the store, and the thought attention reads every segment from it.
    """

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, thought_layout=None,
                  thought_store=None, **kwargs):
        scaling = module.scaling if scaling is None else scaling
        if thought_store is not None:
            keys, values = thought_store.add(module.layer_idx, key, value)
        if thought_layout is None:
            plain = AttentionInterface._global_mapping[base] if base != "eager" else _eager_of(module)
            return plain(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if thought_layout.backend != "torch" and dropout > 0:
            raise ValueError(f"the {thought_layout.backend} thought attention has no attention dropout; use attention_backend='torch'")
        if thought_layout.backend == "flex":
            if thought_store is not None:
                raise ValueError("the flex thought attention takes the keys as one tensor, not a segment store")
            return _flex_attention(query, key, value, attention_mask, scaling), None
        if thought_store is None:
            keys, values = key.split(thought_layout.length, dim=2), value.split(thought_layout.length, dim=2)
        if thought_layout.backend == "cpu_flash":
            return _CpuFlashSegmentAttention.apply(query, thought_layout, scaling, *keys, *values), None
        text_mask = attention_mask[:, 0, 0, :]
        return segment_attention(query, list(keys), list(values), text_mask, thought_layout, scaling, dropout), None

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

"""Token-parallel thought sampling, and the one-pass replay that trains on it.

After every text position t a thought is generated for all L positions at once.
With R thoughts per position the batch is expanded to B*R rows. The thought side
of a step is a sequence of *blocks*, each holding one token for every position:

    block 0          <sot>
    blocks 1..M      z_1 .. z_M              (sampled, or given)
    block M+1        <eot>                   (predicts x_{t+1})
    blocks M+2..     x_{t+1} .. x_{t+K-1}    (teacher forced; predict x_{t+2..t+K})

The token of block k at position t attends to the text at positions <= t and to
blocks 0..k at the same t (the *diagonal attention mask*, ``thought_attention``)
and has position id t + 1 + k, as if the thought were text inserted after x_t.
Each position's chain therefore sees exactly the plain sequence
``[x_<=t, <sot>, z, <eot>, x_{t+1..}]``.

The efficient formulation, used by default, splits a training step in two:

  1. ``sample_thoughts`` (no gradients): the text pass fills a KV cache, then one
     forward per thought block adds L tokens that attend to the text and to their
     own position's earlier blocks. Cost per block ~ L^2 + k*L, not (k*L)^2.
  2. ``replay_thoughts`` (differentiable): a single forward over
     [text | block 0 | ... | block M+K] with the same inputs, positions and mask
     rule. It gives the base hidden states, the policy log-probabilities of the
     thought tokens and the post-thought hidden states. One forward without a
     cache works with gradient checkpointing and DeepSpeed ZeRO-3.

``sequential_thoughts`` keeps the straightforward formulation as the test oracle.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from quietstar.quiet_star.config import QuietStarConfig
from quietstar.quiet_star.losses import at_least_fp32, chunked_token_logprobs
from quietstar.quiet_star.thought_attention import ThoughtLayout, resolve_backend, thought_attention_mask
from quietstar.quiet_star.thought_embeddings import ThoughtEmbeddings


@dataclass
class ThoughtRollout:
    """What the thought passes produce for one batch.

    Attributes:
        thoughts: [B, L, R, M] thought token ids sampled (or given) after each position.
        thought_logprobs: [B, L, R, M] log p(z_i | x_<=t, <sot>, z_<i) at the policy
            temperature, differentiable; None when only sampling.
        post_hidden: [B, L, R, K, H] last hidden states at <eot> and at the
            teacher-forced tokens; entry j predicts x_{t+1+j}. None when only sampling.
    """

    thoughts: torch.LongTensor
    thought_logprobs: torch.Tensor | None = None
    post_hidden: torch.Tensor | None = None


SAMPLING_BLOCK = 256  # vocabulary entries per block of the two-level sampler in choose_tokens


def choose_tokens(
    logits: torch.Tensor, greedy: bool, temperature: float, generator: torch.Generator | None
) -> torch.LongTensor:
    """Pick one token per row of ``logits`` [..., V]: argmax, or a sample at ``temperature``.

    Sampling draws two fp64 uniforms per row and inverts the CDF with them
    (``invert_cdf``); ``torch.multinomial`` and Gumbel noise draw V random numbers
    per row, which dominates on a CPU.
    """
    if greedy:
        return logits.argmax(dim=-1)
    scaled = at_least_fp32(logits)
    probs = torch.softmax(scaled / temperature if temperature != 1.0 else scaled, dim=-1)
    device = generator.device if generator is not None else probs.device
    uniform = torch.rand(probs.shape[:-1] + (2,), generator=generator, device=device, dtype=torch.float64)
    return invert_cdf(probs, uniform.to(probs.device))


def invert_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.LongTensor:
    """The token of each row of ``probs`` [..., V] that the uniforms ``uniform`` [..., 2] in [0, 1) select.

    Two levels: the probabilities are summed per block of ``SAMPLING_BLOCK`` tokens;
    ``uniform[..., 0]`` picks a block by the fp64 CDF of the block masses and
    ``uniform[..., 1]`` a token by the fp64 CDF inside that block. A single fp32 CDF
    over the whole vocabulary rounds away every token whose probability is below
    its last bits (about 6e-8 once the CDF nears 1); here a token can be drawn
    whenever its probability is above about 1e-16 of its block's mass and that
    mass is above about 1e-16 of the total. Zero-probability tokens never are.
    """
    vocab, size = probs.shape[-1], SAMPLING_BLOCK
    full = vocab - vocab % size
    masses = probs[..., :full].unflatten(-1, (-1, size)).sum(dim=-1)  # [..., nb]
    if full < vocab:
        masses = torch.cat([masses, probs[..., full:].sum(dim=-1, keepdim=True)], dim=-1)
    block_cdf = masses.to(torch.float64).cumsum(dim=-1)
    # right=True: the first CDF entry strictly above the draw, so empty blocks and zero-probability tokens are never taken.
    block = torch.searchsorted(block_cdf[..., :-1].contiguous(), uniform[..., :1] * block_cdf[..., -1:], right=True)  # [..., 1]
    index = block * size + torch.arange(size, device=probs.device)  # [..., S]
    inside = probs.gather(-1, index.clamp(max=vocab - 1)).masked_fill(index >= vocab, 0.0)
    inside_cdf = inside.to(torch.float64).cumsum(dim=-1)
    offset = torch.searchsorted(inside_cdf[..., :-1].contiguous(), uniform[..., 1:] * inside_cdf[..., -1:], right=True)
    return (block * size + offset).squeeze(-1).clamp(max=vocab - 1)


def check_thoughts_shape(thoughts: torch.Tensor, batch: int, length: int, config: QuietStarConfig) -> None:
    expected = (batch, length, config.n_thoughts, config.thought_len)
    if tuple(thoughts.shape) != expected:
        raise ValueError(f"thoughts must have shape [B, L, R, M] = {list(expected)}, got {list(thoughts.shape)}")


def true_continuation(input_ids: torch.LongTensor, j: int) -> torch.LongTensor:
    """x_{t+j} at every position t: [B, L], 0 past the end."""
    return F.pad(input_ids[:, j:], (0, j), value=0)


@contextmanager
def _inference_mode(lm: PreTrainedModel):
    """Sampling is inference: no dropout, and HF keeps the KV cache even when activation checkpointing is on."""
    was_training = lm.training
    lm.eval()
    try:
        yield
    finally:
        lm.train(was_training)


@torch.no_grad()
def sample_thoughts(
    lm: PreTrainedModel,
    markers: ThoughtEmbeddings,
    config: QuietStarConfig,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    *,
    backend: str = "auto",
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> torch.LongTensor:
    """Sample R thoughts of M tokens after every position: [B, L, R, M].

    Args:
        input_ids: [B, L] text, right padded; attention_mask: [B, L], 1 on real tokens.
        backend: thought attention backend (``thought_attention.BACKENDS``).
        greedy: argmax instead of sampling at ``config.sample_temperature``.
    """
    batch, length = input_ids.shape
    R, M = config.n_thoughts, config.thought_len
    rows = batch * R
    decoder, lm_head, embed = lm.get_decoder(), lm.get_output_embeddings(), lm.get_input_embeddings()
    dtype = embed.weight.dtype
    text_mask = attention_mask.bool().repeat_interleave(R, dim=0)  # [B*R, L]
    positions = torch.arange(length, device=input_ids.device)
    kernel = resolve_backend(backend, input_ids.device)

    with _inference_mode(lm):
        cache = DynamicCache()
        decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions.expand(batch, length),
                cache=cache, use_cache=True)
        cache.batch_repeat_interleave(R)

        def feed(block: int, embeds: torch.Tensor) -> torch.Tensor:
            """Thought block ``block`` [B*R, L, H] onto the cache -> last hidden states [B*R, L, H]."""
            layout = ThoughtLayout(length, first_query_segment=block + 1, backend=kernel)
            mask = thought_attention_mask(text_mask, layout, 1, block + 2)
            out = decoder(inputs_embeds=embeds.to(dtype), attention_mask=mask,
                          position_ids=(positions + 1 + block).expand(rows, length),
                          cache=cache, use_cache=True, thought_layout=layout)
            return out.last_hidden_state

        hidden = feed(0, markers("start", rows, length))
        tokens = []
        for i in range(M):
            token = choose_tokens(lm_head(hidden), greedy, config.sample_temperature, generator)  # z_{i+1}: [B*R, L]
            tokens.append(token)
            if i < M - 1:
                hidden = feed(i + 1, embed(token))
    return torch.stack(tokens, dim=-1).view(batch, R, length, M).transpose(1, 2)


def replay_thoughts(
    lm: PreTrainedModel,
    markers: ThoughtEmbeddings,
    config: QuietStarConfig,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    thoughts: torch.LongTensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, ThoughtRollout]:
    """One differentiable forward over the text and all thought blocks.

    Args:
        input_ids: [B, L]; attention_mask: [B, L] (right padded).
        thoughts: [B, L, R, M] the thought tokens to teacher-force.
    Returns:
        h_base [B, L, H] (the text segment) and the rollout with the policy
        log-probs [B, L, R, M] and the post-thought hidden states [B, L, R, K, H].
    """
    batch, length = input_ids.shape
    R, M, K = config.n_thoughts, config.thought_len, config.n_true
    check_thoughts_shape(thoughts, batch, length, config)
    rows, n_blocks = batch * R, config.n_blocks
    decoder, lm_head, embed = lm.get_decoder(), lm.get_output_embeddings(), lm.get_input_embeddings()
    dtype = embed.weight.dtype

    # Each of the R rows of an example repeats the text: the text segment costs 1/(1 + n_blocks) of the
    # forward, and every row then reads the text from its own copy (the gradients sum to the same total).
    ids = input_ids.repeat_interleave(R, dim=0)  # [B*R, L]
    z = thoughts.transpose(1, 2).reshape(rows, length, M)  # [B*R, L, M]
    continuation = [true_continuation(ids, j) for j in range(1, K)]
    segments = (
        [embed(ids), markers("start", rows, length)]
        + list(embed(z).unbind(dim=2))
        + [markers("end", rows, length)]
        + [embed(x) for x in continuation]
    )
    embeds = torch.cat([s.to(dtype) for s in segments], dim=1)  # [B*R, (1 + n_blocks) * L, H]
    positions = torch.arange(length, device=input_ids.device)
    position_ids = torch.cat([positions] + [positions + 1 + k for k in range(n_blocks)]).expand(rows, -1)

    layout = ThoughtLayout(length, first_query_segment=0, backend=resolve_backend(backend, input_ids.device))
    text_mask = attention_mask.bool().repeat_interleave(R, dim=0)
    mask = thought_attention_mask(text_mask, layout, 1 + n_blocks, 1 + n_blocks)
    hidden = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False,
                     thought_layout=layout).last_hidden_state
    hidden = hidden.view(batch, R, 1 + n_blocks, length, -1)  # [B, R, segment, L, H]

    base_hidden = hidden[:, 0, 0]  # [B, L, H]: the first copy of the text
    policy_hidden = hidden[:, :, 1 : M + 1].permute(0, 3, 1, 2, 4)  # [B, L, R, M, H]: blocks 0..M-1 predict z_1..z_M
    thought_logprobs = chunked_token_logprobs(lm_head, policy_hidden, thoughts, config.policy_temperature)
    post_hidden = hidden[:, :, M + 2 :].permute(0, 3, 1, 2, 4)  # [B, L, R, K, H]: <eot>, x_{t+1..t+K-1}
    return base_hidden, ThoughtRollout(thoughts=thoughts, thought_logprobs=thought_logprobs, post_hidden=post_hidden)

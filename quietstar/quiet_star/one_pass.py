"""The one-pass training step: the forwards that sample each thought token are the ones it trains through.

Blocks, positions and the diagonal attention rule are those of ``thought_sampler``. The
``efficient`` formulation samples the thoughts without gradients, then replays all blocks in
one differentiable forward: every thought token goes through the network twice. Here each
forward keeps its graph:

    text pass         x_1..x_L, B rows            -> h_base, and the text's keys/values
    block 0           <sot>, B*R rows             -> predicts z_1 (sampled from it)
    blocks 1..M-1     z_1..z_{M-1}, one forward each, each sampled from the forward before
    last forward      z_M, <eot>, x_{t+1..t+K-1}  -> the post-thought hidden states

then the backward runs once through all of them. M + 2 forwards, and the thought tokens are
forwarded once. The text is forwarded for the B examples, not for B*R rows as in the replay.

Memory: the attention keys and values of each forward are kept per segment in a
``SegmentKVStore`` and handed to the attention kernel as a list, which saves them as given.
A KV cache would concatenate the keys of every earlier block at every step, and keep each
concatenation for the backward: O(M^2 * L) per layer instead of O(M * L).

The thoughts drawn for a seed are those of ``sample_thoughts``: the same logits (to rounding)
and the same uniforms in the same order. Sampling happens in the module's own mode, so a
model with dropout samples under dropout here (none of the supported families has dropout on
by default). Activation checkpointing would recompute each layer, adding its keys to the store
again: use the ``efficient`` formulation with it.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from quietstar.quiet_star.config import QuietStarConfig
from quietstar.quiet_star.losses import chunked_token_logprobs
from quietstar.quiet_star.thought_attention import ThoughtLayout, resolve_backend
from quietstar.quiet_star.thought_embeddings import ThoughtEmbeddings
from quietstar.quiet_star.thought_sampler import ThoughtRollout, check_thoughts_shape, choose_tokens, true_continuation


class SegmentKVStore:
    """Each layer's attention keys and values, one [N, H_kv, L, D] tensor per segment (the text first).

    The thought attention dispatcher calls ``add`` with a forward's keys and values and attends to
    everything stored for that layer, this forward's segments included.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.keys: dict[int, list[torch.Tensor]] = {}
        self.values: dict[int, list[torch.Tensor]] = {}

    def add(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Store a forward's keys and values [N, H_kv, S*L, D] as S segments; return the layer's segments so far."""
        self.keys.setdefault(layer, []).extend(key.split(self.length, dim=2))
        self.values.setdefault(layer, []).extend(value.split(self.length, dim=2))
        return self.keys[layer], self.values[layer]

    def repeat_rows(self, repeats: int) -> None:
        """Repeat every stored row ``repeats`` times in place (the text's B rows -> B*R thought rows)."""
        for stored in (self.keys, self.values):
            for layer, segments in stored.items():
                stored[layer] = [s.repeat_interleave(repeats, dim=0) for s in segments]


def one_pass_backend(backend: str, device: torch.device) -> str:
    """The thought attention kernel of the one-pass step: ``auto`` -> ``cpu_flash`` on the CPU, ``torch`` elsewhere.

    FlexAttention takes each layer's keys as one tensor, so it cannot read a ``SegmentKVStore``.
    """
    if backend == "flex":
        raise ValueError("the one_pass formulation cannot use the flex thought attention; "
                         "use attention_backend='torch' or formulation='efficient'")
    if backend == "auto":
        return "cpu_flash" if device.type == "cpu" else "torch"
    return resolve_backend(backend, device)


def one_pass_rollout(
    lm: PreTrainedModel,
    markers: ThoughtEmbeddings,
    config: QuietStarConfig,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    *,
    thoughts: torch.LongTensor | None = None,
    generator: torch.Generator | None = None,
    backend: str,
) -> tuple[torch.Tensor, ThoughtRollout]:
    """The text pass and the thought blocks, with gradients, sampling the thoughts on the way.

    Args:
        input_ids: [B, L]; attention_mask: [B, L] (right padded).
        thoughts: [B, L, R, M] thoughts to teacher-force; None samples them at
            ``config.sample_temperature`` with ``generator``.
        backend: the resolved thought attention kernel, ``cpu_flash`` or ``torch``.
    Returns:
        h_base [B, L, H] and the rollout: the thoughts, their policy log-probs
        [B, L, R, M] and the post-thought hidden states [B, L, R, K, H].
    """
    batch, length = input_ids.shape
    R, M, K = config.n_thoughts, config.thought_len, config.n_true
    if thoughts is not None:
        check_thoughts_shape(thoughts, batch, length, config)
    rows = batch * R
    decoder, lm_head, embed = lm.get_decoder(), lm.get_output_embeddings(), lm.get_input_embeddings()
    dtype = embed.weight.dtype
    text_mask = attention_mask.bool().repeat_interleave(R, dim=0)  # [B*R, L]
    positions = torch.arange(length, device=input_ids.device)
    given = None if thoughts is None else thoughts.transpose(1, 2).reshape(rows, length, M)  # [B*R, L, M]
    store = SegmentKVStore(length)

    base_hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions.expand(batch, length),
                          use_cache=False, thought_store=store).last_hidden_state  # [B, L, H]
    store.repeat_rows(R)

    def feed(first_block: int, embeds: list[torch.Tensor]) -> torch.Tensor:
        """Blocks ``first_block``.. (one [B*R, L, H] each) onto the store -> hidden states [B*R, n*L, H]."""
        layout = ThoughtLayout(length, first_query_segment=first_block + 1, backend=backend)
        position_ids = torch.cat([positions + 1 + first_block + i for i in range(len(embeds))]).expand(rows, -1)
        return decoder(inputs_embeds=torch.cat([e.to(dtype) for e in embeds], dim=1), attention_mask=text_mask[:, None, None, :],
                       position_ids=position_ids, use_cache=False, thought_layout=layout,
                       thought_store=store).last_hidden_state

    policy_hidden, tokens = [feed(0, [markers("start", rows, length)])], []  # block i's state predicts z_{i+1}
    for i in range(M):
        if given is not None:
            token = given[..., i]
        else:
            with torch.no_grad():
                token = choose_tokens(lm_head(policy_hidden[-1]), False, config.sample_temperature, generator)
        tokens.append(token)
        if i < M - 1:
            policy_hidden.append(feed(i + 1, [embed(token)]))
    continuation = [embed(true_continuation(input_ids.repeat_interleave(R, dim=0), j)) for j in range(1, K)]
    last = feed(M, [embed(tokens[-1]), markers("end", rows, length), *continuation])  # [B*R, (K+1)*L, H]

    z = torch.stack(tokens, dim=-1).view(batch, R, length, M).transpose(1, 2)  # [B, L, R, M]
    hidden_size = base_hidden.shape[-1]
    policy = torch.stack(policy_hidden, dim=2).view(batch, R, length, M, hidden_size).transpose(1, 2)  # [B, L, R, M, H]
    thought_logprobs = chunked_token_logprobs(lm_head, policy, z, config.policy_temperature)
    post_hidden = last[:, length:].view(batch, R, K, length, hidden_size).permute(0, 3, 1, 2, 4)  # [B, L, R, K, H]
    return base_hidden, ThoughtRollout(thoughts=z, thought_logprobs=thought_logprobs, post_hidden=post_hidden)

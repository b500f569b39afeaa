"""Token-parallel thought sampling under the diagonal attention mask.

After every text position t, a thought is generated for all L positions at once.
With R thoughts per position the batch is expanded to B*R rows, and the model
runs one forward per *block*: a block holds one new token for each of the L
positions. The blocks after the text are, in order:

    block 0          <sot>
    blocks 1..M      z_1 .. z_M              (sampled, or given)
    block M+1        <eot>                   (predicts x_{t+1})
    blocks M+2..     x_{t+1} .. x_{t+K-1}    (teacher forced; predict x_{t+2..t+K})

A token of block k at position t attends to the text tokens at positions <= t
(causal, padding excluded) and to the tokens of blocks 0..k at the same t, and
to nothing else. Drawn over the keys [text | block 0 | ... | block k] that is a
causal matrix followed by k+1 diagonals: the *diagonal attention mask*. The
token of block k at position t gets position id t + 1 + k, as if the thought
were text inserted after x_t. So every position's chain sees exactly the inputs
and positions of the plain sequence ``[x_<=t, <sot>, z, <eot>, x_{t+1..}]``.

This module is the straightforward ("sequential") formulation: one forward per
block on a growing KV cache, with a dense [L, L*(k+2)] mask per block. It is
exact, and it is the reference any faster formulation must match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from quietstar.config import QuietStarConfig
from quietstar.thought_embeddings import ThoughtEmbeddings


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


def diagonal_thought_mask(text_mask: torch.Tensor, n_blocks: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask for one thought block.

    Args:
        text_mask: [N, L] bool, True on real (non-padding) text tokens.
        n_blocks: number of thought blocks in the cache including the one being fed.
        dtype: dtype of the model's attention scores.
    Returns:
        [N, 1, L, L * (1 + n_blocks)]: 0 where a query may attend, the dtype's
        minimum elsewhere. Keys are ordered [text | block 0 | ... | block n_blocks-1].
    """
    n, length = text_mask.shape
    positions = torch.arange(length, device=text_mask.device)
    causal = positions[None, :] <= positions[:, None]  # [L_query, L_key]
    text_part = causal[None] & text_mask[:, None, :]  # [N, L, L]
    diagonal = torch.eye(length, dtype=torch.bool, device=text_mask.device).expand(n, length, length)
    allowed = torch.cat([text_part] + [diagonal] * n_blocks, dim=-1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=text_mask.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def choose_tokens(
    logits: torch.Tensor, greedy: bool, temperature: float, generator: torch.Generator | None
) -> torch.LongTensor:
    """Pick one token per row of ``logits`` [..., V]: argmax, or a sample at ``temperature``."""
    if greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return flat.view(logits.shape[:-1])


class _BlockRunner:
    """Feeds thought blocks, one forward each, onto the text's KV cache (expanded to B*R rows)."""

    def __init__(self, lm: PreTrainedModel, cache: DynamicCache, attention_mask: torch.Tensor, n_thoughts: int) -> None:
        self.decoder = lm.get_decoder()
        self.cache = cache
        self.cache.batch_repeat_interleave(n_thoughts)
        self.text_mask = attention_mask.bool().repeat_interleave(n_thoughts, dim=0)  # [B*R, L]
        self.dtype = lm.get_input_embeddings().weight.dtype
        self.n_fed = 0

    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds: [B*R, L, H] block inputs -> [B*R, L, H] last hidden states."""
        rows, length = self.text_mask.shape
        mask = diagonal_thought_mask(self.text_mask, self.n_fed + 1, self.dtype)
        positions = torch.arange(length, device=embeds.device) + 1 + self.n_fed
        out = self.decoder(
            inputs_embeds=embeds.to(self.dtype),
            attention_mask=mask,
            position_ids=positions.expand(rows, length),
            past_key_values=self.cache,
            use_cache=True,
        )
        self.n_fed += 1
        return out.last_hidden_state


def rollout_thoughts(
    lm: PreTrainedModel,
    markers: ThoughtEmbeddings,
    config: QuietStarConfig,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    text_cache: DynamicCache,
    *,
    thoughts: torch.LongTensor | None = None,
    continuation: bool = True,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> ThoughtRollout:
    """Run the thought blocks for every position of a batch, in parallel.

    Args:
        lm: the base causal LM.
        markers: the <sot>/<eot> embeddings.
        config: M, K, R and the temperatures.
        input_ids: [B, L] text, right padded.
        attention_mask: [B, L], 1 on real tokens.
        text_cache: KV cache holding the text (the base pass), batch B. It is
            expanded in place to B*R rows and extended with the thought blocks.
        thoughts: [B, L, R, M] thought tokens to teacher-force instead of sampling.
        continuation: also feed <eot> and the true tokens, and compute the policy
            log-probabilities; False stops once the M thought tokens are chosen.
        greedy: argmax instead of sampling (ignored when ``thoughts`` is given).
        generator: RNG for sampling.
    """
    batch, length = input_ids.shape
    R, M, K = config.n_thoughts, config.thought_len, config.n_true
    rows = batch * R
    embed = lm.get_input_embeddings()
    lm_head = lm.get_output_embeddings()
    given = None
    if thoughts is not None:
        expected = (batch, length, R, M)
        if tuple(thoughts.shape) != expected:
            raise ValueError(f"thoughts must have shape [B, L, R, M] = {list(expected)}, got {list(thoughts.shape)}")
        given = thoughts.permute(0, 2, 1, 3).reshape(rows, length, M)  # [B*R, L, M]

    run = _BlockRunner(lm, text_cache, attention_mask, R)
    hidden = run(markers.expand("start", rows, length))  # block 0: <sot>
    tokens, logprobs = [], []
    for i in range(M):
        logits = lm_head(hidden).float()  # [B*R, L, V]: predicts z_{i+1}
        token = given[:, :, i] if given is not None else choose_tokens(logits.detach(), greedy, config.sample_temperature, generator)
        tokens.append(token)
        if continuation:
            log_policy = F.log_softmax(logits / config.policy_temperature, dim=-1)
            logprobs.append(log_policy.gather(-1, token[..., None]).squeeze(-1))
        if continuation or i < M - 1:
            hidden = run(embed(token))  # blocks 1..M: z_{i+1}

    def per_position(x: torch.Tensor) -> torch.Tensor:
        """[B*R, L, n, ...] -> [B, L, R, n, ...]."""
        return x.reshape(batch, R, *x.shape[1:]).transpose(1, 2)

    sampled = per_position(torch.stack(tokens, dim=2))
    if not continuation:
        return ThoughtRollout(thoughts=sampled)

    post = [run(markers.expand("end", rows, length))]  # block M+1: <eot>
    for j in range(1, K):
        true_next = F.pad(input_ids[:, j:], (0, j), value=0).repeat_interleave(R, dim=0)  # x_{t+j}; 0 past the end
        post.append(run(embed(true_next)))
    return ThoughtRollout(
        thoughts=sampled,
        thought_logprobs=per_position(torch.stack(logprobs, dim=2)),
        post_hidden=per_position(torch.stack(post, dim=2)),
    )

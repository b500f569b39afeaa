"""The straightforward ("sequential") Quiet-STaR formulation: the test oracle.

Blocks and positions are as in ``thought_sampler``. Here the thought blocks are
fed one forward each, with gradients, onto a growing KV cache of the text pass,
under a dense additive mask of shape [L, L*(k+2)] for block k: a causal matrix
over the text followed by k+1 diagonals. Sampling and the differentiable pass
are the same forwards. It is simple and exact, but attention costs
~ (K_total*L)^2 / 2 over a step, every block's keys are concatenated (and kept
for backward) again, and activation checkpointing cannot be used (HF drops the
cache under checkpointing). ``config.formulation = "sequential"`` selects it;
the efficient formulation must match it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from quietstar.quiet_star.config import QuietStarConfig
from quietstar.quiet_star.losses import at_least_fp32
from quietstar.quiet_star.thought_embeddings import ThoughtEmbeddings
from quietstar.quiet_star.thought_sampler import ThoughtRollout, check_thoughts_shape, choose_tokens, true_continuation


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
            cache=self.cache,
            use_cache=True,
        )
        self.n_fed += 1
        return out.last_hidden_state


def sequential_rollout(
    lm: PreTrainedModel,
    markers: ThoughtEmbeddings,
    config: QuietStarConfig,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    *,
    thoughts: torch.LongTensor | None = None,
    continuation: bool = True,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, ThoughtRollout]:
    """The text pass, then the thought blocks for every position, one forward per block.

    Args:
        lm: the base causal LM.
        markers: the <sot>/<eot> embeddings.
        config: M, K, R and the temperatures.
        input_ids: [B, L] text, right padded.
        attention_mask: [B, L], 1 on real tokens.
        thoughts: [B, L, R, M] thought tokens to teacher-force instead of sampling.
        continuation: also feed <eot> and the true tokens, and compute the policy
            log-probabilities; False stops once the M thought tokens are chosen.
        greedy: argmax instead of sampling (ignored when ``thoughts`` is given).
        generator: RNG for sampling.
    Returns:
        h_base [B, L, H] and the rollout, as ``thought_sampler.replay_thoughts``.
    """
    batch, length = input_ids.shape
    R, M, K = config.n_thoughts, config.thought_len, config.n_true
    rows = batch * R
    embed = lm.get_input_embeddings()
    lm_head = lm.get_output_embeddings()
    given = None
    if thoughts is not None:
        check_thoughts_shape(thoughts, batch, length, config)
        given = thoughts.permute(0, 2, 1, 3).reshape(rows, length, M)  # [B*R, L, M]

    cache = DynamicCache()
    positions = torch.arange(length, device=input_ids.device).expand(batch, length)
    base_hidden = lm.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache, use_cache=True
    ).last_hidden_state
    run = _BlockRunner(lm, cache, attention_mask, R)
    hidden = run(markers("start", rows, length))  # block 0: <sot>
    tokens, logprobs = [], []
    for i in range(M):
        logits = at_least_fp32(lm_head(hidden))  # [B*R, L, V]: predicts z_{i+1}
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
        return base_hidden, ThoughtRollout(thoughts=sampled)

    post = [run(markers("end", rows, length))]  # block M+1: <eot>
    for j in range(1, K):
        post.append(run(embed(true_continuation(input_ids, j).repeat_interleave(R, dim=0))))  # x_{t+j}
    return base_hidden, ThoughtRollout(
        thoughts=sampled,
        thought_logprobs=per_position(torch.stack(logprobs, dim=2)),
        post_hidden=per_position(torch.stack(post, dim=2)),
    )

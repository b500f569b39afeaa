"""Cached generation and teacher-forced scoring with thoughts.

Before each new token x_{t+1}, the model thinks off to the side of its KV cache:

    feed <sot>, z_1 .. z_M (each sampled from the previous step), <eot>
      at positions t+1 .. t+M+2, exactly as in training;
    mix:  h_talk = h_base(t) + w * (h_<eot> - h_base(t));  predict x_{t+1} from lm_head(h_talk);
    drop the M+2 thought entries from the cache, and feed x_{t+1} at position t+1.

So each new token costs M+3 single-token forwards on the cached context, and the
thought never enters the output or the main cache. ``ThinkingCache`` holds that
machinery; ``generate`` picks x_{t+1} from the mixed prediction (greedily or by
sampling), and ``predict_continuation`` feeds a given continuation instead
(teacher forcing) and returns the base and talk distributions before each of its
tokens, for scoring answers. With thoughts off, ``generate`` is plain decoding
with the base model.

Prompts are left padded (``tokenizer.padding_side = "left"``), as for any
decoder-only batched generation.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from quietstar.quiet_star.model import QuietStarModel
from quietstar.quiet_star.thought_sampler import choose_tokens


class ThinkingCache:
    """A batch of left-padded prompts on a KV cache, extended one token at a time.

    After construction and after every ``append``, ``h_base`` [B, H] is the base
    model's hidden state at the last token t: it predicts x_{t+1}.
    """

    def __init__(self, model: QuietStarModel, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> None:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must both be [B, P], got {list(input_ids.shape)} and {list(attention_mask.shape)}")
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("prompts must be left padded (the last column real in every row); use tokenizer.padding_side='left'")
        self.model = model
        self.decoder = model.lm.get_decoder()
        self.embed = model.lm.get_input_embeddings()
        self.lm_head = model.lm.get_output_embeddings()
        self.batch = input_ids.shape[0]
        self.mask = attention_mask.long()  # [B, P + tokens appended so far]
        self.cache = DynamicCache()
        self._one = torch.ones(self.batch, 1, dtype=self.mask.dtype, device=input_ids.device)
        positions = (self.mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: real tokens count from 0
        self.last = positions[:, -1]  # [B] position t of the last token
        self.h_base = self.decoder(
            input_ids=input_ids, attention_mask=self.mask, position_ids=positions, cache=self.cache, use_cache=True
        ).last_hidden_state[:, -1]

    def _feed(self, embeds: torch.Tensor, position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One token per row [B, 1, H] at ``position`` [B] onto the cache -> its hidden state [B, H]."""
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=position[:, None], cache=self.cache, use_cache=True)
        return out.last_hidden_state[:, -1]

    def think(self, greedy_thoughts: bool, generator: torch.Generator | None,
              forced: torch.LongTensor | None = None) -> tuple[torch.Tensor, torch.LongTensor]:
        """Think after the last token, then forget the thought.

        ``forced`` [B, M], if given, is the thought (teacher forced) instead of one chosen by the model.
        Returns the talk hidden state [B, H] that predicts x_{t+1}, and the thought [B, M].
        """
        cfg = self.model.config
        if forced is not None and tuple(forced.shape) != (self.batch, cfg.thought_len):
            raise ValueError(f"forced thoughts must be [B, M] = [{self.batch}, {cfg.thought_len}], got {list(forced.shape)}")
        thought = []
        mask = torch.cat([self.mask, self._one], dim=1)
        h = self._feed(self.model.thought_embeddings("start", self.batch, 1), self.last + 1, mask)
        for i in range(cfg.thought_len):
            z = forced[:, i] if forced is not None else choose_tokens(self.lm_head(h), greedy_thoughts, cfg.sample_temperature, generator)
            thought.append(z)
            mask = torch.cat([mask, self._one], dim=1)
            h = self._feed(self.embed(z[:, None]), self.last + 2 + i, mask)
        mask = torch.cat([mask, self._one], dim=1)
        h_thought = self._feed(self.model.thought_embeddings("end", self.batch, 1), self.last + 2 + cfg.thought_len, mask)
        self.cache.crop(-(cfg.thought_len + 2))
        talk, _ = self.model.mixing_head(self.h_base, h_thought)
        return talk, torch.stack(thought, dim=1)

    def append(self, token: torch.LongTensor) -> None:
        """Feed x_{t+1} = ``token`` [B] at position t+1; ``h_base`` then predicts x_{t+2}."""
        self.mask = torch.cat([self.mask, self._one], dim=1)
        self.last = self.last + 1
        self.h_base = self._feed(self.embed(token[:, None]), self.last, self.mask)


@dataclass
class GenerationOutput:
    """sequences: [B, P + N] prompt and new tokens; thoughts: [B, N, M] the thought before each new token (or None)."""

    sequences: torch.LongTensor
    thoughts: torch.LongTensor | None = None


@torch.no_grad()
def generate(
    model: QuietStarModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    thoughts: bool = True,
    greedy: bool = True,
    temperature: float = 1.0,
    greedy_thoughts: bool = False,
    eos_token_id: int | None = None,
    stop_token_ids: Collection[int] = (),
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` tokens after each (left-padded) prompt.

    Args:
        model: a QuietStarModel.
        input_ids: [B, P] prompts; attention_mask: [B, P], 0 on left padding.
        thoughts: think before each token (False: the base model alone).
        greedy: argmax over the (mixed) prediction; else sample at ``temperature``.
        greedy_thoughts: argmax thought tokens; else sample them at the config's
            ``sample_temperature``.
        eos_token_id: rows that emit it stop; their later tokens are ``eos_token_id``.
        stop_token_ids: rows that emit one of these stop too (the stop token is kept);
            needs ``eos_token_id`` to fill their later tokens.
        generator: RNG for every sample.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if stop_token_ids and eos_token_id is None:
        raise ValueError("stop_token_ids needs eos_token_id (it fills the tokens after a row stops)")
    state = ThinkingCache(model, input_ids, attention_mask)
    stops = torch.tensor(sorted(set(stop_token_ids) | ({eos_token_id} if eos_token_id is not None else set())), device=input_ids.device)
    finished = torch.zeros(state.batch, dtype=torch.bool, device=input_ids.device)
    new_tokens, all_thoughts = [], []
    for step in range(max_new_tokens):
        hidden = state.h_base
        if thoughts:
            hidden, thought = state.think(greedy_thoughts, generator)
            all_thoughts.append(thought)
        token = choose_tokens(state.lm_head(hidden), greedy, temperature, generator)  # [B]
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= torch.isin(token, stops)
        new_tokens.append(token)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        state.append(token)
    sequences = torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1) if new_tokens else input_ids
    return GenerationOutput(sequences=sequences, thoughts=torch.stack(all_thoughts, dim=1) if all_thoughts else None)


@dataclass
class ContinuationPrediction:
    """The predictions before each token of a teacher-forced continuation (B rows, T tokens, V vocabulary, M thought length).

    base_logprobs: [B, T, V] log p_base(. | prompt, continuation_<j) at step j.
    talk_logprobs: [B, T, V] the same after a thought and mixing (None without thoughts).
    thoughts: [B, T, M] the thought before each continuation token (None without thoughts).
    """

    base_logprobs: torch.Tensor
    talk_logprobs: torch.Tensor | None = None
    thoughts: torch.LongTensor | None = None


@torch.no_grad()
def predict_continuation(
    model: QuietStarModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    continuation: torch.LongTensor,
    *,
    thoughts: bool = True,
    greedy_thoughts: bool = False,
    forced_thoughts: torch.LongTensor | None = None,
    generator: torch.Generator | None = None,
) -> ContinuationPrediction:
    """Teacher-force ``continuation`` [B, T] after the left-padded prompts and predict each of its tokens.

    Step j predicts continuation[:, j] from the prompt and continuation[:, :j]; with
    ``thoughts`` a fresh thought is sampled before every step, as ``generate`` does, or
    ``forced_thoughts[:, j]`` is thought there when given ([B, T, M]: e.g. another item's
    thoughts, the shuffled-thought control).
    Rows with shorter continuations may pad theirs on the right with any token: the
    predictions after their end are simply not read.
    """
    if continuation.ndim != 2 or continuation.shape[0] != input_ids.shape[0] or continuation.shape[1] == 0:
        raise ValueError(f"continuation must be [B, T] with T >= 1 and the prompts' B, got {list(continuation.shape)}")
    if forced_thoughts is not None and (not thoughts or forced_thoughts.shape[:2] != continuation.shape):
        raise ValueError(f"forced_thoughts must be [B, T, M] for the continuation's [B, T] = {list(continuation.shape)}, "
                         f"with thoughts on; got {list(forced_thoughts.shape)}")
    state = ThinkingCache(model, input_ids, attention_mask)
    base, talk, all_thoughts = [], [], []
    for j in range(continuation.shape[1]):
        base.append(torch.log_softmax(state.lm_head(state.h_base).float(), dim=-1))
        if thoughts:
            hidden, thought = state.think(greedy_thoughts, generator, None if forced_thoughts is None else forced_thoughts[:, j])
            talk.append(torch.log_softmax(state.lm_head(hidden).float(), dim=-1))
            all_thoughts.append(thought)
        if j < continuation.shape[1] - 1:
            state.append(continuation[:, j])
    return ContinuationPrediction(
        base_logprobs=torch.stack(base, dim=1),
        talk_logprobs=torch.stack(talk, dim=1) if thoughts else None,
        thoughts=torch.stack(all_thoughts, dim=1) if thoughts else None,
    )

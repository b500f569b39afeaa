"""The lm-evaluation-harness model ``quietstar``: Quiet-STaR and Coconut models behind lm_eval's ``LM`` interface.

    quietstar lm-eval --model runs/demo/final --tasks quietstar_gsm8k quietstar_csqa --data-dir ../shared/data --limit 200
    lm_eval.simple_evaluate(model=QuietStarLM(pretrained="runs/demo/final", thoughts="off"), tasks=[...])

Importing this module registers the class under the name ``quietstar`` (``lm_eval.api.registry.register_model``).
Model args (``--model_args key=value,...``):

    pretrained       a saved QuietStarModel or CoconutModel dir, a plain HF model dir, or ``smollm2-135m`` (the default)
    thoughts         on | off (default on): think before every scored or generated token (Quiet-STaR)
    thought_samples  N (default 2): loglikelihood averages the probability over N thought draws, as ``quietstar eval``
    greedy_thoughts  true | false (default false): argmax thought tokens instead of sampling them
    latents          N: the continuous thoughts of a Coconut model (default: its config's ``inference_latents``)
    seed             seed of every sampled thought and token (default 0); the numbers depend on it and on batch_size
    batch_size       requests per batch (default 16)
    device           cpu, cuda, cuda:1, ... (default: cuda when available)
    max_length       context limit in tokens (default: the model config's max_position_embeddings, else 2048)
    max_gen_toks     generate_until's length limit for tasks that set none (default 256)
    QuietStarConfig fields, e.g. thought_len=8 (a saved model keeps those that shape its weights)

How each request type maps to this project's evaluation:

    loglikelihood          lm_eval's split of context and continuation (``TemplateLM._encode_pair``), then
                           ``predict_continuation``: the continuation teacher forced after the context, with thoughts a
                           fresh thought before each of its tokens, and the probability of the whole continuation averaged
                           over ``thought_samples`` draws, as ``zero_shot.gold_logprobs`` scores GSM8K. is_greedy: each
                           continuation token maximises that averaged probability of the tokens so far followed by it.
                           Requests sharing the context and all but the last continuation token (the letters of a
                           multiple-choice question) run once, so they read the same thoughts, as ``quietstar eval`` does.
    loglikelihood_rolling  the same over lm_eval's disjoint rolling windows of the document (``get_rolling_token_windows``);
                           with thoughts, each window leaves room for the M + 2 positions of its last thought.
    generate_until         ``quiet_star.generation.generate`` (greedy unless the task sets ``do_sample``), stopped at EOS, at
                           ``max_gen_toks`` or at a token whose text contains a stop string, then cut before the first one.

A Coconut model answers after its continuous thoughts: the context is laid out as its inference prompt
(``curriculum.inference_prompt``: context, newline, ``<bot>``, N latents, ``<eot>``), generate_until runs
``coconut.generation.generate`` on it, and loglikelihood scores the continuation, tokenized on its own, after ``<eot>``.
Perplexity (loglikelihood_rolling) is refused for Coconut: its thoughts come between a question and an answer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from quietstar.coconut.config import CoconutConfig
from quietstar.coconut.curriculum import collate, collate_prompts, encode, inference_prompt
from quietstar.coconut.generation import generate as coconut_generate
from quietstar.coconut.model import IGNORE, CoconutModel
from quietstar.core.loading import is_saved, load_model
from quietstar.core.offline import SMOLLM2, locate_model
from quietstar.core.text_data import pad_rows
from quietstar.evaluation.coconut import load_for_eval
from quietstar.quiet_star.config import QuietStarConfig
from quietstar.quiet_star.generation import generate, predict_continuation
from quietstar.quiet_star.model import QuietStarModel

MODEL_ARGS = ("pretrained", "thoughts", "thought_samples", "greedy_thoughts", "latents", "seed", "batch_size", "device",
              "max_length", "max_gen_toks")
WEIGHT_FIELDS = ("mixing_head_layers", "mixing_head_width", "marker_init_text", "end_marker_init_text")  # fixed by a saved model's weights
GENERATION_ARGS = ("until", "max_gen_toks", "do_sample", "temperature")
DEFAULT_MAX_LENGTH = 2048
logger = logging.getLogger(__name__)

# One scoring request: (its strings, None for a rolling window), context ids, continuation ids.
Request = tuple[tuple[str, str] | None, list[int], list[int]]


def _switch(value: object, name: str) -> bool:
    """A model arg given as on/off or true/false (lm_eval turns the latter into bools)."""
    text = str(value).lower()
    if text not in ("on", "off", "true", "false", "1", "0"):
        raise ValueError(f"quietstar model arg {name}={value!r}: expected on or off")
    return text in ("on", "true", "1")


def _count(value: object, name: str, minimum: int) -> int:
    """A model arg that must be an integer >= ``minimum`` (lm_eval passes numbers as int, the CLI's batch size as str)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"quietstar model arg {name}={value!r}: expected an integer >= {minimum}")
    return value


def _pick_device(name: str | None) -> torch.device:
    """``name``; without one, CUDA when available, else the CPU.

    lm_eval's CLI asks for cuda:0 unless told otherwise, so a CUDA device on a machine without CUDA becomes the CPU.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("quietstar: device %s asked for, but CUDA is not available; running on the CPU", name)
        return torch.device("cpu")
    return torch.device(name)


def _load_quietstar(pretrained: str, overrides: dict) -> QuietStarModel:
    """``load_model`` with the QuietStarConfig ``overrides``: the config of a plain model, or changes to a saved model's."""
    config = QuietStarConfig(**overrides)  # validates them
    saved = is_saved(locate_model(pretrained), QuietStarModel)
    fixed = sorted(set(overrides) & set(WEIGHT_FIELDS)) if saved else []
    if fixed:
        raise ValueError(f"quietstar: {', '.join(fixed)} of a saved QuietStarModel are fixed by its weights")
    model = load_model(QuietStarModel, pretrained, config)
    if saved:
        model.config = dataclasses.replace(model.config, **overrides)
    return model


def continuation_score(steps: torch.Tensor, tokens: list[int]) -> tuple[float, bool]:
    """(log P(tokens), is_greedy) from the log-probs of each step in each thought draw, ``steps`` [T, S, V].

    Draw s gives the continuation the product of its steps' probabilities; P is the mean over the S draws.
    is_greedy: at every step j, ``tokens[j]`` maximises P(tokens[:j] followed by the token).
    """
    draws = steps.shape[1]
    target = torch.tensor(tokens, device=steps.device)
    picked = steps.gather(2, target[:, None, None].expand(-1, draws, 1)).squeeze(2)  # [T, S]
    before = picked.cumsum(dim=0) - picked  # [T, S]: log P_s(tokens[:j])
    joint = torch.logsumexp(before[:, :, None] + steps, dim=1)  # [T, V]: log sum_s P_s(tokens[:j], v)
    greedy = bool((joint.argmax(dim=1) == target).all())
    return float(torch.logsumexp(picked.sum(dim=0), dim=0) - math.log(draws)), greedy


@dataclass(frozen=True)
class GenerationSettings:
    """One task's generation arguments: stop strings, a length limit, and the sampling temperature (None: greedy)."""

    until: tuple[str, ...]
    max_new_tokens: int
    temperature: float | None

    @classmethod
    def from_kwargs(cls, kwargs: dict, default_max_new_tokens: int) -> "GenerationSettings":
        unknown = sorted(set(kwargs) - set(GENERATION_ARGS))
        if unknown:
            raise ValueError(f"quietstar generate_until: unsupported generation argument(s) {', '.join(unknown)}; "
                             f"supported: {', '.join(GENERATION_ARGS)}")
        until = kwargs.get("until") or ()
        until = tuple(s for s in ([until] if isinstance(until, str) else until) if s)
        max_new = _count(kwargs.get("max_gen_toks", default_max_new_tokens), "max_gen_toks", 1)
        temperature = float(kwargs.get("temperature", 1.0))
        sample = bool(kwargs.get("do_sample", False)) and temperature > 0
        return cls(until, max_new, temperature if sample else None)

    def cut(self, text: str) -> str:
        """``text`` up to the first stop string."""
        ends = [text.find(s) for s in self.until if s in text]
        return text[: min(ends)] if ends else text


@register_model("quietstar")
class QuietStarLM(TemplateLM):
    """A QuietStarModel (or a CoconutModel) as an lm_eval ``LM``; the model args are listed in the module docstring."""

    def __init__(self, pretrained: str = SMOLLM2, thoughts: bool | str | None = None, thought_samples: int | None = None,
                 greedy_thoughts: bool | str = False, latents: int | None = None, seed: int = 0, batch_size: int | str = 16,
                 device: str | None = None, max_length: int | None = None, max_gen_toks: int = 256, **overrides) -> None:
        super().__init__()
        fields = {f.name for f in dataclasses.fields(QuietStarConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"quietstar: unknown model arg(s) {', '.join(unknown)}; known: {', '.join(MODEL_ARGS)} "
                             "and the QuietStarConfig fields")
        self.batch_size = _count(batch_size, "batch_size", 1)
        self.max_gen_toks = _count(max_gen_toks, "max_gen_toks", 1)
        self.greedy_thoughts = _switch(greedy_thoughts, "greedy_thoughts")
        self._device = _pick_device(device)
        self.generator = torch.Generator(device=self._device).manual_seed(_count(seed, "seed", 0))
        path = locate_model(pretrained)
        coconut = is_saved(path, CoconutModel)
        if coconut and (thoughts is not None or thought_samples is not None or overrides):
            raise ValueError("quietstar: thoughts, thought_samples and QuietStarConfig fields are Quiet-STaR settings; "
                             "a Coconut model takes latents=N")
        if not coconut and latents is not None:
            raise ValueError(f"quietstar: latents is a Coconut setting, and {pretrained!r} is not a saved CoconutModel")
        self.thinks = not coconut and _switch("on" if thoughts is None else thoughts, "thoughts")
        samples = _count(2 if thought_samples is None else thought_samples, "thought_samples", 1)
        self.thought_samples = samples if self.thinks else 1
        self.coconut: CoconutConfig | None = None
        if coconut:
            latents = None if latents is None else _count(latents, "latents", 0)
            model, _, self.coconut = load_for_eval(pretrained, latents, cot=False)
        else:
            model = _load_quietstar(pretrained, overrides)
        self.thought_room = model.config.thought_len + 2 if self.thinks else 0  # <sot>, z_1..z_M, <eot> after the last token
        self.model = model.to(self._device).eval()
        self.tokenizer = model.tokenizer
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"quietstar: the tokenizer of {pretrained!r} has no EOS token; generation needs one")
        config = model.lm.config
        self.max_length = _count(max_length if max_length is not None else getattr(config, "max_position_embeddings", None)
                                 or getattr(config, "n_positions", None) or DEFAULT_MAX_LENGTH, "max_length", 1)
        self._vocabulary: list[str] | None = None

    # --- tokens ---------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes: BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of ``string``, with the tokenizer's own special tokens unless ``add_special_tokens`` is False."""
        return self.tokenizer(string, add_special_tokens=True if add_special_tokens is None else add_special_tokens)["input_ids"]

    def _prompt(self, context: str) -> list[int]:
        """The ids the model reads for ``context``: its tokens, or for Coconut its inference prompt with the latents."""
        if self.coconut is None:
            return self.tok_encode(context)
        return encode(inference_prompt(context, self.coconut), self.tokenizer, with_answer=False)[0]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm_eval's split (``TemplateLM._encode_pair``); for Coconut the inference prompt and the continuation's own tokens."""
        if self.coconut is None:
            return super()._encode_pair(context, continuation)
        return self._prompt(context), self.tok_encode(continuation, add_special_tokens=False)

    def _fit(self, context: list[int], new_tokens: int) -> list[int]:
        """``context`` left-truncated so that it and ``new_tokens`` more fit in ``max_length`` positions.

        The last new token is predicted, not fed, and a thought after the last fed token takes ``thought_room`` more
        positions: len(context) + new_tokens <= max_length + 1 - thought_room. A Coconut prompt is never truncated
        (its latents would move); one that does not fit fails.
        """
        room = self.max_length + 1 - self.thought_room - new_tokens
        if room < 1 or (self.coconut is not None and len(context) > room):
            raise ValueError(f"quietstar: {len(context)} context and {new_tokens} new tokens do not fit "
                             f"max_length={self.max_length}"
                             + (f" with a thought of {self.thought_room} positions" if self.thought_room else ""))
        return context[-room:]

    # --- loglikelihood ----------------------------------------------------------------------------------

    def _step_logprobs(self, contexts: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
        """Log-probs before each continuation token in each draw: [B, T, S, V] (T the longest continuation, S draws)."""
        if self.coconut is not None:
            return self._coconut_step_logprobs(contexts, continuations)[:, :, None]
        ids, mask = pad_rows(contexts, self.pad_id, left=True)
        continuation, _ = pad_rows(continuations)  # right padded: the steps after a row's end are not read
        samples = self.thought_samples
        ids, mask, continuation = (t.repeat_interleave(samples, 0).to(self._device) for t in (ids, mask, continuation))
        pred = predict_continuation(self.model, ids, mask, continuation, thoughts=self.thinks,
                                    greedy_thoughts=self.greedy_thoughts, generator=self.generator)
        logprobs = pred.talk_logprobs if self.thinks else pred.base_logprobs  # [B * S, T, V], each item's draws together
        return logprobs.view(len(contexts), samples, *logprobs.shape[1:]).transpose(1, 2)

    @torch.no_grad()
    def _coconut_step_logprobs(self, contexts: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
        """[B, T, V]: one Coconut forward over prompt + continuation[:-1] (``curriculum.collate`` aligns the latents)."""
        rows = [(c + t[:-1], [IGNORE] * (len(c) + len(t) - 1)) for c, t in zip(contexts, continuations)]
        batch = collate(rows, self.pad_id)
        ids, mask = batch["input_ids"].to(self._device), batch["attention_mask"].to(self._device)
        hidden = self.model.hidden_states(ids, mask)  # [B, L, H]
        steps = max(len(t) for t in continuations)
        first = mask.argmax(dim=1)  # each row's first real column
        offsets = torch.tensor([len(c) - 1 for c in contexts], device=self._device)
        columns = (first + offsets)[:, None] + torch.arange(steps, device=self._device)  # [B, T]: the column before each token
        picked = hidden.gather(1, columns.clamp(max=ids.shape[1] - 1)[..., None].expand(-1, -1, hidden.shape[-1]))
        return torch.log_softmax(self.model.lm.get_output_embeddings()(picked).float(), dim=-1)

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is_greedy) of each request, in the requests' order.

        Longest first in batches of ``batch_size`` (``Collator``, as HFLM); a group of requests with the same
        context + continuation[:-1] runs once and each member reads its own last token.
        """
        requests = [(strings, self._fit(context, len(continuation)), continuation) for strings, context, continuation in requests]
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])),
                            group_by="contexts", group_fn=lambda r: r[1] + r[2][:-1])
        results = []
        bar = tqdm(total=len(requests), desc="quietstar loglikelihood", disable=disable_tqdm)
        for chunk in collator.get_batched(n=self.batch_size):
            steps = self._step_logprobs([r[1] for r in chunk], [r[2] for r in chunk])
            for (strings, context, continuation), row in zip(chunk, steps):
                draws = row[: len(continuation)]  # [T, S, V], flattened below so that get_cache can hand it to the group
                for strings, tokens, shared in collator.get_cache(req_str=strings, cxt_toks=context, cont_toks=continuation,
                                                                   logits=draws.flatten(1)[None]):
                    answer = continuation_score(shared[0, -len(tokens):].view(len(tokens), *draws.shape[1:]), tokens)
                    if strings is not None:
                        self.cache_hook.add_partial("loglikelihood", strings, answer)
                    results.append(answer)
                    bar.update(1)
        bar.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """log P(document) of each request: the sum over its disjoint rolling windows of ``max_length`` tokens."""
        if self.coconut is not None:
            raise ValueError("quietstar: loglikelihood_rolling (perplexity) is not defined for a Coconut model, "
                             "whose thoughts come between a question and its answer")
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - self.thought_room, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generation ------------------------------------------------------------------------------------

    def _stop_token_ids(self, until: tuple[str, ...]) -> list[int]:
        """The tokens whose text contains a stop string (a row stops on them; stop strings across tokens are cut later)."""
        if self._vocabulary is None:
            self._vocabulary = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        return [i for i, text in enumerate(self._vocabulary) if any(s in text for s in until)]

    def _complete(self, prompts: list[list[int]], settings: GenerationSettings) -> list[str]:
        """The text generated after each prompt, up to EOS and before the first stop string."""
        eos = self.eot_token_id
        if self.coconut is not None:
            batch = collate_prompts(prompts, self.pad_id)
            rows = coconut_generate(self.model, batch["input_ids"].to(self._device), batch["attention_mask"].to(self._device),
                                    settings.max_new_tokens, temperature=settings.temperature or 0.0, generator=self.generator,
                                    stop_strings=settings.until).tokens
        else:
            ids, mask = pad_rows(prompts, self.pad_id, left=True)
            out = generate(self.model, ids.to(self._device), mask.to(self._device), max_new_tokens=settings.max_new_tokens,
                           thoughts=self.thinks, greedy=settings.temperature is None, temperature=settings.temperature or 1.0,
                           greedy_thoughts=self.greedy_thoughts, eos_token_id=eos,
                           stop_token_ids=self._stop_token_ids(settings.until), generator=self.generator)
            rows = [row[: row.index(eos)] if eos in row else row for row in out.sequences[:, ids.shape[1]:].tolist()]
        return [settings.cut(self.tokenizer.decode(row, skip_special_tokens=True)) for row in rows]

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """The completion of each request's context under its generation arguments, in the requests' order.

        Requests are grouped by their arguments and batched longest first (``Collator``, as HFLM).
        """
        entries = [(context, kwargs, self._prompt(context)) for context, kwargs in (request.args for request in requests)]
        collator = Collator(entries, sort_fn=lambda e: (-len(e[2]), e[0]), group_by="gen_kwargs", group_fn=lambda e: e[1])
        results = []
        bar = tqdm(total=len(requests), desc="quietstar generate_until", disable=disable_tqdm)
        for chunk in collator.get_batched(n=self.batch_size):
            settings = GenerationSettings.from_kwargs(chunk[0][1], self.max_gen_toks)
            texts = self._complete([self._fit(prompt, settings.max_new_tokens) for _, _, prompt in chunk], settings)
            for (context, kwargs, _), text in zip(chunk, texts):
                self.cache_hook.add_partial("generate_until", (context, kwargs), text)
                results.append(text)
                bar.update(1)
        bar.close()
        return collator.get_original(results)

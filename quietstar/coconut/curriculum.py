"""The curriculum: which language steps an example keeps and how many latents replace the others, per stage and mode.

An example ``{question, steps, answer}`` becomes, at stage k of ``mode='coconut'``:

    question \\n <bot> [latent] x (k * c) <eot> step_{k+1} \\n ... step_n \\n ### answer <eos>

Stage 0 keeps every step (CoT with an empty thought). Past ``max_latent_stage`` every
step is removed and ``max_latent_stage * c`` latents are kept. Without
``pad_latent_to_max``, an example with fewer steps than its stage gets one set of c
latents per step it has. The paper's baselines are modes of the same transform:

    cot               question \\n steps ### answer              (stage 0, no markers)
    no_cot            question \\n ### answer
    no_curriculum     the last stage from the first epoch
    no_thought        the curriculum's removal of steps, <bot><eot> with no latents
    pause_as_thought  the curriculum with <pause> embeddings in place of the latents
    pause_token       question \\n <pause> x (max_latent_stage * c) ### answer, no curriculum

The loss is masked (label ``IGNORE``) over the question, the markers and the latents;
it covers the remaining steps, the answer and EOS.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from quietstar.coconut.config import CoconutConfig
from quietstar.coconut.data import Example
from quietstar.coconut.markers import BOT, EOT, LATENT, PAUSE
from quietstar.coconut.model import IGNORE

CURRICULUM_MODES = ("coconut", "no_thought", "pause_as_thought", "no_curriculum")


@dataclass(frozen=True)
class Layout:
    """What one example shows the model: its question, the thought between the markers, the steps left, its answer.

    thought: placeholders between ``<bot>`` and ``<eot>`` (LATENT or PAUSE), or after the question when
        ``markers`` is False (``pause_token``).
    """

    question: str
    markers: bool
    thought: tuple[int, ...]
    steps: tuple[str, ...]
    answer: str


def epoch_stage(epoch: int, config: CoconutConfig) -> int:
    """The curriculum stage of an epoch (0-based): ``epoch // epochs_per_stage``, at most ``max_latent_stage + 1``
    (every stage past ``max_latent_stage`` has the same layout, so it is one stage and the optimizer is not reset
    again); the last stage for ``no_curriculum``."""
    if config.mode == "no_curriculum":
        return config.max_latent_stage + 1
    if config.mode in CURRICULUM_MODES:
        return min(epoch // config.epochs_per_stage, config.max_latent_stage + 1)
    return 0


def example_stage(example: Example, stage: int, config: CoconutConfig, rng: random.Random) -> int:
    """The stage one training example takes: the epoch's, or with ``uniform_prob`` a random one in 0..its step count."""
    if config.mode in CURRICULUM_MODES and config.uniform_prob > 0 and rng.random() < config.uniform_prob:
        return rng.randint(0, len(example.steps))
    return stage


def layout(example: Example, stage: int, config: CoconutConfig) -> Layout:
    """The layout of ``example`` at curriculum ``stage`` in ``config.mode``."""
    steps = tuple(example.steps)
    if config.mode == "cot":
        return Layout(example.question, False, (), steps, example.answer)
    if config.mode == "no_cot":
        return Layout(example.question, False, (), (), example.answer)
    if config.mode == "pause_token":
        return Layout(example.question, False, (PAUSE,) * (config.max_latent_stage * config.c), (), example.answer)
    if stage > config.max_latent_stage:
        removed = len(steps)
        replaced = config.max_latent_stage if config.pad_latent_to_max else min(len(steps), config.max_latent_stage)
    else:
        removed = min(stage, len(steps))
        replaced = stage if config.pad_latent_to_max else removed
    kind = PAUSE if config.mode == "pause_as_thought" else LATENT
    n = 0 if config.mode == "no_thought" else replaced * config.c
    return Layout(example.question, True, (kind,) * n, steps[removed:], example.answer)


def inference_prompt(question: str, config: CoconutConfig) -> Layout:
    """The prompt at inference: the question, then ``inference_latents`` thoughts in the mode's form; no steps, no answer."""
    n = config.inference_latents
    if config.mode in ("cot", "no_cot"):
        return Layout(question, False, (), (), "")
    if config.mode == "pause_token":
        return Layout(question, False, (PAUSE,) * n, (), "")
    if config.mode == "no_thought":
        return Layout(question, True, (), (), "")
    return Layout(question, True, ((PAUSE if config.mode == "pause_as_thought" else LATENT),) * n, (), "")


def encode(item: Layout, tokenizer, with_answer: bool = True) -> tuple[list[int], list[int]]:
    """(ids, labels) of a layout; with ``with_answer=False``, the prompt only (question, markers and thought).

    The pieces are tokenized apart: ``question + "\\n"`` (with the tokenizer's own special
    tokens, e.g. a BOS), each ``step + "\\n"``, ``"### " + answer``, then EOS.
    """
    ids = tokenizer(item.question + "\n")["input_ids"]
    if item.markers:
        ids = ids + [BOT, *item.thought, EOT]
    else:
        ids = ids + list(item.thought)
    labels = [IGNORE] * len(ids)
    if with_answer:
        for text in [step + "\n" for step in item.steps] + ["### " + item.answer]:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch encoded rows: left-pad so that every row's first latent falls in one column, then right-pad.

    Returns ``input_ids``, ``attention_mask`` and ``labels``, each [B, L]; padding has mask 0 and
    label ``IGNORE``. Rows without latents are only right-padded.
    """
    firsts = [ids.index(LATENT) if LATENT in ids else None for ids, _ in rows]
    column = max((f for f in firsts if f is not None), default=0)
    lefts = [column - f if f is not None else 0 for f in firsts]
    length = max(left + len(ids) for left, (ids, _) in zip(lefts, rows))
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    for b, (left, (ids, labs)) in enumerate(zip(lefts, rows)):
        input_ids[b, left:left + len(ids)] = torch.tensor(ids)
        mask[b, left:left + len(ids)] = 1
        labels[b, left:left + len(labs)] = torch.tensor(labs)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def collate_prompts(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts to one length (so they end, and their latents sit, in the same columns): ids and mask [B, L]."""
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, length - len(p):] = torch.tensor(p)
        mask[b, length - len(p):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}

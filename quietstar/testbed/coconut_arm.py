"""The testbed's Coconut arm: the paper's Table 1 rows, trained from the same base on the task's steps.

A problem is the Coconut example ``{question: "a=1;...;e?", steps: ["b9", "c6", "d2", "e6"], answer: "6"}``;
one hop is one language step, replaced by c continuous thoughts (``coconut_latents_per_step``) per curriculum stage
(``max_latent_stage = hops``, so the last stage reasons in latents only). The rows are modes of
``coconut.curriculum``: ``cot``, ``no_cot``, ``coconut``, ``no_curriculum``, ``pause_as_thought``.
Every row trains for the same number of epochs: one per curriculum stage, plus one more at the last.
Scores are the paper's: greedy answers (the text after the last ``#``), and the generated tokens,
latents and pauses included (``evaluation.coconut.evaluate``).
"""

from __future__ import annotations

import random
import time

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from quietstar.coconut.config import CoconutConfig
from quietstar.coconut.curriculum import collate, encode, epoch_stage, example_stage, layout
from quietstar.coconut.data import Example
from quietstar.coconut.model import CoconutModel
from quietstar.core.optim import build_param_groups
from quietstar.evaluation.coconut import evaluate
from quietstar.testbed.config import TestbedConfig
from quietstar.testbed.task import OPEN, Problem
from quietstar.testbed.tokenizer import char_tokenizer


def row_config(cfg: TestbedConfig, row: str) -> CoconutConfig:
    """The CoconutConfig of a row: c latents per hop, one stage per hop of the hardest problems, markers starting at
    ``[``; an easier problem gets as many latents as its stage (``pad_latent_to_max``, as the paper trains ProsQA,
    whose problems also differ in steps), so training and inference (``max_latent_stage * c`` latents) agree."""
    return CoconutConfig(mode=row, c=cfg.coconut_latents_per_step, max_latent_stage=cfg.hops,
                         epochs_per_stage=cfg.coconut_epochs_per_stage, pad_latent_to_max=True, marker_init_text=OPEN)


def epochs(cfg: TestbedConfig) -> int:
    """Epochs of every row: one per stage (0..hops and the latent-only stage), ``epochs_per_stage`` each."""
    return (cfg.hops + 2) * cfg.coconut_epochs_per_stage


def example(problem: Problem) -> Example:
    return Example(problem.question, problem.steps, problem.answer)


def train_row(cfg: TestbedConfig, row: str, base_dir, train: list[Problem], seed: int,
              desc: str) -> tuple[CoconutModel, list[dict]]:
    """Train one row from the base in ``base_dir`` on ``coconut_train_problems`` problems: the model and a per-epoch log."""
    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    method = row_config(cfg, row)
    model = CoconutModel(AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="sdpa"), tokenizer, method).train()
    examples = [example(p) for p in train[: cfg.coconut_train_problems]]
    steps_per_epoch = len(examples) // cfg.coconut_batch_size
    log, optimizer, started = [], None, time.perf_counter()
    for epoch in tqdm(range(epochs(cfg)), desc=desc, leave=False):
        stage = epoch_stage(epoch, method)
        if optimizer is None or stage != epoch_stage(epoch - 1, method):  # the paper resets AdamW at each stage
            optimizer = torch.optim.AdamW(build_param_groups(model, cfg.coconut_lr, 0.01))
        order = random.Random(f"{seed}/{epoch}").sample(range(len(examples)), len(examples))
        rng = random.Random(f"{seed}/{epoch}/stages")
        losses = []
        for index in range(steps_per_epoch):
            chosen = [examples[i] for i in order[index * cfg.coconut_batch_size:(index + 1) * cfg.coconut_batch_size]]
            rows = [encode(layout(e, example_stage(e, stage, method, rng), method), tokenizer) for e in chosen]
            out = model(**collate(rows, tokenizer.pad_token_id))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
        log.append({"epoch": epoch, "stage": stage, "loss": sum(losses) / len(losses), "seconds": time.perf_counter() - started})
    return model.eval(), log


@torch.no_grad()
def measure(model: CoconutModel, items: list[Problem]) -> dict[str, list]:
    """Per-item greedy correctness and generated tokens (latents and pauses counted, as the paper counts them)."""
    max_new = 3 * max(p.hops for p in items) + 8  # CoT writes "b9\n" per hop, then "### 6" and <eos>
    records, _ = evaluate(model, "coconut", model.config, [example(p) for p in items], batch_size=100,
                          max_new_tokens=max_new, device=torch.device("cpu"), progress=False)
    return {"correct": [r["correct"] for r in records], "generated_tokens": [r["generated_tokens"] for r in records],
            "output": [r["output"] for r in records]}

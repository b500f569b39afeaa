"""The testbed's Quiet-STaR arm: continued pretraining of the base on unworked documents, then the held-out measurements.

A row fixes the markers and the objective (``ROWS``); ``train_row`` runs it for ``qs_steps`` steps from the
cached base, and ``measure`` scores the answer token of every held-out problem (the token after ``?``) through
the library's inference path (``quiet_star.generation.ThinkingCache``: the question on a KV cache, a thought at
``?``, the mixed prediction of the answer):

- answer NLL of the base prediction, of the talk prediction after the model's own sampled thoughts, after its
  greedy thought, after another problem's sampled thoughts (shuffled: the control), and after the true chain
  (the oracle thought);
- greedy answer accuracy without thoughts (the LM alone) and with the greedy thought, paired on the same problems;
- what the greedy thought at ``?`` holds: the exact chain, and the share of intermediate values it states correctly.

Everything is per item, so rows and seeds can be compared pairwise (``testbed.table``).
"""

from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, get_constant_schedule_with_warmup

from quietstar.core.optim import build_param_groups
from quietstar.quiet_star.config import QuietStarConfig
from quietstar.quiet_star.diagnostics import gradient_norms
from quietstar.quiet_star.generation import ThinkingCache
from quietstar.quiet_star.model import QuietStarModel
from quietstar.testbed.base_lm import document_batch
from quietstar.testbed.config import TestbedConfig
from quietstar.testbed.task import CLOSE, OPEN, Problem, iter_documents
from quietstar.testbed.tokenizer import char_tokenizer

# Marker starting texts of each row: (<sot>, <eot>); None keeps QuietStarConfig's default.
ROWS = {
    "delimiters": (OPEN, CLOSE),
    "default_markers": (None, None),
    "task_markers": ("b", CLOSE),  # every chain starts with the second variable, b: task-specific
    "oracle": (OPEN, CLOSE),
    "reference_objective": (OPEN, CLOSE),
}
# The reference code's objective, as launch/configs/paper.yaml sets it.
REFERENCE_OBJECTIVE = dict(loss_reduction="reference", policy_temperature=3.0, base_loss_weight=0.5, talk_loss_weight=0.5,
                           policy_loss_weight=1e6, mixing_head_layers=2, mixing_head_width=None)


def row_config(cfg: TestbedConfig, row: str) -> QuietStarConfig:
    """The QuietStarConfig of a row (markers, objective) at the testbed's M, K, R and marker multiplier."""
    start, end = ROWS[row]
    markers = {} if start is None else {"marker_init_text": start, "end_marker_init_text": end}
    objective = REFERENCE_OBJECTIVE if row == "reference_objective" else {}
    return QuietStarConfig(thought_len=cfg.thought_len, n_true=cfg.qs_n_true, n_thoughts=cfg.qs_n_thoughts,
                           thought_lr_multiplier=cfg.qs_marker_lr_multiplier, **markers, **objective)


def oracle_thoughts(problems: list[Problem], ids: torch.LongTensor, cfg: QuietStarConfig, tokenizer) -> torch.LongTensor:
    """[B, L, R, M]: every position of row b thinks problem b's true chain (cut to M tokens; past the chain, ``]``,
    the answer, then ``<eos>``)."""
    rows = []
    for p in problems:
        tokens = tokenizer(p.chain + CLOSE + p.answer, add_special_tokens=False)["input_ids"][: cfg.thought_len]
        rows.append(tokens + [tokenizer.eos_token_id] * (cfg.thought_len - len(tokens)))
    chains = torch.tensor(rows)  # [B, M]
    return chains[:, None, None, :].expand(ids.shape[0], ids.shape[1], cfg.n_thoughts, cfg.thought_len).contiguous()


def answer_position(problem: Problem) -> int:
    """The index of ``?``: the position whose next token is the answer."""
    return len(problem.question) - 1


def marker_drift(model: QuietStarModel, init: dict[str, torch.Tensor]) -> dict[str, float]:
    """How far each marker moved from its start: ``|now - start| / |start|``."""
    out = {}
    for name, vector in (("sot", model.start_embedding), ("eot", model.end_embedding)):
        out[f"{name}_drift"] = float((vector.detach() - init[name]).norm() / init[name].norm().clamp(min=1e-12))
    return out


def fresh_model(cfg: TestbedConfig, row: str, base_dir, seed: int) -> QuietStarModel:
    """The base in ``base_dir`` wrapped with the row's markers and a new mixing head (seeded): talk == base."""
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="sdpa")
    return QuietStarModel(lm, char_tokenizer(), row_config(cfg, row)).eval()


def train_row(cfg: TestbedConfig, row: str, base_dir, train: list[Problem], probe: list[Problem], seed: int,
              desc: str) -> tuple[QuietStarModel, list[dict]]:
    """Quiet-STaR continued pretraining of the base in ``base_dir`` on unworked documents: the model and a log.

    The log has a record at step 1 and every ``max(1, qs_steps // 10)`` steps: losses, reward, the mixing weight at
    the answer, the markers' drift, the policy/LM gradient norms (``quiet_star.diagnostics``), and the mean answer
    NLLs (``answer_scores``) of the held-out ``probe`` problems (one probe of 100 problems took 12 s with both cores busy,
    several training steps).
    """
    model = fresh_model(cfg, row, base_dir, seed).train()
    tokenizer, method = model.tokenizer, model.config
    init = {"sot": model.start_embedding.detach().clone(), "eot": model.end_embedding.detach().clone()}
    optimizer = torch.optim.AdamW(build_param_groups(model, cfg.qs_lr, 0.0))
    schedule = get_constant_schedule_with_warmup(optimizer, max(1, cfg.qs_steps // 15))
    by_question = {p.unworked: p for p in train}
    documents = iter_documents(train, 0.0, seed)
    generator = torch.Generator().manual_seed(seed)
    every, log, started = max(1, cfg.qs_steps // 10), [], time.perf_counter()
    for step in tqdm(range(1, cfg.qs_steps + 1), desc=desc, leave=False, mininterval=10):
        texts = [next(documents) for _ in range(cfg.qs_batch_size)]
        batch = document_batch(texts, tokenizer)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        thoughts = oracle_thoughts([by_question[t] for t in texts], ids, method, tokenizer) if row == "oracle" else None
        if row != "oracle" and (step == 1 or step % every == 0):  # an extra forward and two backwards
            grads = gradient_norms(model, ids, mask, torch.Generator().manual_seed(seed + step))
        else:
            grads = {}
        out = model(ids, mask, thoughts=thoughts, generator=generator)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % every == 0:
            q = answer_position(by_question[texts[0]])
            held_out = answer_scores(model, probe, torch.Generator().manual_seed(seed))
            held_out.pop("greedy_thought")
            probe_means = {f"probe_{k}": sum(map(float, v)) / len(v) for k, v in held_out.items()}
            log.append({"step": step, **out.metrics(), "answer_mixing_weight": float(out.mixing_weights[:, q, :, 0].mean()),
                        **marker_drift(model, init), **grads, **probe_means, "seconds": time.perf_counter() - started})
    return model.eval(), log


def _logprob(state: ThinkingCache, hidden: torch.Tensor, gold: torch.LongTensor) -> torch.Tensor:
    """log p(gold) [B] of the prediction read from ``hidden`` [B, H]."""
    return torch.log_softmax(state.lm_head(hidden).float(), dim=-1).gather(-1, gold[:, None])[:, 0]


@torch.no_grad()
def answer_scores(model: QuietStarModel, chunk: list[Problem], generator: torch.Generator) -> dict[str, list]:
    """The answer-token measurements of one batch of problems of one hop count, each a list over ``chunk``.

    All on one KV cache of the questions (``quiet_star.generation.ThinkingCache``, the library's inference path),
    thinking at ``?`` several times: R sampled thoughts (their NLL is that of the mean probability: the thoughts as a
    mixture), the same thoughts moved to the next problem of the batch (shuffled), the true chain (oracle), and the
    greedy thought, which also gives the greedy answer with and without thinking: the most likely of the ten digits
    (the base LM puts most of its mass on opening an aside, ``[``, which is no answer).
    """
    tokenizer, cfg = model.tokenizer, model.config
    q = answer_position(chunk[0])
    if any(answer_position(p) != q for p in chunk):
        raise ValueError("the problems of a batch must have one question length (one hop count)")
    ids = document_batch([p.question for p in chunk], tokenizer)["input_ids"][:, : q + 1]  # the questions, no <eos>
    gold = torch.tensor([tokenizer.convert_tokens_to_ids(p.answer) for p in chunk])
    state = ThinkingCache(model, ids)
    base = torch.log_softmax(state.lm_head(state.h_base).float(), dim=-1)
    own, shuffled = [], []
    for _ in range(cfg.n_thoughts):
        hidden, thought = state.think(False, generator)
        own.append(_logprob(state, hidden, gold))
        shuffled.append(_logprob(state, state.think(False, None, forced=thought.roll(1, dims=0))[0], gold))
    oracle = oracle_thoughts(chunk, ids[:, :1], cfg, tokenizer)[:, 0, 0]  # [B, M]
    oracle_logprob = _logprob(state, state.think(False, None, forced=oracle)[0], gold)
    greedy_hidden, greedy_thought = state.think(True, None)
    greedy = torch.log_softmax(state.lm_head(greedy_hidden).float(), dim=-1)
    digits = torch.tensor(tokenizer.convert_tokens_to_ids(list("0123456789")))
    answered = lambda logprobs: (digits[logprobs[:, digits].argmax(-1)] == gold).tolist()  # noqa: E731
    mixture = lambda logprobs: -(torch.logsumexp(torch.stack(logprobs), dim=0) - math.log(len(logprobs)))  # noqa: E731
    return {"base_nll": (-base.gather(-1, gold[:, None])[:, 0]).tolist(), "own_sampled_nll": mixture(own).tolist(),
            "shuffled_nll": mixture(shuffled).tolist(), "oracle_nll": (-oracle_logprob).tolist(),
            "own_greedy_nll": (-greedy.gather(-1, gold[:, None])[:, 0]).tolist(),
            "correct_no_thought": answered(base), "correct_thought": answered(greedy),
            "greedy_thought": greedy_thought.tolist()}


@torch.no_grad()
def measure(model: QuietStarModel, items: list[Problem], seed: int, batch_size: int = 100) -> dict[str, list]:
    """Per-item measurements of the answer token of ``items`` (``answer_scores``, batched by hop count) and the greedy
    thought at ``?`` as text (``thought``); every list is len(items), in the order of ``items``.

    A thought is written together with the text ``<sot>`` started as (``[`` holds nothing; the task row's ``b`` is
    the chain's first character), so ``task.chain_content`` reads it the same way for every row.
    """
    tokenizer, cfg = model.tokenizer, model.config
    generator = torch.Generator().manual_seed(seed)
    opened = cfg.marker_init_text if cfg.marker_init_text.isalnum() else ""
    out: dict[str, list] = {}
    positions: list[int] = []
    for hops in sorted({p.hops for p in items}):  # a batch holds one question length
        index = [i for i, p in enumerate(items) if p.hops == hops]
        for start in range(0, len(index), batch_size):
            chunk = index[start:start + batch_size]
            scores = answer_scores(model, [items[i] for i in chunk], generator)
            scores["thought"] = [opened + tokenizer.decode(t, skip_special_tokens=False) for t in scores.pop("greedy_thought")]
            for name, values in scores.items():
                out.setdefault(name, []).extend(values)
            positions += chunk
    order = sorted(range(len(positions)), key=positions.__getitem__)
    return {name: [values[j] for j in order] for name, values in out.items()}

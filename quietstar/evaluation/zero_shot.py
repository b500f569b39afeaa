"""Zero-shot GSM8K and CommonsenseQA, with and without thoughts, on one model in one run.

    python -m quietstar.evaluation.zero_shot --model runs/demo/final --task gsm8k --data-file gsm8k_test.jsonl --limit 200 --output gsm8k.json

Two metrics, each for ``base`` (the model without thoughts) and ``thoughts`` (a
thought before every answer token, mixed in by the mixing head):

    score         the paper's probability-based score. GSM8K: P(" {gold answer}" | prompt),
                  the product over the answer's tokens, teacher forced. CommonsenseQA:
                  P(gold letter) renormalised over the choice letters. With thoughts, a
                  fresh thought is sampled before every answer token and the probability
                  is averaged over ``thought_samples`` independent draws.
    exact_match   greedy decoding, then answer extraction (``eval_tasks``), against the gold.

The control ``shuffled``: the score with each item's thoughts moved to another item of its batch; a gain of
``thoughts`` over ``shuffled`` is the thoughts' content, not the mixing head (the perplexity report has the same
control). Also reported: ``gold_logprob`` (the mean log of the score's probability), for
CommonsenseQA ``choice_accuracy`` (the gold letter has the highest probability),
standard errors, ``paired`` (thoughts vs. base item by item: the mean gain in
log P(gold) and its standard error, which resolve far smaller effects than the
difference of the two means), generation tokens/s, and with ``--cot-samples N`` a zero-shot
chain-of-thought majority vote over N sampled chains. Items are processed in
batches sorted by prompt length; every number is reproducible for a seed and a
batch size. Each batch samples its thoughts and chains from a generator of its own,
seeded from ``seed`` and the batch's first position (``item_log.batch_generator``), so
its results do not depend on the batches before it. Before evaluations resumed, one
generator ran through all the batches: the sampled numbers measured then (with thoughts,
the chains) differ from today's by their sampling noise; those without sampling are the same.

With ``--output``, finished items are kept in ``<output>.partial.jsonl`` as they go (``item_log``); a run
that stopped continues with ``--resume`` and ends with the report an uninterrupted run writes (the
timings aside).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from quietstar.core import run_lock
from quietstar.core.cli_config import (ArgumentParser, add_dataclass_arguments, build_config, is_int, is_number, load_yaml,
                                       require, run_command)
from quietstar.core.files import not_an_input, write_text_whole
from quietstar.core.loading import load_model
from quietstar.core.offline import SMOLLM2
from quietstar.core.text_data import pad_rows
from quietstar.evaluation.item_log import ItemLog, batch_generator
from quietstar.evaluation.tasks import COT_TRIGGER, TASKS, EvalItem, extract_answer, load_items
from quietstar.quiet_star.config import QuietStarConfig
from quietstar.quiet_star.generation import generate, predict_continuation
from quietstar.quiet_star.model import QuietStarModel

MODES = ("base", "thoughts")
PHASES = ("score", *(f"generate_{mode}" for mode in MODES), "cot")  # the timed parts of a batch
DEFAULT_MAX_NEW_TOKENS = {"gsm8k": 16, "csqa": 8}


@dataclass(frozen=True)
class EvalConfig:
    """Settings of ``python -m quietstar.evaluation.zero_shot``.

    Attributes:
        model: a saved QuietStarModel dir, a plain HF model dir, a hub id, or ``smollm2-135m``.
            A plain model gets fresh Quiet-STaR modules, so its ``thoughts`` numbers equal ``base``.
        task: ``gsm8k`` or ``csqa``.
        data_file: a local jsonl, or a hub dataset name; None reads the task's hub default.
        limit: evaluate only the first ``limit`` items.
        output: where to write the JSON report (None: print only).
        batch_size: prompts per batch.
        thought_samples: independent thought draws averaged in the ``thoughts`` score.
        max_new_tokens: greedy tokens for exact match (None: 16 for gsm8k, 8 for csqa).
        greedy_thoughts: argmax thought tokens instead of sampling them.
        seed: seed of every sampled thought and chain (each batch's generator: ``item_log.batch_generator``).
        cot_samples: chains of thought sampled per item for the majority vote (0: off).
        cot_temperature: sampling temperature of the chains.
        cot_max_new_tokens: length limit of each chain.
    """

    model: str = SMOLLM2
    task: str = ""
    data_file: str | None = None
    limit: int | None = None
    output: str | None = None
    batch_size: int = 16
    thought_samples: int = 2
    max_new_tokens: int | None = None
    greedy_thoughts: bool = False
    seed: int = 0
    cot_samples: int = 0
    cot_temperature: float = 0.7
    cot_max_new_tokens: int = 128

    def __post_init__(self) -> None:
        require(isinstance(self.model, str) and self.model.strip() != "", self, "model", "must be a non-empty string")
        require(self.task in TASKS, self, "task", f"must be one of {', '.join(TASKS)}")
        for name in ("data_file", "output"):
            require(getattr(self, name) is None or (isinstance(getattr(self, name), str) and getattr(self, name).strip() != ""),
                    self, name, "must be a non-empty string or null")
        require(self.limit is None or (is_int(self.limit) and self.limit >= 1), self, "limit", "must be an integer >= 1")
        require(is_int(self.batch_size) and self.batch_size >= 1, self, "batch_size", "must be an integer >= 1")
        require(is_int(self.thought_samples) and self.thought_samples >= 1, self, "thought_samples", "must be an integer >= 1")
        require(self.max_new_tokens is None or (is_int(self.max_new_tokens) and self.max_new_tokens >= 1), self,
                "max_new_tokens", "must be an integer >= 1")
        require(isinstance(self.greedy_thoughts, bool), self, "greedy_thoughts", "must be true or false")
        require(is_int(self.seed), self, "seed", "must be an integer")
        require(is_int(self.cot_samples) and self.cot_samples >= 0, self, "cot_samples", "must be an integer >= 0")
        require(is_number(self.cot_temperature) and self.cot_temperature > 0, self, "cot_temperature", "must be a number > 0")
        require(is_int(self.cot_max_new_tokens) and self.cot_max_new_tokens >= 1, self, "cot_max_new_tokens", "must be an integer >= 1")

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens if self.max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS[self.task]


# --- the probability metric ----------------------------------------------------------------------------


def choice_token_ids(tokenizer, labels: tuple[str, ...]) -> list[int]:
    """The token of " A", " B", ... after "A:"; each label must be one token."""
    ids = []
    for label in labels:
        tokens = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"choice label {label!r} is {len(tokens)} tokens for this tokenizer; the letter score needs one")
        ids.append(tokens[0])
    return ids


def left_padded(tokenizer, texts: list[str], device: torch.device) -> tuple[torch.LongTensor, torch.Tensor]:
    """Tokenize prompts into a left-padded batch: (input_ids [B, P], attention_mask [B, P])."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = pad_rows([tokenizer(text)["input_ids"] for text in texts], pad, left=True)
    return ids.to(device), mask.to(device)


def gold_logprobs(model: QuietStarModel, items: list[EvalItem], samples: int, *, greedy_thoughts: bool = False,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """log P(gold) of each item [B], for ``base``, averaged over ``samples`` thought draws for ``thoughts``, and for
    ``shuffled``: the same thought draws, each thought before an answer token moved to the next item of the batch
    (the control: thoughts that are not about this question; an item alone in its batch keeps its own).

    GSM8K: the gold answer " N" teacher forced after the prompt, summed over its tokens.
    CommonsenseQA: the gold letter's probability renormalised over the item's letters.
    ``thoughts`` and ``shuffled`` average probabilities (not log-probabilities) over the draws.
    Also, for CommonsenseQA, ``*_correct`` [B]: the gold letter has the highest probability.
    """
    tokenizer, device = model.tokenizer, next(model.parameters()).device
    ids, mask = left_padded(tokenizer, [item.prompt for item in items], device)
    if items[0].labels:
        continuation = torch.zeros(len(items), 1, dtype=torch.long, device=device)
    else:
        answers = [tokenizer(" " + item.gold, add_special_tokens=False)["input_ids"] for item in items]
        continuation = torch.zeros(len(items), max(len(a) for a in answers), dtype=torch.long, device=device)
        answer_mask = torch.zeros_like(continuation, dtype=torch.bool)
        for i, a in enumerate(answers):
            continuation[i, : len(a)] = torch.tensor(a)
            answer_mask[i, : len(a)] = True
    # every item once per draw: rows [item 0 draw 0, item 0 draw 1, ..., item 1 draw 0, ...]
    rows = (ids.repeat_interleave(samples, 0), mask.repeat_interleave(samples, 0), continuation.repeat_interleave(samples, 0))
    pred = predict_continuation(model, *rows, greedy_thoughts=greedy_thoughts, generator=generator)
    moved = predict_continuation(model, *rows, forced_thoughts=pred.thoughts.roll(samples, dims=0))
    if items[0].labels:
        letters = torch.tensor([choice_token_ids(tokenizer, item.labels) for item in items], device=device)  # [B, C]
        gold = torch.tensor([item.labels.index(item.gold) for item in items], device=device)
    out = {}
    for mode, logprobs in (("base", pred.base_logprobs[::samples]), ("thoughts", pred.talk_logprobs), ("shuffled", moved.talk_logprobs)):
        if items[0].labels:
            letter_logprobs = logprobs[:, 0].gather(1, letters.repeat_interleave(len(logprobs) // len(items), 0))
            probs = letter_logprobs.softmax(dim=-1).view(len(items), -1, letters.shape[1]).mean(dim=1)  # [B, C]
            out[mode] = probs.gather(1, gold[:, None]).squeeze(1).log()
            out[f"{mode}_correct"] = probs.argmax(dim=1) == gold
        else:
            rows = len(logprobs) // len(items)
            token_lp = logprobs.gather(2, continuation.repeat_interleave(rows, 0)[..., None]).squeeze(-1)
            total = token_lp.masked_fill(~answer_mask.repeat_interleave(rows, 0), 0.0).sum(dim=1)  # [B * rows]
            out[mode] = total.view(len(items), rows).logsumexp(dim=1) - math.log(rows)
    return out


# --- generation ---------------------------------------------------------------------------------------


def newline_token_ids(tokenizer, blank_line: bool = False) -> list[int]:
    """Ids of the tokens whose text contains a newline (``blank_line``: two newlines)."""
    needle = "\n\n" if blank_line else "\n"
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [i for i, text in enumerate(texts) if needle in text]


def completions(model: QuietStarModel, prompts: list[str], thoughts: bool, *, greedy: bool, temperature: float,
                max_new_tokens: int, stop_token_ids: list[int], greedy_thoughts: bool, generator: torch.Generator,
                device: torch.device) -> tuple[list[str], list[int]]:
    """Generated text after each prompt (up to EOS), and the number of tokens generated after each."""
    tokenizer = model.tokenizer
    ids, mask = left_padded(tokenizer, prompts, device)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; generation needs one to mark finished rows")
    out = generate(model, ids, mask, max_new_tokens=max_new_tokens, thoughts=thoughts, greedy=greedy, temperature=temperature,
                   greedy_thoughts=greedy_thoughts, eos_token_id=eos, stop_token_ids=stop_token_ids, generator=generator)
    texts, counts = [], []
    for row in out.sequences[:, ids.shape[1]:].tolist():
        if eos in row:
            row = row[: row.index(eos)]
        counts.append(len(row))
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts, counts


def majority(answers: list[str | None]) -> str | None:
    """The most common extracted answer (the earliest on ties); None if no chain gave one."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


# --- the run ------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def evaluation_order(items: list[EvalItem]) -> list[int]:
    """The indices of ``items`` in the order they are evaluated: by prompt length (ties in file order), so that a
    batch's prompts pad little."""
    return sorted(range(len(items)), key=lambda i: len(items[i].prompt))


def evaluate_batch(model: QuietStarModel, batch: list[EvalItem], config: EvalConfig, generator: torch.Generator,
                   answer_stops: list[int], chain_stops: list[int]) -> tuple[list[dict], dict[str, float]]:
    """One batch of items: their results (in ``batch`` order) and the seconds of each of ``PHASES``.

    A result has the item's ``id``, ``question`` and ``gold``, then per mode (``base``, ``thoughts``)
    ``gold_logprob``, the greedy ``completion`` with its ``answer``, ``exact_match`` and
    ``generated_tokens``, for CommonsenseQA ``choice_correct``, with ``--cot-samples`` the chains and their vote,
    and ``shuffled`` (the control's ``gold_logprob``, ``choice_correct``). Every sample draws from ``generator``.
    """
    device = next(model.parameters()).device
    results = [{"id": item.id, "question": item.question, "gold": item.gold} for item in batch]
    seconds = dict.fromkeys(PHASES, 0.0)
    started = time.perf_counter()
    logprobs = gold_logprobs(model, batch, config.thought_samples, greedy_thoughts=config.greedy_thoughts, generator=generator)
    seconds["score"] = time.perf_counter() - started
    for mode in MODES:
        started = time.perf_counter()
        texts, counts = completions(
            model, [item.prompt for item in batch], mode == "thoughts", greedy=True, temperature=1.0,
            max_new_tokens=config.new_tokens, stop_token_ids=answer_stops, greedy_thoughts=config.greedy_thoughts,
            generator=generator, device=device)
        seconds[f"generate_{mode}"] = time.perf_counter() - started
        for row, (result, item, text, count) in enumerate(zip(results, batch, texts, counts)):
            answer = extract_answer(item, text)
            result[mode] = {"gold_logprob": float(logprobs[mode][row]), "completion": text, "answer": answer,
                            "exact_match": answer == item.gold, "generated_tokens": count}
            if f"{mode}_correct" in logprobs:
                result[mode]["choice_correct"] = bool(logprobs[f"{mode}_correct"][row])
            if mode == "thoughts":
                result["shuffled"] = {"gold_logprob": float(logprobs["shuffled"][row])}
                if "shuffled_correct" in logprobs:
                    result["shuffled"]["choice_correct"] = bool(logprobs["shuffled_correct"][row])
        if config.cot_samples:
            started = time.perf_counter()
            chains, _ = completions(
                model, [item.prompt + COT_TRIGGER for item in batch for _ in range(config.cot_samples)],
                mode == "thoughts", greedy=False, temperature=config.cot_temperature,
                max_new_tokens=config.cot_max_new_tokens, stop_token_ids=chain_stops,
                greedy_thoughts=config.greedy_thoughts, generator=generator, device=device)
            seconds["cot"] += time.perf_counter() - started
            for row, (result, item) in enumerate(zip(results, batch)):
                mine = [c.split("\nQ:")[0] for c in chains[row * config.cot_samples : (row + 1) * config.cot_samples]]
                vote = majority([extract_answer(item, chain, chain_of_thought=True) for chain in mine])
                result[mode].update(cot_chains=mine, cot_answer=vote, cot_correct=vote == item.gold)
    return results, seconds


def evaluate(model: QuietStarModel, items: list[EvalItem], config: EvalConfig, progress: bool = True,
             log: ItemLog | None = None) -> dict:
    """Score ``items`` with and without thoughts; the report as a JSON-ready dict.

    The items go in batches of ``config.batch_size`` in ``evaluation_order``; the batch whose first item is at
    position ``start`` of that order samples from ``batch_generator(config.seed, start)``, so every batch's
    results depend on the seed and its items alone. With ``log``, the batches it holds are not evaluated again
    (their results are read from it) and each new batch is added to it as soon as it is done.
    """
    device = next(model.parameters()).device
    answer_stops = newline_token_ids(model.tokenizer)
    chain_stops = newline_token_ids(model.tokenizer, blank_line=True) if config.cot_samples else []
    order = evaluation_order(items)
    done = list(log.items) if log is not None else []  # results in evaluation order
    seconds = {phase: log.phases.get(phase, 0.0) if log is not None else 0.0 for phase in PHASES}
    bar = tqdm(total=len(items), initial=len(done), desc=f"{config.task} eval", unit="item", disable=not progress)
    for start in range(len(done), len(order), config.batch_size):
        batch = [items[i] for i in order[start : start + config.batch_size]]
        generator = batch_generator(config.seed, start, device)
        records, phases = evaluate_batch(model, batch, config, generator, answer_stops, chain_stops)
        if log is not None:
            log.add(records, sum(phases.values()), phases)
        done += records
        seconds = {phase: seconds[phase] + phases[phase] for phase in PHASES}
        bar.update(len(batch))
    bar.close()
    results: list[dict] = [{} for _ in items]  # back in file order
    for i, result in zip(order, done):
        results[i] = result
    generated = {mode: sum(r[mode]["generated_tokens"] for r in results) for mode in MODES}

    report = {"task": config.task, "n": len(items)}
    for mode in MODES:
        rows = [r[mode] for r in results]
        score, score_se = _stats([math.exp(r["gold_logprob"]) for r in rows])
        em, em_se = _stats([float(r["exact_match"]) for r in rows])
        report[mode] = {"score": score, "score_stderr": score_se, "exact_match": em, "exact_match_stderr": em_se,
                        "gold_logprob": sum(r["gold_logprob"] for r in rows) / len(rows)}
        if "choice_correct" in rows[0]:
            report[mode]["choice_accuracy"] = sum(r["choice_correct"] for r in rows) / len(rows)
        if config.cot_samples:
            report[mode]["cot_majority"] = sum(r["cot_correct"] for r in rows) / len(rows)
        report[mode]["generation_tokens_per_s"] = generated[mode] / max(seconds[f"generate_{mode}"], 1e-9)
    shuffled = [r["shuffled"] for r in results]
    score, score_se = _stats([math.exp(r["gold_logprob"]) for r in shuffled])
    report["shuffled"] = {"score": score, "score_stderr": score_se, "gold_logprob": sum(r["gold_logprob"] for r in shuffled) / len(shuffled)}
    if "choice_correct" in shuffled[0]:
        report["shuffled"]["choice_accuracy"] = sum(r["choice_correct"] for r in shuffled) / len(shuffled)
    gains = [r["thoughts"]["gold_logprob"] - r["base"]["gold_logprob"] for r in results]
    gain, gain_se = _stats(gains)
    own_gains = [r["thoughts"]["gold_logprob"] - r["shuffled"]["gold_logprob"] for r in results]
    own_gain, own_gain_se = _stats(own_gains)
    report["paired"] = {  # thoughts vs. base, and vs. shuffled thoughts, on the same items
        "gold_logprob_gain": gain, "gold_logprob_gain_stderr": gain_se,
        "improved_fraction": sum(g > 0 for g in gains) / len(gains),
        "same_answer_fraction": sum(r["thoughts"]["answer"] == r["base"]["answer"] for r in results) / len(results),
        "gold_logprob_gain_over_shuffled": own_gain, "gold_logprob_gain_over_shuffled_stderr": own_gain_se,
    }
    report["settings"] = {**dataclasses.asdict(config), "max_new_tokens": config.new_tokens,
                          "thought_len": model.config.thought_len, "sample_temperature": model.config.sample_temperature}
    report["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    report["items"] = results
    return report


def format_table(report: dict) -> str:
    """The report's metrics as a fixed-width table."""
    names = [("score", "score (P of gold)"), ("gold_logprob", "mean log P(gold)"), ("choice_accuracy", "choice accuracy"),
             ("exact_match", "exact match (greedy)"), ("cot_majority", "CoT majority vote"),
             ("generation_tokens_per_s", "generation tokens/s")]
    lines = [f"{report['task']}: {report['n']} items, thought_len M={report['settings']['thought_len']}",
             f"{'metric':<24}{'base':>18}{'thoughts':>18}"]
    for key, label in names:
        if key not in report["base"]:
            continue
        cells = []
        for mode in MODES:
            value, se = report[mode][key], report[mode].get(f"{key}_stderr")
            cells.append(f"{value:.4f} ± {se:.4f}" if se is not None else f"{value:.4f}")
        lines.append(f"{label:<24}{cells[0]:>18}{cells[1]:>18}")
    paired = report["paired"]
    lines.append(f"thoughts - base, per item: log P(gold) {paired['gold_logprob_gain']:+.4f} ± {paired['gold_logprob_gain_stderr']:.4f}, "
                 f"higher on {100 * paired['improved_fraction']:.0f}% of items; same extracted answer on {100 * paired['same_answer_fraction']:.0f}%")
    lines.append(f"thoughts - shuffled thoughts (another item's), per item: log P(gold) "
                 f"{paired['gold_logprob_gain_over_shuffled']:+.4f} ± {paired['gold_logprob_gain_over_shuffled_stderr']:.4f} "
                 f"(the gain the thoughts' content gives, the mixing head's share removed)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a YAML file of EvalConfig / QuietStarConfig fields (flags override it)")
    parser.add_argument("--resume", action="store_true", help="continue an evaluation that stopped, from the items it kept "
                        "in <output>.partial.jsonl (needs --output)")
    add_dataclass_arguments(parser, EvalConfig, "evaluation")
    add_dataclass_arguments(parser, QuietStarConfig, "Quiet-STaR settings (for a plain base model; a saved model keeps its own)")


def run(args: argparse.Namespace) -> dict:
    values = load_yaml(args.config)
    config = build_config(EvalConfig, values, args)
    quiet_star = build_config(QuietStarConfig, values, args)
    if args.resume and not config.output:
        raise ValueError("--resume continues from the items kept beside --output; give --output")
    items = load_items(config.task, config.data_file, config.limit)
    log = None
    if config.output:  # before the model loads: a rerun over kept items, or a report in use, is refused at once
        not_an_input(config.output, "--output", {"--data-file": config.data_file})
        run_lock.hold_file(Path(config.output))
        settings = {**{k: v for k, v in dataclasses.asdict(config).items() if k != "output"}, **dataclasses.asdict(quiet_star)}
        log = ItemLog(Path(config.output), settings, [items[i].question for i in evaluation_order(items)], args.resume)
    model = load_model(QuietStarModel, config.model, quiet_star).eval()
    if torch.cuda.is_available():
        model.cuda()
    report = evaluate(model, items, config, log=log)
    report["model"], report["data"] = config.model, config.data_file
    print(format_table(report))
    if config.output:
        path = Path(config.output)
        write_text_whole(path, json.dumps(report, indent=1) + "\n")
        log.close()
        print(f"report: {path}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m quietstar.evaluation.zero_shot", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_command("eval", run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

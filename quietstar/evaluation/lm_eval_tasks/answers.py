"""The functions the task YAMLs name with ``!function``: records to prompts and golds, results to metrics.

lm-evaluation-harness loads this file by its path (next to the YAMLs), so it only imports from ``quietstar``.
"""

from __future__ import annotations

import math

from datasets import Dataset

from quietstar.evaluation.tasks import EvalItem, csqa_item, extract_number, gsm8k_item


def _fields(item: EvalItem) -> dict:
    return {"prompt": item.prompt, "gold": item.gold, "labels": list(item.labels), "choice_texts": list(item.choices),
            "gold_index": item.labels.index(item.gold) if item.labels else -1}


def gsm8k_docs(dataset: Dataset) -> Dataset:
    """GSM8K records (``question``, ``answer`` ending in ``#### N``) with ``prompt`` and the normalised ``gold``."""
    return dataset.map(lambda record, i: _fields(gsm8k_item(dict(record), f"gsm8k row {i}")), with_indices=True)


def csqa_docs(dataset: Dataset) -> Dataset:
    """CommonsenseQA records (original or hub layout) with ``prompt``, ``labels``, ``gold`` and ``gold_index``."""
    return dataset.map(lambda record, i: _fields(csqa_item(dict(record), f"csqa row {i}")), with_indices=True)


def gsm8k_exact_match(doc: dict, results: list[str]) -> dict[str, float]:
    """1.0 when the number extracted from the completion (``extract_number``) equals the gold."""
    return {"exact_match": float(extract_number(results[0]) == doc["gold"])}


def gsm8k_score(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """``score``: P(" {gold}" | prompt); ``gold_logprob``: its log."""
    logprob, _ = results[0]
    return {"score": math.exp(logprob), "gold_logprob": logprob}


def csqa_results(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """``acc``: the gold letter is the most likely; ``score``: its probability renormalised over the letters."""
    logprobs = [logprob for logprob, _ in results]
    best = max(range(len(logprobs)), key=logprobs.__getitem__)  # the first of ties, as argmax
    total = sum(math.exp(lp - logprobs[best]) for lp in logprobs)
    gold = doc["gold_index"]
    return {"acc": float(best == gold), "score": math.exp(logprobs[gold] - logprobs[best]) / total}

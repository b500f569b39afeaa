"""Is reasoning necessary on the task? The same tiny LM trained on worked text against unworked text.

Trained from scratch with the base LM's recipe and budget (``base_steps``), once on worked documents only
and once on unworked documents only, then asked the held-out questions greedily: the worked model writes
the chain and then the answer, the unworked one answers right after ``?``. The task is worth its name when
the first is near perfect and the second near the majority-class rate.
"""

from __future__ import annotations

from collections import Counter

import torch

from quietstar.testbed.base_lm import answer_accuracy, train_lm
from quietstar.testbed.config import TestbedConfig
from quietstar.testbed.task import Problem
from quietstar.testbed.tokenizer import char_tokenizer


def measure_gap(cfg: TestbedConfig, train: list[Problem], held_out: list[Problem]) -> dict:
    """Accuracy of the worked-trained and the unworked-trained model on ``held_out``, and the majority-class rate."""
    tokenizer = char_tokenizer()
    rows = {}
    for name, fraction in (("worked", 1.0), ("unworked", 0.0)):
        model, record = train_lm(cfg, train, fraction, cfg.base_seed, f"gap: {name}")
        with torch.no_grad():
            result = answer_accuracy(model, tokenizer, held_out, "free")
        rows[name] = {"accuracy": result["accuracy"], "training": record}
    majority = Counter(p.answer for p in held_out).most_common(1)[0][1] / len(held_out)
    return {"hops": cfg.hops, "items": len(held_out), "split": cfg.eval_split, "majority_class": majority, **rows,
            "gap_points": 100 * (rows["worked"]["accuracy"] - rows["unworked"]["accuracy"])}

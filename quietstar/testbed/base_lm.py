"""The testbed's tiny base LM: a Llama trained from scratch on the task's documents, cached, and its greedy answers.

One recipe serves the base (a mix of worked and unworked documents) and the gap measurement
(worked only against unworked only). The trained base is cached under a key of the settings that
decide it (``TestbedConfig.base_key``), so every arm and seed starts from the same weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

from quietstar.core import run_lock
from quietstar.core.files import write_text_whole
from quietstar.core.text_data import pad_rows
from quietstar.testbed.config import BASE_FIELDS, TestbedConfig
from quietstar.testbed.task import CLOSE, OPEN, Problem, iter_documents
from quietstar.testbed.tokenizer import char_tokenizer

IGNORE = -100


def new_lm(cfg: TestbedConfig, vocab_size: int, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama of the configured size (fp32, SDPA attention, untied embeddings)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=None,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def document_batch(texts: list[str], tokenizer) -> dict[str, torch.Tensor]:
    """Right-padded ids, mask and labels [B, L] of documents, each followed by ``<eos>``; padding is not scored."""
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    ids, mask = pad_rows(rows, pad_id=tokenizer.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)}


def train_lm(cfg: TestbedConfig, items: list[Problem], worked_fraction: float, seed: int,
             desc: str) -> tuple[LlamaForCausalLM, dict]:
    """Train a fresh LM for ``base_steps`` steps on documents of ``items`` (worked with probability ``worked_fraction``).

    Returns the model (eval mode) and a record of its training (final loss, seconds).
    """
    tokenizer = char_tokenizer()
    model = new_lm(cfg, len(tokenizer), seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.base_lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, cfg.base_steps // 20), cfg.base_steps)
    documents = iter_documents(items, worked_fraction, seed)
    started, losses = time.perf_counter(), []
    for _ in tqdm(range(cfg.base_steps), desc=desc, leave=False, mininterval=5):
        batch = document_batch([next(documents) for _ in range(cfg.base_batch_size)], tokenizer)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    tail = losses[-50:]
    return model.eval(), {"steps": cfg.base_steps, "final_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - started}


def cached_base(cfg: TestbedConfig, items: list[Problem], cache: Path) -> tuple[LlamaForCausalLM, Path]:
    """The base LM for ``cfg`` from ``cache/base-<key>`` (trained and saved there first if absent) and its directory."""
    directory = cache / f"base-{cfg.base_key()}"
    if not (directory / "testbed_base.json").is_file():  # written last, whole: its presence means a complete base
        run_lock.hold_directory(directory, "the base cache")  # another run training the same base is named, not raced
        model, record = train_lm(cfg, items, cfg.base_worked_fraction, cfg.base_seed, "base LM")
        model.save_pretrained(directory)
        char_tokenizer().save_pretrained(directory)
        fields = {name: getattr(cfg, name) for name in BASE_FIELDS}
        write_text_whole(directory / "testbed_base.json", json.dumps({"config": fields, "training": record}, indent=1) + "\n")
    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval(), directory


def read_answer(continuation: str) -> str | None:
    """The answer a greedy continuation of a question gives: the character after the aside ``[...]`` when it opens
    one, else its first character; None when an opened aside never closes."""
    if continuation.startswith(OPEN):
        close = continuation.find(CLOSE)
        return continuation[close + 1] if 0 <= close < len(continuation) - 1 else None
    return continuation[:1] or None


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 100) -> list[str]:
    """Greedy continuations of ``prompts`` (each cut at ``<eos>``), batched with left padding."""
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start:start + batch_size]]
        ids, mask = pad_rows(rows, pad_id=tokenizer.pad_token_id, left=True)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out += [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in generated]
    return out


def answer_accuracy(model, tokenizer, items: list[Problem], form: str) -> dict:
    """Greedy answer accuracy on ``items`` (of any mix of hop counts, each scored with its own).

    ``form``: ``free`` (the model continues the question as it likes: an aside then the answer, or the answer),
    ``direct`` (the answer must follow ``?``: the most likely digit there), ``worked`` (the prompt ends in ``[``,
    so the model writes the chain first). Returns accuracy, per-item ``correct`` and, for ``free``, per-item
    ``opened`` (an aside was opened) and its rate.
    """
    correct, opened = [False] * len(items), [False] * len(items)
    for hops in sorted({p.hops for p in items}):
        index = [i for i, p in enumerate(items) if p.hops == hops]
        group = [items[i] for i in index]
        if form == "direct":
            digits = tokenizer([str(d) for d in range(10)], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([tokenizer(p.question, add_special_tokens=False)["input_ids"] for p in group])
            logits = model(input_ids=ids).logits[:, -1, [d[0] for d in digits]]
            answers = [str(int(i)) for i in logits.argmax(-1)]
            texts = [""] * len(group)
        else:
            prefix = OPEN if form == "worked" else ""
            texts = greedy_continuations(model, tokenizer, [p.question + prefix for p in group], max_new_tokens=2 * hops + 3)
            answers = [read_answer(prefix + t) for t in texts]
        for i, p, answer, text in zip(index, group, answers, texts):
            correct[i], opened[i] = answer == p.answer, text.startswith(OPEN)
    result = {"accuracy": sum(correct) / len(items), "correct": correct}
    if form == "free":
        result.update(opened=opened, opened_aside=sum(opened) / len(items))
    return result


def base_report(cfg: TestbedConfig, train: list[Problem], held_out: list[Problem], cache: Path) -> dict:
    """The cached base LM (trained first if needed) and its held-out greedy accuracy in each form: at the hardest
    difficulty (``hops``) and at each one (``by_hops``)."""
    model, directory = cached_base(cfg, train, cache)
    tokenizer = char_tokenizer()
    with torch.no_grad():
        scores = {form: answer_accuracy(model, tokenizer, held_out, form) for form in ("free", "direct", "worked")}
    by_hops = {}
    for hops in sorted({p.hops for p in held_out}):
        index = [i for i, p in enumerate(held_out) if p.hops == hops]
        share = lambda values: sum(values[i] for i in index) / len(index)  # noqa: E731
        by_hops[hops] = {**{f"{form}_accuracy": share(s["correct"]) for form, s in scores.items()},
                         "opened_aside": share(scores["free"]["opened"])}
    record = json.loads((directory / "testbed_base.json").read_text())
    return {"directory": str(directory), **record, "split": cfg.eval_split, "items": len(held_out),
            **by_hops[max(by_hops)], "by_hops": by_hops}

"""The zero-shot eval tasks: GSM8K and CommonsenseQA records, prompts, gold answers and answer extraction.

Records come from the hub (``openai/gsm8k`` config ``main``, split ``test``;
``tau/commonsense_qa``, split ``validation``) or from local jsonl files in either
the hub's field layout or the original releases' (the files in ``shared/data``):

    gsm8k  {"question": str, "answer": "... #### 1,234"}
    csqa   {"answerKey": "A", "question": {"stem": str, "choices": [{"label": "A", "text": str}, ...]}}   original
           {"answerKey": "A", "question": str, "choices": {"label": [...], "text": [...]}}            hub

Prompts (the design note's zero-shot format):

    gsm8k  "Q: {question}\\nA:"                          gold continuation " {answer}"
    csqa   "Q: {stem}\\nAnswer Choices:\\n(A) ...\\n...\\nA:"  gold continuation " {letter}"

With chain of thought, " Let's think step by step." follows the final "A:".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quietstar.core.files import input_file, json_lines

TASKS = ("gsm8k", "csqa")
HUB = {"gsm8k": ("openai/gsm8k", "main", "test"), "csqa": ("tau/commonsense_qa", None, "validation")}
COT_TRIGGER = " Let's think step by step."


@dataclass(frozen=True)
class EvalItem:
    """One question: ``prompt`` ends with "A:"; ``gold`` is the normalised answer (a number string or a letter)."""

    id: str
    question: str
    gold: str
    prompt: str
    labels: tuple[str, ...] = ()  # csqa: the choice letters, in order
    choices: tuple[str, ...] = ()  # csqa: the choice texts, in order


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{where}: {message}")


# --- answers -------------------------------------------------------------------------------------------

# A number as people write it: optional sign (ASCII or Unicode minus) and "$", thousands commas, decimals.
_NUMBER = re.compile(r"(?<![\w.])([-−]?)\$?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?")
_ANSWER_IS = re.compile(r"answer is\s*:?\s*", re.IGNORECASE)


def normalize_number(text: str) -> str | None:
    """``"1,234.50"`` -> ``"1234.5"``, ``"-7"`` -> ``"-7"``; None if ``text`` is not a number."""
    match = _NUMBER.fullmatch(text.strip().rstrip("."))
    if match is None:
        return None
    return _canonical(match)


def _canonical(match: re.Match) -> str:
    """The number of a ``_NUMBER`` match as digits: no commas, no leading zeros, no trailing decimal zeros.

    Done on the digits as text, so a number of any length keeps every digit (a ``Decimal`` rounds to
    28 of them, and ``str(int)`` refuses more than 4300).
    """
    integer = match.group(2).replace(",", "").lstrip("0") or "0"
    fraction = (match.group(3) or ".")[1:].rstrip("0")
    text = f"{integer}.{fraction}" if fraction else integer
    return ("-" if match.group(1) and text != "0" else "") + text


def extract_number(text: str, chain_of_thought: bool = False) -> str | None:
    """The numeric answer in a generated completion, normalised, or None.

    The number after the last "answer is" wins. Otherwise, for a direct answer, the
    last number of the first non-empty line ("$1,234 per day." -> "1234", "16 x 3 = 48" -> "48");
    for a chain of thought, the last number of the whole text.
    """
    if _ANSWER_IS.search(text) and (match := _NUMBER.search(_ANSWER_IS.split(text)[-1])):
        return _canonical(match)
    if not chain_of_thought:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        text = lines[0] if lines else ""
    matches = list(_NUMBER.finditer(text))
    return _canonical(matches[-1]) if matches else None


def extract_choice(text: str, labels: tuple[str, ...], choices: tuple[str, ...], chain_of_thought: bool = False) -> str | None:
    """The chosen letter in a generated completion, or None.

    In order: a letter right after "answer is"; for direct answers a letter at the
    very start (" B", " (B)", " B) library"); else the choice whose text appears first
    (last, with chain of thought).
    """
    letter = "|".join(re.escape(label) for label in labels)
    standalone = rf"\(?({letter})\)?(?![\w'])"
    after = [m.group(1) for m in re.finditer(rf"(?i:answer is)\s*:?\s*{standalone}", text)]
    if after:
        return after[-1] if chain_of_thought else after[0]
    if not chain_of_thought and (match := re.match(rf"\s*{standalone}", text)):
        return match.group(1)
    lowered = text.lower()
    found = [(lowered.find(c.lower()), label) for label, c in zip(labels, choices) if c and c.lower() in lowered]
    if not found:
        return None
    found.sort(key=lambda pair: pair[0], reverse=chain_of_thought)
    return found[0][1]


def extract_answer(item: EvalItem, text: str, chain_of_thought: bool = False) -> str | None:
    """The answer in a completion of ``item.prompt``, normalised like ``item.gold``."""
    if item.labels:
        return extract_choice(text, item.labels, item.choices, chain_of_thought)
    return extract_number(text, chain_of_thought)


# --- records -------------------------------------------------------------------------------------------


def gsm8k_item(record: Any, where: str) -> EvalItem:
    """An ``EvalItem`` from a GSM8K record; ``where`` names it in errors ("file.jsonl line 3")."""
    _require(isinstance(record, dict), where, f"expected a JSON object, got {type(record).__name__}")
    question, answer = record.get("question"), record.get("answer")
    _require(isinstance(question, str) and bool(question.strip()), where, "GSM8K record needs a non-empty string 'question'")
    _require(isinstance(answer, str) and "####" in answer, where, "GSM8K record needs an 'answer' string ending in '#### <number>'")
    gold = normalize_number(answer.rsplit("####", 1)[1])
    _require(gold is not None, where, f"GSM8K answer after '####' is not a number: {answer.rsplit('####', 1)[1].strip()!r}")
    question = question.strip()
    return EvalItem(id=str(record.get("id", where)), question=question, gold=gold, prompt=f"Q: {question}\nA:")


def csqa_item(record: Any, where: str) -> EvalItem:
    """An ``EvalItem`` from a CommonsenseQA record, in the original or the hub layout."""
    _require(isinstance(record, dict), where, f"expected a JSON object, got {type(record).__name__}")
    question = record.get("question")
    if isinstance(question, dict):  # original release
        stem, raw = question.get("stem"), question.get("choices")
        _require(isinstance(raw, list) and all(isinstance(c, dict) for c in raw), where, "'question.choices' must be a list of {label, text}")
        labels, texts = [c.get("label") for c in raw], [c.get("text") for c in raw]
    else:  # hub layout
        stem, raw = question, record.get("choices")
        _require(isinstance(raw, dict), where, "CommonsenseQA record needs 'question.choices' or 'choices' {label: [...], text: [...]}")
        labels, texts = raw.get("label"), raw.get("text")
        _require(isinstance(labels, list) and isinstance(texts, list) and len(labels) == len(texts), where,
                 "'choices' needs equally long 'label' and 'text' lists")
    _require(isinstance(stem, str) and bool(stem.strip()), where, "CommonsenseQA record needs a non-empty question stem")
    _require(len(labels) >= 2, where, f"CommonsenseQA record needs at least 2 choices, got {len(labels)}")
    _require(all(isinstance(x, str) and x for x in labels + texts), where, "every choice needs a string 'label' and 'text'")
    _require(all(re.fullmatch(r"[A-Z]", x) for x in labels) and len(set(labels)) == len(labels), where,
             f"choice labels must be distinct capital letters, got {labels}")
    gold = record.get("answerKey")
    _require(gold in labels, where, f"'answerKey' {gold!r} is not one of the choice labels {labels}")
    lines = [f"Q: {stem.strip()}", "Answer Choices:"] + [f"({label}) {text}" for label, text in zip(labels, texts)] + ["A:"]
    return EvalItem(id=str(record.get("id", where)), question=stem.strip(), gold=gold, prompt="\n".join(lines),
                    labels=tuple(labels), choices=tuple(texts))


MAKE_ITEM = {"gsm8k": gsm8k_item, "csqa": csqa_item}


def read_jsonl(path: str | Path, task: str, limit: int | None = None) -> list[EvalItem]:
    """The first ``limit`` items of a jsonl file; a malformed line (not UTF-8, not JSON, not a record of ``task``)
    fails with its line number."""
    path = input_file(path, "eval data file")
    items: list[EvalItem] = []
    for number, record, problem in json_lines(path):
        if limit is not None and len(items) >= limit:
            break
        where = f"{path.name} line {number}"
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        items.append(MAKE_ITEM[task](record, where))
    if not items:
        raise ValueError(f"{path}: no {task} records")
    return items


def load_items(task: str, data_file: str | None = None, limit: int | None = None) -> list[EvalItem]:
    """The task's items from ``data_file`` (a local jsonl) or, when None, from the hub test/validation split."""
    if task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    looks_local = data_file is not None and (
        Path(data_file).suffix in (".jsonl", ".json") or data_file.startswith((".", "/", "~")) or Path(data_file).exists())
    if looks_local:
        return read_jsonl(Path(data_file).expanduser(), task, limit)
    from datasets import load_dataset  # only for hub data

    name, config, split = HUB[task]
    name = data_file or name
    try:
        records = load_dataset(name, config, split=split)
    except Exception as error:  # the hub raises many types; all mean "cannot use this name"
        raise ValueError(f"cannot load {name!r} from the hub ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                         "pass a local jsonl with --data-file") from None
    records = records.select(range(min(limit, len(records)))) if limit is not None else records
    return [MAKE_ITEM[task](record, f"{name} row {i}") for i, record in enumerate(records)]

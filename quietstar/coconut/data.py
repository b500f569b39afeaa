"""Coconut's examples: ``{question, steps, answer}`` read from jsonl (converted files or raw GSM8K), written, and scored.

Every data set of the paper comes down to one format (a jsonl line per example):

    {"question": "...", "steps": ["<<4-2=2>>", "<<2/.5=4>>"], "answer": "4"}

- GSM8K ("GSM8k-Aug" format): the steps are the ``<<...>>`` calculator annotations of the
  raw solution, in order and with their brackets; the answer is the text after ``####``
  without thousands commas. ``read_examples`` loads the raw splits directly.
- ProntoQA, ProsQA and our own files are already in the format (extra keys are ignored).

Scoring follows the paper: the answer of a generated text is what follows its last ``#``,
compared with the gold answer as a plain string.

CLI:
    python -m quietstar.coconut.data convert-gsm8k IN.jsonl OUT.jsonl
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from quietstar.core.cli_config import ArgumentParser
from quietstar.core.files import input_file, json_lines

PROG = "quietstar.coconut.data"
CALCULATOR = re.compile(r"<<.*?>>")  # one GSM8K calculator annotation, e.g. "<<48/2=24>>"


@dataclass(frozen=True)
class Example:
    """One example: ``question``, the reasoning ``steps`` (zero or more strings) and the ``answer``."""

    question: str
    steps: tuple[str, ...]
    answer: str


def gsm8k_example(record: object) -> Example | None:
    """The example of a raw GSM8K record ``{question, answer}``, or None if it is malformed.

    The solution text (``answer``) holds ``<<expr=value>>`` annotations and ends in
    ``#### N``. Steps: the annotations before the last ``####``, in order, brackets kept
    (an item may have none). Answer: the text after the last ``####``, stripped, commas
    removed ("1,000" -> "1000"). Malformed: not a dict, ``question`` or ``answer`` missing or
    not a string, no ``####``, or nothing after it.
    """
    if not isinstance(record, dict):
        return None
    question, solution = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not isinstance(solution, str) or "####" not in solution:
        return None
    reasoning, _, final = solution.rpartition("####")
    answer = final.strip().replace(",", "")
    if not answer:
        return None
    return Example(question, tuple(CALCULATOR.findall(reasoning)), answer)


def qa_example(record: object) -> Example | None:
    """The example of a converted record ``{question: str, steps: [str], answer: str}``, or None if it is malformed.

    Extra keys (e.g. ProsQA's graph) are ignored; a missing key or a wrong type makes it malformed.
    """
    if not isinstance(record, dict):
        return None
    question, steps, answer = record.get("question"), record.get("steps"), record.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str) or not isinstance(steps, (list, tuple)):
        return None
    if not all(isinstance(step, str) for step in steps):
        return None
    return Example(question, tuple(steps), answer)


def read_examples(path: str | Path) -> tuple[list[Example], int]:
    """(examples, skipped) from a local ``.jsonl`` file of converted records or raw GSM8K records.

    Each non-blank line is tried as a converted record (``qa_example``), then as raw GSM8K
    (``gsm8k_example``). Lines that are not UTF-8, not JSON, not an object, or malformed are
    skipped and counted in ``skipped``; blank lines are neither used nor counted.
    Raises an OSError if the file is missing, a directory or unreadable (``core.files.input_file``),
    ValueError if it yields no example.
    """
    path = input_file(path)
    examples: list[Example] = []
    skipped = 0
    for _, record, problem in json_lines(path):
        example = None if problem else qa_example(record) or gsm8k_example(record)
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    if not examples:
        detail = f"all {skipped} non-blank lines are malformed" if skipped else "the file has no records"
        raise ValueError(f"no examples in {path}: {detail} (expected jsonl of {{question, steps, answer}} or raw GSM8K)")
    return examples, skipped


def write_examples(path: str | Path, examples: Iterable[Example]) -> int:
    """Write ``examples`` to ``path`` as jsonl ``{question, steps, answer}`` (UTF-8); returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            record = {"question": ex.question, "steps": list(ex.steps), "answer": ex.answer}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def answer_of(text: str) -> str:
    """The answer in a generated text: what follows its last ``#``, without commas, stripped ("### 1,300" -> "1300").

    The paper's scoring drops the commas of the prediction too. A text without ``#`` gives all of itself.
    """
    return text.rpartition("#")[2].replace(",", "").strip()


def answers_match(predicted: str, gold: str) -> bool:
    """Whether two answers are equal as strings after stripping whitespace.

    A plain string match, as the paper scores it: no number parsing, so "300" and "300.0"
    differ. Gold GSM8K answers carry no commas (``gsm8k_example``), nor do ``answer_of``'s.
    """
    return predicted.strip() == gold.strip()


def main(argv: list[str] | None = None) -> int:
    """CLI: ``convert-gsm8k IN.jsonl OUT.jsonl`` writes the Coconut format of a raw GSM8K file and prints counts."""
    parser = ArgumentParser(prog=PROG, description="Coconut data: convert GSM8K to {question, steps, answer} jsonl.")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert-gsm8k", help="extract the <<...>> steps and the #### answer of a raw GSM8K jsonl file")
    convert.add_argument("input", help="raw GSM8K jsonl ({question, answer})")
    convert.add_argument("output", help="jsonl to write ({question, steps, answer})")
    args = parser.parse_args(argv)
    try:
        examples, skipped = read_examples(args.input)
        written = write_examples(args.output, examples)
    except (OSError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    no_steps = sum(1 for ex in examples if not ex.steps)
    mean_steps = sum(len(ex.steps) for ex in examples) / written
    print(f"wrote {written} examples to {args.output} (skipped {skipped} lines; "
          f"{mean_steps:.2f} steps on average; {no_steps} with no steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The testbed's reasoning task: chained assignments modulo 10.

A problem of k hops defines k + 1 variables; each new one is the previous one combined with a digit
(or, from the third variable on and with probability ``earlier_prob``, with an earlier variable) by
+, - or * modulo 10, and asks for the last one:

    question    a=1;b=a*9;c=b*4;d=c*7;e=d+4;e?
    chain       b9c6d2e6                       every intermediate value, in order
    answer      6

Each hop needs the value the previous hop computed, so a constant-depth transformer that must
answer right after ``?`` has to do k dependent look-ups-and-operations in one forward, while one
that writes the chain first does one per token (Feng et al., 2023, show this gap for arithmetic).

Three forms of the same problem (``Problem``):

    unworked    a=1;b=a*9;c=b*4;d=c*7;e=d+4;e?6
    worked      a=1;b=a*9;c=b*4;d=c*7;e=d+4;e?[b9c6d2e6]6     the chain as a bracketed aside
    Coconut     {question, steps: ["b9", "c6", "d2", "e6"], answer: "6"}

The brackets make the chain an aside the text opens and closes, as ``---`` opens one in web text:
Quiet-STaR's ``<sot>``/``<eot>`` can start at ``[``/``]`` without knowing anything about the task.

Splits are by problem: a problem's split is a hash of its question, so the same question never
lands in two splits, whatever seed or count made it.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Iterator
from dataclasses import dataclass

OPERATIONS = "+-*"
SPLITS = ("train", "valid", "test")
OPEN, CLOSE, ASK = "[", "]", "?"
MAX_HOPS = len(string.ascii_lowercase) - 1


@dataclass(frozen=True)
class Problem:
    """One problem: ``question`` (ends in ``?``), the intermediate ``values`` of variables 2..k+1, and the answer."""

    question: str
    names: tuple[str, ...]
    values: tuple[int, ...]

    @property
    def hops(self) -> int:
        return len(self.values)

    @property
    def answer(self) -> str:
        return str(self.values[-1])

    @property
    def steps(self) -> tuple[str, ...]:
        """Each hop as "<variable><value>": ("b9", "c6", ...)."""
        return tuple(f"{name}{value}" for name, value in zip(self.names[1:], self.values))

    @property
    def chain(self) -> str:
        """The worked steps as one string: "b9c6d2e6"."""
        return "".join(self.steps)

    @property
    def unworked(self) -> str:
        return self.question + self.answer

    @property
    def worked(self) -> str:
        return f"{self.question}{OPEN}{self.chain}{CLOSE}{self.answer}"

    def coconut_record(self) -> dict:
        """The Coconut example format: ``{question, steps, answer}``."""
        return {"question": self.question, "steps": list(self.steps), "answer": self.answer}


def split_of(question: str) -> str:
    """The split a question belongs to: 10 % valid, 10 % test, the rest train, by a hash of its text."""
    bucket = int(hashlib.sha1(question.encode()).hexdigest(), 16) % 10
    return "valid" if bucket == 0 else "test" if bucket == 1 else "train"


def make_problem(rng: random.Random, hops: int, earlier_prob: float = 0.3) -> Problem:
    """One random problem of ``hops`` hops."""
    if not 1 <= hops <= MAX_HOPS:
        raise ValueError(f"hops must be in 1..{MAX_HOPS}, got {hops}")
    names = string.ascii_lowercase[: hops + 1]
    value = {names[0]: rng.randrange(10)}
    parts = [f"{names[0]}={value[names[0]]}"]
    for i in range(1, hops + 1):
        previous, op = names[i - 1], rng.choice(OPERATIONS)
        if i >= 2 and rng.random() < earlier_prob:
            other = rng.choice(names[: i - 1])
            operand, text = value[other], other
        else:
            operand = rng.randrange(10)
            text = str(operand)
        a = value[previous]
        value[names[i]] = (a + operand) % 10 if op == "+" else (a - operand) % 10 if op == "-" else (a * operand) % 10
        parts.append(f"{names[i]}={previous}{op}{text}")
    question = ";".join(parts) + f";{names[-1]}{ASK}"
    return Problem(question, tuple(names), tuple(value[n] for n in names[1:]))


def problems(split: str, count: int, hops: int, seed: int, earlier_prob: float = 0.3) -> list[Problem]:
    """``count`` distinct problems of ``split`` with ``hops`` hops, drawn from ``seed``.

    Raises ValueError when the split cannot hold that many distinct problems (small ``hops``).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    rng = random.Random(f"{seed}-{split}-{hops}")
    seen: dict[str, Problem] = {}
    tries = 0
    while len(seen) < count:
        tries += 1
        if tries > 50 * count + 1000:
            raise ValueError(f"only {len(seen)} distinct {split} problems of {hops} hop(s) found in {tries} draws; "
                             f"ask for fewer than {count} or more hops")
        problem = make_problem(rng, hops, earlier_prob)
        if split_of(problem.question) == split:
            seen.setdefault(problem.question, problem)
    return list(seen.values())


def mixed_problems(split: str, count: int, hops: tuple[int, ...], seed: int, earlier_prob: float = 0.3) -> list[Problem]:
    """``count`` problems spread evenly over the given hop counts, shuffled with ``seed``."""
    share = [count // len(hops) + (i < count % len(hops)) for i in range(len(hops))]
    out = [p for k, n in zip(hops, share) for p in problems(split, n, k, seed, earlier_prob)]
    random.Random(f"{seed}-{split}-mix").shuffle(out)
    return out


def iter_documents(items: list[Problem], worked_fraction: float, seed: int) -> Iterator[str]:
    """An endless stream of documents: each problem in its worked form with probability ``worked_fraction``."""
    rng = random.Random(seed)
    while True:
        for problem in rng.sample(items, len(items)):
            yield problem.worked if rng.random() < worked_fraction else problem.unworked


def parse_chain(text: str, names: tuple[str, ...]) -> dict[str, int]:
    """The values a written chain states, e.g. "b9c6]..." -> {"b": 9, "c": 6}; reads up to the first break in the pattern."""
    values: dict[str, int] = {}
    i = 0
    while i + 1 < len(text) and text[i] in names[1:] and text[i + 1].isdigit():
        values.setdefault(text[i], int(text[i + 1]))
        i += 2
    return values


def chain_content(thought: str, problem: Problem, specials: tuple[str, ...] = ("<eos>", "<pad>", "<unk>")) -> tuple[bool, float]:
    """What a thought says about ``problem``'s chain: (it holds the exact chain, the share of the k values it states
    right). Special tokens are dropped first, and the values are read from the first mention of the second variable."""
    for special in specials:
        thought = thought.replace(special, "")
    first = problem.names[1]
    stated = parse_chain(thought[thought.index(first):] if first in thought else "", problem.names)
    right = sum(stated.get(name) == value for name, value in zip(problem.names[1:], problem.values))
    return problem.chain in thought, right / problem.hops

"""A ProsQA-style generator (the Coconut paper's Algorithm 1, as restated in shared/design/coconut.md) and its statistics.

An item is a random DAG of "is a" facts over made-up concepts and a few people, and a
question whose answer needs a search from one person to a leaf concept:

    {"question": "Every wexpus is a dorpus. Tom is a wexpus. ... Is Tom a dorpus or blimpus?",
     "answer": "Tom is a dorpus.",
     "steps": ["Tom is a wexpus.", "Every wexpus is a dorpus."],
     "idx_to_symbol": ["Anna", "Tom", "wexpus", ...], "edges": [[1, 2], [2, 3], ...],
     "root": 1, "target": 3, "neg_target": 7}

the format (keys, key order, wording) of the released ``prosqa_valid.jsonl``. An edge
``[a, b]`` reads "a is a b"; a node with no parents is a person ("Tom is a wexpus."), any
other node a concept ("Every wexpus is a dorpus."). Nodes are numbered in creation order,
edges listed by child.

The graph (``_graph``): nodes 0 and 1 are people. Each new node takes Poisson(parents_mean)
parents among the earlier nodes, drawn without replacement with weight
``depth_weight * depth + 1`` (depth: the longest chain of parents above a node). With
probability ``p_family0`` the parents come only from node 0's family (its descendants that
do not descend from node 1), with ``p_family1`` only from node 1's; otherwise from any
earlier node, and only then can a node join both families or take a parentless node as a
parent. A node that got no parents and no children is dropped; one that got no parents but
has children is another person.

The question (``_item``): for each of nodes 0 and 1, its exclusive leaves (concepts with no
children that descend from it and not from the other) at their shortest distance. The
person whose deepest exclusive leaf lies farther is the root (ties at random) and that leaf
(ties at random) the target; the distractor is a random exclusive leaf of the other person,
so it is unreachable from the root. Items whose shortest root-target path has fewer than
``min_steps`` or more than ``max_steps`` hops, or where a person has no exclusive leaf,
are drawn again. The steps are the facts along one shortest path (ties at random); the
question lists every fact, shuffled, then asks "Is <root> a <x> or <y>?" with target and
distractor in random order.

Defaults are tuned so that generated items match the released validation split in nodes,
edges, shortest path, steps and question length (``statistics``), and also in the share of
nodes per family, extra people and parent counts; ``p_family1 > p_family0`` reproduces its
bias towards node 1 as the root (65% of its items).

CLI:
    python -m quietstar.coconut.prosqa generate --n 1000 --seed 0 --output prosqa_gen.jsonl [--set n_nodes=12 ...]
    python -m quietstar.coconut.prosqa stats prosqa_gen.jsonl ../shared/data/prosqa_valid.jsonl [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quietstar.core.cli_config import ArgumentParser, is_int, is_number, key_list, require
from quietstar.core.files import json_lines

PROG = "quietstar.coconut.prosqa"

# People's names (a node with no parents) and the pieces of the made-up concept words.
NAMES = ("Tom", "Anna", "Ben", "Clara", "Dan", "Elsa", "Finn", "Grace", "Hugo", "Iris", "Jack", "Kate",
         "Leo", "Mia", "Nina", "Owen", "Paul", "Rosa", "Sam", "Tina", "Uma", "Vera", "Will", "Zoe")
ONSETS = ("b", "bl", "br", "ch", "d", "dr", "f", "fl", "g", "gl", "gr", "h", "j", "k", "kr", "l", "m", "n", "p",
          "pl", "qu", "r", "s", "sh", "sk", "sl", "sn", "st", "t", "th", "tr", "v", "w", "y", "z", "zh")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("", "b", "d", "g", "l", "m", "n", "r", "x")
ENDINGS = ("pus",)  # every concept of the real split ends so ("wumpus", "lempus"); it keeps the token counts alike
MAX_VOCABULARY = 1000  # well below the len(ONSETS) * len(VOWELS) * len(CODAS) * len(ENDINGS) possible words


@dataclass(frozen=True)
class Settings:
    """Knobs of the generator (see the module docstring for where each acts).

    n_nodes: nodes drawn per graph before parentless, childless ones are dropped.
    parents_mean: mean of the Poisson number of parents of a new node.
    depth_weight: a candidate parent of depth d has weight ``depth_weight * d + 1``.
    p_family0 / p_family1: probability that a new node's parents are all in node 0's / node 1's family.
    min_steps / max_steps: bounds on the shortest root-target path (= the number of steps).
    vocab_size: concept words made per ``generate`` call (the real split uses 38); >= n_nodes.
    no_shortcut: draw again any item whose answer a rule without search decides (``one_hop_shortcut`` is not a
        guess): the distractor is then never the only option that another person is directly. Small graphs
        need it: there the rule alone answers about 80 %.
    """

    n_nodes: int = 28
    parents_mean: float = 1.5
    depth_weight: float = 1.5
    p_family0: float = 0.34
    p_family1: float = 0.46
    min_steps: int = 3
    max_steps: int = 6
    vocab_size: int = 40
    no_shortcut: bool = False

    def __post_init__(self) -> None:
        require(is_int(self.n_nodes) and self.n_nodes >= 4, self, "n_nodes", "must be an integer >= 4")
        require(is_number(self.parents_mean) and self.parents_mean > 0, self, "parents_mean", "must be > 0")
        require(is_number(self.depth_weight) and self.depth_weight >= 0, self, "depth_weight", "must be >= 0")
        require(is_number(self.p_family0) and self.p_family0 >= 0, self, "p_family0", "must be a number >= 0")
        require(is_number(self.p_family1) and self.p_family1 >= 0 and self.p_family0 + self.p_family1 <= 1, self, "p_family1",
                "p_family0 and p_family1 must be >= 0 with a sum <= 1")
        require(is_int(self.min_steps) and self.min_steps >= 1, self, "min_steps", "must be an integer >= 1")
        require(is_int(self.max_steps) and self.max_steps >= self.min_steps, self, "max_steps",
                "min_steps and max_steps must be integers with 1 <= min_steps <= max_steps")
        require(is_int(self.vocab_size) and self.vocab_size >= self.n_nodes, self, "vocab_size", "must be an integer >= n_nodes")
        require(isinstance(self.no_shortcut, bool), self, "no_shortcut", "must be true or false")


def make_settings(**settings: Any) -> Settings:
    """``Settings`` from keyword arguments; an unknown name raises a one-line ValueError."""
    known = [f.name for f in dataclasses.fields(Settings)]
    unknown = [name for name in settings if name not in known]
    if unknown:
        raise ValueError(f"unknown ProsQA setting(s) {key_list(unknown)}; known: {', '.join(known)}")
    return Settings(**settings)


def make_vocabulary(size: int, rng: random.Random) -> list[str]:
    """``size`` distinct nonsense words of two syllables (onset + vowel + coda, then "pus"), e.g. "glorpus"."""
    words: set[str] = set()
    while len(words) < size:
        words.add(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) + rng.choice(ENDINGS))
    return sorted(words)


def _poisson(rng: random.Random, mean: float) -> int:
    """A Poisson(mean) draw (Knuth's product of uniforms; fine for small means)."""
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _graph(rng: random.Random, s: Settings) -> tuple[list[list[int]], list[int]]:
    """(parents per node, family label per node) of one DAG, isolated nodes dropped and the rest renumbered.

    Labels are bit sets: 1 = descends from node 0, 2 = from node 1, 3 = both, 0 = neither.
    """
    parents: list[list[int]] = [[], []]
    label, depth = [1, 2], [0, 0]
    for _ in range(2, s.n_nodes):
        k = _poisson(rng, s.parents_mean)
        r = rng.random()
        allowed = (1,) if r < s.p_family0 else (2,) if r < s.p_family0 + s.p_family1 else (0, 1, 2, 3)
        pool = [i for i in range(len(parents)) if label[i] in allowed]
        weights = [s.depth_weight * depth[i] + 1 for i in pool]
        chosen: list[int] = []
        for _ in range(min(k, len(pool))):
            j = rng.choices(range(len(pool)), weights=weights)[0]
            chosen.append(pool.pop(j))
            weights.pop(j)
        parents.append(chosen)
        label.append(0)
        for p in chosen:
            label[-1] |= label[p]
        depth.append(1 + max(depth[p] for p in chosen) if chosen else 0)
    has_child = [False] * len(parents)
    for ps in parents:
        for p in ps:
            has_child[p] = True
    keep = [i for i in range(len(parents)) if i < 2 or parents[i] or has_child[i]]
    new = {old: i for i, old in enumerate(keep)}
    return [[new[p] for p in parents[i]] for i in keep], [label[i] for i in keep]


def _distances(children: list[list[int]], source: int) -> dict[int, int]:
    """Shortest hop counts from ``source`` to every node it reaches (BFS)."""
    dist, queue = {source: 0}, [source]
    for u in queue:
        for v in children[u]:
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def _item(rng: random.Random, s: Settings, vocabulary: Sequence[str]) -> dict | None:
    """One record in the released format, or None if this graph does not make a valid question."""
    parents, label = _graph(rng, s)
    n = len(parents)
    children: list[list[int]] = [[] for _ in range(n)]
    for child, ps in enumerate(parents):
        for p in ps:
            children[p].append(child)
    people = [i for i in range(n) if not parents[i]]
    if len(people) > len(NAMES):
        return None
    dist = [_distances(children, 0), _distances(children, 1)]
    deepest: list[list[int]] = []
    for person in (0, 1):
        leaves = [i for i in range(n) if label[i] == person + 1 and not children[i]]
        far = max((dist[person][i] for i in leaves), default=0)
        deepest.append([i for i in leaves if dist[person][i] == far] if leaves else [])
    if not deepest[0] or not deepest[1]:
        return None
    far0, far1 = dist[0][deepest[0][0]], dist[1][deepest[1][0]]
    root = 0 if far0 > far1 else 1 if far1 > far0 else rng.randrange(2)
    other = 1 - root
    target = rng.choice(deepest[root])
    d = dist[root]
    if not s.min_steps <= d[target] <= s.max_steps:
        return None
    neg_target = rng.choice([i for i in range(n) if label[i] == other + 1 and not children[i]])

    names = rng.sample(NAMES, len(people))
    words = iter(rng.sample(list(vocabulary), n - len(people)))
    person_names = dict(zip(people, names))
    symbols = [person_names[i] if i in person_names else next(words) for i in range(n)]

    def fact(a: int, b: int) -> str:
        return f"{symbols[a]} is a {symbols[b]}." if not parents[a] else f"Every {symbols[a]} is a {symbols[b]}."

    path = [target]
    while path[-1] != root:
        path.append(rng.choice([p for p in parents[path[-1]] if d.get(p) == d[path[-1]] - 1]))
    path.reverse()
    edges = [[p, child] for child in range(n) for p in parents[child]]
    facts = [fact(a, b) for a, b in edges]
    rng.shuffle(facts)
    options = [symbols[target], symbols[neg_target]]
    rng.shuffle(options)
    question = " ".join(facts) + f" Is {symbols[root]} a {options[0]} or {options[1]}?"
    return {
        "question": question,
        "answer": f"{symbols[root]} is a {symbols[target]}.",
        "steps": [fact(a, b) for a, b in zip(path, path[1:])],
        "idx_to_symbol": symbols,
        "edges": edges,
        "root": root,
        "target": target,
        "neg_target": neg_target,
    }


def iter_items(n: int, seed: int, settings: Settings) -> Iterator[dict]:
    """Yield ``n`` records, deterministic for ``seed`` (one ``random.Random(seed)``, no global state)."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    rng = random.Random(seed)
    vocabulary = make_vocabulary(settings.vocab_size, rng)
    made = tries = 0
    while made < n:
        tries += 1
        if tries > 1000 * (made + 1):
            raise ValueError(f"ProsQA settings {settings} rarely make a valid item ({made} in {tries} tries)")
        item = _item(rng, settings, vocabulary)
        if item is not None and not (settings.no_shortcut and one_hop_shortcut(item) != 0.5):
            made += 1
            yield item


def generate(n: int, seed: int, **settings: Any) -> list[dict]:
    """``n`` ProsQA-style records in the released format, deterministic for ``seed``; ``settings``: fields of ``Settings``."""
    return list(iter_items(n, seed, make_settings(**settings)))


def shortest_path(record: dict) -> int:
    """Hops on the shortest path from ``root`` to ``target`` over ``edges``; ValueError if there is none."""
    n = len(record["idx_to_symbol"])
    children: list[list[int]] = [[] for _ in range(n)]
    for a, b in record["edges"]:
        children[a].append(b)
    dist = _distances(children, record["root"])
    if record["target"] not in dist:
        raise ValueError(f"target {record['target']} is not reachable from root {record['root']}")
    return dist[record["target"]]


def one_hop_shortcut(record: dict) -> float:
    """The credit of a rule that answers without any search: the option that another person (a node with no
    parents, not the root) is directly ("Paul is a pedpus.") is the distractor. 1 when only the distractor is
    one hop from another person, 0 when only the target is, 0.5 (a guess) otherwise."""
    parents = {parent for _, parent in record["edges"]}  # nodes with a child: concepts
    others = {a for a, _ in record["edges"] if a not in parents and a != record["root"]}
    near = [any(a in others and b == option for a, b in record["edges"]) for option in (record["target"], record["neg_target"])]
    return 0.5 if near[0] == near[1] else float(near[1])


def statistics(records: Sequence[dict], tokenizer: Any = None) -> dict[str, float]:
    """Mean size and difficulty of ProsQA records.

    Returns {items, nodes, edges, shortest_path, steps, question_words}, with question_tokens and one_hop_shortcut when known:
    the number of records, then means per record of ``len(idx_to_symbol)``, ``len(edges)``,
    the root-target shortest path, ``len(steps)``, the question's whitespace words and, with
    ``tokenizer`` (anything with ``encode(str) -> list``, e.g. a Hugging Face tokenizer), its tokens; with
    every record's ``neg_target``, the accuracy of ``one_hop_shortcut``, a rule that needs no search (chance 0.5):
    a model can reach it without reasoning.
    """
    if not records:
        raise ValueError("no records to describe")
    keys = ("question", "steps", "idx_to_symbol", "edges", "root", "target")
    for i, r in enumerate(records):
        missing = [k for k in keys if not isinstance(r, dict) or k not in r]
        if missing:
            raise ValueError(f"record {i} is not a ProsQA record: missing {', '.join(missing)}")
    n = len(records)
    stats: dict[str, float] = {
        "items": n,
        "nodes": sum(len(r["idx_to_symbol"]) for r in records) / n,
        "edges": sum(len(r["edges"]) for r in records) / n,
        "shortest_path": sum(shortest_path(r) for r in records) / n,
        "steps": sum(len(r["steps"]) for r in records) / n,
        "question_words": sum(len(r["question"].split()) for r in records) / n,
    }
    if tokenizer is not None:
        stats["question_tokens"] = sum(len(tokenizer.encode(r["question"])) for r in records) / n
    if all("neg_target" in r for r in records):
        stats["one_hop_shortcut"] = sum(one_hop_shortcut(r) for r in records) / n
    return stats


RECORD_KEYS = ("question", "answer", "steps", "idx_to_symbol", "edges", "root", "target", "neg_target")


def record_problem(record: object) -> str | None:
    """Why ``record`` is not a ProsQA record with its graph, or None when it is one.

    A record has every key of ``RECORD_KEYS``; ``question`` and ``answer`` are strings, ``steps`` and
    ``idx_to_symbol`` lists of strings, ``edges`` a list of ``[child, parent]`` pairs and ``root``,
    ``target`` and ``neg_target`` node indices (integers in ``0..len(idx_to_symbol) - 1``).
    """
    if not (isinstance(record, dict) and all(key in record for key in RECORD_KEYS)):
        return f"not a ProsQA record with its graph (keys {', '.join(RECORD_KEYS)})"
    if not (isinstance(record["question"], str) and isinstance(record["answer"], str) and _strings(record["steps"])):
        return "question and answer must be strings and steps a list of strings"
    names = record["idx_to_symbol"]
    if not _strings(names):
        return "idx_to_symbol must be a list of strings"

    def node(value: object) -> bool:
        return is_int(value) and 0 <= value < len(names)

    edges = record["edges"]
    if not (isinstance(edges, list) and all(isinstance(e, list) and len(e) == 2 and node(e[0]) and node(e[1]) for e in edges)):
        return "edges must be [child, parent] pairs of node indices"
    if not all(node(record[key]) for key in ("root", "target", "neg_target")):
        return "root, target or neg_target is not a node"
    return None


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def read_records(path: str | Path) -> list[dict]:
    """The ProsQA records of a jsonl file (blank lines skipped); FileNotFoundError, or a ValueError naming the first
    line that is not UTF-8, not JSON or not a record (``record_problem``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    records = []
    for lineno, record, problem in json_lines(path):
        problem = problem or record_problem(record)
        if problem is not None:
            raise ValueError(f"{path}:{lineno}: {problem}")
        records.append(record)
    return records


def _setting_value(text: str) -> tuple[str, Any]:
    """'name=value' from the command line, the value read as JSON (numbers) or kept as text."""
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def _table(columns: dict[str, dict[str, float]]) -> str:
    """A small text table: one row per statistic, one column per source."""
    rows = list(next(iter(columns.values())))
    rows += [k for c in columns.values() for k in c if k not in rows]
    width = max(12, *(len(name) for name in columns))
    lines = ["statistic".ljust(16) + "".join(name.rjust(width + 2) for name in columns)]
    for row in rows:
        cells = []
        for c in columns.values():
            v = c.get(row)
            cells.append("-" if v is None else f"{v:.0f}" if row == "items" else f"{v:.2f}")
        lines.append(row.ljust(16) + "".join(cell.rjust(width + 2) for cell in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``generate --n N --seed S --out FILE [--set NAME=VALUE ...]`` and ``stats FILE... [--tokenizer PATH]``."""
    parser = ArgumentParser(prog=PROG, description="Generate ProsQA-style data and compare its statistics.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write N generated items as jsonl")
    gen.add_argument("--n", type=int, required=True, help="number of items")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--out", "--output", dest="out", required=True, help="jsonl file to write")
    gen.add_argument("--set", dest="settings", type=_setting_value, action="append", default=[], metavar="NAME=VALUE",
                     help="a generator setting (see Settings), e.g. --set n_nodes=28; repeatable")
    stats = sub.add_parser("stats", help="print mean nodes, edges, path length, steps, question length and a no-search rule's accuracy per file")
    stats.add_argument("files", nargs="+", help="ProsQA jsonl files")
    stats.add_argument("--tokenizer", help="a local Hugging Face tokenizer directory, to count question tokens too")
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            settings = make_settings(**dict(args.settings))
            from tqdm import tqdm

            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("w", encoding="utf-8") as f:
                for item in tqdm(iter_items(args.n, args.seed, settings), total=args.n, desc="prosqa",
                                 disable=args.n < 1000, file=sys.stderr):
                    f.write(json.dumps(item) + "\n")
            print(f"wrote {args.n} items to {out} (seed {args.seed})")
        else:
            tokenizer = None
            if args.tokenizer:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
            columns = {path: statistics(read_records(path), tokenizer) for path in args.files}
            print(_table(columns))
    except (OSError, ValueError, TypeError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

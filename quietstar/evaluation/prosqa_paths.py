"""ProsQA reasoning paths: read a generated path against the item's graph and classify it as the Coconut paper does.

An item (``prosqa_valid.jsonl``, or ``coconut.prosqa``'s generator) carries its graph: ``idx_to_symbol``
(node names), ``edges`` (``[a, b]`` reads "a is a b"), ``root``, ``target`` and ``neg_target``. A
generated output is language steps, then ``### <answer>``; each step is one fact,
``"<person> is a <concept>."`` or ``"Every <concept> is a <concept>."``, so a step is an edge.

After k continuous thoughts the model resumes in language from wherever its latent search got to,
so the language path need not start at the root. The classes (the paper's six, section 5):

    correct_path      a chain of graph edges from a node reachable from the root to the target, on a
                      shortest root-target path: dist(root, start) + len(path) == dist(root, target)
                      (any of several shortest paths)
    longer_path       such a chain to the target, but longer than the shortest
    hallucination     a step that is not an edge of the graph, a step that does not read as a fact,
                      a chain that breaks (a step not starting where the last one ended), or a start
                      the root cannot reach
    wrong_target      a chain of graph edges from a reachable node that ends elsewhere than the target
    correct_label     no language steps, and the answer is right
    incorrect_label   no language steps, and the answer is wrong

With k = 0 the path must start at the root itself (dist 0).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

PATH_CLASSES = ("correct_path", "longer_path", "hallucination", "wrong_target", "correct_label", "incorrect_label")
FACT = re.compile(r"^(?:Every )?(?P<child>\S+) is an? (?P<parent>\S+)$")


@dataclass(frozen=True)
class Graph:
    """An item's graph: node names, their children, and the question's root, target and distractor."""

    names: tuple[str, ...]
    children: tuple[frozenset[int], ...]
    root: int
    target: int
    neg_target: int

    @classmethod
    def of_item(cls, item: dict) -> "Graph":
        names = tuple(item["idx_to_symbol"])
        children = [set() for _ in names]
        for child, parent in item["edges"]:
            children[child].add(parent)
        return cls(names, tuple(frozenset(c) for c in children), item["root"], item["target"], item["neg_target"])

    def node(self, name: str) -> int | None:
        """The index of the node named ``name``, or None."""
        return self.names.index(name) if name in self.names else None

    def distances_from(self, start: int) -> dict[int, int]:
        """Hops from ``start`` to every node it reaches (breadth first along "is a")."""
        hops, queue = {start: 0}, deque([start])
        while queue:
            node = queue.popleft()
            for nxt in self.children[node]:
                if nxt not in hops:
                    hops[nxt] = hops[node] + 1
                    queue.append(nxt)
        return hops

    def frontier(self, depth: int) -> set[int]:
        """The nodes exactly ``depth`` hops from the root by their shortest path."""
        return {node for node, hops in self.distances_from(self.root).items() if hops == depth}

    def height(self, node: int) -> int:
        """Hops from ``node`` to its nearest leaf (a node with no "is a" out of it): 0 for a leaf."""
        return min(h for n, h in self.distances_from(node).items() if not self.children[n])


def split_output(text: str) -> tuple[list[str], str]:
    """A generated output -> (its language steps without their full stops, its answer): the steps are the
    sentences before the last ``#``, split at full stops and line breaks."""
    reasoning, hashes, answer = text.rpartition("#")
    if not hashes:
        reasoning, answer = text, ""
    steps = [s.strip() for s in re.split(r"[.\n#]", reasoning) if s.strip()]
    return steps, answer.strip()


def classify_path(graph: Graph, text: str, answer_correct: bool, latents: int = 0) -> str:
    """The class (``PATH_CLASSES``) of the generated output ``text`` for the item's ``graph``, after ``latents``
    continuous thoughts (with none, the path must start at the root)."""
    steps, _ = split_output(text)
    if not steps:
        return "correct_label" if answer_correct else "incorrect_label"
    edges = []
    for step in steps:
        fact = FACT.match(step)
        if fact is None:
            return "hallucination"
        child, parent = graph.node(fact["child"]), graph.node(fact["parent"])
        if child is None or parent is None or parent not in graph.children[child]:
            return "hallucination"
        edges.append((child, parent))
    if any(edges[i][1] != edges[i + 1][0] for i in range(len(edges) - 1)):
        return "hallucination"
    from_root = graph.distances_from(graph.root)
    start, end = edges[0][0], edges[-1][1]
    if start not in from_root or (latents == 0 and start != graph.root):
        return "hallucination"
    if end != graph.target:
        return "wrong_target"
    return "correct_path" if from_root[start] + len(edges) == from_root[graph.target] else "longer_path"

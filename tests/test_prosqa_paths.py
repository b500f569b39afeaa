"""The ProsQA path classifier against hand-made graphs: every class, ties between shortest paths, partial latents."""

import pytest

from quietstar.evaluation.prosqa_paths import PATH_CLASSES, Graph, classify_path, split_output

#  Tom -> alpus, bempus;  alpus -> cirpus, epus;  bempus -> cirpus, gorpus;  cirpus -> dumpus (the target);
#  epus -> fempus -> dumpus (a longer way);  Ann -> xorpus (the distractor, out of Tom's reach)
NAMES = ["Tom", "Ann", "alpus", "bempus", "cirpus", "dumpus", "epus", "fempus", "gorpus", "xorpus"]
EDGES = [[0, 2], [0, 3], [2, 4], [3, 4], [4, 5], [2, 6], [6, 7], [7, 5], [3, 8], [1, 9]]
ITEM = {"idx_to_symbol": NAMES, "edges": EDGES, "root": 0, "target": 5, "neg_target": 9}


def lines(*steps, answer="Tom is a dumpus."):
    return "\n".join(steps) + f"\n### {answer}"


@pytest.mark.parametrize("text,answer_correct,latents,expected", [
    (lines("Tom is a alpus.", "Every alpus is a cirpus.", "Every cirpus is a dumpus."), True, 0, "correct_path"),
    (lines("Tom is a bempus.", "Every bempus is a cirpus.", "Every cirpus is a dumpus."), True, 0, "correct_path"),  # the tie
    (lines("Tom is a alpus.", "Every alpus is a epus.", "Every epus is a fempus.", "Every fempus is a dumpus."), True, 0,
     "longer_path"),
    (lines("Tom is a alpus.", "Every alpus is a xorpus."), False, 0, "hallucination"),  # not an edge
    (lines("Tom is a alpus.", "Every cirpus is a dumpus."), True, 0, "hallucination"),  # the chain breaks
    (lines("Tom is a alpus.", "Every alpus is a blorpus."), False, 0, "hallucination"),  # no such node
    (lines("Tom likes alpus."), False, 0, "hallucination"),  # not a fact
    (lines("Every alpus is a cirpus.", "Every cirpus is a dumpus."), True, 0, "hallucination"),  # skips the root
    (lines("Tom is a bempus.", "Every bempus is a gorpus.", answer="Tom is a gorpus."), False, 0, "wrong_target"),
    ("### Tom is a dumpus.", True, 6, "correct_label"),
    ("### Tom is a xorpus.", False, 6, "incorrect_label"),
    (lines("Every cirpus is a dumpus."), True, 1, "correct_path"),  # the latent got to cirpus's parent's level
    (lines("Every alpus is a cirpus.", "Every cirpus is a dumpus."), True, 1, "correct_path"),
    (lines("Every epus is a fempus.", "Every fempus is a dumpus."), True, 1, "longer_path"),
    (lines("Ann is a xorpus.", answer="Tom is a xorpus."), False, 1, "hallucination"),  # starts out of the root's reach
])
def test_each_class_against_a_hand_made_graph(text, answer_correct, latents, expected):
    assert classify_path(Graph.of_item(ITEM), text, answer_correct, latents) == expected


def test_every_class_is_covered_above():
    (mark,) = [m for m in test_each_class_against_a_hand_made_graph.pytestmark if m.name == "parametrize"]
    assert {case[-1] for case in mark.args[1]} == set(PATH_CLASSES)


def test_graph_quantities():
    graph = Graph.of_item(ITEM)
    assert graph.frontier(1) == {2, 3} and graph.frontier(2) == {4, 6, 8} and graph.frontier(3) == {5, 7}
    assert [graph.height(n) for n in (5, 4, 3, 0)] == [0, 1, 1, 2]  # bempus -> gorpus, a leaf, in one hop
    assert graph.distances_from(0)[5] == 3 and 9 not in graph.distances_from(0)


def test_split_output_reads_steps_and_answer():
    assert split_output("Tom is a alpus. Every alpus is a cirpus.\n### Tom is a cirpus.") == (
        ["Tom is a alpus", "Every alpus is a cirpus"], "Tom is a cirpus.")
    assert split_output("no answer here") == (["no answer here"], "")

"""coconut-analyze: node values against a one-item-at-a-time computation, batched against unbatched, the report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_lm, tiny_tokenizer

from quietstar.coconut.config import CoconutConfig
from quietstar.coconut.curriculum import encode, inference_prompt
from quietstar.coconut.model import CoconutModel
from quietstar.evaluation.coconut_analysis import decode_paths, frontier_after, main, node_pieces, node_values, with_thoughts
from quietstar.evaluation.prosqa_paths import PATH_CLASSES, Graph

NAMES = ["Tom", "Ann", "alpus", "bempus", "cirpus", "dumpus", "epus", "fempus", "gorpus", "xorpus"]
VOCAB = (["<pad>", "<unk>", "<eos>", "Every", "is", "a", "Is", "or", "###"]
         + [n + end for n in NAMES for end in ("", ".", "?")])


def item(edges, root, target, neg_target, question_order):
    facts = [("Every " if child not in (0, 1) else "") + f"{NAMES[child]} is a {NAMES[parent]}." for child, parent in edges]
    question = " ".join(facts[i] for i in question_order) + f" Is {NAMES[root]} a {NAMES[target]} or {NAMES[neg_target]}?"
    return {"question": question, "answer": f"{NAMES[root]} is a {NAMES[target]}.", "steps": [],
            "idx_to_symbol": NAMES, "edges": edges, "root": root, "target": target, "neg_target": neg_target}


EDGES = [[0, 2], [0, 3], [2, 4], [3, 4], [4, 5], [2, 6], [6, 7], [7, 5], [3, 8], [1, 9]]
ITEMS = [item(EDGES, 0, 5, 9, range(10)), item(EDGES[:5] + [[1, 9]], 0, 5, 9, [5, 3, 1, 0, 4, 2]),
         item([[1, 2], [2, 3], [1, 4], [0, 9]], 1, 3, 9, [2, 0, 1, 3])]


def coconut_model(family: str, mode: str = "coconut") -> CoconutModel:
    torch.manual_seed(1)
    return CoconutModel(tiny_lm(family, vocab_size=len(VOCAB)), tiny_tokenizer(VOCAB),
                        CoconutConfig(mode=mode, c=1, max_latent_stage=2)).eval()


def one_at_a_time(model: CoconutModel, record: dict, k: int) -> dict[int, float]:
    """Each node's value from its own full sequence, run without a cache: question, k latents, <eot>, Every, name."""
    prompt = encode(inference_prompt(record["question"], with_thoughts(model.config, k)), model.tokenizer, with_answer=False)[0]
    concepts, prefix, suffixes = node_pieces(model.tokenizer, record)
    values = {}
    for node, suffix in zip(concepts, suffixes):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + prefix + suffix])).logits[0].double()
        start = len(prompt) + len(prefix)
        values[node] = math.exp(sum(float(torch.log_softmax(logits[start - 1 + j], -1)[t]) for j, t in enumerate(suffix)))
    return values


@pytest.mark.parametrize("family,mode", [("gpt2", "coconut"), ("llama", "coconut"), ("gpt2", "pause_as_thought")])
def test_node_values_equal_a_one_item_at_a_time_computation_batched_or_not(family, mode):
    model = coconut_model(family, mode)
    for k in (1, 2):
        batched = node_values(model, model.config, ITEMS, k, batch_size=3, device=torch.device("cpu"))
        single = node_values(model, model.config, ITEMS, k, batch_size=1, device=torch.device("cpu"))
        for record, got, alone in zip(ITEMS, batched, single):
            expected = one_at_a_time(model, record, k)
            assert got.keys() == expected.keys() == alone.keys()
            for node in expected:
                assert got[node] == pytest.approx(expected[node], rel=1e-4)
                assert got[node] == pytest.approx(alone[node], rel=1e-5)
        assert all(0 < sum(v.values()) <= 1 + 1e-6 for v in batched)  # probabilities of distinct names


@pytest.mark.parametrize("mode", ["coconut", "pause_as_thought"])
def test_partial_latent_paths_batched_equal_one_item_at_a_time(mode):
    model = coconut_model("llama", mode)
    for k in (0, 1, 2):
        batched = decode_paths(model, "coconut", model.config, ITEMS, k, 3, 8, torch.device("cpu"))
        single = [decode_paths(model, "coconut", model.config, [record], k, 1, 8, torch.device("cpu"))[0] for record in ITEMS]
        assert batched == single
        assert all(r["class"] in PATH_CLASSES for r in batched)


def test_concepts_and_frontiers_follow_the_graph():
    graph = Graph.of_item(ITEMS[0])
    concepts, prefix, suffixes = node_pieces(tiny_tokenizer(VOCAB), ITEMS[0])
    assert concepts == [2, 3, 4, 5, 6, 7, 8, 9]  # every node with a parent; Tom and Ann are people
    assert all(len(s) == 1 for s in suffixes) and len(prefix) == 1
    assert frontier_after(graph, 0) == {0} and frontier_after(graph, 1) == {2, 3} and frontier_after(graph, 2) == {4, 6, 8}
    assert frontier_after(graph, 3) == {5, 7}


def test_the_command_writes_the_report_figures_and_page(tmp_path):
    model = coconut_model("gpt2")
    model.save_pretrained(tmp_path / "model")
    data = tmp_path / "prosqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    out = tmp_path / "report"
    assert main(["--model", str(tmp_path / "model"), "--data-file", str(data), "--output-dir", str(out),
                 "--batch-size", "2", "--max-new-tokens", "6"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["max_thoughts"] == 2 and len(report["items"]) == 3
    summary = report["summary"]
    assert sorted(summary["path_classes"]) == ["0", "1", "2"] and sorted(summary["value_mass"]) == ["1", "2"]
    for shares in summary["path_classes"].values():
        assert set(shares) == set(PATH_CLASSES) and sum(shares.values()) == pytest.approx(1.0)
    first = report["items"][0]
    assert set(first["paths"]) == {"0", "1", "2"} and set(first["node_values"]) == {"1", "2"}
    assert first["paths"]["1"]["class"] in PATH_CLASSES and "alpus" in first["node_values"]["1"]
    assert "1->2" in summary["top_node_changes"]
    for name in ("path_classes.png", "frontier_values.png", "index.html"):
        assert (out / name).stat().st_size > 0
    assert "Item 0" in (out / "index.html").read_text()


def test_a_record_without_its_graph_fails_in_one_line_naming_the_line(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(ITEMS[0]) + "\n" + json.dumps({"question": "q", "answer": "a", "steps": []}) + "\n")
    assert main(["--model", str(tmp_path / "nowhere"), "--data-file", str(data), "--output-dir", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "bad.jsonl line 2" in error and "graph" in error


def test_a_cot_model_is_analysed_at_k_0_only(tmp_path):
    """A model trained on written steps has no thoughts to stop after: its paths at k = 0, and no node values."""
    model = coconut_model("gpt2", mode="cot")
    model.save_pretrained(tmp_path / "model")
    data = tmp_path / "prosqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    out = tmp_path / "report"
    assert main(["--model", str(tmp_path / "model"), "--data-file", str(data), "--output-dir", str(out),
                 "--max-new-tokens", "6"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["max_thoughts"] == 0 and list(report["summary"]["path_classes"]) == ["0"]
    assert report["summary"]["value_mass"] == {} and all(i["node_values"] == {} for i in report["items"])
    assert (out / "path_classes.png").stat().st_size > 0 and not (out / "frontier_values.png").exists()
    assert main(["--model", str(tmp_path / "model"), "--data-file", str(data), "--output-dir", str(out),
                 "--max-thoughts", "2"]) == 2

"""Coconut's data: GSM8K extraction, reading with skip counts, round trips, answer scoring, and the ProsQA-style generator."""

from __future__ import annotations

import json
from collections import deque

import pytest

from quietstar.coconut import data, prosqa
from quietstar.core.cli_config import ConfigError
from quietstar.coconut.data import Example, answer_of, answers_match, gsm8k_example, qa_example, read_examples, write_examples

# Raw GSM8K records, in the released format (the second has no calculator annotation).
GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
               "So she earns 72*1000/72 = <<72*1000/72=1000>>1000 cents.\n#### 1,000"},
    {"question": "Tom has 3 apples and gets 2 more. How many apples does he have?",
     "answer": "He has 3 + 2 = 5 apples.\n#### 5"},
]
PROSQA_KEYS = ["question", "answer", "steps", "idx_to_symbol", "edges", "root", "target", "neg_target"]


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


# ---- GSM8K and converted records -------------------------------------------------------------------------


def test_gsm8k_steps_are_the_annotations_in_order_and_the_answer_loses_commas():
    ex = gsm8k_example(GSM8K[0])
    assert ex == Example(GSM8K[0]["question"], ("<<48/2=24>>", "<<48+24=72>>", "<<72*1000/72=1000>>"), "1000")
    assert gsm8k_example(GSM8K[1]) == Example(GSM8K[1]["question"], (), "5")


@pytest.mark.parametrize("record", [
    None, [1, 2], "text", {"question": "q"}, {"answer": "#### 4"}, {"question": 3, "answer": "#### 4"},
    {"question": "q", "answer": "no final marker 4"}, {"question": "q", "answer": "<<1+1=2>>2 ####  "},
])
def test_malformed_gsm8k_records_give_none(record):
    assert gsm8k_example(record) is None


def test_qa_example_takes_converted_records_and_ignores_extra_keys():
    assert qa_example({"question": "q", "steps": ["a", "b"], "answer": "x", "edges": [[0, 1]]}) == Example("q", ("a", "b"), "x")
    for bad in [{"question": "q", "answer": "x"}, {"question": "q", "steps": "a", "answer": "x"},
                {"question": "q", "steps": ["a", 2], "answer": "x"}, {"question": "q", "steps": [], "answer": 3}, ["q"]]:
        assert qa_example(bad) is None


def test_read_examples_skips_and_counts_every_kind_of_bad_line(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", [
        json.dumps(GSM8K[0]),
        "",                                                          # blank: not counted
        "{not json",                                                 # bad JSON
        json.dumps([1, 2, 3]),                                       # not an object
        json.dumps({"question": "q", "steps": ["a"]}),              # missing field
        json.dumps({"question": "q", "steps": "a", "answer": "x"}),  # wrong type
        json.dumps({"question": 7, "answer": "#### 7"}),             # wrong type (raw form)
        b"\xff\xfe not utf-8",                                       # undecodable
        "   ",
        json.dumps({"question": "q2", "steps": ["s1", "s2"], "answer": "y"}),
        json.dumps(GSM8K[1]),
    ])
    examples, skipped = read_examples(path)
    assert skipped == 6
    assert [ex.answer for ex in examples] == ["1000", "y", "5"]
    assert examples[1] == Example("q2", ("s1", "s2"), "y")


def test_missing_file_and_files_without_examples_raise_one_line_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl") as err:
        read_examples(missing)
    assert "\n" not in str(err.value)
    for name, lines in [("bad.jsonl", ["{x", "[]"]), ("empty.jsonl", ["", " "])]:
        with pytest.raises(ValueError, match="no examples in") as err:
            read_examples(write_lines(tmp_path / name, lines))
        assert "\n" not in str(err.value)


def test_write_then_read_round_trips(tmp_path):
    examples = [Example("Qui a 3 œufs ?", ("<<1+2=3>>", "step two"), "3"), Example("no steps", (), "True")]
    path = tmp_path / "sub" / "out.jsonl"
    assert write_examples(path, examples) == 2
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()][1] == \
        {"question": "no steps", "steps": [], "answer": "True"}
    assert read_examples(path) == (examples, 0)


def test_convert_gsm8k_cli(tmp_path, capsys):
    raw = write_lines(tmp_path / "raw.jsonl", [json.dumps(r) for r in GSM8K] + ["oops"])
    out = tmp_path / "out.jsonl"
    assert data.main(["convert-gsm8k", str(raw), str(out)]) == 0
    assert "wrote 2 examples" in capsys.readouterr().out
    assert read_examples(out) == ([gsm8k_example(r) for r in GSM8K], 0)
    assert data.main(["convert-gsm8k", str(tmp_path / "missing.jsonl"), str(out)]) == 2
    assert capsys.readouterr().err.startswith("quietstar.coconut.data: error: data file not found")


def test_answer_of_and_answers_match():
    assert answer_of("<<4-2=2>>\n<<100*3=300>>\n### 300") == "300"
    assert answer_of("Tom is a wumpus.\n### Tom is a lempus. ") == "Tom is a lempus."
    assert answer_of("a # b ## 12\n") == "12"
    assert answer_of(" 42 ") == "42"
    assert answer_of("### 1,300") == "1300"
    assert answers_match(" 300\n", "300")
    assert not answers_match("300.0", "300")
    assert not answers_match("1,000", "1000")


# ---- the ProsQA-style generator ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def items():
    return prosqa.generate(60, seed=7)


def reachable(record, start):
    children = {}
    for a, b in record["edges"]:
        children.setdefault(a, []).append(b)
    seen, queue = {start}, deque([start])
    while queue:
        for v in children.get(queue.popleft(), []):
            if v not in seen:
                seen.add(v)
                queue.append(v)
    return seen


def test_generation_is_deterministic_for_a_seed(items):
    assert prosqa.generate(60, seed=7) == items
    assert prosqa.generate(5, seed=8) != items[:5]
    assert prosqa.generate(0, seed=1) == []


def test_records_have_the_released_format(items):
    for r in items:
        assert list(r) == PROSQA_KEYS
        sym = r["idx_to_symbol"]
        assert len(set(sym)) == len(sym) and all(0 <= a < b < len(sym) for a, b in r["edges"])
        root, target, neg = sym[r["root"]], sym[r["target"]], sym[r["neg_target"]]
        assert r["root"] in (0, 1) and r["answer"] == f"{root} is a {target}."
        assert r["question"].endswith((f" Is {root} a {target} or {neg}?", f" Is {root} a {neg} or {target}?"))
        facts = r["question"].rsplit(" Is ", 1)[0]
        assert facts.count(".") == len(r["edges"])
        has_parent = {b for _, b in r["edges"]}
        for a, b in r["edges"]:  # every edge is a fact of the question, in the person or concept wording
            fact = f"Every {sym[a]} is a {sym[b]}." if a in has_parent else f"{sym[a]} is a {sym[b]}."
            assert fact in facts


def test_steps_follow_a_shortest_path_to_the_answer_and_the_distractor_is_unreachable(items):
    for r in items:
        sym, edges = r["idx_to_symbol"], {tuple(e) for e in r["edges"]}
        assert 3 <= len(r["steps"]) <= 6
        assert len(r["steps"]) == prosqa.shortest_path(r)
        node = r["root"]
        for i, step in enumerate(r["steps"]):  # walk the chain of facts from the root
            head = f"{sym[node]} is a " if i == 0 else f"Every {sym[node]} is a "
            assert step.startswith(head) and step.endswith(".")
            nxt = sym.index(step[len(head):-1])
            assert (node, nxt) in edges
            node = nxt
        assert node == r["target"]
        assert r["neg_target"] not in reachable(r, r["root"])
        assert r["target"] not in reachable(r, 1 - r["root"])
        assert not any(a in (r["target"], r["neg_target"]) for a, _ in r["edges"])  # both are leaves


def test_settings_bound_the_steps_and_unknown_settings_are_refused():
    assert {len(r["steps"]) for r in prosqa.generate(10, seed=0, min_steps=4, max_steps=4)} == {4}
    with pytest.raises(ValueError, match="unknown ProsQA setting"):
        prosqa.generate(1, seed=0, n_node=20)
    with pytest.raises(ValueError, match="min_steps"):
        prosqa.generate(1, seed=0, min_steps=5, max_steps=4)


def test_read_examples_loads_generated_records_and_statistics_describe_them(tmp_path, items):
    path = tmp_path / "prosqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    examples, skipped = read_examples(path)
    assert skipped == 0 and len(examples) == len(items)
    assert examples[0] == Example(items[0]["question"], tuple(items[0]["steps"]), items[0]["answer"])

    class Words:
        def encode(self, text):
            return text.split()

    stats = prosqa.statistics(items, tokenizer=Words())
    assert stats["items"] == 60 and stats["steps"] == stats["shortest_path"]
    assert stats["question_tokens"] == stats["question_words"]
    assert 3 <= stats["steps"] <= 6 and stats["edges"] > stats["nodes"] > 10
    with pytest.raises(ValueError, match="record 0"):
        prosqa.statistics([{"question": "q"}])


def test_the_one_hop_shortcut_reads_which_option_another_person_is_directly():
    #  Tom (root) -> alpus -> dumpus (target);  Ann -> xorpus (the distractor), or Ann -> dumpus, or Ann -> alpus
    def record(ann_edges):
        return {"question": "...", "steps": ["Tom is a alpus.", "Every alpus is a dumpus."], "root": 0, "target": 3,
                "neg_target": 4, "idx_to_symbol": ["Tom", "Ann", "alpus", "dumpus", "xorpus"], "edges": [[0, 2], [2, 3]] + ann_edges}

    assert prosqa.one_hop_shortcut(record([[1, 4]])) == 1.0  # only the distractor is one hop from another person
    assert prosqa.one_hop_shortcut(record([[1, 3], [1, 4]])) == 0.5  # both: a guess
    assert prosqa.one_hop_shortcut(record([[1, 2], [2, 4]])) == 0.5  # neither (xorpus is two hops from Ann)
    assert prosqa.one_hop_shortcut(record([[1, 3], [1, 2], [2, 4]])) == 0.0  # only the target: the rule is wrong
    assert prosqa.one_hop_shortcut({**record([[1, 4]]), "edges": [[0, 4], [0, 2], [2, 3], [1, 2]]}) == 0.5  # the root's own
    records = [record([[1, 4]]), record([[1, 3], [1, 2], [2, 4]])]
    assert prosqa.statistics(records)["one_hop_shortcut"] == 0.5
    assert "one_hop_shortcut" not in prosqa.statistics([{k: v for k, v in records[0].items() if k != "neg_target"}])


def test_no_shortcut_draws_only_items_the_one_hop_rule_cannot_decide():
    small = dict(n_nodes=12, min_steps=2, max_steps=3, vocab_size=24)
    plain = prosqa.generate(200, 7, **small)
    assert prosqa.statistics(plain)["one_hop_shortcut"] > 0.7  # small graphs give the answer away
    assert prosqa.generate(200, 7, **small, no_shortcut=False) == plain  # the default stream is unchanged
    hard = prosqa.generate(200, 7, **small, no_shortcut=True)
    assert all(prosqa.one_hop_shortcut(r) == 0.5 for r in hard) and len({r["question"] for r in hard}) == 200
    with pytest.raises(ConfigError, match="Settings.no_shortcut"):
        prosqa.generate(1, 0, no_shortcut="yes")


def test_prosqa_cli_generates_and_prints_stats(tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    assert prosqa.main(["generate", "--n", "5", "--seed", "3", "--out", str(out), "--set", "n_nodes=24"]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == prosqa.generate(5, seed=3, n_nodes=24)
    assert prosqa.main(["stats", str(out)]) == 0
    table = capsys.readouterr().out
    assert "shortest_path" in table and "question_words" in table
    assert prosqa.main(["stats", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("quietstar.coconut.prosqa: error:")

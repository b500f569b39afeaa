"""The reasoning testbed: the task's problems and forms, its tokenizer and config, the statistics, and the whole
table's plumbing at a tiny size (the plumbing, not the effect: the effect needs the default size)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from quietstar.cli import main as cli_main
from quietstar.core.cli_config import ConfigError
from quietstar.testbed import quiet_star_arm, task
from quietstar.testbed.base_lm import read_answer
from quietstar.testbed.config import TestbedConfig as Settings  # not Test*: pytest would collect it
from quietstar.testbed.table import paired, sign_test
from quietstar.testbed.tokenizer import char_tokenizer


def evaluate_question(question: str) -> dict[str, int]:
    """The variables' values, computed by executing the assignments as Python (an independent reading of the text)."""
    env: dict[str, int] = {}
    for statement in question.rstrip("?").split(";")[:-1]:
        name, expression = statement.split("=")
        env[name] = eval(expression, {}, dict(env)) % 10  # noqa: S307 - our own generated arithmetic
    return env


@pytest.mark.parametrize("hops", [1, 2, 4, 7])
def test_problems_state_the_values_their_assignments_compute(hops):
    for problem in task.problems("train", 50, hops, seed=3):
        env = evaluate_question(problem.question)
        assert problem.hops == hops and problem.question.endswith(f"{problem.names[-1]}?")
        assert [env[n] for n in problem.names[1:]] == list(problem.values)
        assert problem.answer == str(env[problem.names[-1]])
        assert problem.worked == f"{problem.question}[{problem.chain}]{problem.answer}"
        assert problem.unworked == problem.question + problem.answer
        assert problem.coconut_record() == {"question": problem.question, "steps": list(problem.steps), "answer": problem.answer}
        assert re.fullmatch(r"([a-z]\d)+", problem.chain) and len(problem.steps) == hops


def test_splits_are_disjoint_by_question_seeded_and_reject_impossible_counts():
    splits = {s: task.problems(s, 300, 3, seed=0) for s in task.SPLITS}
    questions = {s: {p.question for p in items} for s, items in splits.items()}
    assert all(len(q) == 300 for q in questions.values())
    assert not (questions["train"] & questions["valid"]) and not (questions["train"] & questions["test"])
    assert not (questions["valid"] & questions["test"])
    assert task.problems("valid", 300, 3, seed=0) == splits["valid"]
    assert task.problems("valid", 300, 3, seed=1) != splits["valid"]
    with pytest.raises(ValueError, match="distinct valid problems of 1 hop"):
        task.problems("valid", 5000, 1, seed=0)  # one hop has only 10 * 3 * 10 = 300 questions in all
    with pytest.raises(ValueError, match="hops must be in"):
        task.make_problem(__import__("random").Random(0), 0)


def test_documents_mix_the_forms_as_asked():
    items = task.problems("train", 200, 2, seed=0)
    stream = task.iter_documents(items, 0.25, seed=1)
    docs = [next(stream) for _ in range(2000)]
    worked = sum("[" in d for d in docs) / len(docs)
    assert 0.2 < worked < 0.3
    assert all("[" not in d for d in (next(task.iter_documents(items, 0.0, 2)) for _ in range(50)))


def test_reading_chains_and_answers():
    names = tuple("abcde")
    assert task.parse_chain("b9c6d2e6]6", names) == {"b": 9, "c": 6, "d": 2, "e": 6}
    assert task.parse_chain("b9c6x", names) == {"b": 9, "c": 6}
    assert task.parse_chain("9c6", names) == {}
    problem = task.Problem("a=1;b=a*9;c=b*4;c?", tuple("abc"), (9, 6))
    assert task.chain_content("b9c6]6", problem) == (True, 1.0)
    assert task.chain_content("b9<eos>c6", problem) == (True, 1.0)  # special tokens say nothing about the chain
    assert task.chain_content("7b9c5", problem) == (False, 0.5)
    assert task.chain_content("c6", problem) == (False, 0.0)
    assert read_answer("[b9c6]6<") == "6" and read_answer("4") == "4" and read_answer("[b9c6") is None and read_answer("") is None


def test_the_tokenizer_is_one_token_per_character_and_round_trips():
    tokenizer = char_tokenizer()
    text = "a=1;b=a*9;b?[b9]9\n### 9"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer("---", add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids("-")] * 3


def test_oracle_thoughts_are_the_chain_then_the_close_and_answer():
    tokenizer = char_tokenizer()
    problem = task.problems("train", 1, 2, seed=0)[0]
    method = quiet_star_arm.row_config(Settings(hops=2, qs_thought_len=7), "oracle")
    ids = torch.zeros(1, 3, dtype=torch.long)
    thoughts = quiet_star_arm.oracle_thoughts([problem], ids, method, tokenizer)
    assert thoughts.shape == (1, 3, 2, 7)
    text = tokenizer.decode(thoughts[0, 2, 1].tolist(), skip_special_tokens=False)
    assert text == f"{problem.chain}]{problem.answer}<eos>"


def test_rows_start_their_markers_as_named():
    cfg = Settings()
    assert quiet_star_arm.row_config(cfg, "delimiters").marker_init_text == "["
    assert quiet_star_arm.row_config(cfg, "delimiters").end_marker_init_text == "]"
    assert quiet_star_arm.row_config(cfg, "default_markers").marker_init_text == "---"
    assert quiet_star_arm.row_config(cfg, "task_markers").marker_init_text == "b"
    assert quiet_star_arm.row_config(cfg, "reference_objective").loss_reduction == "reference"
    assert quiet_star_arm.row_config(cfg, "delimiters").thought_len == 2 * cfg.hops


@pytest.mark.parametrize("field,value,match", [
    ("hops", 0, "TestbedConfig.hops"), ("qs_rows", "delimiters,nope", "unknown row"), ("seeds", "1,1", "each once"),
    ("seeds", "1,x", "comma-separated integers"), ("heads", 3, "must divide hidden_size"), ("eval_split", "train", "valid or test"),
    ("qs_n_thoughts", 1, ">= 2"), ("coconut_rows", "cot,bad", "unknown row"), ("min_hops", 5, "TestbedConfig.min_hops"),
    ("coconut_latents_per_step", 0, "TestbedConfig.coconut_latents_per_step"),
])
def test_bad_settings_fail_naming_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        Settings(**{field: value})


def test_sign_test_and_paired_comparison():
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 0) == pytest.approx(2 / 32)
    assert sign_test(3, 3) == 1.0
    result = paired([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]], [[2.0, 2.0, 4.0], [2.0, 2.0, 2.0]], lower_is_better=True)
    assert result["difference"] == pytest.approx(((2 - 8 / 3) + (1 - 2)) / 2)
    assert (result["wins"], result["losses"]) == (5, 0)


TINY = ["--hops", "3", "--min-hops", "2", "--layers", "1", "--hidden-size", "32", "--heads", "2", "--base-steps", "10", "--base-batch-size", "8",
        "--base-problems", "200", "--eval-problems", "8", "--qs-steps", "2", "--qs-batch-size", "4", "--qs-rows",
        "delimiters,oracle", "--coconut-rows", "coconut,no_cot", "--coconut-train-problems", "16", "--coconut-batch-size", "8",
        "--seeds", "1,2", "--workers", "1"]


def test_the_table_runs_end_to_end_at_a_tiny_size_and_resumes(tmp_path, capsys):
    out, cache = tmp_path / "table", tmp_path / "cache"
    assert cli_main(["testbed", "table", "--out", str(out), "--cache", str(cache), *TINY]) == 0
    table = json.loads((out / "table.json").read_text())
    assert set(table["quietstar"]) == {"delimiters", "oracle"} and set(table["coconut"]) == {"coconut", "no_cot"}
    jobs = sorted(p.name for p in (out / "jobs").iterdir())
    assert jobs == sorted(f"{arm}-{row}-s{s}.json" for arm, rows in (("quietstar", ("delimiters", "oracle")),
                                                                      ("coconut", ("coconut", "no_cot"))) for row in rows for s in (1, 2))
    job = json.loads((out / "jobs" / "quietstar-delimiters-s1.json").read_text())
    assert all(len(values) == 16 for values in job["after"].values())  # 8 problems at each of 2 and 3 hops, easiest first
    other = json.loads((out / "jobs" / "quietstar-delimiters-s2.json").read_text())
    seed_means = [sum(j["after"]["shuffled_nll"][8:]) / 8 for j in (job, other)]  # the headline is the hardest difficulty
    assert table["quietstar"]["delimiters"]["shuffled_nll"][0] == pytest.approx(sum(seed_means) / 2)
    easy = [sum(j["after"]["correct_thought"][:8]) / 8 for j in (job, other)]
    assert table["by_hops"]["QS delimiters: thought"]["2"][0] == pytest.approx(sum(easy) / 2)
    assert set(table["by_hops"]) == {"QS delimiters: no thought", "QS delimiters: thought", "QS oracle: no thought",
                                     "QS oracle: thought", "Coconut coconut", "Coconut no_cot"}
    assert set(table["base"]["by_hops"]) == {"2", "3"}
    assert {"probe_own_sampled_nll", "probe_shuffled_nll", "sot_drift"} <= set(job["log"][-1]) and "grad_ratio" in job["log"][0]
    assert (out / "own_vs_shuffled.png").stat().st_size > 0 and (out / "accuracy.png").stat().st_size > 0
    assert "## Paired comparisons" in (out / "table.md").read_text()
    assert "| base LM, answering at once |" in (out / "table.md").read_text()
    assert len(list(cache.glob("base-*/model.safetensors"))) == 1
    # A second run finds every job done and the base cached: nothing is trained again.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "jobs").iterdir()}
    assert cli_main(["testbed", "table", "--out", str(out), "--cache", str(cache), *TINY]) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "jobs").iterdir()}


def test_describe_and_generate(tmp_path, capsys):
    assert cli_main(["testbed", "describe", "--hops", "3", "--base-problems", "50", "--eval-problems", "20"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["train_problems"] == 50 and described["valid_problems"] == 40 and len(described["examples"]) == 3
    assert described["hops"] == [2, 3] and set(described["majority_class_rate"]) == {"2", "3"}
    assert cli_main(["testbed", "generate", "--out", str(tmp_path), "--hops", "3", "--base-problems", "50",
                     "--eval-problems", "20"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert len(lines) == 40 and all(r["worked"].startswith(r["question"]) and len(r["steps"]) == r["hops"] for r in lines)
    assert {r["hops"] for r in lines} == {2, 3}
    assert cli_main(["testbed", "describe", "--hops", "0"]) == 2
    assert "TestbedConfig.hops" in capsys.readouterr().err


def test_the_demo_config_is_the_tables_delimiters_row_alone_on_a_shorter_base():
    """launch/configs/testbed_demo.yaml (make testbed-demo) changes only the base's length, the sizes and the rows:
    the Quiet-STaR row it runs is the full table's."""
    from pathlib import Path

    from quietstar.core.cli_config import build_config, load_yaml

    demo = build_config(Settings, load_yaml(Path(__file__).resolve().parents[1] / "launch" / "configs" / "testbed_demo.yaml"))
    assert demo.quiet_star_rows == ("delimiters",) and demo.coconut_row_list == () and demo.seed_list == (1,)
    assert demo.base_steps < Settings().base_steps and demo.eval_split == "test"  # settings were chosen on valid
    row_fields = [name for name in Settings.__dataclass_fields__ if name.startswith("qs_") and name != "qs_rows"]
    assert all(getattr(demo, name) == getattr(Settings(), name) for name in row_fields)

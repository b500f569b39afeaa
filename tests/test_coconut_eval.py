"""The Coconut eval and generate commands: the JSON report, scoring, token counts, model kinds and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import WORDS, tiny_lm, tiny_tokenizer

from quietstar import QuietStarConfig, QuietStarModel, cli
from quietstar.coconut.config import CoconutConfig
from quietstar.coconut.curriculum import collate_prompts, encode, inference_prompt
from quietstar.coconut.data import answer_of
from quietstar.coconut.generation import generate
from quietstar.coconut.model import CoconutModel
from quietstar.evaluation.coconut import main

VOCAB = WORDS + ["###", "<<"]
RECORDS = [{"question": "the sum of 2 and 3 is", "steps": ["2 plus 3"], "answer": "5"},
           {"question": "x plus y", "steps": ["x", "y"], "answer": "x"},
           {"question": "half of 4", "steps": [], "answer": "2"}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("coconut_eval")
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(VOCAB)
    coconut = CoconutModel(tiny_lm("gpt2", vocab_size=len(VOCAB)), tokenizer, CoconutConfig(c=1, max_latent_stage=2))
    coconut.save_pretrained(root / "coconut")
    QuietStarModel(tiny_lm("llama", vocab_size=len(VOCAB)), tokenizer, QuietStarConfig(thought_len=2)).save_pretrained(root / "quietstar")
    tiny_lm("llama", vocab_size=len(VOCAB)).save_pretrained(root / "plain")
    tokenizer.save_pretrained(root / "plain")
    data = root / "prosqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root


def test_report_scores_each_item_as_the_paper_and_counts_latents(saved, tmp_path):
    out = tmp_path / "report.json"
    args = ["--model", str(saved / "coconut"), "--task", "prosqa", "--data-file", str(saved / "prosqa.jsonl"),
            "--output", str(out), "--batch-size", "2", "--max-new-tokens", "5"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert (report["task"], report["method"], report["mode"], report["latents"], report["n"]) == ("prosqa", "coconut", "coconut", 2, 3)
    model = CoconutModel.from_pretrained(saved / "coconut").eval()
    prompts = [encode(inference_prompt(r["question"], model.config), model.tokenizer, with_answer=False)[0] for r in RECORDS]
    expected = generate(model, **collate_prompts(prompts, model.tokenizer.pad_token_id), max_new_tokens=5).tokens
    for item, record, ids in zip(report["items"], RECORDS, expected):
        assert item["output"] == model.tokenizer.decode(ids, skip_special_tokens=True)
        assert item["predicted"] == answer_of(item["output"]) and item["correct"] == (item["predicted"] == record["answer"])
        assert item["generated_tokens"] == 2 + len(ids)  # the latents count, as in the paper's table
    assert report["accuracy"] == sum(i["correct"] for i in report["items"]) / 3
    assert report["mean_generated_tokens"] == sum(i["generated_tokens"] for i in report["items"]) / 3
    assert main(args + ["--latents", "0", "--limit", "2"]) == 0
    fewer = json.loads(out.read_text())
    assert fewer["latents"] == 0 and fewer["n"] == 2


def test_quietstar_and_plain_models_are_evaluated_by_the_same_command(saved, tmp_path, capsys):
    for kind, method in (("quietstar", "quietstar"), ("plain", "plain")):
        out = tmp_path / f"{kind}.json"
        assert main(["--model", str(saved / kind), "--task", "prosqa", "--data-file", str(saved / "prosqa.jsonl"),
                     "--output", str(out), "--max-new-tokens", "3"]) == 0
        report = json.loads(out.read_text())
        assert report["method"] == method and report["latents"] == 0 and report["n"] == 3
        assert all(0 <= i["generated_tokens"] <= 3 for i in report["items"])
    assert "| prosqa |" in capsys.readouterr().out


def test_malformed_records_fail_before_the_model_loads_naming_file_and_line(saved, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"question": "no answer"}) + "\n")
    assert main(["--model", str(tmp_path / "no-such-model"), "--task", "prontoqa", "--data-file", str(bad)]) == 2
    assert f"{bad} line 2: not a prontoqa record" in capsys.readouterr().err
    bad.write_text("{oops\n")
    assert main(["--model", str(tmp_path / "no-such-model"), "--task", "gsm8k", "--data-file", str(bad)]) == 2
    assert "line 1: not valid JSON" in capsys.readouterr().err
    assert main(["--model", str(saved / "coconut"), "--task", "gsm8k", "--data-file", str(tmp_path / "none.jsonl")]) == 2
    assert "eval data file not found" in capsys.readouterr().err


def test_generate_command_shows_each_latent(saved, capsys):
    assert cli.main(["coconut-generate", "--model", str(saved / "coconut"), "--show-latents", "--max-new-tokens", "3",
                     "the sum of 2 and 3 is", "x plus y"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("latent 1:") == 2 and printed.count("latent 2:") == 2 and "2 latent(s)" in printed


def test_an_evaluation_that_stops_resumes_to_the_uninterrupted_report(saved, tmp_path, monkeypatch, capsys):
    import quietstar.evaluation.coconut as coconut_eval
    from quietstar.evaluation.item_log import partial_path

    data = tmp_path / "six.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 2))
    whole, out = tmp_path / "whole.json", tmp_path / "report.json"
    args = ["--model", str(saved / "coconut"), "--task", "prosqa", "--data-file", str(data), "--batch-size", "2",
            "--max-new-tokens", "5"]
    assert main(args + ["--output", str(whole)]) == 0
    assert not partial_path(whole).exists()  # the log goes once the report is written

    calls, real = [], coconut_eval.coconut_generate

    def stops_at_the_third_batch(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill would stop it, after two finished batches
        return real(*a, **k)

    monkeypatch.setattr(coconut_eval, "coconut_generate", stops_at_the_third_batch)
    assert main(args + ["--output", str(out)]) == 130  # Ctrl-C: one line, the finished batches kept
    monkeypatch.setattr(coconut_eval, "coconut_generate", real)
    log = partial_path(out)
    assert len(log.read_text().splitlines()) == 1 + 4 and not out.exists()
    with log.open("a") as f:
        f.write('{"item": {"question": "torn')  # a kill in the middle of writing the next batch
    assert main(args + ["--output", str(out)]) == 2  # without --resume: refused, nothing lost
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert main(args + ["--output", str(out), "--resume", "--batch-size", "3"]) == 2
    assert "batch_size (then 2, now 3)" in capsys.readouterr().err
    assert main(args + ["--output", str(out), "--resume"]) == 0
    resumed, expected = json.loads(out.read_text()), json.loads(whole.read_text())
    assert resumed["items"] == expected["items"] and resumed["accuracy"] == expected["accuracy"]
    assert resumed["n"] == 6 and not log.exists()

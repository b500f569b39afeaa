"""The benchmark command runs and writes rows with the documented fields (tiny sizes; timings are not checked)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_writes_its_rows(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--device", "cpu", "--seq-lens", "16",
           "--thought-lens", "2", "--steps", "1", "--warmup", "0", "--generation-tokens", "2", "--lora-ranks", "0", "4",
           "--gemm-size", "64", "--threads", "1", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    train = [r for r in rows if r["kind"] == "train_step"]
    assert {(r["formulation"], r["checkpointing"], r["lora_rank"]) for r in train} == {
        ("one_pass", False, 0), ("one_pass", False, 4),  # the one pass cannot checkpoint: no +ckpt rows
        ("efficient", False, 0), ("efficient", True, 0), ("efficient", False, 4), ("efficient", True, 4), ("oracle", False, 0)}
    assert "/full fine-tuning time" in done.stdout
    for row in train:
        assert row["status"] == "ok"
        assert row["seq_len"] == 16 and row["thought_len"] == 2 and row["device"].startswith("cpu")
        assert row["step_s"] > 0 and row["peak_mem_mb"] > 0
    generation = [r for r in rows if r["kind"] == "generation"]
    assert {r["formulation"] for r in generation} == {"thoughts", "no thoughts"}
    assert all(r["tokens_per_s"] > 0 for r in generation)
    assert "efficient/oracle" in done.stdout or "/oracle time" in done.stdout
    (gemm,) = [r for r in rows if r["kind"] == "gemm"]  # the CPU roofline every MFU is read against
    assert gemm["status"] == "ok" and gemm["tflops"] > 0 and "1 threads" in gemm["device"]
    (plain,) = [r for r in rows if r["kind"] == "plain_step"]
    assert plain["status"] == "ok" and plain["tokens_per_s"] > 0
    for row in train + [plain]:
        assert row["mfu"] == pytest.approx(row["tflops"] / gemm["tflops"])
    assert "against the plain LM step's" in done.stdout


def test_block_mask_benchmark_compares_both_constructions(tmp_path):
    out = tmp_path / "mask.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "block_mask.py"), "--seq-len", "40", "--thought-len", "3", "--rows", "2",
           "--repeats", "1", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr  # it exits non-zero when the two constructions' tiles differ
    rows = json.loads(out.read_text())
    assert [r["construction"] for r in rows] == ["tiles", "dense"]
    assert rows[0]["partial_tiles"] == rows[1]["partial_tiles"] > 0 and all(r["seconds"] > 0 for r in rows)


def test_step_profile_gives_every_phase(tmp_path):
    out = tmp_path / "profile.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_profile.py"), "--seq-len", "8", "--thought-len", "2", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    phases = json.loads(out.read_text())["phases"]
    for name in ("sampling (no grad)", "replay (decoder, grad)", "logits", "mixing head", "losses", "forward", "backward",
                 "optimizer"):
        assert phases[name] > 0, name
    assert "| phase | seconds | share of step |" in done.stdout


def test_generation_benchmark_writes_its_rows(tmp_path):
    import torch
    from helpers import move_off_init, tiny_lm, tiny_tokenizer

    from quietstar import QuietStarConfig, QuietStarModel

    torch.manual_seed(0)
    move_off_init(QuietStarModel(tiny_lm("llama"), tiny_tokenizer(), QuietStarConfig(thought_len=2))).save_pretrained(tmp_path / "model")
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "generation.py"), "--model", str(tmp_path / "model"), "--batch-sizes", "1", "3",
           "--new-tokens", "3", "--repeats", "1", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["thought_len"] == 2 and r["tokens_per_s_thoughts"] > 0 and r["tokens_per_s_no_thoughts"] > 0 for r in rows)


def test_sampler_benchmark_writes_its_rows(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "sampler.py"), "--repeats", "1", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["rows"], r["vocab"]) for r in rows] == [(512, 8192), (128, 49152), (64, 152064)]
    for row in rows:
        assert row["two_level_ms"] > 0 and row["fp32_cdf_ms"] > 0 and row["multinomial_ms"] > 0
        assert row["two_level_undrawable"] == 0 and row["two_level_tv"] < 1e-6  # exact up to fp32 softmax rounding
        assert row["fp32_cdf_undrawable"] > 0  # the old single fp32 CDF cannot reach part of the tail


def test_coconut_step_benchmark_times_three_methods(tmp_path):
    out = tmp_path / "coconut.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "coconut_step.py"), "--model", "tiny", "--device", "cpu", "--steps", "1",
           "--warmup", "0", "--batch-size", "2", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert set(result["times_s"]) == {"coconut", "cot", "official"} and all(t > 0 for t in result["times_s"].values())
    assert result["loss_check"]["passed"] and result["loss_check"]["relative_diff"] <= 1e-4  # official pattern = CoconutModel
    assert result["latents"] == 6 and result["batch_size"] == 2 and result["device"].startswith("cpu")
    assert set(result["ratios"]) == {"coconut/cot", "official/coconut"}
    assert "| official |" in done.stdout


def test_coconut_generation_benchmark_checks_tokens_then_times_both_paths(tmp_path):
    out = tmp_path / "generation.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "coconut_generation.py"), "--model", "tiny", "--items", "3",
           "--batch-size", "2", "--new-tokens", "3", "--latents", "2", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr  # the batched cached tokens equal the full re-run's before any timing
    result = json.loads(out.read_text())
    assert result["batched_cached_items_per_s"] > 0 and result["batch1_rerun_items_per_s"] > 0
    assert result["speedup"] == pytest.approx(result["seconds"]["batch1_rerun"] / result["seconds"]["batched_cached"])


def test_zero3_load_benchmark_reports_each_ranks_memory(tmp_path):
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "zero3_load.py"), "--layers", "1", "--hidden", "32", "--intermediate", "64",
           "--heads", "4", "--vocab", "256", "--methods", "coconut", "--modes", "recipe", "--json", str(out)]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(out.read_text())["rows"]  # one row: whole loading is the plain path test_train.py covers
    assert row["mode"] == "recipe" and row["ranks"][0]["loaded"] == {"partitioned": True, "dtype": "float32"} and len(row["ranks"]) == 2
    assert all(r["held_parameters"] < r["parameters"] for r in row["ranks"])
    assert all(r["peak_anon_initialized_mb"] > 0 for r in row["ranks"])


def test_checkpoint_checksum_benchmark_times_both_saves_and_the_check(tmp_path):
    out = tmp_path / "checksums.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "checkpoint_checksums.py"), "--mb", "4", "--files", "4", "--repeats", "1",
           "--dir", str(tmp_path), "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["mb"] > 3.9 and result["files"] == 4 and result["verify_s"] > 0
    assert all(result[k] > 0 for k in ("plain_save_s", "checksummed_save_s", "inline_checksum_save_s"))
    assert "with CRC-32s beside the save" in done.stdout


def test_saved_activations_benchmark_counts_each_formulation():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "saved_activations.py"), "--seq-len", "16", "--thought-len", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT / "benchmarks")
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: float(line.split()[1]) for line in done.stdout.splitlines()}
    assert set(lines) == {"one_pass", "efficient", "oracle"} and all(mb > 0 for mb in lines.values())
    assert lines["one_pass"] < lines["oracle"]


def test_coconut_seeds_gives_mean_and_se_over_seeds_paired_and_split_by_the_no_search_rule(tmp_path, capsys):
    #  Tom -> alpus -> dumpus (the target); Ann -> xorpus (the distractor, one hop from Ann: the rule is right), or
    #  Ann -> alpus -> xorpus (two hops: the rule guesses)
    def record(question, ann_edges):
        return {"question": question, "answer": "Tom is a dumpus.", "steps": [], "root": 0, "target": 3, "neg_target": 4,
                "idx_to_symbol": ["Tom", "Ann", "alpus", "dumpus", "xorpus"], "edges": [[0, 2], [2, 3]] + ann_edges}

    records = [record("q1", [[1, 4]]), record("q2", [[1, 4]]), record("q3", [[1, 2], [2, 4]]), record("q4", [[1, 2], [2, 4]])]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def report(name, correct):
        path = tmp_path / f"{name}.json"
        items = [{"question": f"q{i + 1}", "correct": c} for i, c in enumerate(correct)]
        path.write_text(json.dumps({"accuracy": sum(correct) / len(correct), "items": items}))
        return str(path)

    def analysis(name, accuracy, frontier):
        directory = tmp_path / name
        directory.mkdir()
        k = {"correct_path": 0.0, "longer_path": 0.0, "hallucination": 0.0, "wrong_target": 0.0, "correct_label": 0.5, "incorrect_label": 0.5}
        summary = {"accuracy": {"0": 0.5, "1": accuracy}, "path_classes": {"0": k, "1": k},
                   "value_mass": {"1": {"frontier": frontier, "other": 0.1}}, "top_node_changes": {}}
        (directory / "report.json").write_text(json.dumps({"summary": summary}))
        return str(directory)

    coconut = [report("c0", [True, True, True, False]), report("c1", [True, True, False, False])]
    pause = [report("p0", [True, True, False, False]), report("p1", [True, False, False, False])]
    out = tmp_path / "seeds.json"
    spec = importlib.util.spec_from_file_location("coconut_seeds", ROOT / "benchmarks" / "coconut_seeds.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # in this process: no second interpreter to start
    assert script.main(["--eval", "coconut=" + ",".join(coconut), "--eval", "pause=" + ",".join(pause),
                        "--analysis", f"coconut={analysis('a0', 0.75, 0.4)},{analysis('a1', 0.5, 0.2)}",
                        "--data-file", str(tmp_path / "test.jsonl"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["accuracy"]["coconut"]["mean"] == pytest.approx(0.625) and result["accuracy"]["coconut"]["se"] == pytest.approx(0.125)
    paired = result["paired"]["coconut - pause"]
    assert paired["mean"] == pytest.approx(0.25) and paired["se"] == pytest.approx(0.0)
    assert (paired["items_only_first"], paired["items_only_second"]) == (2, 0)
    assert result["by_shortcut"]["coconut"]["rule_right"]["mean"] == 1.0
    assert result["by_shortcut"]["coconut"]["rule_guesses"]["mean"] == pytest.approx(0.25)
    assert result["by_shortcut"]["pause"]["rule_right"]["mean"] == pytest.approx(0.75) and "rule_wrong" not in result["by_shortcut"]["pause"]
    search = result["latent_search"]["coconut"]["per_k"]["1"]
    assert search["accuracy_minus_k0"]["mean"] == pytest.approx(0.125) and search["frontier_mass"]["mean"] == pytest.approx(0.3)
    assert "| coconut - pause | 25.0 ± 0.0 | 2 / 0 |" in capsys.readouterr().out

"""The training recipe: real 2-process DeepSpeed runs (ZeRO-2 and ZeRO-3), exact resume, config plumbing, checkpoint safety."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, free_port, run, training_fixture
from transformers import AutoModelForCausalLM

from quietstar.core.cli_config import ConfigError, RunError
from quietstar.core.text_data import DataConfig, heldout_batches, load_documents, split_heldout
from quietstar.evaluation.perplexity import heldout_nll
from quietstar.quiet_star.model import QuietStarModel
from quietstar.training import checkpoints
from quietstar.training.pretrain import CONFIGS, STEP_METRICS, main, parse_args
from quietstar.training.run_log import RunLog, read_metrics
from quietstar.training.train_config import DS_CONFIGS, TrainConfig, deepspeed_config, grad_diagnostics_on

CONTRACT_FIELDS = ("step", "loss", "base_nll", "talk_nll", "policy_loss", "reward_mean", "mixing_weight_mean", "lr", "tokens_per_s")
STEPS = 4


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (saved as a plain HF dir) and a synthetic jsonl corpus."""
    return training_fixture(tmp_path_factory.mktemp("train"))


def recipe_args(root: Path, output_dir: Path, zero: int, max_steps: int = STEPS) -> list[str]:
    return [
        "--model", str(root / "model"), "--dataset", str(root / "text.jsonl"), "--output-dir", str(output_dir),
        "--deepspeed", str(DS_CONFIGS / f"zero{zero}.json"), "--max-steps", str(max_steps), "--seed", "3",
        "--seq-len", "24", "--thought-len", "3", "--n-true", "2", "--micro-batch-size", "2", "--grad-accum-steps", "2",
        "--lr", "1e-3", "--warmup-steps", "3", "--heldout-documents", "4", "--eval-batch-size", "4",
        "--eval-every", "2", "--save-every", "2",
    ]


def launch_script(args: list[str], hostfile: Path | None = None) -> subprocess.CompletedProcess:
    """The user's entry point: `bash launch/pretrain.sh` (the deepspeed launcher, 2 processes, or a hostfile's slots)."""
    procs = ["--hostfile", str(hostfile)] if hostfile else ["--num-gpus", "2"]
    return run(["bash", str(ROOT / "launch" / "pretrain.sh"), *procs, "--master-port", str(free_port()), *args])


def launcher(args: list[str], port: int | None = None) -> subprocess.CompletedProcess:
    """The deepspeed launcher's own form over the same script, 2 processes: `deepspeed launch/pretrain.sh ...`."""
    return run(["deepspeed", "--num_gpus", "2", "--master_port", str(port or free_port()), str(ROOT / "launch" / "pretrain.sh"), *args])


@pytest.fixture(scope="module")
def runs(fixture_dir) -> dict[int, Path]:
    """Uninterrupted 4-step runs at ZeRO-2 and ZeRO-3, through `bash launch/pretrain.sh` (ZeRO-3: a one-line hostfile)."""
    out = {2: fixture_dir / "zero2", 3: fixture_dir / "zero3"}
    launch_script(recipe_args(fixture_dir, out[2], zero=2))
    hostfile = fixture_dir / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    launch_script(recipe_args(fixture_dir, out[3], zero=3), hostfile=hostfile)  # diagnostics off: ZeRO-3 partitions the weights
    return out


@pytest.mark.parametrize("zero", [2, 3])
def test_launcher_run_logs_every_step_and_exports_a_reloadable_final_model(runs, fixture_dir, zero):
    out = runs[zero]
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        for name in CONTRACT_FIELDS:
            assert math.isfinite(record[name]), (name, record)
    assert records[-1]["mixing_weight_mean"] > 0  # the mixing head has moved off its zero init
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert checkpoints.latest_tag(out / "checkpoints") == checkpoints.tag(STEPS)

    final = QuietStarModel.from_pretrained(out / "final", dtype=torch.float32)
    assert final.config.thought_len == 3 and final.config.n_true == 2
    initial = AutoModelForCausalLM.from_pretrained(fixture_dir / "model")
    stock = AutoModelForCausalLM.from_pretrained(out / "final")  # the base weights load without quietstar
    assert not torch.equal(stock.model.embed_tokens.weight, initial.model.embed_tokens.weight)
    assert torch.equal(stock.model.embed_tokens.weight, final.lm.model.embed_tokens.weight)

    # The exported weights are the trained ones: one process recomputes the held-out NLL the run measured last.
    data = DataConfig(dataset=str(fixture_dir / "text.jsonl"), seq_len=24, heldout_documents=4)
    _, texts = split_heldout(load_documents(data), data.heldout_documents)
    batches = heldout_batches(texts, final.tokenizer, data.seq_len, batch_size=4)
    recomputed = heldout_nll(final.eval(), batches, torch.device("cpu"), seed=3)
    summary = json.loads((out / "summary.json").read_text())
    for name in ("base_nll", "talk_nll", "shuffled_talk_nll"):
        assert recomputed[name] == pytest.approx(summary["heldout_after"][name], rel=1e-5, abs=1e-6)
    before = summary["heldout_before"]
    assert before["base_nll"] == pytest.approx(before["talk_nll"], abs=1e-6) == pytest.approx(before["shuffled_talk_nll"], abs=1e-6)
    assert records[-1]["heldout_shuffled_talk_nll"] == summary["heldout_after"]["shuffled_talk_nll"]


def test_gradient_diagnostics_are_logged_on_evaluation_steps(runs):
    """ZeRO-2 over 2 ranks: the LM and policy gradient norms at steps 2 and 4 (eval_every 2), nowhere else."""
    records = read_metrics(runs[2])
    for record in records:
        logged = "grad_norm_lm" in record
        assert logged == (record["step"] % 2 == 0), record
        if logged:
            assert record["grad_norm_lm"] > 0 and record["grad_norm_policy"] >= 0
            assert record["grad_ratio"] == pytest.approx(record["grad_norm_policy"] / record["grad_norm_lm"])
    assert records[-1]["grad_norm_policy"] > 0  # the head has moved, so rewards and the policy gradient are non-zero
    assert not any("grad_norm_lm" in record for record in read_metrics(runs[3]))


def test_zero3_loads_the_model_partitioned_and_zero2_whole(runs):
    """After loading (before deepspeed.initialize), a ZeRO-3 rank holds only its shard of the base LM's parameters."""
    whole, parts = (json.loads((runs[zero] / "config.json").read_text())["load"] for zero in (2, 3))
    assert not whole["partitioned"] and whole["held_per_rank"] == [whole["base_parameters"]] * 2
    assert parts["partitioned"] and parts["base_parameters"] == whole["base_parameters"]
    assert all(held <= 0.55 * parts["base_parameters"] for held in parts["held_per_rank"]), parts
    assert sum(parts["held_per_rank"]) >= parts["base_parameters"]  # every element is held somewhere (shards are padded)


def test_runs_leave_no_shared_memory_buffers_behind(first_half):
    """DeepSpeed's CPU all-reduce buffers (/dev/shm) are removed when a recipe ends."""
    port = (first_half / "port").read_text()
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_zero2_and_zero3_take_the_same_first_step(runs):
    """Also the hostfile path: the ZeRO-3 run's 2 ranks came from `localhost slots=2`."""
    assert [json.loads((runs[zero] / "config.json").read_text())["world_size"] for zero in (2, 3)] == [2, 2]
    first = [read_metrics(runs[zero])[0] for zero in (2, 3)]
    for name in STEP_METRICS:
        assert first[0][name] == pytest.approx(first[1][name], rel=1e-5, abs=1e-6), name


@pytest.fixture(scope="module")
def first_half(fixture_dir) -> Path:
    """Steps 1-2 of the ZeRO-2 run, through `deepspeed launch/pretrain.sh` (the uninterrupted one went through bash)."""
    out = fixture_dir / "resumed"
    out.mkdir()
    port = free_port()
    (out / "port").write_text(str(port))
    launcher(recipe_args(fixture_dir, out, zero=2, max_steps=2), port=port)
    return out


def test_bash_and_deepspeed_forms_of_the_launch_script_take_the_same_first_step(runs, first_half):
    by_bash, by_deepspeed = read_metrics(runs[2])[0], read_metrics(first_half)[0]
    for name in (*STEP_METRICS, "lr", "grad_norm"):
        assert by_deepspeed[name] == pytest.approx(by_bash[name], rel=1e-6, abs=1e-7), name


def test_resume_after_step_k_repeats_the_uninterrupted_steps(runs, fixture_dir, first_half):
    """Stop after step 2, resume to 4: the weights, optimizer, LR warmup, data position and RNG all carry over."""
    out = first_half
    launcher(recipe_args(fixture_dir, out, zero=2) + ["--resume"])
    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1))
    assert_same_steps(read_metrics(out), read_metrics(runs[2]))


def assert_same_steps(resumed: list[dict], uninterrupted: list[dict]) -> None:
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted]
    for a, b in zip(resumed, uninterrupted):
        for name in (*STEP_METRICS, "lr", "thought_lr", "grad_norm", "documents"):
            assert a[name] == pytest.approx(b[name], rel=0, abs=1e-6), (a["step"], name)


def start(command: list[str], **env: str) -> subprocess.Popen:
    """``command`` in the background, in a session of its own (so that a signal can go to the whole job)."""
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env))


def wait_until(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_sigterm_saves_after_the_current_step_and_resume_repeats_the_uninterrupted_run(runs, fixture_dir, tmp_path):
    """The scheduler's SIGTERM to every process of the job (as SLURM sends it) during a 40-step run: each rank
    finishes the step, saves and exits; --resume to step 4 then takes the uninterrupted run's steps."""
    out = tmp_path / "preempted"
    job = start(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "launch" / "pretrain.sh"),
                 *recipe_args(fixture_dir, out, zero=2, max_steps=40)])
    wait_until(lambda: logged_steps(out) >= 1, job)
    os.killpg(job.pid, signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    step = int(checkpoints.latest_tag(out / "checkpoints").removeprefix("step-"))
    assert 1 <= step <= STEPS and logged_steps(out) == step, err[-3000:]
    assert f"stopped by SIGTERM after step {step}; checkpoint {out / 'checkpoints' / checkpoints.tag(step)} saved" in err
    assert not (out / "final").exists()
    launcher(recipe_args(fixture_dir, out, zero=2) + ["--resume"])
    assert_same_steps(read_metrics(out), read_metrics(runs[2]))


def test_a_killed_rank_stops_the_other_within_seconds_and_resume_works(runs, fixture_dir, tmp_path):
    """Two ranks started without a launcher (nothing else would stop the survivor); rank 1 is killed after the
    step-2 checkpoint. Rank 0 exits with one line, and a resumed run takes the uninterrupted run's steps."""
    out, port = tmp_path / "killed", str(free_port())
    command = [sys.executable, "-m", "quietstar.training.pretrain", *recipe_args(fixture_dir, out, zero=2, max_steps=40),
               "--dist-timeout-s", "30"]
    ranks = [start(command, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for r in (0, 1)]
    wait_until(lambda: checkpoints.latest_tag(out / "checkpoints") is not None, ranks[0])
    ranks[1].kill()
    killed = time.monotonic()
    _, err = ranks[0].communicate(timeout=120)
    assert time.monotonic() - killed < 35 and ranks[0].returncode == 1
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "another rank died or stopped answering" in lines[0] and "Traceback" not in err, err[-3000:]
    ranks[1].communicate()
    saved = int(checkpoints.latest_tag(out / "checkpoints").removeprefix("step-"))
    assert saved in (2, 4), saved
    launcher(recipe_args(fixture_dir, out, zero=2) + ["--resume"])
    assert_same_steps(read_metrics(out), read_metrics(runs[2]))


# --- configuration, logs and checkpoint files (no processes launched) -------------------------------


def test_every_config_field_has_a_flag_and_yaml_and_flags_layer(tmp_path, capsys):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("thought_len: 7\nseq_len: 99\nlr: 0.5\nmax_steps: 3\n")
    args, method, data, train = parse_args(["--config", str(yaml_file), "--lr", "0.25", "--model", "m", "--dataset", "d.jsonl",
                                            "--output-dir", "o", "--seed", "5", "--deepspeed", "x.json", "--resume"])
    assert (method.thought_len, data.seq_len, train.lr, train.max_steps) == (7, 99, 0.25, 3)
    assert (train.model, data.dataset, train.output_dir, train.seed, train.deepspeed, args.resume) == ("m", "d.jsonl", "o", 5, "x.json", True)
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    shown = capsys.readouterr().out
    for cls in CONFIGS:
        for field in dataclasses.fields(cls):
            assert "--" + field.name.replace("_", "-") in shown, field.name


def test_a_run_refuses_an_output_dir_with_checkpoints_and_a_missing_dataset(tmp_path, fixture_dir, monkeypatch, capsys):
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "checkpoints" / checkpoints.tag(2)).mkdir(parents=True)
    (tmp_path / "checkpoints" / checkpoints.LATEST).write_text(checkpoints.tag(2))
    assert main(recipe_args(fixture_dir, tmp_path, zero=2)) == 2
    assert "already has checkpoints; pass --resume" in capsys.readouterr().err
    assert main(recipe_args(fixture_dir, tmp_path / "new", zero=2) + ["--dataset", str(tmp_path / "missing.jsonl")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "missing.jsonl" in error


def test_bad_settings_fail_with_the_field_named(tmp_path):
    with pytest.raises(ConfigError, match="TrainConfig.lr"):
        TrainConfig(lr=0)
    with pytest.raises(ConfigError, match="TrainConfig.lr_scheduler"):
        TrainConfig(lr_scheduler="constant", warmup_steps=5)
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("thougth_len: 3\n")
    with pytest.raises(ConfigError, match="thougth_len"):
        parse_args(["--config", str(yaml_file)])
    with pytest.raises(ConfigError, match="QuietStarConfig.n_thoughts"):
        parse_args(["--n-thoughts", "1"])


def test_deepspeed_config_is_completed_from_the_recipe_and_conflicts_are_refused(tmp_path):
    train = TrainConfig(deepspeed=str(DS_CONFIGS / "zero3.json"), micro_batch_size=2, grad_accum_steps=3, lr=1e-4, grad_clip=0.5)
    ds = deepspeed_config(train, "cpu", world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3 and ds["train_batch_size"] == 12
    assert ds["optimizer"]["params"]["lr"] == 1e-4 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and ds["optimizer"]["params"]["torch_adam"] is True  # CPU
    assert deepspeed_config(train, "cuda", world_size=8)["bf16"]["enabled"] is True
    assert "torch_adam" not in deepspeed_config(train, "cuda", world_size=8)["optimizer"]["params"]

    conflicting = tmp_path / "ds.json"
    conflicting.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu = 4 disagrees with TrainConfig.micro_batch_size"):
        deepspeed_config(TrainConfig(deepspeed=str(conflicting)), "cpu", 1)
    conflicting.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ConfigError, match="scheduler"):
        deepspeed_config(TrainConfig(deepspeed=str(conflicting)), "cpu", 1)
    conflicting.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        deepspeed_config(TrainConfig(deepspeed=str(conflicting)), "cpu", 1)
    with pytest.raises(ConfigError, match="file not found"):
        deepspeed_config(TrainConfig(deepspeed=str(tmp_path / "missing.json")), "cpu", 1)
    with pytest.raises(ConfigError, match="^TrainConfig.grad_diagnostics: needs ZeRO stage 0-2"):
        zero3 = TrainConfig(deepspeed=str(DS_CONFIGS / "zero3.json"), grad_diagnostics=True)
        grad_diagnostics_on(zero3, deepspeed_config(zero3, "cpu", 1))
    auto = TrainConfig()
    assert grad_diagnostics_on(auto, deepspeed_config(auto, "cpu", 1))  # zero2.json
    assert not grad_diagnostics_on(auto, {"zero_optimization": {"stage": 3}})
    assert not grad_diagnostics_on(TrainConfig(grad_diagnostics=False), {"zero_optimization": {"stage": 2}})


def test_shipped_deepspeed_configs_cover_each_zero_stage():
    stages = {}
    for path in sorted(DS_CONFIGS.glob("*.json")):
        ds = deepspeed_config(TrainConfig(deepspeed=str(path)), "cuda", world_size=8)
        stages[path.name] = (ds["zero_optimization"]["stage"], ds["bf16"]["enabled"], "offload_optimizer" in ds["zero_optimization"])
    assert stages == {
        "zero1.json": (1, True, False),
        "zero2.json": (2, True, False),
        "zero3.json": (3, True, False),
        "zero3_offload.json": (3, True, True),
    }


def test_named_configs_parse():
    for name in ("demo", "paper", "cpu_compare"):
        _, method, data, train = parse_args(["--config", str(ROOT / "launch" / "configs" / f"{name}.yaml")])
        assert train.max_steps >= 1 and data.seq_len >= 2 and method.n_thoughts >= 2
    _, method, data, train = parse_args(["--config", str(ROOT / "launch" / "configs" / "paper.yaml")])
    assert (train.lr, train.weight_decay, train.warmup_steps, train.grad_clip, data.seq_len) == (1e-6, 0.001, 20, 1.0, 256)
    assert method.n_thoughts == 2 and method.thought_lr_multiplier == 100.0


def test_a_resumed_log_drops_the_steps_after_the_checkpoint(tmp_path):
    log = RunLog(tmp_path)
    for step in range(1, 6):
        log.step({"step": step, "loss": float(step)})
    log.close()
    RunLog(tmp_path, resume_step=3).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    RunLog(tmp_path).close()  # a fresh run starts an empty log
    assert read_metrics(tmp_path) == []


def fake_checkpoint(root: Path, step: int, files=("mp_rank_00_model_states.pt", "rank00000_state.pt")) -> Path:
    """A checkpoint directory with a few files and its manifest, as ``checkpoints.save`` leaves it."""
    directory = root / checkpoints.tag(step)
    directory.mkdir(parents=True)
    for name in files:
        (directory / name).write_bytes(b"x" * (100 + step))
    checkpoints._write_manifest(directory)
    return directory


def test_latest_ignores_partial_saves_and_old_checkpoints_are_pruned(tmp_path):
    assert checkpoints.latest_tag(tmp_path) is None and not checkpoints.any_saved(tmp_path)
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    (tmp_path / f"{checkpoints.tag(8)}.partial").mkdir()  # a save that was killed
    (tmp_path / checkpoints.LATEST).write_text(checkpoints.tag(6) + "\n")
    assert checkpoints.latest_tag(tmp_path) == "step-000006" and checkpoints.any_saved(tmp_path)
    checkpoints._prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000004", "step-000006", "step-000008.partial"]


@pytest.mark.parametrize("pointer", ["", "\x00\x13garbage", "step-000099", None])
def test_an_empty_or_garbage_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, capsys, pointer):
    for step in (2, 4):
        fake_checkpoint(tmp_path, step)
    if pointer is not None:
        (tmp_path / checkpoints.LATEST).write_text(pointer)
    assert checkpoints.resume_tag(tmp_path) == "step-000004"
    warning = capsys.readouterr().err
    assert (pointer is None) == (warning == "")  # no pointer at all (killed before the first switch): nothing to warn about
    if pointer is not None:
        assert "resuming from step-000004, the newest complete checkpoint" in warning and warning.count("\n") == 1
        assert ("does not exist" if pointer == "step-000099" else "not a checkpoint's name") in warning


@pytest.mark.parametrize("damage", ["truncated", "missing", "no manifest", "corrupted"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_or_refuses(tmp_path, capsys, damage):
    fake_checkpoint(tmp_path, 2)
    newest = fake_checkpoint(tmp_path, 4)
    (tmp_path / checkpoints.LATEST).write_text("step-000004\n")
    target = newest / ("rank00000_state.pt" if damage != "no manifest" else checkpoints.MANIFEST)
    if damage == "truncated":
        target.write_bytes(b"x" * 10)
    elif damage == "corrupted":  # the same size, one byte changed: only the checksum tells
        target.write_bytes(b"x" * 103 + b"y")
    else:
        target.unlink()
    assert checkpoints.resume_tag(tmp_path) == "step-000002"
    warning = capsys.readouterr().err
    assert "checkpoint step-000004 is incomplete" in warning and "resuming from step-000002" in warning
    assert {"truncated": "truncated (10 of 104 bytes)", "missing": "rank00000_state.pt is missing",
            "no manifest": "complete.json is missing", "corrupted": "rank00000_state.pt is corrupted"}[damage] in warning
    assert checkpoints.complete(newest) == (damage == "corrupted")  # sizes alone (pruning, pointers) do not read files
    shutil.rmtree(tmp_path / "step-000002")  # nothing to fall back to: one line
    with pytest.raises(RunError, match=r"--resume: no complete checkpoint in .*step-000004"):
        checkpoints.resume_tag(tmp_path)


def test_a_corrupted_checkpoint_passed_over_is_named_and_with_none_left_resume_is_refused(tmp_path, capsys):
    fake_checkpoint(tmp_path, 2)
    third = fake_checkpoint(tmp_path, 3)
    newest = fake_checkpoint(tmp_path, 4)
    (tmp_path / checkpoints.LATEST).write_text("step-000004\n")
    for directory in (newest, third):
        target = directory / "mp_rank_00_model_states.pt"
        target.write_bytes(target.read_bytes()[:-1] + b"?")
    assert checkpoints.resume_tag(tmp_path) == "step-000002"
    warning = capsys.readouterr().err
    assert "step-000003 is incomplete" in warning and "mp_rank_00_model_states.pt is corrupted" in warning
    assert "resuming from step-000002" in warning
    shutil.rmtree(tmp_path / "step-000002")
    with pytest.raises(RunError, match=r"no complete checkpoint in .*step-000004 is incomplete.*step-000003 is incomplete"):
        checkpoints.resume_tag(tmp_path)


def test_checksums_taken_beside_a_save_are_the_files_and_the_engine_is_put_back(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from quietstar.training.checksums import checksummed_saves, file_digest

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    engine, digests = Engine(), {}
    inner = engine.checkpoint_engine
    with checksummed_saves(engine, digests) as checksum:
        for i in range(3):
            engine.checkpoint_engine.save({"weights": torch.randn(300, 70), "i": i}, str(tmp_path / f"part{i}.pt"))
        torch.save({"step": 7}, tmp_path / "rank.pt")
        checksum(tmp_path / "rank.pt")
    assert engine.checkpoint_engine is inner
    names = ["part0.pt", "part1.pt", "part2.pt", "rank.pt"]
    assert digests == {str((tmp_path / n).resolve()): file_digest(tmp_path / n) for n in names}
    assert torch.load(tmp_path / "part2.pt", weights_only=False)["i"] == 2


def test_verify_checkpoint_reports_each_checkpoint_in_one_line(tmp_path, capsys):
    from quietstar import cli

    fake_checkpoint(tmp_path / "checkpoints", 2)
    newest = fake_checkpoint(tmp_path / "checkpoints", 4)
    assert cli.main(["verify-checkpoint", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step-000002: ok" in out and "step-000004: ok" in out and "2 of 2 checkpoint(s) whole" in out
    (newest / "rank00000_state.pt").write_bytes(b"z" * 104)
    assert cli.main(["verify-checkpoint", str(tmp_path / "checkpoints")]) == 1
    assert "rank00000_state.pt is corrupted" in capsys.readouterr().out
    assert cli.main(["verify-checkpoint", str(newest)]) == 1
    assert cli.main(["verify-checkpoint", str(tmp_path / "checkpoints" / "step-000002")]) == 0
    capsys.readouterr()
    assert cli.main(["verify-checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_launch_script_help_and_missing_hostfile():
    script = str(ROOT / "launch" / "pretrain.sh")
    shown = subprocess.run(["bash", script, "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "--hostfile" in shown.stdout and "NUM_GPUS" in shown.stdout
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    missing = subprocess.run(["bash", script, "--hostfile", "/nonexistent/hosts"], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and "hostfile not found" in missing.stderr
    assert shutil.which("deepspeed", path=env["PATH"])


def test_bf16_run_keeps_fp32_master_weights(tmp_path, fixture_dir, monkeypatch, capsys):
    """bf16 compute with gradient checkpointing; the exported weights carry updates far below bf16's resolution."""
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = recipe_args(fixture_dir, tmp_path, zero=2, max_steps=3) + ["--precision", "bf16", "--gradient-checkpointing"]
    # The default one-pass formulation cannot recompute layers: refused at start-up, by the field's name.
    assert main(args) == 2
    assert "error: TrainConfig.gradient_checkpointing: the one_pass formulation" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()
    assert main(args + ["--formulation", "efficient", "--lr", "1e-6", "--warmup-steps", "0"]) == 0
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["load"]["dtype"] == "bfloat16"  # not fp32, then cast
    initial = AutoModelForCausalLM.from_pretrained(fixture_dir / "model").model.layers[0].mlp.up_proj.weight
    trained = QuietStarModel.from_pretrained(tmp_path / "final").lm.model.layers[0].mlp.up_proj.weight
    assert trained.dtype == torch.float32
    # DeepSpeed casts the module to bf16 before it copies the fp32 master weights, so training starts from bf16(initial).
    start = initial.bfloat16().float()
    delta = (trained - start).abs()
    assert 0 < delta.max() < 1e-5  # 3 AdamW steps of lr 1e-6, kept in fp32
    # bf16 weights alone would have lost them: the weights are ~0.1, where bf16's spacing is ~5e-4.
    assert (trained.bfloat16() != initial.bfloat16()).float().mean() < 0.01

"""The Coconut recipe end to end: 2-process DeepSpeed runs through launch/coconut.sh (ZeRO-2 and ZeRO-3) across stage
changes, exact resume mid-epoch and across a stage change, validation, the best checkpoint, and the export."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, WORDS, free_port, run, tiny_lm, tiny_tokenizer

from quietstar.coconut.model import CoconutModel
from quietstar.core.cli_config import ConfigError
from quietstar.training import checkpoints
from quietstar.training.coconut import main, parse_args
from quietstar.training.run_log import read_metrics
from quietstar.training.train_config import DS_CONFIGS

VOCAB = WORDS + ["###", "<<"]
EPOCHS = 3  # stages 0, 1, 2 with max_latent_stage 1: CoT, one step replaced, every step removed
STEP_FIELDS = ("step", "epoch", "stage", "loss", "lr", "scored_tokens", "step_s", "optimizer_reset")


def arithmetic_record(rng: random.Random) -> dict:
    a, b = rng.randint(0, 4), rng.randint(0, 4)
    steps = [f"{a} plus {b}", f"equals {a + b}"] if a + b < 10 else [f"{a} plus {b}"]
    return {"question": f"the sum of {a} and {b} is", "steps": steps, "answer": str((a + b) % 10)}


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2 (the paper's family) saved as a plain HF dir, and train/validation jsonl with bad lines."""
    root = tmp_path_factory.mktemp("coconut")
    tiny_lm("gpt2", vocab_size=len(VOCAB)).save_pretrained(root / "model")
    tiny_tokenizer(VOCAB).save_pretrained(root / "model")
    rng = random.Random(0)
    with (root / "train.jsonl").open("w") as f:
        for i in range(24):
            f.write(json.dumps(arithmetic_record(rng)) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"question": "no steps field"}) + "\n")
    with (root / "val.jsonl").open("w") as f:
        for _ in range(6):
            f.write(json.dumps(arithmetic_record(rng)) + "\n")
    return root


def recipe_args(root: Path, output_dir: Path, zero: int, epochs: int = EPOCHS) -> list[str]:
    return [
        "--model", str(root / "model"), "--train-file", str(root / "train.jsonl"), "--val-file", str(root / "val.jsonl"),
        "--output-dir", str(output_dir), "--deepspeed", str(DS_CONFIGS / f"zero{zero}.json"), "--num-epochs", str(epochs),
        "--seed", "3", "--c", "2", "--max-latent-stage", "1", "--epochs-per-stage", "1", "--marker-init-text", "<<",
        "--micro-batch-size", "2", "--grad-accum-steps", "2", "--lr", "1e-3", "--save-every", "1", "--keep-checkpoints", "0",
        "--val-batch-size", "4", "--val-max-new-tokens", "6",
    ]


def launch_script(args: list[str]):
    """`bash launch/coconut.sh`, 2 processes; the script picks a free port itself."""
    return run(["bash", str(ROOT / "launch" / "coconut.sh"), "--num-gpus", "2", *args])


def launcher(args: list[str]):
    """The deepspeed launcher's own form: `deepspeed launch/coconut.sh ...`."""
    return run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "launch" / "coconut.sh"), *args])


@pytest.fixture(scope="module")
def runs(fixture_dir) -> dict[int, Path]:
    out = {2: fixture_dir / "zero2", 3: fixture_dir / "zero3"}
    for zero in (2, 3):  # ZeRO-3 with activation checkpointing through the latent passes
        launch_script(recipe_args(fixture_dir, out[zero], zero=zero) + ["--gradient-checkpointing"] * (zero == 3))
    return out


def steps_and_validations(out: Path) -> tuple[list[dict], list[dict]]:
    records = read_metrics(out)
    return [r for r in records if "loss" in r], [r for r in records if "val_accuracy" in r]


@pytest.mark.parametrize("zero", [2, 3])
def test_two_process_run_crosses_every_stage_and_exports(runs, fixture_dir, zero):
    out = runs[zero]
    steps, validations = steps_and_validations(out)
    per_epoch = 24 // (2 * 2 * 2)  # 24 examples (2 malformed lines skipped), micro 2 x accum 2 x 2 ranks
    assert [r["step"] for r in steps] == list(range(1, EPOCHS * per_epoch + 1))
    assert [r["stage"] for r in steps] == [0] * per_epoch + [1] * per_epoch + [2] * per_epoch
    # the AdamW state is reset at the first step of each new stage, nowhere else
    assert [r["step"] for r in steps if r["optimizer_reset"]] == [per_epoch + 1, 2 * per_epoch + 1]
    for record in steps:
        assert all(name in record for name in STEP_FIELDS) and math.isfinite(record["loss"])
    assert [(v["epoch"], v["stage"], v["val_items"]) for v in validations] == [(0, 0, 6), (1, 1, 6), (2, 2, 6)]
    assert all(0 <= v["val_accuracy"] <= 1 for v in validations)
    config = json.loads((out / "config.json").read_text())
    assert config["skipped_malformed"] == 2 and config["train_examples"] == 24

    summary = json.loads((out / "summary.json").read_text())
    best = max(validations, key=lambda v: (v["val_accuracy"], -v["epoch"]))
    assert summary["best"]["epoch"] == best["epoch"] and summary["best"]["val_accuracy"] == best["val_accuracy"]
    assert checkpoints.latest_tag(out / "checkpoints", checkpoints.BEST) == summary["best"]["tag"]
    final = CoconutModel.from_pretrained(out / "final")
    assert final.config.c == 2 and final.config.max_latent_stage == 1
    assert (out / "best" / "coconut_config.json").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_zero3_loads_the_model_partitioned(runs):
    whole, parts = (json.loads((runs[zero] / "config.json").read_text())["load"] for zero in (2, 3))
    assert not whole["partitioned"] and whole["held_per_rank"] == [whole["base_parameters"]] * 2
    assert parts["partitioned"] and all(held <= 0.55 * parts["base_parameters"] for held in parts["held_per_rank"]), parts


def test_zero2_and_zero3_take_the_same_steps(runs):
    """ZeRO-3 with activation checkpointing (the latent passes replayed from a SegmentCache) takes ZeRO-2's steps."""
    a, b = (steps_and_validations(runs[zero])[0] for zero in (2, 3))
    assert json.loads((runs[3] / "config.json").read_text())["train"]["gradient_checkpointing"]
    assert [x["stage"] for x in a] == [y["stage"] for y in b] and b[-1]["stage"] == 2  # latents in the later stages
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), x["step"]


def test_kill_and_resume_mid_epoch_then_across_stage_changes_repeats_the_uninterrupted_run(runs, fixture_dir):
    """A run stopped after step 1 of epoch 0 (its later checkpoints discarded, as a kill leaves them unwritten),
    resumed to the end: every step's loss equals the uninterrupted run's (fp32, 1e-6), stage changes and resets included.
    The resumed run checkpoints activations (the uninterrupted one does not), so this also shows ZeRO-2's steps exact
    with activation checkpointing through the latent passes."""
    out = fixture_dir / "resumed"
    launcher(recipe_args(fixture_dir, out, zero=2, epochs=1) + ["--gradient-checkpointing"])
    root = out / "checkpoints"
    for later in [p for p in root.glob("step-*") if p.name != checkpoints.tag(1)]:
        for f in sorted(later.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        later.rmdir()
    (root / checkpoints.LATEST).write_text(checkpoints.tag(1) + "\n")
    launcher(recipe_args(fixture_dir, out, zero=2) + ["--resume", "--gradient-checkpointing"])
    resumed, uninterrupted = steps_and_validations(out)[0], steps_and_validations(runs[2])[0]
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted]
    for a, b in zip(resumed, uninterrupted):
        assert (a["epoch"], a["stage"], a["optimizer_reset"]) == (b["epoch"], b["stage"], b["optimizer_reset"])
        assert a["loss"] == pytest.approx(b["loss"], rel=0, abs=1e-6), a["step"]
    weights = [CoconutModel.from_pretrained(o / "final").lm.transformer.h[0].mlp.c_fc.weight for o in (out, runs[2])]
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=1e-6)


def test_bad_settings_and_missing_files_fail_in_one_line(tmp_path, fixture_dir, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="^CoconutConfig.c:"):
        parse_args(["--c", "0"])
    with pytest.raises(ConfigError, match="^CoconutDataConfig.val_file:"):
        parse_args(["--train-file", "x.jsonl"])  # the val file still the generated default
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("max_latent_stages: 3\n")
    with pytest.raises(ConfigError, match="max_latent_stages"):
        parse_args(["--config", str(yaml_file)])
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = recipe_args(fixture_dir, tmp_path / "run", zero=2) + ["--train-file", str(tmp_path / "missing.jsonl")]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "missing.jsonl" in error


def test_named_configs_parse_with_the_paper_settings():
    settings = {}
    for name in ("demo", "gsm8k", "prontoqa", "prosqa"):
        _, method, data, train = parse_args(["--config", str(ROOT / "launch" / "configs" / f"coconut_{name}.yaml")])
        settings[name] = (method.c, method.max_latent_stage, method.epochs_per_stage, train.num_epochs)
        if name != "demo":
            assert (train.lr, train.weight_decay, train.grad_clip, train.precision, train.lr_scheduler) == (1e-4, 0.01, 0.0, "fp32", "constant")
    assert settings["gsm8k"] == (2, 3, 3, 25)
    assert settings["prontoqa"] == settings["prosqa"] == (1, 6, 5, 50)
    assert settings["demo"][3] > settings["demo"][1] * settings["demo"][2]  # the demo reaches the last stage


@pytest.fixture
def one_process_group(monkeypatch):
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_nan_losses_are_skipped_then_stop_the_run(tmp_path, fixture_dir, one_process_group, capsys):
    out = tmp_path / "nan"
    assert main(recipe_args(fixture_dir, out, zero=2) + ["--lr", "1e12", "--max-bad-steps", "2"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "optimizer steps in a row had a non-finite loss, grad norm" in errors[0], errors
    records = read_metrics(out)
    assert [r["update_skipped"] for r in records] == [False, True, True]
    assert not (out / "final").exists()


def test_sigusr1_saves_mid_epoch_and_resume_repeats_the_uninterrupted_run(tmp_path, fixture_dir, one_process_group, capsys):
    """SIGUSR1 (SLURM's --signal) arrives during step 2 of an epoch of 6 steps; the run saves after that step and exits 0."""
    args = lambda out: recipe_args(fixture_dir, out, zero=2, epochs=1) + ["--save-every", "0"]  # noqa: E731
    assert main(args(tmp_path / "whole")) == 0

    out = tmp_path / "preempted"
    sent = threading.Event()

    def signal_during_step_two() -> None:
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGUSR1)
        sent.set()

    threading.Thread(target=signal_during_step_two, daemon=True).start()
    assert main(args(out)) == 0 and sent.is_set()
    assert "stopped by SIGUSR1 after step" in capsys.readouterr().err
    stopped = read_metrics(out)[-1]["step"]
    assert 2 <= stopped < 6 and checkpoints.latest_tag(out / "checkpoints") == checkpoints.tag(stopped)
    assert not (out / "final").exists()
    assert main(args(out) + ["--resume"]) == 0
    resumed, whole = read_metrics(out), read_metrics(tmp_path / "whole")
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]
    for a, b in zip(resumed, whole):
        assert a.keys() == b.keys()
        for name in {"loss", "lr", "grad_norm", "val_accuracy"} & a.keys():
            assert a[name] == pytest.approx(b[name], rel=0, abs=1e-6), (a["step"], name)

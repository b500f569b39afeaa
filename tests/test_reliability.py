"""Runs that go wrong, in one process: NaN losses, a full disk, resuming what cannot be resumed.

The 2-process cases (a signal from the scheduler, a rank that dies) are in test_train.py, next to
the uninterrupted run they are compared with.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import free_port, training_fixture

from quietstar.training import checkpoints
from quietstar.training.pretrain import main
from quietstar.training.run_log import read_metrics


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    return training_fixture(tmp_path_factory.mktemp("reliability"))


@pytest.fixture(autouse=True)
def one_process_group(monkeypatch):
    """Each ``main`` call below makes (and, at its end, destroys) a one-process group."""
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def args(root: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--model", str(root / "model"), "--dataset", str(root / "text.jsonl"), "--output-dir", str(output_dir),
            "--seq-len", "16", "--thought-len", "2", "--n-true", "2", "--micro-batch-size", "2", "--grad-accum-steps", "1",
            "--heldout-documents", "2", "--eval-batch-size", "2", "--eval-every", "0", "--warmup-steps", "0",
            "--save-every", "2", "--max-steps", "4", *extra]


def error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(err) == 1, err
    return err[0]


def test_nan_losses_skip_their_updates_then_stop_the_run_without_saving_nan(fixture_dir, tmp_path, capsys):
    """--lr 1e12: step 1 is finite but leaves huge weights, every later loss is NaN. Those updates are skipped
    (the weights stay finite), the run stops at max_bad_steps in a row with exit code 2, and no NaN is saved."""
    out = tmp_path / "run"
    assert main(args(fixture_dir, out, "--lr", "1e12", "--max-steps", "20", "--max-bad-steps", "3")) == 2
    line = error_line(capsys)
    assert "step 4: 3 optimizer steps in a row had a non-finite loss, base NLL, talk NLL, policy loss, grad norm" in line
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-000002'}" in line
    records = read_metrics(out)
    assert [r["update_skipped"] for r in records] == [False, True, True, True]
    assert math.isfinite(records[0]["loss"]) and all(math.isnan(r["loss"]) for r in records[1:])
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    assert checkpoints.complete_tags(out / "checkpoints") == ["step-000002"]  # step 4 stopped the run before its save
    weights = torch.load(out / "checkpoints" / "step-000002" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs: room for one checkpoint of the tiny model (640 kB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1000k", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.strip() or made.returncode})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_save_ends_the_run_in_one_line_and_keeps_the_last_good_checkpoint(fixture_dir, small_disk, capsys):
    out = small_disk / "run"
    assert main(args(fixture_dir, out)) == 2
    line = error_line(capsys)
    ckpt = out / "checkpoints"
    assert "saving the checkpoint of step 4 failed (the disk is full:" in line and "a checkpoint takes 0.64 MB" in line, line
    assert f"the last good checkpoint is {ckpt / 'step-000002'}" in line and "rerun with --resume" in line
    assert (ckpt / checkpoints.LATEST).read_text().strip() == "step-000002" and checkpoints.complete(ckpt / "step-000002")
    assert not list(ckpt.glob("*.partial")) and not (out / "final").exists()


def test_resume_without_a_checkpoint_or_with_other_settings_is_refused_in_one_line(fixture_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    assert main(args(fixture_dir, empty, "--resume")) == 2
    assert f"--resume: no complete checkpoint in {empty / 'checkpoints'}" in error_line(capsys)

    out = tmp_path / "run"
    assert main(args(fixture_dir, out, "--max-steps", "2")) == 0
    capsys.readouterr()
    other_model = tmp_path / "other-model"
    other_model.symlink_to(fixture_dir / "model")
    assert main(args(fixture_dir, out, "--resume", "--thought-len", "3", "--model", str(other_model))) == 2
    line = error_line(capsys)
    assert f"--resume: {out / 'checkpoints' / 'step-000002'} was trained with other settings" in line
    assert "QuietStarConfig.thought_len (checkpoint 2, now 3)" in line and "TrainConfig.model (checkpoint" in line
    assert main(args(fixture_dir, out, "--resume", "--max-steps", "3")) == 0  # the same settings resume
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["steps_run"] == 1

    # Every file of a real save has the CRC-32 taken while it was written, and it is the file's.
    for step in (2, 3):
        directory = out / "checkpoints" / checkpoints.tag(step)
        manifest = json.loads((directory / checkpoints.MANIFEST).read_text())
        assert manifest["crc32"].keys() == manifest["files"].keys()
        assert checkpoints.problem(directory, checksums=True) is None
    # A truncated file in the newest checkpoint (step 3): the next resume falls back to step 2, with a warning.
    capsys.readouterr()
    (optimizer,) = (out / "checkpoints" / "step-000003").glob("*optim_states.pt")
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    assert main(args(fixture_dir, out, "--resume", "--max-steps", "4")) == 0
    warning = capsys.readouterr().err
    assert "checkpoint step-000003 is incomplete" in warning and "truncated (100 of" in warning
    assert "resuming from step-000002" in warning
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text())["steps_run"] == 2

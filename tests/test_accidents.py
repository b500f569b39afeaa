"""The accidents people make at a terminal or in a file manager around a long run and its files.

Each ends in one clear line with nothing lost, or simply works (docs/troubleshooting.md lists them).
Everything runs in this process, in a one-process group, or in a small Python that loads one of our
modules by its path (no torch): two short training runs are the only real ones, and most cases stop
before any model loads.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
from helpers import ROOT, free_port, training_fixture

from quietstar import cli
from quietstar.core import files, run_lock
from quietstar.core.cli_config import ConfigError
from quietstar.core.text_data import TokenStream
from quietstar.evaluation.coconut import main as coconut_eval
from quietstar.training import checkpoints, engine, launch_scripts, pretrain
from quietstar.training.preemption import Preemption
from quietstar.training.run_log import read_metrics

PRETRAIN = "quietstar.training.pretrain"
RECORDS = [{"question": "the sum of 2 and 3 is", "steps": ["2 plus 3"], "answer": "5"},
           {"question": "x plus y", "steps": ["x", "y"], "answer": "x"}]
# Holds the locks named in argv (pairs of "dir"/"file" and a path) until killed: another run, in another terminal.
HOLDER = r"""
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
run_lock = sys.modules["run_lock"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
for kind, path in zip(sys.argv[2::2], sys.argv[3::2]):
    (run_lock.hold_directory if kind == "dir" else run_lock.hold_file)(Path(path))
print("holding", flush=True)
time.sleep(300)
"""


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (a plain HF dir), its text, and a two-question eval file."""
    root = training_fixture(tmp_path_factory.mktemp("accidents"))
    (root / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root


@pytest.fixture(autouse=True)
def one_process_group(monkeypatch):
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def train_args(root: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--model", str(root / "model"), "--dataset", str(root / "text.jsonl"), "--output-dir", str(output_dir),
            "--seq-len", "16", "--thought-len", "2", "--n-true", "2", "--micro-batch-size", "2", "--grad-accum-steps", "1",
            "--heldout-documents", "2", "--eval-batch-size", "2", "--eval-every", "0", "--warmup-steps", "0",
            "--save-every", "1", "--max-steps", "3", *extra]


def eval_args(root: Path, output: Path, *extra: str) -> list[str]:
    return ["--model", str(root / "model"), "--task", "prosqa", "--data-file", str(root / "questions.jsonl"),
            "--output", str(output), "--batch-size", "1", "--max-new-tokens", "2", *extra]


def error_line(err: str, program: str) -> str:
    """The one line of ``err``, checked to be ``<program>: error: ...``; the message after that."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), lines
    return lines[0].removeprefix(f"{program}: error: ")


def python_running(script: str, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], **popen)


# --- two runs into one output ------------------------------------------------------------------------------


def test_a_second_run_or_evaluation_into_the_same_output_is_refused_while_the_first_runs(fixture_dir, tmp_path, capsys):
    """Another process holds a training output dir, a perplexity output dir and a report: each command started
    into them is refused in one line naming it, before anything loads. A copy of the held directory is free, and
    once the holder is killed (-9, its locks left behind) the same commands go ahead and leave no lock."""
    run, report_dir, report = tmp_path / "run", tmp_path / "ppl", tmp_path / "reports" / "r.json"
    table = tmp_path / "testbed"
    holder = python_running(HOLDER, str(ROOT / "quietstar" / "core" / "run_lock.py"), "dir", str(run), "dir", str(report_dir),
                            "file", str(report), "dir", str(table), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        other = f"is in use by another run (pid {holder.pid} on {socket.gethostname()}, since "
        missing = str(tmp_path / "missing.jsonl")
        assert pretrain.main(train_args(fixture_dir, run, "--dataset", missing)) == 2
        line = error_line(capsys.readouterr().err, PRETRAIN)
        assert line.startswith(f"--output-dir {run} {other}") and "wait for it to end, or choose another --output-dir" in line
        assert coconut_eval(eval_args(fixture_dir, report)) == 2
        assert error_line(capsys.readouterr().err, "quietstar coconut-eval").startswith(f"--output {report} {other}")
        assert cli.main(["perplexity", "--model", str(fixture_dir / "model"), "--data-file", missing, "--output-dir", str(report_dir)]) == 2
        assert error_line(capsys.readouterr().err, "quietstar perplexity").startswith(f"--output-dir {report_dir} {other}")
        assert cli.main(["testbed", "table", "--out", str(table), "--cache", str(tmp_path / "cache")]) == 2
        assert error_line(capsys.readouterr().err, "quietstar testbed").startswith(f"--out {table} {other}")
        assert not (tmp_path / "cache").exists()  # refused before the base

        copy = tmp_path / "copy"
        shutil.copytree(run, copy)  # the holder's lock file comes along, but it locks the original
        assert pretrain.main(train_args(fixture_dir, copy, "--dataset", missing)) == 2
        assert error_line(capsys.readouterr().err, PRETRAIN) == f"DataConfig.dataset: no file matches '{missing}'"
    finally:
        holder.kill()
        holder.wait()
    assert (run / run_lock.LOCK).exists()  # a stale lock: its process is gone
    assert pretrain.main(train_args(fixture_dir, run, "--dataset", missing)) == 2
    assert error_line(capsys.readouterr().err, PRETRAIN) == f"DataConfig.dataset: no file matches '{missing}'"
    assert not (run / run_lock.LOCK).exists() and not (copy / run_lock.LOCK).exists()
    assert not (tmp_path / "never-written").exists()
    assert pretrain.main(train_args(fixture_dir, tmp_path / "never-written" / "run", "--dataset", missing)) == 2
    assert not (tmp_path / "never-written").exists()  # a run refused at start-up leaves no directory behind
    capsys.readouterr()


# --- signals from the terminal ------------------------------------------------------------------------------


def test_ctrl_c_saves_after_the_step_and_the_run_resumes_from_where_it_was_moved(fixture_dir, tmp_path, monkeypatch, capfd):
    """Ctrl-C during step 1: the step finishes, a checkpoint is saved, the run says so and exits 130 (so
    ``train && eval`` stops there, as after any interrupted command). The run's
    directory is then moved (mv, a file manager) and resumed from its new path; nothing in it names the old one."""
    real_batches = TokenStream.batches

    def ctrl_c_in_step_1(self, *args, **kwargs):
        for number, batch in enumerate(real_batches(self, *args, **kwargs)):
            if number == 0:
                os.kill(os.getpid(), signal.SIGINT)
            yield batch

    monkeypatch.setattr(TokenStream, "batches", ctrl_c_in_step_1)
    first = tmp_path / "first"
    assert pretrain.main(train_args(fixture_dir, first)) == 130
    err = capfd.readouterr().err
    assert "Ctrl-C: finishing this step and saving a checkpoint" in err and "Traceback" not in err
    assert f"stopped by SIGINT after step 1; checkpoint {first / 'checkpoints' / 'step-000001'} saved" in err
    assert checkpoints.latest_tag(first / "checkpoints") == "step-000001" and not (first / run_lock.LOCK).exists()
    monkeypatch.setattr(TokenStream, "batches", real_batches)

    moved = tmp_path / "renamed" / "second"
    moved.parent.mkdir()
    first.rename(moved)
    for path in (moved / "checkpoints").rglob("*"):
        assert not path.is_file() or str(first).encode() not in path.read_bytes(), path
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert pretrain.main(train_args(fixture_dir, moved, "--resume", "--max-steps", "2")) == 0
    assert [r["step"] for r in read_metrics(moved)] == [1, 2] and (moved / "final").is_dir()
    assert not first.exists()


def test_a_second_ctrl_c_stops_at_once_and_ctrl_c_outside_the_loop_is_one_line(capfd):
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), Preemption() as preemption:
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.signal_name == "SIGINT"  # the first: recorded, the step goes on
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    capfd.readouterr()

    def interrupted():
        raise KeyboardInterrupt  # e.g. while the model loads

    assert engine.run_recipe(PRETRAIN, interrupted) == 130
    assert capfd.readouterr().err.strip() == (f"{PRETRAIN}: interrupted; stopped without saving "
                                              "(checkpoints already complete are kept)")


# Started in a session of its own with a pseudo-terminal as its controlling terminal, like a run started in a
# terminal window; the terminal is then closed. Loads preemption.py by its path.
HANGUP = r"""
import fcntl, importlib.util, sys, termios, time
spec = importlib.util.spec_from_file_location("preemption", sys.argv[1])
preemption = importlib.util.module_from_spec(spec)
spec.loader.exec_module(preemption)
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
with preemption.Preemption() as caught:
    print("ready", flush=True)
    while not caught.requested():
        time.sleep(0.01)
    for _ in range(50):
        print("the run goes on to its save, printing as it goes", flush=True)
    sys.stderr.write("and its last line\n")
open(sys.argv[2], "w").write(caught.signal_name)
"""


def test_closing_the_terminal_is_a_preemption_and_the_run_outlives_its_terminal(tmp_path):
    """SIGHUP is recorded like SIGTERM (the recipe then saves and stops), and what the run prints after the
    terminal is gone goes nowhere instead of failing: before, it ended the process at once."""
    try:
        master, terminal = pty.openpty()
    except OSError as error:
        pytest.skip(f"no pseudo-terminal here ({error})")
    result = tmp_path / "signal"
    run = subprocess.Popen([sys.executable, "-c", HANGUP, str(ROOT / "quietstar" / "training" / "preemption.py"), str(result)],
                           stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True)
    os.close(terminal)
    try:
        seen = b""
        while b"ready" not in seen:
            assert select.select([master], [], [], 60)[0], seen
            seen += os.read(master, 1024)
        os.close(master)  # the terminal window closes
        assert run.wait(timeout=60) == 0
    finally:
        run.kill()
        run.wait()
    assert result.read_text() == "SIGHUP"


# --- files moved, deleted or given in the wrong place -------------------------------------------------------


def fake_checkpoint(root: Path, step: int, ranks: int = 1) -> Path:
    """A checkpoint directory with one model file, ``ranks`` state files and its manifest."""
    directory = root / checkpoints.tag(step)
    directory.mkdir(parents=True)
    for name in ["mp_rank_00_model_states.pt"] + [f"rank{rank:05d}_state.pt" for rank in range(ranks)]:
        (directory / name).write_bytes(b"x" * 100)
    checkpoints._write_manifest(directory)
    (root / checkpoints.LATEST).write_text(directory.name + "\n")
    return directory


def test_checkpoints_deleted_by_hand_while_the_run_prunes_do_not_stop_it(tmp_path, monkeypatch, capsys):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    shutil.rmtree(tmp_path / "step-000002")  # to free disk, while the run goes on
    real_rmtree = shutil.rmtree

    def deleted_meanwhile(path, *args, **kwargs):  # the user's `rm -rf` got there first
        if Path(path).name == "step-000001" and not kwargs.get("ignore_errors"):
            real_rmtree(path)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", deleted_meanwhile)
    checkpoints._prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000003", "step-000004"]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("given", ["checkpoint", "checkpoints", "run"])
def test_a_piece_of_a_training_run_given_as_the_model_names_the_model_to_pass(tmp_path, capsys, given):
    run = tmp_path / "run"
    checkpoint = fake_checkpoint(run / "checkpoints", 4)
    (run / "config.json").write_text("{}\n")  # the run's settings, not a model's config
    path = {"checkpoint": checkpoint, "checkpoints": run / "checkpoints", "run": run}[given]
    what = {"checkpoint": "a training checkpoint (DeepSpeed's shards, not a model)",
            "checkpoints": "a training run's checkpoints", "run": "a training run's output directory"}[given]
    assert cli.main(["generate", "--model", str(path), "the sum"]) == 2
    assert error_line(capsys.readouterr().err, "quietstar generate") == (
        f"--model '{path}' is {what}; the run writes its model to {run / 'final'} when it ends (continue it with --resume)")
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}\n")
    assert cli.main(["generate", "--model", str(path), "the sum"]) == 2
    assert error_line(capsys.readouterr().err, "quietstar generate") == f"--model '{path}' is {what}; pass {run / 'final'}"


def unwritable(path: Path, monkeypatch) -> None:
    """``path`` made a directory that cannot be written in: chmod 555, or, where that does not stop writes
    (root), a PermissionError when a file is made in it."""
    path.mkdir()
    path.chmod(0o555)
    if os.access(path, os.W_OK):
        real_write = Path.write_text

        def refuse(self, *args, **kwargs):
            if self.parent == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real_write(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", refuse)


def test_an_output_that_is_a_file_a_directory_or_read_only_is_refused_at_start_up(fixture_dir, tmp_path, monkeypatch, capsys):
    """Refused before any data or model loads (the dataset given does not exist)."""
    missing = str(tmp_path / "missing.jsonl")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("my notes\n")
    assert pretrain.main(train_args(fixture_dir, a_file, "--dataset", missing)) == 2
    assert error_line(capsys.readouterr().err, PRETRAIN) == f"--output-dir {a_file} is a file, not a directory"
    assert cli.main(["perplexity", "--model", "m", "--data-file", missing, "--output-dir", str(a_file / "report")]) == 2
    assert error_line(capsys.readouterr().err, "quietstar perplexity") == (
        f"--output-dir {a_file / 'report'} cannot be written (Not a directory)")
    assert coconut_eval(eval_args(fixture_dir, tmp_path)) == 2
    assert error_line(capsys.readouterr().err, "quietstar coconut-eval") == (
        f"--output {tmp_path} is a directory; give the report's file name, e.g. {tmp_path / 'report.json'}")
    assert a_file.read_text() == "my notes\n"

    locked = tmp_path / "read-only"
    unwritable(locked, monkeypatch)
    assert pretrain.main(train_args(fixture_dir, locked, "--dataset", missing)) == 2
    assert error_line(capsys.readouterr().err, PRETRAIN) == f"--output-dir {locked} cannot be written (Permission denied)"


def test_a_report_named_like_its_data_file_is_refused(fixture_dir, capsys):
    data = fixture_dir / "questions.jsonl"
    before = data.read_text()
    assert coconut_eval(eval_args(fixture_dir, data)) == 2
    assert error_line(capsys.readouterr().err, "quietstar coconut-eval") == (
        f"--output {data} is the --data-file file, which the report would overwrite; give the report another name")
    assert data.read_text() == before


def test_a_report_in_new_directories_then_overwritten_by_a_run_stopped_while_writing_it(fixture_dir, tmp_path, monkeypatch, capsys):
    """The report's directories are made. A rerun stopped by Ctrl-C while it writes the new report leaves the old
    one whole (one line, exit 130) and its finished items kept; --resume then finishes it."""
    report = tmp_path / "not" / "yet" / "there" / "report.json"
    assert coconut_eval(eval_args(fixture_dir, report)) == 0
    old = report.read_text()
    assert json.loads(old)["n"] == 2 and not report.with_name("report.json.lock").exists()

    real_replace = os.replace

    def stopped_before_the_rename(source, target):  # the new report is written in full, not yet in place
        if Path(target) == report:
            raise KeyboardInterrupt
        return real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", stopped_before_the_rename)
    capsys.readouterr()
    assert coconut_eval(eval_args(fixture_dir, report, "--limit", "1")) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "quietstar coconut-eval: interrupted" and "Traceback" not in err
    assert report.read_text() == old
    assert sorted(p.name for p in report.parent.iterdir()) == ["report.json", "report.json.partial.jsonl"]
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert coconut_eval(eval_args(fixture_dir, report, "--limit", "1", "--resume")) == 0
    assert json.loads(report.read_text())["n"] == 1
    assert sorted(p.name for p in report.parent.iterdir()) == ["report.json"]


# --- flags, ranks and launch scripts -----------------------------------------------------------------------


@pytest.mark.parametrize("typed, meant", [("--learning-rate", "--lr"), ("--max_steps", "--max-steps"),
                                          ("--output_dir", "--output-dir"), ("--sed", "--seed")])
def test_a_mistyped_flag_names_the_closest_real_one(capsys, typed, meant):
    with pytest.raises(SystemExit) as stopped:
        pretrain.main([typed, "3"])
    assert stopped.value.code == 2
    assert error_line(capsys.readouterr().err, "python -m quietstar.training.pretrain") == (
        f"unrecognized arguments {typed} 3 ({typed}: did you mean {meant}?); see --help")


def test_a_mistyped_flag_of_a_command_names_the_closest_real_one(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["coconut-eval", "--model", "m", "--task", "prosqa", "--data-file", "d", "--ouptut", "r.json"])
    assert stopped.value.code == 2
    assert error_line(capsys.readouterr().err, "quietstar coconut-eval") == (
        "unrecognized arguments --ouptut r.json (--ouptut: did you mean --output?); see --help")


def test_resuming_with_another_number_of_ranks_says_how_many_the_run_used(tmp_path):
    fake_checkpoint(tmp_path, 2, ranks=2)
    with pytest.raises(ConfigError) as refused:
        engine.resume_state(tmp_path, "step-000002", 1, {})
    assert str(refused.value) == (f"--resume: {tmp_path / 'step-000002'} was written by 2 ranks, this run has 1; each rank "
                                  "resumes its own data position, so resume it with 2 ranks (the launcher's --num-gpus, "
                                  "or a hostfile's slots)")


def test_a_launch_script_run_from_another_directory_or_through_a_symlink(tmp_path, monkeypatch):
    link = tmp_path / "bin" / "qs-pretrain"
    link.parent.mkdir()
    link.symlink_to(ROOT / "launch" / "pretrain.sh")
    for script in (link, ROOT / "launch" / "pretrain.sh"):
        shown = subprocess.run(["bash", str(script), "--help"], cwd=tmp_path, capture_output=True, text=True)
        assert shown.returncode == 0 and "--hostfile" in shown.stdout, shown.stderr
    # What each rank runs, `python <script> --local_rank=N ...`, given the link: the recipe and its default config.
    called = []
    monkeypatch.setattr(launch_scripts.importlib, "import_module", lambda name: types.SimpleNamespace(
        main=lambda argv: called.append((name, argv)) or 0))
    with pytest.raises(SystemExit) as done:
        launch_scripts.run(str(link), ["--local_rank=0"])
    assert done.value.code == 0
    (name, argv), = called
    assert name == PRETRAIN and argv[argv.index("--config") + 1] == str(ROOT / "launch" / "configs" / "demo.yaml")

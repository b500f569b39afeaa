"""Kill-and-resume soak: a 2-rank ZeRO-2 run killed with SIGKILL at random moments, resumed each time, against
the same run uninterrupted.

    python benchmarks/soak.py --method quiet_star --kills 20 --json benchmarks/results/soak_quiet_star.json
    python benchmarks/soak.py --method coconut --kills 20 --json benchmarks/results/soak_coconut.json

Each method trains a tiny random model (``tests/helpers.py``'s fixtures) with 2 processes under the DeepSpeed
launcher (``launch/pretrain.sh`` or ``launch/coconut.sh``), ZeRO-2, saving every 2 steps: Quiet-STaR for
``--steps`` steps; Coconut for 3 epochs (stages 0, 1, 2: two stage changes, each resetting the optimizer), about
the same number of steps. First the run goes uninterrupted. Then the same run is started and killed ``--kills``
times: the whole job (launcher and both ranks) gets SIGKILL, alternately at a random moment of the run and just
after a checkpoint save has begun (its ``step-N.partial`` directory appears), and is started again, with
``--resume`` once a checkpoint exists. After the last kill it runs to the end.

A kill is survived when the next start resumes (or, with no checkpoint yet, starts over) without an error. At the
end the interrupted run must equal the uninterrupted one: every logged step (loss, learning rate, data position,
...) to 1e-6, the exported final weights, and the last checkpoint's optimizer state, LR schedule and every rank's
data position and RNG state, exactly. Prints the tally and writes it to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the suite's tiny fixtures
from helpers import WORDS, tiny_lm, tiny_tokenizer, training_fixture  # noqa: E402

from quietstar.training import checkpoints  # noqa: E402
from quietstar.training.run_log import read_metrics  # noqa: E402
from quietstar.training.train_config import DS_CONFIGS  # noqa: E402

COCONUT_VOCAB = WORDS + ["###", "<<"]
VOLATILE = {"step_s", "tokens_per_s", "seconds", "time", "elapsed_s", "wall_s"}  # timings differ between runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def coconut_fixture(root: Path, examples: int) -> Path:
    """A tiny random GPT-2 and ``examples`` arithmetic records with 1-2 steps each (as tests/test_coconut_train.py)."""
    tiny_lm("gpt2", vocab_size=len(COCONUT_VOCAB)).save_pretrained(root / "model")
    tiny_tokenizer(COCONUT_VOCAB).save_pretrained(root / "model")
    rng = random.Random(0)
    for name, count in (("train.jsonl", examples), ("val.jsonl", 6)):
        with (root / name).open("w") as f:
            for _ in range(count):
                a, b = rng.randint(0, 4), rng.randint(0, 4)
                steps = [f"{a} plus {b}", f"equals {a + b}"] if a + b < 10 else [f"{a} plus {b}"]
                f.write(json.dumps({"question": f"the sum of {a} and {b} is", "steps": steps, "answer": str((a + b) % 10)}) + "\n")
    return root


def recipe(method: str, root: Path, out: Path, steps: int) -> tuple[Path, list[str]]:
    """The launch script and its arguments for one run."""
    if method == "quiet_star":
        return ROOT / "launch" / "pretrain.sh", [
            "--model", str(root / "model"), "--dataset", str(root / "text.jsonl"), "--output-dir", str(out),
            "--deepspeed", str(DS_CONFIGS / "zero2.json"), "--max-steps", str(steps), "--seed", "3", "--seq-len", "24",
            "--thought-len", "3", "--n-true", "2", "--micro-batch-size", "2", "--grad-accum-steps", "1", "--lr", "1e-3",
            "--warmup-steps", "5", "--heldout-documents", "4", "--eval-batch-size", "4", "--eval-every", "10",
            "--save-every", "2", "--keep-checkpoints", "3"]
    return ROOT / "launch" / "coconut.sh", [
        "--model", str(root / "model"), "--train-file", str(root / "train.jsonl"), "--val-file", str(root / "val.jsonl"),
        "--output-dir", str(out), "--deepspeed", str(DS_CONFIGS / "zero2.json"), "--num-epochs", "3", "--seed", "3",
        "--c", "2", "--max-latent-stage", "1", "--epochs-per-stage", "1", "--marker-init-text", "<<",
        "--micro-batch-size", "2", "--grad-accum-steps", "1", "--lr", "1e-3", "--save-every", "2", "--keep-checkpoints", "3",
        "--val-batch-size", "6", "--val-max-new-tokens", "4"]


def start(script: Path, args: list[str]) -> subprocess.Popen:
    """The job in a session of its own, so that one signal reaches the launcher and both ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.Popen(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(script), *args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finished(job: subprocess.Popen, what: str) -> None:
    _, err = job.communicate(timeout=900)
    if job.returncode != 0:
        raise SystemExit(f"{what} failed (exit {job.returncode}):\n{err[-3000:]}")


def saving(out: Path) -> bool:
    root = out / "checkpoints"
    return root.is_dir() and any(p.name.endswith(".partial") for p in root.iterdir())


def logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def kill_at(job: subprocess.Popen, out: Path, moment: str, rng: random.Random, step_s: float) -> str:
    """SIGKILL the whole job at ``moment``; what happened.

    "random": during start-up (after 0-15 s, or at the first new step if that comes first) one time in three, else
    once 1-2 more steps are logged, plus up to
    1.5 steps' time (``step_s``: one step of the uninterrupted run); "save": as soon as a save has begun (its
    ``step-N.partial`` directory exists).
    """
    began, steps, extra = time.monotonic(), logged(out), rng.choice([0, 1, 2])
    delay = rng.uniform(0, 15) if extra == 0 else rng.uniform(0, 1.5 * step_s)
    reached = None
    while job.poll() is None:
        if moment == "save" and saving(out):
            break
        if moment == "random":
            if extra == 0 and logged(out) > steps:  # start-up is over before the delay: kill at the first new step
                break
            if reached is None and (extra == 0 or logged(out) >= steps + extra):
                reached = time.monotonic()
            if reached is not None and time.monotonic() - reached >= delay:
                break
        if time.monotonic() - began > 600:
            raise SystemExit("a run made no progress for 10 minutes")
        time.sleep(0.01)
    if job.poll() is not None:
        return "finished first"
    during_save = saving(out)
    os.killpg(job.pid, signal.SIGKILL)
    job.communicate()
    return "killed during a save" if during_save else "killed"


def same(a, b, where: str, problems: list[str]) -> None:
    """Recursively compare two saved states exactly (tensors bit for bit); note each difference."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and torch.equal(a, b)):
            problems.append(where)
    elif isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            problems.append(f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))}")
        for key in a.keys() & b.keys():
            same(a[key], b[key], f"{where}.{key}", problems)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            problems.append(f"{where}: lengths {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]", problems)
    elif type(a) is type(b) and hasattr(a, "__dict__") and type(a).__eq__ is object.__eq__:  # e.g. DeepSpeed's loss scaler
        same(vars(a), vars(b), where, problems)
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and a != a and b != b):
        problems.append(f"{where}: {a!r} != {b!r}")


def compare(interrupted: Path, uninterrupted: Path) -> list[str]:
    """Every difference between the two runs' steps, final weights and last checkpoints."""
    problems: list[str] = []
    steps_a, steps_b = read_metrics(interrupted), read_metrics(uninterrupted)
    if [r["step"] for r in steps_a] != [r["step"] for r in steps_b]:
        problems.append(f"logged steps {[r['step'] for r in steps_a]} != {[r['step'] for r in steps_b]}")
    for a, b in zip(steps_a, steps_b):
        for name in (a.keys() | b.keys()) - VOLATILE:
            x, y = a.get(name), b.get(name)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
                if abs(x - y) > 1e-6:
                    problems.append(f"step {a['step']} {name}: {x} != {y}")
            elif x != y:
                problems.append(f"step {a['step']} {name}: {x!r} != {y!r}")
    weights = [load_file(next((run / "final").glob("**/model.safetensors"))) for run in (interrupted, uninterrupted)]
    same(weights[0], weights[1], "final weights", problems)
    tags = [checkpoints.latest_tag(run / "checkpoints") for run in (interrupted, uninterrupted)]
    if tags[0] != tags[1]:
        problems.append(f"last checkpoints {tags}")
    else:
        for name in sorted(p.name for p in (uninterrupted / "checkpoints" / tags[1]).rglob("*.pt")):
            files = [next((run / "checkpoints" / tags[1]).rglob(name)) for run in (interrupted, uninterrupted)]
            states = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
            same(states[0], states[1], f"{tags[1]}/{name}", problems)
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("quiet_star", "coconut"), default="quiet_star")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=40, help="Quiet-STaR's steps (Coconut: 3 epochs of about as many in all)")
    parser.add_argument("--seed", type=int, default=0, help="chooses the kill moments")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        fixture = (training_fixture(work / "fixture") if args.method == "quiet_star"
                   else coconut_fixture(work / "fixture", examples=2 * 2 * args.steps // 3))
        reference, interrupted = work / "uninterrupted", work / "interrupted"
        script, ref_args = recipe(args.method, fixture, reference, args.steps)
        began = time.monotonic()
        finished(start(script, ref_args), "the uninterrupted run")
        duration = time.monotonic() - began
        times = sorted(r["step_s"] for r in read_metrics(reference) if "step_s" in r)
        step_s = times[len(times) // 2]
        print(f"uninterrupted run: {len(read_metrics(reference))} steps in {duration:.0f} s ({step_s:.2f} s a step)", flush=True)

        script, run_args = recipe(args.method, fixture, interrupted, args.steps)
        kills: list[dict] = []
        while len(kills) < args.kills:
            resume = checkpoints.latest_tag(interrupted / "checkpoints") is not None
            moment = "save" if len(kills) % 2 else "random"
            job = start(script, run_args + ["--resume"] * resume)
            outcome = kill_at(job, interrupted, moment, rng, step_s)
            if outcome == "finished first":
                if job.returncode != 0:
                    raise SystemExit(f"a resumed run failed (exit {job.returncode}):\n{job.communicate()[1][-3000:]}")
                break
            kills.append(dict(moment=moment, outcome=outcome, resumed_from=checkpoints.latest_tag(interrupted / "checkpoints"),
                              steps_logged=len(read_metrics(interrupted)) if (interrupted / "metrics.jsonl").exists() else 0))
            print(f"kill {len(kills)} ({moment}): {outcome}; latest checkpoint {kills[-1]['resumed_from']}", flush=True)
        if not (interrupted / "final").exists():
            resume = checkpoints.latest_tag(interrupted / "checkpoints") is not None
            finished(start(script, run_args + ["--resume"] * resume), "the last resumed run")
        problems = compare(interrupted, reference)
    result = dict(method=args.method, kills_attempted=args.kills, kills=len(kills),
                  kills_during_a_save=sum(k["outcome"] == "killed during a save" for k in kills),
                  survived=len(kills), equal=not problems, problems=problems[:50], kill_log=kills,
                  uninterrupted_s=duration, step_s=step_s)
    print(f"{args.method}: {len(kills)} kills ({result['kills_during_a_save']} during a save), every one resumed; "
          f"final state {'equal to' if not problems else 'DIFFERENT from'} the uninterrupted run's"
          + ("" if not problems else f": {problems[:5]}"))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()

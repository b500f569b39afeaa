"""launch/pretrain.sh and launch/coconut.sh are bash and Python at once: `bash launch/X.sh` and `deepspeed launch/X.sh`.

The 2-rank runs through both forms are in test_train.py (the same first step) and test_coconut_train.py.
"""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, WORDS, free_port, run, tiny_lm, tiny_tokenizer

from quietstar.core.cli_config import ConfigError
from quietstar.training import engine
from quietstar.training.launch_scripts import recipe_arguments, uses_default

SCRIPTS = [ROOT / "launch" / "pretrain.sh", ROOT / "launch" / "coconut.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_each_launch_script_is_valid_python_and_its_help_works_both_ways(script):
    ast.parse(script.read_text(), filename=str(script))
    shell = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert shell.returncode == 0 and "deepspeed [--num_gpus N] [--hostfile H]" in shell.stdout
    python = subprocess.run([sys.executable, str(script), "--local_rank=0", "--help"], capture_output=True, text=True)
    assert python.returncode == 0 and "--output-dir" in python.stdout and "--resume" in python.stdout


def test_the_launchers_local_rank_is_not_a_recipe_argument():
    assert recipe_arguments(["--local_rank=1", "--max-steps", "3"]) == ["--max-steps", "3"]
    assert recipe_arguments(["--local_rank", "0"]) == []
    assert uses_default(["--local_rank=0"]) and uses_default([])
    assert uses_default(["--local_rank=0", "--deepspeed", "ds_configs/zero3.json"])  # what DS_CONFIG adds
    assert not uses_default(["--local_rank=0", "--max-steps", "3"])


def test_every_rank_agrees_on_the_default_run_directory_when_clocks_differ(tmp_path):
    """Rank 1's clock runs a second ahead of rank 0's; both ranks still name rank 0's directory."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys, time\n"
        "from quietstar.training.engine import init_distributed, run_recipe, shared_output_dir\n"
        "from quietstar.training.train_config import TrainConfig\n"
        "if os.environ['RANK'] == '1':\n"
        "    real = time.strftime\n"
        "    time.strftime = lambda f, t=None: real(f, time.localtime(time.time() + 1))\n"
        "def main():\n"
        "    init_distributed()\n"
        "    cfg = shared_output_dir(TrainConfig(output_dir='runs/demo-{time}'))\n"
        f"    open(os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK']), 'w').write(cfg.output_dir)\n"
        "sys.exit(run_recipe('probe', main))\n"
    )
    # Each rank writes its answer to its own file: lines printed by two ranks share the launcher's pipe and can
    # interleave into one line. The body runs inside run_recipe, as the recipes' does, so that the process group is
    # torn down before the interpreter exits (a rank that exits with it alive can abort in gloo's threads: -6).
    run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(probe)])
    paths = {(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)}
    assert len(paths) == 1 and paths.pop().startswith("runs/demo-")


def test_ranks_started_by_mpirun_or_srun_are_not_taken_for_a_run_of_their_own(monkeypatch):
    """DeepSpeed's openmpi/slurm launchers leave RANK unset; the ranks come from MPI, which needs mpi4py."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if not installed
    with pytest.raises(ConfigError, match="mpirun/srun.*pip install mpi4py"):
        engine.init_distributed()
    assert "RANK" not in os.environ  # no one-process group was made up


def ssh_to_localhost() -> bool:
    probe = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "ConnectTimeout=3", "localhost", "true"]
    return shutil.which("ssh") is not None and subprocess.run(probe, capture_output=True).returncode == 0


def mpi_ready() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return shutil.which("mpirun") is not None


@pytest.mark.parametrize("launcher", ["pdsh", "openmpi"])
def test_deepspeeds_multi_node_launchers_run_the_script_on_one_host(launcher, tmp_path, monkeypatch):
    """DeepSpeed's pdsh and OpenMPI launchers (forced to their multi-node path on a one-host hostfile) run 2 ranks.

    Skipped where the launcher's tools are missing (CI has neither)."""
    if launcher == "pdsh" and not (shutil.which("pdsh") and ssh_to_localhost()):
        pytest.skip("needs pdsh and passwordless ssh to localhost")
    if launcher == "openmpi" and not mpi_ready():
        pytest.skip("needs mpirun and mpi4py")
    tiny_lm("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    rng = random.Random(0)
    (tmp_path / "text.jsonl").write_text("".join(
        json.dumps({"text": " ".join(rng.choice(WORDS[3:]) for _ in range(30))}) + "\n" for _ in range(20)))
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT", "1")  # mpirun refuses root otherwise (containers)
    monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    out = tmp_path / "run"
    no_ssh = ["--no_ssh_check"] if launcher == "openmpi" else []  # mpirun starts local ranks without ssh
    run(["deepspeed", "--launcher", launcher, *no_ssh, "--hostfile", str(tmp_path / "hosts"), "--force_multi", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(ROOT / "launch" / "pretrain.sh"), "--model", str(tmp_path / "model"),
         "--dataset", str(tmp_path / "text.jsonl"), "--output-dir", str(out), "--max-steps", "1", "--seq-len", "16",
         "--thought-len", "2", "--n-true", "2", "--micro-batch-size", "1", "--grad-accum-steps", "1", "--heldout-documents", "2"])
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert (out / "final").is_dir()

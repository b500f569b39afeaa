"""Our commands print no warning of their own: every ``--help`` and a tiny real Quiet-STaR and Coconut generation.

Each runs in a fresh Python, as a user types it, with FutureWarning and DeprecationWarning made errors
when they are raised from quietstar's code (the command's own module runs as ``__main__``). Python's
``-W error::FutureWarning:quietstar`` cannot say that: ``-W`` matches one module name exactly, so
the filters are set with a regex before the command runs. transformers' deprecations of an argument
(``past_key_values=``, renamed ``cache=`` in 5.24) are raised from its wrapper with ``stacklevel=2``
and so are attributed to ``torch.nn.modules.module``, not to our module that made the call; what the
user sees, the printed output, is checked too: no warning and no DeepSpeed "Setting accelerator to CPU"
notice in stdout or stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, WORDS, move_off_init, tiny_lm, tiny_tokenizer

from quietstar import CoconutConfig, CoconutModel, QuietStarConfig, QuietStarModel

# Runs each (target, argv) of the JSON list in argv[1] as `python -m target *argv` (`python target *argv`
# for a launch/*.sh script) in this one process, with our own deprecation warnings as errors.
STRICT_RUN = r"""
import json, runpy, sys, warnings
for category in (FutureWarning, DeprecationWarning):
    warnings.filterwarnings("error", category=category, module=r"(quietstar|__main__)(\.|$)")
for target, argv in json.loads(sys.argv[1]):
    sys.argv = [target, *argv]
    try:
        if target.endswith(".sh"):
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        if exit.code not in (0, None):
            raise
"""
NOT_CLEAN = ("Warning", "warning", "deprecated", "Setting accelerator")
SUBCOMMANDS = ["demo", "generate", "eval", "perplexity", "coconut-generate", "coconut-eval", "lm-eval", "testbed"]


def run_strict(*commands: tuple[str, list[str]]) -> str:
    """Run the commands in one fresh Python; they succeed and print no warning. Returns stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-c", STRICT_RUN, json.dumps(commands)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    shown = f"{commands}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    assert result.returncode == 0, shown
    noisy = [line for line in (result.stdout + result.stderr).splitlines() if any(word in line for word in NOT_CLEAN)]
    assert not noisy, shown
    return result.stdout


def test_every_commands_help_is_clean():
    out = run_strict(
        ("quietstar.cli", ["--help"]),
        *[("quietstar.cli", [name, "--help"]) for name in SUBCOMMANDS],
        ("quietstar.training.pretrain", ["--help"]),
        ("quietstar.training.coconut", ["--help"]),
        *[(str(ROOT / "launch" / script), ["--local_rank=0", "--help"]) for script in ("pretrain.sh", "coconut.sh")],
    )
    assert out.count("usage: quietstar") == 1 + len(SUBCOMMANDS)
    assert out.count("usage: python -m quietstar.training.pretrain") == 2 and out.count("usage: python -m quietstar.training.coconut") == 2


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    torch.manual_seed(0)
    move_off_init(QuietStarModel(tiny_lm("llama"), tiny_tokenizer(), QuietStarConfig(thought_len=3)), head_scale=0.5).save_pretrained(
        root / "quiet_star")
    coconut = CoconutModel(tiny_lm("llama", vocab_size=len(WORDS)), tiny_tokenizer(), CoconutConfig(c=1, max_latent_stage=2))
    with torch.no_grad():
        for p in coconut.marker_parameters():
            p.add_(0.5 * torch.randn_like(p))
    coconut.save_pretrained(root / "coconut")
    return root


def test_quiet_star_generation_is_clean(saved_models):
    out = run_strict(("quietstar.cli", ["generate", "--model", str(saved_models / "quiet_star"), "--max-new-tokens", "3", "3 plus 4"]))
    assert "with thoughts (M=3)" in out


def test_coconut_generation_is_clean(saved_models):
    out = run_strict(("quietstar.cli", ["coconut-generate", "--model", str(saved_models / "coconut"), "--max-new-tokens", "3",
                                        "--show-latents", "the sum of 2 and 3 is", "x plus y"]))
    assert "2 question(s), mode coconut, 2 latent(s)" in out


def test_importing_quietstar_leaves_deepspeed_alone_and_our_commands_hide_only_its_cpu_notice():
    """`import quietstar` does not import DeepSpeed, so a library user sees its output as always; our entry points
    (run_command, run_recipe) hide the one notice it prints, on import, when it finds no GPU."""
    check = (
        "import logging, sys\n"
        "import quietstar\n"
        "assert 'deepspeed' not in sys.modules\n"
        "from quietstar.core.cli_config import deepspeed_cpu_notice_hidden\n"
        "with deepspeed_cpu_notice_hidden():\n"
        "    import deepspeed\n"
        "assert not logging.getLogger('DeepSpeed').filters\n"
        "deepspeed.utils.logger.warning('Setting accelerator to CPU. (after the block: shown)')\n"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    printed = (result.stdout + result.stderr).splitlines()
    assert [line for line in printed if "Setting accelerator" in line] == [printed[-1]] and "(after the block: shown)" in printed[-1]

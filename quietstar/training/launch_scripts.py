"""What each rank runs when the DeepSpeed launcher is given ``launch/pretrain.sh`` or ``launch/coconut.sh``.

Those two files are bash and Python at once, so that both forms users type work:

    bash launch/pretrain.sh [launcher settings] [recipe arguments]
    deepspeed [--num_gpus N] [--hostfile H] launch/pretrain.sh [recipe arguments]

Bash reads the file's first command (a line that Python reads as a string) and execs
``launch/deepspeed_recipe.sh``, which runs the DeepSpeed launcher over the same file. The
launcher starts every rank as ``python -u launch/pretrain.sh --local_rank=N [recipe arguments]``,
and Python, skipping that line, calls ``run`` here, which runs the recipe's ``main``.

With no recipe arguments (or only ``--deepspeed FILE``) the embedded default runs: the
script's named config into ``runs/<name>-{time}``. The recipe replaces ``{time}`` with rank 0's
start time on every rank (``engine.shared_output_dir``), so every rank (and every node) writes
into the same directory even when their clocks differ.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

# script name -> (recipe module, its embedded default's config under launch/configs/, run name)
RECIPES = {
    "pretrain": ("quietstar.training.pretrain", "demo.yaml", "demo"),
    "coconut": ("quietstar.training.coconut", "coconut_demo.yaml", "coconut-demo"),
}


def recipe_arguments(argv: list[str]) -> list[str]:
    """``argv`` without the launcher's ``--local_rank`` (``--local_rank=N`` or ``--local_rank N``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            out.append(arg)
    return out


def uses_default(argv: list[str]) -> bool:
    """True when the recipe arguments are none, or only ``--deepspeed FILE`` (what ``DS_CONFIG`` adds)."""
    rest = recipe_arguments(argv)
    return not rest or (len(rest) == 2 and rest[0] == "--deepspeed")


def run(script: str, argv: list[str] | None = None) -> None:
    """Run the recipe that ``script`` (``launch/<name>.sh``, or a symlink to it) stands for with ``argv`` (default
    ``sys.argv[1:]``); exits with its code."""
    script = str(Path(script).resolve())
    name = Path(script).name.removesuffix(".sh")
    module_name, default_config, run_name = RECIPES[name]
    argv = sys.argv[1:] if argv is None else argv
    if uses_default(argv):
        config = Path(script).parent / "configs" / default_config
        argv = [*argv, "--config", str(config), "--output-dir", f"runs/{run_name}-{{time}}"]
    sys.exit(importlib.import_module(module_name).main(argv))

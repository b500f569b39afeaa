"""``quietstar lm-eval``: lm-evaluation-harness's own command line, with the ``quietstar`` model registered.

    quietstar lm-eval --model runs/demo/final --tasks quietstar_gsm8k,quietstar_csqa --data-dir ../shared/data --limit 200
    quietstar lm-eval --model smollm2-135m --model_args thoughts=off --tasks quietstar_csqa --data-dir ../shared/data

lm_eval 0.4 loads no model plugins, so this command imports ``lm_eval.models`` and ``evaluation.lm_eval_adapter``
(which registers ``quietstar``) and then runs lm_eval's CLI in the same process. ``--model DIR`` and
``--model_args K=V ...`` become ``--model quietstar --model_args pretrained=DIR,K=V,...``; every other argument
(``--tasks``, ``--limit``, ``--batch_size``, ``--output_path``, ``--log_samples``, ...) goes to lm_eval unchanged.

``--data-dir DIR`` makes the task YAMLs of ``evaluation/lm_eval_tasks`` read ``DIR/gsm8k_test.jsonl`` and
``DIR/commonsenseqa_dev.jsonl``: lm_eval needs their paths absolute (or relative to the working directory), so
a temporary include dir gets one small YAML per task found there, which includes the packaged one and names
the file by absolute path. lm_eval takes a single include path, so an ``--include_path`` of your own is copied
into that dir too.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from quietstar.core.cli_config import RunError
from quietstar.core.offline import SMOLLM2

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
TASK_FILES = {  # task: (split, file in --data-dir)
    "quietstar_gsm8k": ("test", "gsm8k_test.jsonl"),
    "quietstar_gsm8k_score": ("test", "gsm8k_test.jsonl"),
    "quietstar_csqa": ("validation", "commonsenseqa_dev.jsonl"),
}


def write_task_dir(data_dir: Path, target: Path) -> list[str]:
    """Write into ``target`` a YAML per task whose file is in ``data_dir``, naming it by absolute path; the tasks written."""
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir}: not a directory")
    written = []
    for task, (split, name) in TASK_FILES.items():
        path = (data_dir / name).resolve()
        if path.is_file():
            config = {"include": str(TASKS_DIR / f"{task}.yaml"), "task": task,
                      "dataset_kwargs": {"data_files": {split: str(path)}}}
            (target / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            written.append(task)
    if not written:
        names = sorted({name for _, name in TASK_FILES.values()})
        raise FileNotFoundError(f"--data-dir {data_dir}: has none of {', '.join(names)}")
    return written


def lm_eval_argv(args: argparse.Namespace, include_path: str | None) -> list[str]:
    """The command line handed to lm_eval's CLI."""
    model_args = ",".join([f"pretrained={args.model}", *args.model_args])
    include = ["--include_path", include_path] if include_path else []
    return ["lm-eval", "--model", "quietstar", "--model_args", model_args, *include, *args.lm_eval_args]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=SMOLLM2, help=f"a saved QuietStarModel or CoconutModel dir, a plain HF model dir, "
                        f"or '{SMOLLM2}' (the default)")
    parser.add_argument("--model_args", "--model-args", dest="model_args", nargs="+", action="extend", default=[], metavar="K=V",
                        help="more model args (thoughts=on|off, thought_samples=N, seed=N, thought_len=M, latents=N, ...)")
    parser.add_argument("--data-dir", help="a folder with gsm8k_test.jsonl and/or commonsenseqa_dev.jsonl for the "
                        "quietstar_gsm8k, quietstar_gsm8k_score and quietstar_csqa tasks")
    parser.add_argument("--include_path", "--include-path", dest="include_path", help="a folder of your own task YAMLs")
    parser.epilog = "Every other argument goes to lm_eval (see: lm-eval run --help)."


def run(args: argparse.Namespace) -> None:
    try:
        import lm_eval.models  # noqa: F401  (registers lm_eval's own models, before ours)
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise RunError("lm_eval is not installed: pip install -e '.[lm-eval]' (or pip install 'lm_eval>=0.4,<0.5')") from None

    import quietstar.evaluation.lm_eval_adapter  # noqa: F401  (registers "quietstar")

    with tempfile.TemporaryDirectory(prefix="quietstar-lm-eval-") as tmp:
        include_path = args.include_path
        if args.data_dir is not None:
            write_task_dir(Path(args.data_dir), Path(tmp))
            if args.include_path is not None:
                shutil.copytree(args.include_path, Path(tmp) / "include_path")
            include_path = tmp
        saved, sys.argv = sys.argv, lm_eval_argv(args, include_path)
        try:
            cli_evaluate()
        finally:
            sys.argv = saved

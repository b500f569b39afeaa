"""``quietstar testbed``: generate and describe the task, measure its gap, train the base, run the table.

    quietstar testbed generate --out DIR          train/valid/test jsonl in all three forms
    quietstar testbed describe                    examples, sizes and the majority-class rate
    quietstar testbed gap                         worked-trained vs unworked-trained accuracy
    quietstar testbed base                        train (or find) the cached base LM and score it
    quietstar testbed table --out DIR             both arms, every row and seed: table.json, table.md, plots

Every subcommand takes ``--config FILE.yaml`` and one flag per ``TestbedConfig`` field.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from quietstar.core.cli_config import add_dataclass_arguments, build_config, load_yaml
from quietstar.core.files import write_text_whole
from quietstar.core.offline import cache_dir
from quietstar.testbed import task
from quietstar.testbed.base_lm import base_report
from quietstar.testbed.config import TestbedConfig
from quietstar.testbed.gap import measure_gap

COMMANDS = ("generate", "describe", "gap", "base", "table")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=COMMANDS, help="what to do (see `quietstar testbed --help`)")
    parser.add_argument("--config", help="YAML file of TestbedConfig fields (flags override it)")
    parser.add_argument("--out", help="output directory (generate, table) or JSON file (gap, base)")
    parser.add_argument("--cache", help="where trained base LMs are kept (default: $QUIETSTAR_CACHE/testbed)")
    add_dataclass_arguments(parser, TestbedConfig, "testbed settings")


def config_of(args: argparse.Namespace) -> TestbedConfig:
    return build_config(TestbedConfig, load_yaml(args.config), args)


def splits(cfg: TestbedConfig) -> tuple[list[task.Problem], list[task.Problem]]:
    """The training problems (every difficulty, mixed) and the held-out problems of ``cfg.eval_split``."""
    return cfg.train_problems(), cfg.held_out_problems()


def gap_splits(cfg: TestbedConfig) -> tuple[list[task.Problem], list[task.Problem]]:
    """The gap's problems: the hardest difficulty (``hops``) only, train and held out."""
    train = task.problems("train", cfg.base_problems, cfg.hops, cfg.data_seed, cfg.earlier_prob)
    return train, task.problems(cfg.eval_split, cfg.eval_problems, cfg.hops, cfg.data_seed, cfg.earlier_prob)


def write_json(path: str | None, record: dict) -> None:
    text = json.dumps(record, indent=1)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_whole(path, text + "\n")
    print(text)


def generate(args: argparse.Namespace, cfg: TestbedConfig) -> None:
    if not args.out:
        raise ValueError("generate needs --out DIR")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hops = f"{cfg.min_hops}-{cfg.hops}" if cfg.min_hops < cfg.hops else str(cfg.hops)
    for split in ("train", "valid", "test"):
        items = cfg.train_problems() if split == "train" else cfg.held_out_problems(split)
        with (out / f"{split}.jsonl").open("w") as f:
            for p in items:
                f.write(json.dumps({**p.coconut_record(), "hops": p.hops, "worked": p.worked, "unworked": p.unworked}) + "\n")
        print(f"{out / f'{split}.jsonl'}: {len(items)} problems of {hops} hops")


def majority_class_rate(items: list[task.Problem]) -> float:
    """The share of ``items`` whose answer is the most common answer among them."""
    return Counter(p.answer for p in items).most_common(1)[0][1] / len(items)


def describe(cfg: TestbedConfig) -> dict:
    train, held_out = splits(cfg)
    return {"hops": list(cfg.hop_range), "train_problems": len(train), f"{cfg.eval_split}_problems": len(held_out),
            "majority_class_rate": {k: majority_class_rate([p for p in held_out if p.hops == k]) for k in cfg.hop_range},
            "examples": [{"unworked": p.unworked, "worked": p.worked, "steps": list(p.steps)} for p in train[:3]]}


def run(args: argparse.Namespace) -> None:
    cfg = config_of(args)
    torch.set_num_threads(cfg.threads)
    cache = Path(args.cache) if args.cache else cache_dir() / "testbed"
    if args.action == "generate":
        generate(args, cfg)
    elif args.action == "describe":
        write_json(args.out, describe(cfg))
    elif args.action == "gap":
        write_json(args.out, measure_gap(cfg, *gap_splits(cfg)))
    elif args.action == "base":
        write_json(args.out, base_report(cfg, *splits(cfg), cache))
    else:
        from quietstar.testbed.table import run_table

        if not args.out:
            raise ValueError("table needs --out DIR")
        run_table(cfg, Path(args.out), cache)

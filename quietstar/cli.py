"""The ``quietstar`` console command."""

from __future__ import annotations

import argparse
import sys

from quietstar.core.cli_config import run_command
from quietstar.evaluation import perplexity, zero_shot as zero_shot_eval
from quietstar.quiet_star import demo, generate_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quietstar", description="Quiet-STaR continued pretraining for Hugging Face causal LMs")
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(commands.add_parser("demo", help="show the thought sampled after each token of a sentence"))
    generate_cli.add_arguments(commands.add_parser("generate", help="complete prompts, thinking before each token"))
    zero_shot_eval.add_arguments(commands.add_parser("eval", help="zero-shot GSM8K / CommonsenseQA with and without thoughts"))
    perplexity.add_arguments(commands.add_parser("perplexity", help="per-token base vs. talk NLL report on held-out text"))
    args = parser.parse_args(argv)
    runners = {"demo": demo.run, "generate": generate_cli.run, "eval": zero_shot_eval.run, "perplexity": perplexity.run}
    return run_command(args.command, runners[args.command], args)


if __name__ == "__main__":
    sys.exit(main())

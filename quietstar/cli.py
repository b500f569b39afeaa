"""The ``quietstar`` console command."""

from __future__ import annotations

import argparse
import sys

from quietstar import demo, generate_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quietstar", description="Quiet-STaR continued pretraining for Hugging Face causal LMs")
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(commands.add_parser("demo", help="show the thought sampled after each token of a sentence"))
    generate_cli.add_arguments(commands.add_parser("generate", help="complete prompts, thinking before each token"))
    args = parser.parse_args(argv)
    try:
        {"demo": demo.run, "generate": generate_cli.run}[args.command](args)
    except (FileNotFoundError, ValueError) as error:
        print(f"quietstar {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

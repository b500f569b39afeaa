"""The ``quietstar`` console command."""

from __future__ import annotations

import sys

from quietstar.coconut import generate_cli as coconut_generate_cli
from quietstar.core.cli_config import ArgumentParser, run_command, unrecognized
from quietstar.evaluation import coconut as coconut_eval
from quietstar.evaluation import coconut_analysis
from quietstar.evaluation import lm_eval_cli, perplexity, zero_shot as zero_shot_eval
from quietstar.quiet_star import demo, generate_cli
from quietstar.testbed import cli as testbed_cli
from quietstar.training import verify_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="quietstar", description="Latent-reasoning training for Hugging Face causal LMs: Quiet-STaR and Coconut")
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(commands.add_parser("demo", help="show the thought sampled after each token of a sentence"))
    generate_cli.add_arguments(commands.add_parser("generate", help="complete prompts, thinking before each token"))
    zero_shot_eval.add_arguments(commands.add_parser("eval", help="zero-shot GSM8K / CommonsenseQA with and without thoughts"))
    perplexity.add_arguments(commands.add_parser("perplexity", help="per-token base vs. talk NLL report on held-out text"))
    coconut_generate_cli.add_arguments(commands.add_parser("coconut-generate", help="answer questions with a Coconut model"))
    coconut_eval.add_arguments(commands.add_parser("coconut-eval", help="GSM8K / ProntoQA / ProsQA accuracy of a Coconut, Quiet-STaR or plain model"))
    coconut_analysis.add_arguments(commands.add_parser("coconut-analyze", help="ProsQA latent search: reasoning paths after k "
                                                       "thoughts and node values after each (the Coconut paper's section 5)"))
    lm_eval_cli.add_arguments(commands.add_parser("lm-eval", allow_abbrev=False,
                                                  help="lm-evaluation-harness with the quietstar model and tasks"))
    verify_checkpoint.add_arguments(commands.add_parser("verify-checkpoint", help="check training checkpoints (files, sizes, "
                                                         "checksums) without loading them"))
    testbed_cli.add_arguments(commands.add_parser("testbed", help="the reasoning testbed: task, gap, base LM, both methods' table"))
    args, passthrough = parser.parse_known_args(argv)
    if args.command == "lm-eval":
        args.lm_eval_args = passthrough
    elif passthrough:
        command = commands.choices[args.command]
        command.error(unrecognized(command, passthrough))
    runners = {"demo": demo.run, "generate": generate_cli.run, "eval": zero_shot_eval.run, "perplexity": perplexity.run,
               "coconut-generate": coconut_generate_cli.run, "coconut-eval": coconut_eval.run,
               "coconut-analyze": coconut_analysis.run, "verify-checkpoint": verify_checkpoint.run, "lm-eval": lm_eval_cli.run, "testbed": testbed_cli.run}
    return run_command(args.command, runners[args.command], args)


if __name__ == "__main__":
    sys.exit(main())

"""Coconut evaluation: greedy answers on GSM8K, ProntoQA or ProsQA, scored as the paper scores them.

    python -m quietstar.evaluation.coconut --model runs/prosqa/best --task prosqa --data-file D/prosqa_valid.jsonl
    python -m quietstar.evaluation.coconut --model runs/gsm8k-cot/best --task gsm8k --data-file D/gsm8k_test.jsonl --limit 200
    quietstar coconut-eval ...                                   # the same, through the console command

``--model`` is a saved ``CoconutModel`` (any mode: the prompt and the number of latents follow
its config; ``--latents`` overrides N), a saved ``QuietStarModel`` (thinking before each token),
or a plain HF causal LM (``smollm2-135m`` included). The last two are prompted as the
recipe's ``cot``/``no_cot`` modes are, with the question and a newline, and decoded greedily.

The answer is the text after the last ``#`` of the output, without commas, compared with
the gold answer as a string (``coconut.data.answer_of``/``answers_match``). ``mean_generated_tokens``
counts the latents (or pauses) of the prompt and the generated tokens, as the paper's table
does. Every record is read before the model loads; a malformed one fails naming the file and line.

The JSON report: ``task``, ``model``, ``method``, ``mode``, ``latents``, ``n``, ``accuracy``,
``mean_generated_tokens``, ``seconds``, ``items_per_second`` and ``items`` (each item's question,
gold answer, output, predicted answer, correctness and token count).

With ``--output``, finished items are kept in ``<output>.partial.jsonl`` as they go (``item_log``); a run
that stopped continues with ``--resume`` and ends with the report an uninterrupted run writes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from quietstar.coconut.config import CoconutConfig
from quietstar.coconut.curriculum import collate_prompts, encode, inference_prompt
from quietstar.coconut.data import Example, answer_of, answers_match, gsm8k_example, qa_example
from quietstar.coconut.generation import generate as coconut_generate
from quietstar.coconut.markers import LATENT, PAUSE
from quietstar.coconut.model import CoconutModel
from quietstar.core import run_lock
from quietstar.core.cli_config import ArgumentParser, run_command
from quietstar.core.files import input_file, json_lines, not_an_input, write_text_whole
from quietstar.core.loading import is_saved, load_base
from quietstar.core.offline import SMOLLM2, locate_model
from quietstar.evaluation.item_log import ItemLog
from quietstar.quiet_star.generation import generate as quietstar_generate
from quietstar.quiet_star.model import QuietStarModel

TASKS = ("gsm8k", "prontoqa", "prosqa")


def read_task(path: str | Path, task: str) -> list[Example]:
    """Every record of a jsonl file as an Example; the first malformed line fails, naming the file and line."""
    path = input_file(path, "eval data file")
    examples = []
    for number, record, problem in json_lines(path):
        if problem is not None:
            raise ValueError(f"{path} line {number}: {problem}")
        example = qa_example(record) or (gsm8k_example(record) if task == "gsm8k" else None)
        if example is None:
            wanted = "{question, steps, answer} or raw GSM8K {question, answer with ####}" if task == "gsm8k" else "{question, steps, answer}"
            raise ValueError(f"{path} line {number}: not a {task} record ({wanted})")
        examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no records")
    return examples


def load_for_eval(name: str, latents: int | None, cot: bool) -> tuple[torch.nn.Module, str, CoconutConfig | None]:
    """(model, method, the Coconut config that shapes the prompt; None for Quiet-STaR)."""
    path = locate_model(name)
    if is_saved(path, CoconutModel):
        model = CoconutModel.from_pretrained(path, dtype=torch.float32)
        if latents is not None:
            model.config = CoconutConfig(**{**model.config.to_dict(), "inference_latents": latents})
        return model, "coconut", model.config
    if is_saved(path, QuietStarModel):
        return QuietStarModel.from_pretrained(path, dtype=torch.float32), "quietstar", CoconutConfig(mode="cot" if cot else "no_cot")
    lm, tokenizer = load_base(name)
    config = CoconutConfig(mode="cot" if cot else "no_cot")  # no markers in these prompts: their vectors stay unused
    return CoconutModel(lm, tokenizer, config), "plain", config


def evaluate(model, method: str, config: CoconutConfig, examples: list[Example], batch_size: int, max_new_tokens: int,
             device: torch.device, progress: bool = True, on_batch=None) -> tuple[list[dict], float]:
    """Greedy answers for ``examples``: (one record per item, seconds of generation).

    ``on_batch(records, seconds)``, if given, is called after each batch (``item_log.ItemLog.add`` keeps them).
    """
    tokenizer = model.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    items, seconds = [], 0.0
    for start in tqdm(range(0, len(examples), batch_size), desc="eval", unit="batch", disable=not progress):
        chunk = examples[start:start + batch_size]
        prompts = [encode(inference_prompt(e.question, config), tokenizer, with_answer=False)[0] for e in chunk]
        batch = {k: v.to(device) for k, v in collate_prompts(prompts, tokenizer.pad_token_id).items()}
        began = time.perf_counter()
        if method == "quietstar":
            out = quietstar_generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                                     eos_token_id=tokenizer.eos_token_id)
            eos = tokenizer.eos_token_id
            tails = [row[batch["input_ids"].shape[1]:] for row in out.sequences.tolist()]
            outputs = [row[: row.index(eos)] if eos in row else row for row in tails]
        else:
            outputs = coconut_generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens).tokens
        batch_seconds = time.perf_counter() - began
        seconds += batch_seconds
        records = []
        for example, prompt, ids in zip(chunk, prompts, outputs):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            predicted = answer_of(text)
            thought = sum(t in (LATENT, PAUSE) for t in prompt)
            records.append({"question": example.question, "gold": example.answer, "output": text, "predicted": predicted,
                            "correct": answers_match(predicted, example.answer), "generated_tokens": thought + len(ids)})
        items += records
        if on_batch is not None:
            on_batch(records, batch_seconds)
    return items, seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=f"a saved CoconutModel or QuietStarModel dir, a plain HF model dir, or '{SMOLLM2}'")
    parser.add_argument("--task", required=True, choices=TASKS, help="which answer format the records have")
    parser.add_argument("--data-file", required=True, help="jsonl: {question, steps, answer} records (raw GSM8K also for gsm8k)")
    parser.add_argument("--limit", type=int, help="evaluate the first N records only")
    parser.add_argument("--output", help="write the JSON report here")
    parser.add_argument("--latents", type=int, help="latents at inference for a CoconutModel (default: its config's)")
    parser.add_argument("--cot", action="store_true", help="plain and Quiet-STaR models: the answer may follow written steps "
                        "(only changes the default --max-new-tokens, as both prompts are the question and a newline)")
    parser.add_argument("--batch-size", type=int, default=32, help="questions per batch (default 32)")
    parser.add_argument("--max-new-tokens", type=int, help="tokens generated per answer at most (default 64; 160 with --cot or a cot model)")
    parser.add_argument("--resume", action="store_true", help="continue an evaluation that stopped, from the items it kept "
                        "in <output>.partial.jsonl (needs --output)")


def run(args: argparse.Namespace) -> dict:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.latents is not None and args.latents < 0:
        raise ValueError(f"--latents must be >= 0, got {args.latents}")
    if args.resume and not args.output:
        raise ValueError("--resume continues from the items kept beside --output; give --output")
    examples = read_task(args.data_file, args.task)[: args.limit]  # before the model loads
    settings = {"model": args.model, "task": args.task, "data_file": str(args.data_file), "latents": args.latents,
                "cot": args.cot, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    log = None
    if args.output:  # before the model loads
        not_an_input(args.output, "--output", {"--data-file": args.data_file})
        run_lock.hold_file(Path(args.output))
        log = ItemLog(Path(args.output), settings, [e.question for e in examples], args.resume)
    model, method, config = load_for_eval(args.model, args.latents, args.cot)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    max_new = args.max_new_tokens or (160 if args.cot or config.mode == "cot" else 64)
    if log is None:
        items, seconds = evaluate(model, method, config, examples, args.batch_size, max_new, device)
    else:
        evaluate(model, method, config, examples[len(log.items):], args.batch_size, max_new, device, on_batch=log.add)
        items, seconds = log.items, log.seconds
    report = {
        "task": args.task, "model": args.model, "method": method, "mode": config.mode,
        "latents": config.inference_latents if method == "coconut" else 0, "n": len(items),
        "accuracy": sum(i["correct"] for i in items) / len(items),
        "mean_generated_tokens": sum(i["generated_tokens"] for i in items) / len(items),
        "seconds": seconds, "items_per_second": len(items) / seconds if seconds else None, "items": items,
    }
    print(f"\n| task | model | method | mode | n | accuracy | mean tokens | seconds |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n"
          f"| {report['task']} | {args.model} | {method} | {config.mode} | {report['n']} | {report['accuracy']:.3f} | "
          f"{report['mean_generated_tokens']:.1f} | {seconds:.1f} |")
    if args.output:
        write_text_whole(args.output, json.dumps(report, indent=2) + "\n")
        log.close()
        print(f"wrote {args.output}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m quietstar.evaluation.coconut", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_command("coconut-eval", run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

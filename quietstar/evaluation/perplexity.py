"""Held-out NLL with and without thoughts, and perplexity reports on held-out text.

Both NLLs score the same targets: the next token x_{t+1} after every position t.
``base`` is the model's ordinary prediction; ``talk`` is the prediction mixed with a
sampled thought, averaged over the R thoughts (as an NLL, not as a probability).
An untrained mixing head gives talk == base exactly. The improvement of a token is
base - talk (positive: the thought helped).

The thought-usefulness control: ``shuffled`` is the talk NLL when every scored
position gets the thoughts sampled at another position of the batch (another
place in the text or another sequence; ``shuffle_thoughts``), with the same
model and mixing head. If the thoughts carry information about what follows
them, talk < shuffled; if only the mixing head learned something that any
thought allows, the two tie.

    python -m quietstar.evaluation.perplexity --model runs/demo/final --data-file heldout.jsonl --output-dir reports/demo

reads a ``.txt`` file (one document) or a ``.jsonl`` file (one object per line, the text in
``--text-field``), cuts each document into consecutive ``--seq-len`` windows, scores them
with token-parallel thoughts and writes to ``--output-dir``:

    report.json     summary numbers and the difficulty bins (see ``build_report``)
    difficulty.png  mean improvement per difficulty bin
    tokens.html     the text token by token, coloured by improvement; hover for the NLLs and the thought

Token difficulty is the base NLL, binned with the fixed edges ``DIFFICULTY_EDGES`` (nats;
a bin holds lo <= base NLL < hi), as in the Quiet-STaR paper's per-difficulty figure.

While it scores, each finished batch's windows (their token ids, NLLs and first thoughts) are kept in
``report.json.partial.jsonl`` in the output directory (``item_log``). A report that stopped continues
with ``--resume``: the kept scores are read back exactly, each batch samples from a generator seeded
from ``seed`` and its first window (``item_log.batch_generator``), and the report equals the
uninterrupted run's bit for bit (its ``seconds`` aside). The training runs' held-out evaluation
(``heldout_nll``) keeps one generator through all its batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from tqdm import tqdm

from quietstar.core import run_lock
from quietstar.core.cli_config import (ArgumentParser, add_dataclass_arguments, build_config, is_int, load_yaml, require,
                                       run_command)
from quietstar.core.files import input_file, read_utf8, write_text_whole
from quietstar.core.loading import load_model
from quietstar.core.offline import SMOLLM2
from quietstar.core.text_data import jsonl_records, pad_rows
from quietstar.evaluation.item_log import ItemLog, batch_generator
from quietstar.evaluation.reports import TokenScores, Window, write_html, write_png
from quietstar.quiet_star.config import QuietStarConfig
from quietstar.quiet_star.model import QuietStarModel

DIFFICULTY_EDGES = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, math.inf)
SUFFIXES = (".txt", ".jsonl")


def shuffle_thoughts(thoughts: torch.LongTensor, valid: torch.Tensor, generator: torch.Generator | None = None) -> torch.LongTensor:
    """Move the thoughts [B, L, R, M] of every valid position [B, L] to another valid position.

    The valid positions are put in a random cycle and each takes the thoughts (all R
    of them) of the next one, so no position keeps its own when there are two or
    more. Positions that are not valid keep theirs.
    """
    where = valid.flatten().nonzero().squeeze(-1)
    if where.numel() < 2:
        return thoughts.clone()
    device = generator.device if generator is not None else where.device
    order = where[torch.randperm(where.numel(), generator=generator, device=device).to(where.device)]
    flat = thoughts.flatten(0, 1).clone()  # [B*L, R, M]
    flat[order] = flat[order.roll(-1)]
    return flat.view_as(thoughts)


@torch.no_grad()
def token_nlls(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor, generator: torch.Generator | None = None):
    """Next-token NLLs of one right-padded batch: (base, talk, shuffled, valid), each [B, L], and the thoughts [B, L, R, M].

    ``talk`` uses freshly sampled thoughts; ``shuffled`` the same thoughts moved to other
    positions (``shuffle_thoughts``).
    """
    out = model(input_ids, attention_mask, generator=generator)
    base, talk, valid = out.next_token_nlls()
    moved = shuffle_thoughts(out.thoughts, valid, generator)
    _, shuffled, _ = model(input_ids, attention_mask, thoughts=moved).next_token_nlls()
    return (base, talk, shuffled, valid), out.thoughts


@torch.no_grad()
def heldout_nll(model, batches, device, seed: int, progress: bool = False) -> dict[str, float]:
    """Token-weighted mean base, talk and shuffled-thought talk NLL over ``batches`` of (input_ids, attention_mask),
    and the paired difference talk - shuffled per token with its standard error over tokens (``talk_minus_shuffled``,
    ``talk_minus_shuffled_se``): below -2 SE, the thoughts' content helps.

    Under ``torch.distributed`` the batches are split between ranks and the sums are
    all-reduced. Every rank runs the same number of forwards (ZeRO-3 needs every rank
    in every forward): a rank short of a batch repeats one and does not count it.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # base, talk, shuffled talk NLL, tokens, talk - shuffled, its square
    rounds = math.ceil(len(batches) / world)
    for i in tqdm(range(rounds), desc="held-out NLL", disable=not progress or rank != 0, leave=False):
        index = i * world + rank
        ids, mask = batches[min(index, len(batches) - 1)]
        scores, _ = token_nlls(model, ids.to(device), mask.to(device), generator)
        if index < len(batches):
            base, talk, shuffled, valid = (x.double() for x in scores)
            difference = (talk - shuffled) * valid
            sums += torch.stack([base.sum(), talk.sum(), shuffled.sum(), valid.sum(), difference.sum(), difference.pow(2).sum()])
    if world > 1:
        dist.all_reduce(sums)
    base_sum, talk_sum, shuffled_sum, tokens, difference_sum, square_sum = sums.tolist()
    if tokens == 0:
        raise ValueError("held-out NLL: the held-out batches have no token with a next token")
    mean_difference = difference_sum / tokens
    variance = max(square_sum / tokens - mean_difference ** 2, 0.0) * tokens / max(tokens - 1, 1)
    return {"base_nll": base_sum / tokens, "talk_nll": talk_sum / tokens, "shuffled_talk_nll": shuffled_sum / tokens, "tokens": int(tokens),
            "talk_minus_shuffled": mean_difference, "talk_minus_shuffled_se": math.sqrt(variance / tokens)}


# --- perplexity reports ------------------------------------------------------------------------------------


def read_documents(path: Path, text_field: str, max_documents: int | None = None) -> list[str]:
    """The documents of a ``.txt`` file (the whole file) or a ``.jsonl`` file (``text_field`` of each object).

    Reads at most ``max_documents`` documents. A missing, unreadable or directory path, another
    suffix, a ``.txt`` file that is not UTF-8, or a jsonl line that is not a UTF-8 JSON object with
    a string ``text_field`` is an error naming the file (and line).
    """
    input_file(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported data file type {path.suffix or '(none)'!r}; use {' or '.join(SUFFIXES)}")
    if path.suffix == ".txt":
        return [read_utf8(path)][:max_documents]
    documents = []
    for number, text, problem in jsonl_records(path, text_field):
        if problem is not None:
            raise ValueError(f"{path} line {number}: {problem}")
        documents.append(text)
        if len(documents) == max_documents:
            break
    return documents


def make_windows(documents: Iterable[list[int]], seq_len: int, max_tokens: int) -> list[Window]:
    """Consecutive, non-overlapping windows of ``seq_len`` tokens of each tokenized document.

    A window of n tokens scores n - 1 next tokens; windows shorter than 2 tokens are
    dropped, and the last window is cut so that at most ``max_tokens`` tokens are scored.
    """
    windows, budget = [], max_tokens
    for document, ids in enumerate(documents):
        for start in range(0, len(ids), seq_len):
            piece = ids[start : start + seq_len][: budget + 1]
            if len(piece) < 2:
                continue
            windows.append(Window(document, piece))
            budget -= len(piece) - 1
            if budget == 0:
                return windows
    return windows


@torch.no_grad()
def score_windows(
    model, windows: list[Window], batch_size: int, seed: int, progress: bool = False, scores: TokenScores | None = None,
    on_batch: Callable[[list[dict[str, Any]], float], None] | None = None,
) -> TokenScores:
    """Base and talk NLL of every next token of ``windows``.

    The windows are scored in order, ``batch_size`` at a time, each batch right padded and run through one forward
    of ``model`` with token-parallel thoughts sampled by ``batch_generator(seed, s)`` (a CPU generator; s: the
    index of the batch's first window), then once more with those thoughts shuffled between positions (the
    control). ``scores``, if given, holds the scores of the first windows (whole batches, a resumed run's): the
    rest are appended to it. ``on_batch(records, seconds)``, if given, gets each batch's ``window_records`` and
    its seconds.
    """
    device = next(model.parameters()).device
    scores = scores if scores is not None else TokenScores()
    for start in tqdm(range(len(scores.base), len(windows), batch_size), desc="scoring", unit="batch", disable=not progress):
        began = time.perf_counter()
        batch = windows[start : start + batch_size]
        ids, mask = pad_rows([window.ids for window in batch])
        (base, talk, shuffled, _), thoughts = token_nlls(model, ids.to(device), mask.to(device), batch_generator(seed, start))
        for row, window in enumerate(batch):
            n = len(window.ids) - 1
            scores.base.append(base[row, :n].float().cpu())
            scores.talk.append(talk[row, :n].float().cpu())
            scores.shuffled.append(shuffled[row, :n].float().cpu())
            scores.thoughts.append(thoughts[row, :n, 0].cpu())
        if on_batch is not None:
            on_batch(window_records(batch, scores, start), time.perf_counter() - began)
    return scores


def window_records(windows: list[Window], scores: TokenScores, first: int) -> list[dict[str, Any]]:
    """The scores of ``windows``, which are entries ``first``, ``first + 1``, ... of ``scores``, as JSON records:
    the window's token ``ids`` and its ``base``, ``talk`` and ``shuffled`` NLLs and ``thoughts`` as lists.

    A float32 NLL is a Python float exactly, and JSON writes a float so that it reads back the same, so the
    records give back the very tensors (``scores_of``).
    """
    return [{"ids": window.ids, "base": scores.base[first + i].tolist(), "talk": scores.talk[first + i].tolist(),
             "shuffled": scores.shuffled[first + i].tolist(), "thoughts": scores.thoughts[first + i].tolist()}
            for i, window in enumerate(windows)]


def scores_of(records: list[dict[str, Any]]) -> TokenScores:
    """The ``TokenScores`` of ``window_records``: base, talk, shuffled [n - 1] float32, thoughts [n - 1, M] int64 each."""
    scores = TokenScores()
    for record in records:
        scores.base.append(torch.tensor(record["base"], dtype=torch.float32))
        scores.talk.append(torch.tensor(record["talk"], dtype=torch.float32))
        scores.shuffled.append(torch.tensor(record["shuffled"], dtype=torch.float32))
        scores.thoughts.append(torch.tensor(record["thoughts"], dtype=torch.long))
    return scores


def token_stats(base: torch.Tensor, talk: torch.Tensor, shuffled: torch.Tensor) -> dict[str, Any]:
    """Statistics of [N] tokens' base, talk and shuffled-thought talk NLLs.

    Keys: count, base_nll, talk_nll, shuffled_talk_nll (means), mean_improvement (base - talk),
    shuffled_improvement (base - shuffled), improved_fraction (talk < base) and
    own_beats_shuffled_fraction (talk < shuffled). The means are None when N = 0.
    """
    keys = ("base_nll", "talk_nll", "shuffled_talk_nll", "mean_improvement", "shuffled_improvement",
            "improved_fraction", "own_beats_shuffled_fraction")
    if base.numel() == 0:
        return {"count": 0, **dict.fromkeys(keys)}
    base, talk, shuffled = base.double(), talk.double(), shuffled.double()
    values = (base.mean(), talk.mean(), shuffled.mean(), (base - talk).mean(), (base - shuffled).mean(),
              (talk < base).double().mean(), (talk < shuffled).double().mean())
    return {"count": base.numel(), **{k: v.item() for k, v in zip(keys, values)}}


def difficulty_bins(
    base: torch.Tensor, talk: torch.Tensor, shuffled: torch.Tensor, edges: tuple[float, ...] = DIFFICULTY_EDGES
) -> list[dict[str, Any]]:
    """One dict per difficulty bin lo <= base NLL < hi of the [N] tokens: ``lo``, ``hi`` (None for inf) and ``token_stats``."""
    bins = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (base >= lo) & (base < hi)
        bins.append({"lo": lo, "hi": None if math.isinf(hi) else hi, **token_stats(base[inside], talk[inside], shuffled[inside])})
    return bins


def summary(base: torch.Tensor, talk: torch.Tensor, shuffled: torch.Tensor) -> dict[str, Any]:
    """Totals over N >= 1 scored tokens (each [N]).

    Keys: tokens, base_nll, talk_nll, shuffled_talk_nll, base_ppl, talk_ppl, shuffled_talk_ppl
    (exp of the mean NLL), mean_improvement, shuffled_improvement, improved_fraction,
    own_beats_shuffled_fraction (see ``token_stats``).
    """
    stats = token_stats(base, talk, shuffled)
    return {
        "tokens": stats.pop("count"),
        **stats,
        "base_ppl": math.exp(stats["base_nll"]),
        "talk_ppl": math.exp(stats["talk_nll"]),
        "shuffled_talk_ppl": math.exp(stats["shuffled_talk_nll"]),
    }


def write_report(path: Path, report: dict[str, Any]) -> None:
    write_text_whole(path, json.dumps(report, indent=2) + "\n")


@dataclass(frozen=True)
class ReportConfig:
    """Settings of ``python -m quietstar.evaluation.perplexity``.

    Attributes:
        model: a saved QuietStarModel dir (e.g. ``<output-dir>/final``), a plain HF model dir, or ``smollm2-135m``.
        data_file: held-out text: a ``.txt`` file (one document) or ``.jsonl`` (one object per line).
        output_dir: where report.json, difficulty.png and tokens.html go.
        text_field: the field holding the text in ``.jsonl`` records.
        seq_len: tokens per scored window.
        batch_size: windows per forward.
        max_tokens: score at most this many tokens.
        max_documents: read at most this many documents (None: all).
        html_tokens: tokens shown in tokens.html.
        seed: seed of the thought sampler (each batch's generator: ``item_log.batch_generator``).
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:N``.
    """

    model: str = ""
    data_file: str = ""
    output_dir: str = ""
    text_field: str = "text"
    seq_len: int = 256
    batch_size: int = 4
    max_tokens: int = 20000
    max_documents: int | None = None
    html_tokens: int = 4000
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("model", "data_file", "output_dir"):
            require(isinstance(getattr(self, name), str) and getattr(self, name) != "", self, name, "is required")
        require(is_int(self.seq_len) and self.seq_len >= 2, self, "seq_len", "must be an integer >= 2")
        require(is_int(self.batch_size) and self.batch_size >= 1, self, "batch_size", "must be an integer >= 1")
        require(is_int(self.max_tokens) and self.max_tokens >= 1, self, "max_tokens", "must be an integer >= 1")
        require(self.max_documents is None or (is_int(self.max_documents) and self.max_documents >= 1), self,
                "max_documents", "must be an integer >= 1")
        require(is_int(self.html_tokens) and self.html_tokens >= 0, self, "html_tokens", "must be an integer >= 0")
        require(is_int(self.seed), self, "seed", "must be an integer")
        require(isinstance(self.text_field, str) and self.text_field != "", self, "text_field", "must be a non-empty string")
        require(isinstance(self.device, str) and (self.device in ("auto", "cpu") or self.device.startswith("cuda")), self,
                "device", "must be auto, cpu, cuda or cuda:N")


def build_report(config: ReportConfig, model, windows: list[Window], scores: TokenScores, seconds: float) -> dict[str, Any]:
    """The content of report.json.

    Keys: model, data_file, documents (with a scored window), windows, the ``summary`` keys,
    bins (``difficulty_bins``), settings, and seconds (reading, loading and scoring; a resumed run adds the
    scoring seconds of the windows it read back).
    """
    base, talk, shuffled = scores.flat()
    cfg = model.config
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("model", "data_file", "output_dir")}
    return {
        "model": config.model,
        "data_file": config.data_file,
        "documents": len({window.document for window in windows}),
        "windows": len(windows),
        **summary(base, talk, shuffled),
        "bins": difficulty_bins(base, talk, shuffled),
        "settings": {**settings, "thought_len": cfg.thought_len, "n_thoughts": cfg.n_thoughts, "n_true": cfg.n_true,
                     "sample_temperature": cfg.sample_temperature},
        "seconds": seconds,
    }


def print_summary(report: dict[str, Any], paths: list[Path]) -> None:
    """The totals as a small table on stdout, and the files written."""
    print(f"\ntokens scored  {report['tokens']} ({report['documents']} documents, {report['windows']} windows)")
    print(f"{'':14} {'NLL':>8} {'ppl':>10}")
    print(f"{'base':14} {report['base_nll']:>8.4f} {report['base_ppl']:>10.5g}")
    print(f"{'talk':14} {report['talk_nll']:>8.4f} {report['talk_ppl']:>10.5g}")
    print(f"{'talk shuffled':14} {report['shuffled_talk_nll']:>8.4f} {report['shuffled_talk_ppl']:>10.5g}")
    improved = 100 * report["improved_fraction"]
    print(f"improvement    {report['mean_improvement']:+.4f} nats per token, {improved:.1f}% of tokens improved")
    own = report["shuffled_talk_nll"] - report["talk_nll"]
    print(f"own thoughts   {own:+.4f} nats per token better than shuffled ones "
          f"({100 * report['own_beats_shuffled_fraction']:.1f}% of tokens)")
    for path in paths:
        print(f"wrote {path}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a YAML file of ReportConfig / QuietStarConfig fields (flags override it)")
    parser.add_argument("--resume", action="store_true", help="continue a report that stopped, from the windows it kept "
                        "in <output-dir>/report.json.partial.jsonl")
    add_dataclass_arguments(parser, ReportConfig, f"report (--model, --data-file and --output-dir are required; model may be '{SMOLLM2}')")
    add_dataclass_arguments(parser, QuietStarConfig, "Quiet-STaR settings (for a plain base model; a saved model keeps its own)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    values = load_yaml(args.config)
    config = build_config(ReportConfig, values, args)
    quiet_star = build_config(QuietStarConfig, values, args)
    started = time.perf_counter()
    run_lock.hold_directory(Path(config.output_dir))  # before anything loads: an output in use, or a file, is refused at once
    texts = read_documents(Path(config.data_file), config.text_field, config.max_documents)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    model = load_model(QuietStarModel, config.model, quiet_star).eval().to(device)
    tokenizer = model.tokenizer
    documents = (tokenizer(text)["input_ids"] for text in texts)  # with its own specials (Gemma's <bos>)
    windows = make_windows(documents, config.seq_len, config.max_tokens)
    if not windows:
        raise ValueError(f"{config.data_file}: no text to score (no document has 2 or more tokens)")
    output_dir = Path(config.output_dir)
    paths = [output_dir / name for name in ("report.json", "difficulty.png", "tokens.html")]
    settings = {**{k: v for k, v in dataclasses.asdict(config).items() if k not in ("output_dir", "html_tokens")},
                **dataclasses.asdict(quiet_star)}
    log = ItemLog(paths[0], settings, [window.ids for window in windows], args.resume, key="ids")
    earlier = log.seconds  # the scoring seconds of the windows a stopped run kept
    scores = score_windows(model, windows, config.batch_size, config.seed, progress=True, scores=scores_of(log.items),
                           on_batch=log.add)
    report = build_report(config, model, windows, scores, time.perf_counter() - started + earlier)
    write_report(paths[0], report)
    write_png(paths[1], report["bins"], f"Improvement from thoughts by token difficulty\n{config.model}")
    write_html(paths[2], report, windows, scores, tokenizer, config.html_tokens)
    log.close()
    print_summary(report, paths)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m quietstar.evaluation.perplexity", description="perplexity report with and without thoughts on held-out text"
    )
    add_arguments(parser)
    return run_command("perplexity", run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

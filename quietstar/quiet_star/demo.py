"""Demo: the thought sampled after each token of a math sentence, and what it does to the next token.

    quietstar demo [--model smollm2-135m|DIR] [--text "..."] [--seed N] [--thought-len M ...]

DIR is either a plain Hugging Face causal LM (wrapped with fresh Quiet-STaR
modules, so talk == base) or a directory saved by ``QuietStarModel.save_pretrained``.
"""

from __future__ import annotations

import argparse
import time
import torch

from quietstar.core.cli_config import add_dataclass_arguments, build_config
from quietstar.core.loading import load_model
from quietstar.core.offline import SMOLLM2
from quietstar.quiet_star.config import QuietStarConfig
from quietstar.quiet_star.model import QuietStarModel

DEFAULT_TEXT = "If 3 apples cost 12 dollars, then one apple costs 4 dollars, so 5 apples cost 20 dollars."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=SMOLLM2, help=f"'{SMOLLM2}' (offline default), a local HF model dir, or a saved QuietStarModel dir")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="the sentence to think about")
    parser.add_argument("--seed", type=int, default=0, help="seed of the thought sampler")
    add_dataclass_arguments(parser, QuietStarConfig, "Quiet-STaR settings (for a plain base model)")


def _show(text: str, width: int) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    model = load_model(QuietStarModel, args.model, build_config(QuietStarConfig, {}, args)).eval()
    loaded = time.perf_counter()
    tok = model.tokenizer
    ids = tok(args.text, return_tensors="pt")["input_ids"]  # with its own specials (Gemma's <bos>)
    with torch.no_grad():
        thoughts = model.sample_thoughts(ids, generator=torch.Generator().manual_seed(args.seed))
        out = model(ids, thoughts=thoughts)
    cfg = model.config
    print(f"model: {args.model}  |  thought_len M={cfg.thought_len}, n_true K={cfg.n_true}, n_thoughts R={cfg.n_thoughts}, T={cfg.sample_temperature}")
    print(f"text: {args.text!r} ({ids.shape[1]} tokens)\n")
    print(f"{'t':>3}  {'x_t':<12} {'thought sampled after x_t (r=0)':<52} {'next':<12} {'log p_base':>10} {'log p_talk':>10}")
    for t in range(ids.shape[1]):
        token = _show(tok.decode(ids[0, t].tolist()), 12)
        thought = "<sot>" + _show(tok.decode(thoughts[0, t, 0].tolist()), 40) + "<eot>"
        if t + 1 < ids.shape[1]:
            nxt = _show(tok.decode(ids[0, t + 1].tolist()), 12)
            base, talk = float(out.base_logprobs[0, t, 0]), float(out.talk_logprobs[0, t, 0, 0])
            print(f"{t:>3}  {token:<12} {thought:<52} {nxt:<12} {base:>10.3f} {talk:>10.3f}")
        else:
            print(f"{t:>3}  {token:<12} {thought:<52}")
    base, talk, valid = out.next_token_nlls()
    base_next, talk_next = base[valid].mean(), talk[valid].mean()
    print(
        f"\nnext-token NLL: base {float(base_next):.3f}, talk {float(talk_next):.3f} (mean over R thoughts); "
        f"mean mixing weight {float(out.mixing_weight_mean):.3f}"
    )
    if float(out.mixing_weight_mean) == 0.0:
        print("(untrained mixing head: w = 0, so talk == base until Quiet-STaR training moves it)")
    print(f"loaded in {loaded - started:.1f}s, thought + scoring in {time.perf_counter() - loaded:.1f}s")

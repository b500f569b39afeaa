"""Report rendering: the difficulty figure and the token-by-token HTML page of a perplexity report.

``quietstar.evaluation.perplexity`` computes the numbers into ``Window``s and ``TokenScores`` (defined here); this file draws them:

    difficulty.png  mean improvement (base - talk NLL) per token-difficulty bin, with the model's own
                    thoughts and with shuffled ones (the control), bars annotated with counts
    tokens.html     the text token by token, coloured by improvement; hover for the NLLs and the thought
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from quietstar.core.files import write_text_whole, written_whole


@dataclass
class Window:
    """Consecutive tokens ``ids`` of document number ``document`` (0-based, in file order)."""

    document: int
    ids: list[int]


@dataclass
class TokenScores:
    """Per-window scores, aligned with the scored windows.

    For a window of n tokens, entry t scores the target ids[t + 1]:
        base: [n - 1] base NLLs.
        talk: [n - 1] talk NLLs (mean over the R thoughts).
        shuffled: [n - 1] talk NLLs with thoughts from other positions (``shuffle_thoughts``).
        thoughts: [n - 1, M] the first thought (r = 0), sampled after ids[t].
    """

    base: list[torch.Tensor] = field(default_factory=list)
    talk: list[torch.Tensor] = field(default_factory=list)
    shuffled: list[torch.Tensor] = field(default_factory=list)
    thoughts: list[torch.LongTensor] = field(default_factory=list)

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The base, talk and shuffled-thought talk NLLs of all windows, each [N] for N scored tokens."""
        return torch.cat(self.base), torch.cat(self.talk), torch.cat(self.shuffled)


def bin_label(lo: float, hi: float | None) -> str:
    """A difficulty bin's x-axis label, e.g. "0.5-1" or ">=8"."""
    return f"{lo:g}-{hi:g}" if hi is not None else f">={lo:g}"


def write_png(path: Path, bins: list[dict[str, Any]], title: str) -> None:
    """Mean improvement per difficulty bin, own thoughts beside shuffled thoughts, annotated with token counts."""
    figure = Figure(figsize=(9, 4.8))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    x = range(len(bins))
    width = 0.4
    own = [b["mean_improvement"] or 0.0 for b in bins]  # an empty bin draws no bar
    shuffled = [b["shuffled_improvement"] or 0.0 for b in bins]
    bars = ax.bar([i - width / 2 for i in x], own, width, color="tab:green", label="own thoughts")
    ax.bar([i + width / 2 for i in x], shuffled, width, color="tab:gray", label="shuffled thoughts (control)")
    ax.bar_label(bars, labels=[f"n={b['count']}" for b in bins], padding=2, fontsize=8)
    ax.set_xticks(list(x), [bin_label(b["lo"], b["hi"]) for b in bins])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.margins(y=0.15)
    ax.legend(fontsize=8)
    ax.set_xlabel("token difficulty: base NLL (nats)")
    ax.set_ylabel("mean improvement: base - talk NLL (nats)")
    ax.set_title(title)
    figure.tight_layout()
    with written_whole(path) as staging:
        figure.savefig(staging, dpi=120, format="png")


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
table.summary { border-collapse: collapse; margin: 1em 0; }
table.summary td { padding: 0.15em 1em 0.15em 0; }
table.summary td.num { text-align: right; font-variant-numeric: tabular-nums; }
.legend { margin: 1em 0; }
.legend .key { display: inline-block; padding: 0 0.5em; margin-right: 1em; border: 1px solid #ccc; }
.note { color: #a33; }
.text { font-family: ui-monospace, monospace; white-space: pre-wrap; overflow-wrap: anywhere; line-height: 1.9; }
.doc { border-top: 1px solid #ccc; padding: 0.5em 0; }
.doc-label { font: 12px system-ui, sans-serif; color: #777; }
.tok { border-radius: 2px; }
.tok:hover, .ctx:hover { outline: 1px solid #333; }
.ctx { color: #999; }
"""


def improvement_color(improvement: float, scale: float) -> str:
    """Background of a token: green when the thought helped, red when it hurt, full strength at |improvement| >= scale."""
    alpha = 0.75 * min(abs(improvement) / scale, 1.0)
    return f"rgba(0, 170, 0, {alpha:.3f})" if improvement > 0 else f"rgba(230, 0, 0, {alpha:.3f})"


def shown_text(text: str) -> str:
    """Text on one line: newlines shown as \\n."""
    return text.replace("\n", "\\n")


def html_summary(report: dict[str, Any]) -> str:
    """The report's totals as an HTML table."""
    rows = [
        ("tokens scored", f"{report['tokens']} ({report['documents']} documents, {report['windows']} windows)"),
        ("base NLL / perplexity", f"{report['base_nll']:.4f} / {report['base_ppl']:.5g}"),
        ("talk NLL / perplexity", f"{report['talk_nll']:.4f} / {report['talk_ppl']:.5g}"),
        ("mean improvement (base - talk)", f"{report['mean_improvement']:+.4f} nats"),
        ("talk NLL with shuffled thoughts (control)", f"{report['shuffled_talk_nll']:.4f}"),
        ("tokens improved (talk < base)", f"{100 * report['improved_fraction']:.1f}%"),
    ]
    cells = "".join(f'<tr><td>{html.escape(name)}</td><td class="num">{html.escape(value)}</td></tr>' for name, value in rows)
    return f'<table class="summary">{cells}</table>'


def html_tokens(windows: list[Window], scores: TokenScores, tokenizer, cap: int, scale: float) -> str:
    """The first ``cap`` scored tokens, one coloured ``<span class="tok">`` each, grouped by document.

    A window's first token has no target; it is shown as grey context.
    """
    parts, shown, document = [], 0, None
    for window, base, talk, thoughts in zip(windows, scores.base, scores.talk, scores.thoughts):
        if shown == cap:
            break
        if window.document != document:
            if document is not None:
                parts.append("</div>")
            parts.append(f'<div class="doc"><div class="doc-label">document {window.document + 1}</div>')
            document = window.document
        count = min(len(base), cap - shown)
        texts = tokenizer.batch_decode([[token] for token in window.ids[: count + 1]])
        thought_texts = tokenizer.batch_decode(thoughts[:count].tolist())
        parts.append(f'<span class="ctx" title="first token of a window: not scored">{html.escape(texts[0])}</span>')
        for t in range(count):
            b, k = float(base[t]), float(talk[t])
            tip = (
                f"token {texts[t + 1]!r}\n"
                f"base NLL {b:.3f}, talk NLL {k:.3f}, improvement {b - k:+.3f}\n"
                f"thought before it: <sot>{shown_text(thought_texts[t])}<eot>"
            )
            parts.append(
                f'<span class="tok" style="background-color: {improvement_color(b - k, scale)}" '
                f'title="{html.escape(tip)}">{html.escape(texts[t + 1])}</span>'
            )
        shown += count
    return "".join(parts) + ("</div>" if parts else "")


def write_html(
    path: Path, report: dict[str, Any], windows: list[Window], scores: TokenScores, tokenizer, cap: int
) -> None:
    """A self-contained page: the summary, a legend, and the first ``cap`` scored tokens coloured by improvement.

    The colour saturates at the 95th percentile of |improvement| over all scored tokens.
    """
    base, talk, _ = scores.flat()
    magnitudes = (base - talk).abs().sort().values
    scale = max(float(magnitudes[int(0.95 * (len(magnitudes) - 1))]), 1e-3)
    title = f"Quiet-STaR token report: {report['model']}"
    legend = (
        f'<span class="key" style="background-color: {improvement_color(scale, scale)}">thought helped (talk &lt; base)</span>'
        f'<span class="key" style="background-color: {improvement_color(-scale, scale)}">thought hurt (talk &gt; base)</span>'
        '<span class="key ctx">first token of a window (not scored)</span>'
        f"<br>Colour strength grows with |base NLL - talk NLL| up to {scale:.3g} nats (95th percentile). "
        "Hover over a token for its NLLs and the thought sampled before it (the first of the R thoughts)."
    )
    note = ""
    if report["tokens"] > cap:
        note = f'<p class="note">Showing the first {cap} of {report["tokens"]} scored tokens (--html-tokens).</p>'
    page = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{HTML_STYLE}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
        f"<p>data: {html.escape(report['data_file'])}</p>\n{html_summary(report)}\n"
        f'<div class="legend">{legend}</div>\n{note}\n'
        f'<div class="text">{html_tokens(windows, scores, tokenizer, cap, scale)}</div>\n</body>\n</html>\n'
    )
    write_text_whole(path, page)

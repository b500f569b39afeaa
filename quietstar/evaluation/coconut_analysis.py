"""What continuous thoughts do on ProsQA: the Coconut paper's latent-search analysis (its section 5) as a report.

    quietstar coconut-analyze --model runs/prosqa/coconut/best --data-file D/prosqa_valid.jsonl --output-dir reports/prosqa
    quietstar coconut-analyze --model runs/prosqa/cot/best --data-file D/prosqa_valid.jsonl --output-dir reports/cot  # k = 0 only

Two measurements, on any saved ``CoconutModel`` (``coconut`` or ``pause_as_thought`` mode; a CoT or plain
model gives k = 0 only):

1. **Partial-latent decoding.** For each k in 0..K (K: ``--max-thoughts``, default the model's
   ``max_latent_stage``), the question with k continuous thoughts (k * c latents), then ``<eot>`` and
   greedy language. Each output is classified against the item's graph (``prosqa_paths``): correct path,
   longer path, hallucination, wrong target, correct label, incorrect label.
2. **Node values.** After k >= 1 thoughts the next language step reads "Every <node> is a ...", its
   subject the node the search stands on. The value of a concept node is the probability the model gives
   its name's tokens after ``<eot>`` and "Every" (teacher forced; the product over the name's tokens).
   The frontier after k thoughts is the set of nodes k hops from the root (children of the frontier at
   k - 1); a node's height is its distance to the nearest leaf. Per thought the report gives the value
   mass on frontier nodes and on the rest, frontier values against height, and how often the top-valued
   node changes from one thought to the next.

The prompt of each item is forwarded once per k, and the name suffixes of all its nodes are scored as one
batch on copies of that prompt's KV cache. Files in ``--output-dir``: ``report.json`` (every item's numbers),
``path_classes.png`` (classes against k, stacked), ``frontier_values.png`` (value mass per thought, and
frontier values against height) and ``index.html`` (a few items: the graph, the path taken after each k,
the node values after each thought).
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm
from transformers import DynamicCache

from quietstar.coconut.config import CoconutConfig
from quietstar.coconut.curriculum import collate_prompts, encode, inference_prompt
from quietstar.coconut.data import Example
from quietstar.coconut.prosqa import record_problem
from quietstar.core import run_lock
from quietstar.core.cli_config import ArgumentParser, run_command
from quietstar.core.files import input_file, json_lines, write_text_whole
from quietstar.evaluation.coconut import evaluate, load_for_eval
from quietstar.evaluation.prosqa_paths import PATH_CLASSES, Graph, classify_path


def read_prosqa(path: str | Path) -> list[dict]:
    """Every record of a ProsQA jsonl file, with its graph; the first malformed line (``prosqa.record_problem``) fails,
    naming the file and line."""
    path = input_file(path, "ProsQA file")
    items = []
    for number, record, problem in json_lines(path):
        problem = problem or record_problem(record)
        if problem is not None:
            raise ValueError(f"{path} line {number}: {problem}")
        items.append(record)
    if not items:
        raise ValueError(f"{path}: no records")
    return items


def with_thoughts(config: CoconutConfig, k: int) -> CoconutConfig:
    """The model's config with k thoughts (k * c latents, or pauses) at inference."""
    return CoconutConfig(**{**config.to_dict(), "inference_latents": k * config.c})


def decode_paths(model, method: str, config: CoconutConfig, items: list[dict], k: int, batch_size: int, max_new_tokens: int,
                 device: torch.device, on_batch: Callable[[], object] | None = None) -> list[dict]:
    """Greedy language after k thoughts, for every item: its output, answer correctness and path class
    (``on_batch()`` after each batch: a progress bar's update)."""
    examples = [Example(i["question"], tuple(i["steps"]), i["answer"]) for i in items]
    records, _ = evaluate(model, method, with_thoughts(config, k), examples, batch_size, max_new_tokens, device, progress=False,
                          on_batch=on_batch and (lambda records, seconds: on_batch()))
    return [{"output": r["output"], "correct": r["correct"],
             "class": classify_path(Graph.of_item(item), r["output"], r["correct"], latents=k)}
            for item, r in zip(items, records)]


def node_pieces(tokenizer, item: dict) -> tuple[list[int], list[int], list[list[int]]]:
    """(the concept nodes, the tokens of "Every", each node's name tokens after them), as training tokenized steps."""
    graph = Graph.of_item(item)
    concepts = [n for n in range(len(graph.names)) if any(n in c for c in graph.children)]  # has a parent: a concept
    prefix = tokenizer("Every", add_special_tokens=False)["input_ids"]
    suffixes = []
    for node in concepts:
        full = tokenizer(f"Every {graph.names[node]}", add_special_tokens=False)["input_ids"]
        if full[: len(prefix)] != prefix:
            raise ValueError(f"the tokenizer merges 'Every' with the name {graph.names[node]!r}; node values need them apart")
        suffixes.append(full[len(prefix):])
    return concepts, prefix, suffixes


@torch.no_grad()
def node_values(model, config: CoconutConfig, items: list[dict], k: int, batch_size: int, device: torch.device,
                on_batch: Callable[[], object] | None = None) -> list[dict[int, float]]:
    """For each item, {concept node: p(its name | question, k thoughts, <eot>, "Every")}.

    The prompts of a batch run once (``CoconutModel.hidden_states`` on a cache); the cache rows are then
    copied to one row per (item, node) and the name tokens fed as one right-padded block. ``on_batch()`` after
    each batch.
    """
    tokenizer, head = model.tokenizer, model.lm.get_output_embeddings()
    decoder, embedding = model.lm.base_model, model.lm.get_input_embeddings()
    cfg = with_thoughts(config, k)
    values = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        pieces = [node_pieces(tokenizer, item) for item in chunk]
        prompts = [encode(inference_prompt(item["question"], cfg), tokenizer, with_answer=False)[0] + prefix
                   for item, (_, prefix, _) in zip(chunk, pieces)]
        batch = {key: v.to(device) for key, v in collate_prompts(prompts, tokenizer.pad_token_id).items()}
        cache = DynamicCache(config=model.lm.config)
        last = model.hidden_states(batch["input_ids"], batch["attention_mask"], cache=cache)[:, -1]  # [B, H]
        rows = torch.tensor([b for b, (nodes, _, _) in enumerate(pieces) for _ in nodes], device=device)
        suffixes = [s for _, _, node_suffixes in pieces for s in node_suffixes]
        width = max(len(s) for s in suffixes)
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in suffixes], device=device)  # [N, S]
        cache.reorder_cache(rows)
        mask = torch.cat([batch["attention_mask"][rows], torch.ones_like(ids)], dim=1)
        positions = batch["attention_mask"][rows].long().sum(dim=1, keepdim=True) + torch.arange(width, device=device)
        hidden = decoder(inputs_embeds=embedding(ids), attention_mask=mask, position_ids=positions, cache=cache,
                         use_cache=True).last_hidden_state  # [N, S, H]
        predicting = torch.cat([last[rows, None], hidden[:, :-1]], dim=1)  # the state before each name token
        logprobs = torch.log_softmax(head(predicting).float(), dim=-1).gather(-1, ids[..., None]).squeeze(-1)  # [N, S]
        lengths = torch.tensor([len(s) for s in suffixes], device=device)
        totals = (logprobs * (torch.arange(width, device=device) < lengths[:, None])).sum(dim=1).exp().tolist()
        at = 0
        for nodes, _, _ in pieces:
            values.append(dict(zip(nodes, totals[at:at + len(nodes)])))
            at += len(nodes)
        if on_batch is not None:
            on_batch()
    return values


def frontier_after(graph: Graph, k: int) -> set[int]:
    """Nodes k hops from the root along some path: the children of the frontier after k - 1 thoughts."""
    frontier = {graph.root}
    for _ in range(k):
        frontier = set().union(*(graph.children[n] for n in frontier)) if frontier else set()
    return frontier


def summarise(items: list[dict], paths: dict[int, list[dict]], values: dict[int, list[dict[int, float]]]) -> dict:
    """The report's aggregate numbers: class shares per k, value mass and frontier values by height per thought."""
    summary = {"n": len(items), "path_classes": {}, "value_mass": {}, "frontier_value_by_height": {}, "top_node_changes": {}}
    for k, records in paths.items():
        counts = Counter(r["class"] for r in records)
        summary["path_classes"][k] = {c: counts[c] / len(records) for c in PATH_CLASSES}
        summary.setdefault("accuracy", {})[k] = sum(r["correct"] for r in records) / len(records)
    for k, per_item in values.items():
        frontier_mass, other_mass, by_height = [], [], {}
        for item, node_value in zip(items, per_item):
            graph = Graph.of_item(item)
            frontier = frontier_after(graph, k)
            frontier_mass.append(sum(v for n, v in node_value.items() if n in frontier))
            other_mass.append(sum(v for n, v in node_value.items() if n not in frontier))
            for n, v in node_value.items():
                if n in frontier:
                    by_height.setdefault(graph.height(n), []).append(v)
        summary["value_mass"][k] = {"frontier": sum(frontier_mass) / len(items), "other": sum(other_mass) / len(items)}
        summary["frontier_value_by_height"][k] = {h: {"mean": sum(v) / len(v), "n": len(v)} for h, v in sorted(by_height.items())}
    ks = sorted(values)
    for before, after in zip(ks, ks[1:]):
        changed = [max(a, key=a.get) != max(b, key=b.get) for a, b in zip(values[before], values[after]) if a and b]
        summary["top_node_changes"][f"{before}->{after}"] = sum(changed) / len(changed) if changed else None
    return summary


def plot(summary: dict, out_dir: Path, title: str) -> list[str]:
    """The three figures, in the shape of the paper's; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    ks = sorted(summary["path_classes"], key=int)
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(ks)
    for c in PATH_CLASSES:
        shares = [summary["path_classes"][k][c] for k in ks]
        ax.bar([str(k) for k in ks], shares, bottom=bottom, label=c.replace("_", " "))
        bottom = [b + s for b, s in zip(bottom, shares)]
    ax.set(xlabel="continuous thoughts k before language", ylabel="share of items", title=f"{title}: reasoning paths")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3)
    fig.tight_layout()
    fig.savefig(out_dir / "path_classes.png", dpi=120)
    files.append("path_classes.png")
    plt.close(fig)
    if summary["value_mass"]:
        thoughts = sorted(summary["value_mass"], key=int)
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
        left.plot([str(k) for k in thoughts], [summary["value_mass"][k]["frontier"] for k in thoughts], "o-", label="frontier nodes")
        left.plot([str(k) for k in thoughts], [summary["value_mass"][k]["other"] for k in thoughts], "s--", label="other nodes")
        left.set(xlabel="thought k", ylabel="value mass (probability)", title="value after each thought")
        left.legend(fontsize=8)
        for k in thoughts:
            heights = summary["frontier_value_by_height"][k]
            right.plot([int(h) for h in heights], [heights[h]["mean"] for h in heights], "o-", label=f"thought {k}")
        right.set(xlabel="height of the frontier node (hops to a leaf)", ylabel="mean value", title="frontier values by height")
        right.legend(fontsize=8, loc="best")
        fig.tight_layout()
        fig.savefig(out_dir / "frontier_values.png", dpi=120)
        files.append("frontier_values.png")
        plt.close(fig)
    return files


def write_html(items: list[dict], paths: dict[int, list[dict]], values: dict[int, list[dict[int, float]]], figures: list[str],
               out_dir: Path, shown: int = 5) -> None:
    """index.html: the figures, then a few items with their graph, the path after each k and the node values."""
    e = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>Coconut latent search</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:auto}td,th{padding:2px 8px;border:1px solid #ccc}"
             "table{border-collapse:collapse;margin:0.5em 0}.frontier{background:#e6f2ff}</style>",
             "<h1>Coconut latent search</h1>"] + [f"<img src='{f}' alt='{f}'>" for f in figures]
    for index, item in enumerate(items[:shown]):
        graph = Graph.of_item(item)
        facts = ", ".join(f"{graph.names[a]} → {graph.names[b]}" for a, b in item["edges"])
        parts += [f"<h2>Item {index}</h2><p>root <b>{e(graph.names[graph.root])}</b>, target <b>{e(graph.names[graph.target])}</b>, "
                  f"distractor {e(graph.names[graph.neg_target])}</p><p><small>{e(facts)}</small></p>",
                  "<table><tr><th>k</th><th>output</th><th>class</th></tr>"]
        parts += [f"<tr><td>{k}</td><td>{e(records[index]['output'])}</td><td>{records[index]['class']}</td></tr>"
                  for k, records in sorted(paths.items())]
        parts.append("</table>")
        if values:
            nodes = sorted({n for per_item in values.values() for n in per_item[index]}, key=lambda n: graph.names[n])
            parts.append("<table><tr><th>node</th>" + "".join(f"<th>after thought {k}</th>" for k in sorted(values)) + "</tr>")
            for n in nodes:
                cells = "".join(f"<td class='{'frontier' if n in frontier_after(graph, k) else ''}'>{values[k][index].get(n, 0):.3f}</td>"
                                for k in sorted(values))
                parts.append(f"<tr><td>{e(graph.names[n])}</td>{cells}</tr>")
            parts.append("</table><p><small>shaded: the frontier after that thought</small></p>")
    write_text_whole(out_dir / "index.html", "\n".join(parts) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a saved CoconutModel dir (or a CoT / plain model: k = 0 only)")
    parser.add_argument("--data-file", required=True, help="ProsQA jsonl with each item's graph (prosqa_valid.jsonl's format)")
    parser.add_argument("--output-dir", required=True, help="report.json, the figures and index.html go here")
    parser.add_argument("--max-thoughts", type=int, help="the largest k (default: the model's max_latent_stage; 0 for other models)")
    parser.add_argument("--limit", type=int, help="analyse the first N items only")
    parser.add_argument("--batch-size", type=int, default=16, help="items per batch (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="language tokens generated after the thoughts (default 96)")


def run(args: argparse.Namespace) -> dict:
    for name in ("limit", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_thoughts is not None and args.max_thoughts < 0:
        raise ValueError(f"--max-thoughts must be >= 0, got {args.max_thoughts}")
    items = read_prosqa(args.data_file)[: args.limit]  # before the model loads
    run_lock.hold_directory(Path(args.output_dir))
    model, method, config = load_for_eval(args.model, None, cot=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    if model.tokenizer.pad_token_id is None:
        model.tokenizer.pad_token = model.tokenizer.eos_token
    thinks = method == "coconut" and config.mode in ("coconut", "pause_as_thought", "no_curriculum")
    if not thinks and args.max_thoughts:
        raise ValueError(f"--max-thoughts {args.max_thoughts}: {args.model} is a {config.mode if method == 'coconut' else method} "
                         "model, with no thoughts to stop after; it is analysed at k = 0 only (leave --max-thoughts out)")
    K = (args.max_thoughts if args.max_thoughts is not None else config.max_latent_stage) if thinks else 0
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, values = {}, {}
    batches = -(-len(items) // args.batch_size)
    with tqdm(total=(2 * K + 1) * batches, desc="coconut-analyze", unit="batch") as bar:
        for k in range(K + 1):
            bar.set_postfix(k=k)
            paths[k] = decode_paths(model, method, config, items, k, args.batch_size, args.max_new_tokens, device, bar.update)
            if k >= 1:
                values[k] = node_values(model, config, items, k, args.batch_size, device, bar.update)
    summary = summarise(items, paths, values)
    figures = plot(summary, out_dir, f"{config.mode} ({Path(args.model).name})")
    write_html(items, paths, values, figures, out_dir)
    report = {"model": args.model, "method": method, "mode": config.mode, "data_file": str(args.data_file), "max_thoughts": K,
              "summary": summary,
              "items": [{"question": item["question"], "answer": item["answer"],
                         "paths": {k: paths[k][i] for k in paths},
                         "node_values": {k: {Graph.of_item(item).names[n]: v for n, v in values[k][i].items()} for k in values}}
                        for i, item in enumerate(items)]}
    write_text_whole(out_dir / "report.json", json.dumps(report, indent=1) + "\n")
    print(f"\n| k | accuracy | " + " | ".join(c.replace("_", " ") for c in PATH_CLASSES) + " | frontier value | other value |")
    print("|" + " --- |" * (len(PATH_CLASSES) + 4))
    for k in paths:
        shares = " | ".join(f"{summary['path_classes'][k][c]:.2f}" for c in PATH_CLASSES)
        mass = summary["value_mass"].get(k)
        tail = f"{mass['frontier']:.3f} | {mass['other']:.3f}" if mass else "- | -"
        print(f"| {k} | {summary['accuracy'][k]:.3f} | {shares} | {tail} |")
    print(f"wrote {out_dir}/report.json, {', '.join(figures)}, index.html")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="quietstar coconut-analyze", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_command("coconut-analyze", run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

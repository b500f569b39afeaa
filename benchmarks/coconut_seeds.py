"""Coconut modes over training seeds: accuracy, paired differences and the latent-search numbers, mean ± SE over seeds.

    python benchmarks/coconut_seeds.py \
        --eval coconut=eval_coconut_s0.json,eval_coconut_s1.json,eval_coconut_s2.json \
        --eval pause_as_thought=eval_pause_s0.json,eval_pause_s1.json,eval_pause_s2.json \
        --eval no_cot=eval_no_cot_s0.json,eval_no_cot_s1.json,eval_no_cot_s2.json \
        --analysis coconut=analysis_coconut_s0,analysis_coconut_s1,analysis_coconut_s2 \
        --analysis pause_as_thought=analysis_pause_s0,analysis_pause_s1,analysis_pause_s2 \
        --data-file test.jsonl --json benchmarks/results/coconut_seeds.json

Each ``--eval MODE=FILES`` lists one ``quietstar coconut-eval`` report per seed, in the same seed order for every
mode (the n-th file of each mode is the same seed, on the same items). Each ``--analysis MODE=DIRS`` lists
``quietstar coconut-analyze`` output directories (their ``report.json``), likewise. Standard errors are over
seeds (sample standard deviation / sqrt(seeds)); a paired difference is taken seed by seed, then averaged. With
``--data-file`` (the evaluated ProsQA file, with its graphs), accuracy is also split by what a rule that does no search
says of each item (``coconut.prosqa.one_hop_shortcut``): right, a guess, or wrong; a model that searches does as well
where the rule guesses as where it is right. Prints markdown tables and writes every number to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quietstar.coconut.prosqa import one_hop_shortcut  # noqa: E402
from quietstar.evaluation.prosqa_paths import PATH_CLASSES  # noqa: E402


def mean_se(values: list[float]) -> dict:
    """{"mean", "se", "n", "values"}: the standard error is the sample standard deviation over sqrt(n) (None for n = 1)."""
    n = len(values)
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None
    return {"mean": mean, "se": se, "n": n, "values": values}


def shown(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    text = f"{stat['mean'] * scale:.{digits}f}"
    return text + (f" ± {stat['se'] * scale:.{digits}f}" if stat["se"] is not None else "")


def groups(specs: list[str], flag: str) -> dict[str, list[Path]]:
    """``MODE=A,B,C`` flags -> {mode: [paths]}; every mode must list the same number of seeds."""
    out = {}
    for spec in specs:
        mode, eq, paths = spec.partition("=")
        if not eq or not mode or not paths:
            raise SystemExit(f"{flag} {spec!r}: expected MODE=PATH[,PATH...]")
        out[mode] = [Path(p) for p in paths.split(",")]
    if len({len(v) for v in out.values()}) > 1:
        raise SystemExit(f"{flag}: every mode needs the same number of seeds, got " + ", ".join(f"{m} {len(v)}" for m, v in out.items()))
    return out


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"{path}: {error}") from None


def accuracy_table(evals: dict[str, list[dict]]) -> dict:
    """Per mode, accuracy over seeds; per pair of modes, the paired difference over seeds and the item counts."""
    result = {"accuracy": {m: mean_se([r["accuracy"] for r in reports]) for m, reports in evals.items()}, "paired": {}}
    modes = list(evals)
    for i, a in enumerate(modes):
        for b in modes[i + 1:]:
            diffs, only_a, only_b = [], 0, 0
            for ra, rb in zip(evals[a], evals[b]):
                if [x["question"] for x in ra["items"]] != [x["question"] for x in rb["items"]]:
                    raise SystemExit(f"{a} and {b}: a seed's reports are on different items; pair them on the same file")
                diffs.append(ra["accuracy"] - rb["accuracy"])
                only_a += sum(x["correct"] and not y["correct"] for x, y in zip(ra["items"], rb["items"]))
                only_b += sum(y["correct"] and not x["correct"] for x, y in zip(ra["items"], rb["items"]))
            result["paired"][f"{a} - {b}"] = {**mean_se(diffs), "items_only_first": only_a, "items_only_second": only_b}
    return result


def shortcut_table(evals: dict[str, list[dict]], records: list[dict]) -> dict:
    """Per mode, accuracy on the items where the no-search rule is right (credit 1), guesses (0.5) or is wrong (0)."""
    credit = {r["question"]: one_hop_shortcut(r) for r in records}
    out = {}
    for mode, reports in evals.items():
        missing = [x["question"] for x in reports[0]["items"] if x["question"] not in credit]
        if missing:
            raise SystemExit(f"--data-file: {len(missing)} of {mode}'s evaluated questions are not in it, e.g. {missing[0][:80]!r}")
        out[mode] = {}
        for name, value in (("rule_right", 1.0), ("rule_guesses", 0.5), ("rule_wrong", 0.0)):
            per_seed = [[x["correct"] for x in r["items"] if credit[x["question"]] == value] for r in reports]
            if per_seed[0]:
                out[mode][name] = {**mean_se([sum(v) / len(v) for v in per_seed]), "items": len(per_seed[0])}
    return out


def analysis_table(analyses: dict[str, list[dict]]) -> dict:
    """Per mode and k: accuracy, its change from k = 0, path-class shares; per thought: value mass on the
    frontier and on the rest, and the top node's changes; each mean ± SE over seeds."""
    out = {}
    for mode, reports in analyses.items():
        summaries = [r["summary"] for r in reports]
        ks = sorted(summaries[0]["accuracy"], key=int)
        per_k = {}
        for k in ks:
            per_k[k] = {"accuracy": mean_se([s["accuracy"][k] for s in summaries]),
                        "accuracy_minus_k0": mean_se([s["accuracy"][k] - s["accuracy"]["0"] for s in summaries]),
                        "path_classes": {c: mean_se([s["path_classes"][k][c] for s in summaries]) for c in PATH_CLASSES}}
            if k in summaries[0]["value_mass"]:
                per_k[k]["frontier_mass"] = mean_se([s["value_mass"][k]["frontier"] for s in summaries])
                per_k[k]["other_mass"] = mean_se([s["value_mass"][k]["other"] for s in summaries])
                per_k[k]["frontier_minus_other"] = mean_se([s["value_mass"][k]["frontier"] - s["value_mass"][k]["other"] for s in summaries])
        changes = {step: mean_se([s["top_node_changes"][step] for s in summaries]) for step in summaries[0]["top_node_changes"]
                   if all(s["top_node_changes"][step] is not None for s in summaries)}
        out[mode] = {"per_k": per_k, "top_node_changes": changes}
    return out


def print_shortcut(table: dict) -> None:
    print("\n| mode | where the no-search rule is right | where it guesses | where it is wrong |\n| --- | --- | --- | --- |")
    for mode, row in table.items():
        cells = [f"{shown(row[n])} ({row[n]['items']} items)" if n in row else "-" for n in ("rule_right", "rule_guesses", "rule_wrong")]
        print(f"| {mode} | " + " | ".join(cells) + " |")


def print_tables(acc: dict, search: dict) -> None:
    n = next(iter(acc["accuracy"].values()))["n"]
    print(f"\n| mode | accuracy per seed (%) | mean ± SE over {n} seeds (%) |\n| --- | --- | --- |")
    for mode, stat in acc["accuracy"].items():
        print(f"| {mode} | {', '.join(f'{v * 100:.1f}' for v in stat['values'])} | {shown(stat)} |")
    print("\n| paired (same seed, same items) | difference (points) | items right only in the first / only in the second |\n| --- | --- | --- |")
    for pair, stat in acc["paired"].items():
        print(f"| {pair} | {shown(stat)} | {stat['items_only_first']} / {stat['items_only_second']} |")
    for mode, table in search.items():
        print(f"\n{mode}: after k thoughts (mean ± SE over seeds, %; value mass in probability)\n")
        print("| k | accuracy | accuracy - k=0 | correct path | hallucination | correct label | incorrect label | frontier mass | other mass |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for k, row in table["per_k"].items():
            mass = (f"{shown(row['frontier_mass'], 1, 3)} | {shown(row['other_mass'], 1, 3)}" if "frontier_mass" in row else "- | -")
            classes = " | ".join(shown(row["path_classes"][c]) for c in ("correct_path", "hallucination", "correct_label", "incorrect_label"))
            print(f"| {k} | {shown(row['accuracy'])} | {shown(row['accuracy_minus_k0'])} | {classes} | {mass} |")
        for step, stat in table["top_node_changes"].items():
            print(f"top node changes {step}: {shown(stat)} %")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval", action="append", default=[], metavar="MODE=FILES", help="coconut-eval reports, one per seed")
    parser.add_argument("--analysis", action="append", default=[], metavar="MODE=DIRS", help="coconut-analyze directories, one per seed")
    parser.add_argument("--data-file", help="the evaluated ProsQA file with its graphs: accuracy split by the no-search rule")
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args(argv)
    if not args.eval:
        parser.error("give at least one --eval MODE=FILES")
    evals = {m: [read_json(p) for p in paths] for m, paths in groups(args.eval, "--eval").items()}
    analyses = {m: [read_json(p / "report.json") for p in paths] for m, paths in groups(args.analysis, "--analysis").items()}
    acc, search = accuracy_table(evals), analysis_table(analyses)
    print_tables(acc, search)
    if args.data_file:
        records = [json.loads(line) for line in Path(args.data_file).read_text().splitlines() if line.strip()]
        acc["by_shortcut"] = shortcut_table(evals, records)
        print_shortcut(acc["by_shortcut"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"evals": {m: [str(p) for p in ps] for m, ps in groups(args.eval, "--eval").items()},
                                               **acc, "latent_search": search}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The testbed's table: every row of both arms, every seed, from one cached base, with standard errors and sign tests.

    quietstar testbed table --out DIR [--eval-split test] [--seeds 4,5,6] ...

writes into ``DIR``:

    config.json                 the TestbedConfig
    base.json                   the base LM's record and held-out accuracy
    jobs/<arm>-<row>-s<seed>.json   one row and seed: its per-item measurements and training log (a finished job
                                is not run again, so an interrupted table resumes where it stopped)
    table.json, table.md        means over seeds +- standard error, paired comparisons with sign tests
    own_vs_shuffled.png         held-out answer NLL with own and shuffled thoughts against training step
    accuracy.png                greedy answer accuracy of every row against difficulty

Rows run side by side in ``workers`` processes of ``threads`` threads each.
"""

from __future__ import annotations

import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from quietstar.core import run_lock
from quietstar.core.files import write_text_whole
from quietstar.testbed import coconut_arm, quiet_star_arm, task
from quietstar.testbed.base_lm import base_report
from quietstar.testbed.config import TestbedConfig

PROBE_PROBLEMS = 100  # valid problems scored during Quiet-STaR training (the NLL-against-step curve)


def job_name(arm: str, row: str, seed: int) -> str:
    return f"{arm}-{row}-s{seed}"


def run_job(cfg: TestbedConfig, arm: str, row: str, seed: int, base_dir: str, path: str) -> str:
    """Train one row with one seed from the base, score it on the held-out split, and write ``path``."""
    torch.set_num_threads(cfg.threads)
    train, held_out = cfg.train_problems(), cfg.held_out_problems()
    desc = job_name(arm, row, seed)
    if arm == "quietstar":
        probe = task.problems("valid", PROBE_PROBLEMS, cfg.hops, cfg.data_seed, cfg.earlier_prob)
        before = quiet_star_arm.measure(quiet_star_arm.fresh_model(cfg, row, base_dir, seed), held_out, seed)
        model, log = quiet_star_arm.train_row(cfg, row, base_dir, train, probe, seed, desc)
        record = {"before": before, "after": quiet_star_arm.measure(model, held_out, seed), "log": log}
    else:
        model, log = coconut_arm.train_row(cfg, row, base_dir, train, seed, desc)
        record = {"after": coconut_arm.measure(model, held_out), "log": log}
    write_text_whole(path, json.dumps({"arm": arm, "row": row, "seed": seed, **record}) + "\n")  # a killed job leaves none
    return path


def mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (over seeds); the error is 0 with one value."""
    values = [float(v) for v in values]
    m = mean(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value of ``wins`` against ``losses`` (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(a_runs: list[list[float]], b_runs: list[list[float]], lower_is_better: bool) -> dict:
    """Compare a against b, item by item within each seed: the mean difference a - b over seeds +- SE, and the
    sign test over all (seed, item) pairs (a wins where it is lower, or higher when ``lower_is_better`` is False)."""
    diffs = [mean(x) - mean(y) for x, y in zip(a_runs, b_runs)]
    d, se = mean_se(diffs)
    wins = losses = 0
    for x, y in zip(a_runs, b_runs):
        for u, v in zip(x, y):
            better = u < v if lower_is_better else u > v
            worse = u > v if lower_is_better else u < v
            wins, losses = wins + better, losses + worse
    return {"difference": d, "se": se, "wins": wins, "losses": losses, "p_sign": sign_test(wins, losses),
            "beyond_2se": abs(d) > 2 * se and se > 0, "seeds": len(diffs)}


QS_METRICS = ("base_nll", "own_sampled_nll", "own_greedy_nll", "shuffled_nll", "oracle_nll", "correct_no_thought",
              "correct_thought")


def chain_means(thoughts: list[str], held_out: list[task.Problem]) -> tuple[float, float]:
    """The share of thoughts holding the exact chain, and the mean share of values stated right (``task.chain_content``)."""
    content = [task.chain_content(t, p) for t, p in zip(thoughts, held_out)]
    return mean(exact for exact, _ in content), mean(values for _, values in content)


def pick(values: list, index: list[int]) -> list:
    return [values[i] for i in index]


def summarise(cfg: TestbedConfig, jobs: dict[tuple[str, str, int], dict], held_out: list[task.Problem]) -> dict:
    """Per row: each metric's mean +- SE over seeds at the hardest difficulty (``hops``), accuracy at every
    difficulty (``by_hops``), and the paired comparisons the testbed is about (at the hardest difficulty)."""
    seeds = cfg.seed_list
    at = {k: [i for i, p in enumerate(held_out) if p.hops == k] for k in cfg.hop_range}
    hard = at[cfg.hops]
    quiet, coconut, comparisons, by_hops = {}, {}, {}, {}
    for row in cfg.quiet_star_rows:
        runs = [jobs[("quietstar", row, s)] for s in seeds]
        after = [{m: pick(r["after"][m], hard) for m in QS_METRICS} for r in runs]
        quiet[row] = {m: mean_se([mean(a[m]) for a in after]) for m in QS_METRICS}
        for phase, prefix in (("before", "before_"), ("after", "")):
            content = [chain_means(pick(r[phase]["thought"], hard), pick(held_out, hard)) for r in runs]
            quiet[row][f"{prefix}chain_exact"] = mean_se([exact for exact, _ in content])
            quiet[row][f"{prefix}chain_values"] = mean_se([values for _, values in content])
        quiet[row]["answer_mixing_weight"] = mean_se([r["log"][-1]["answer_mixing_weight"] for r in runs])
        for metric, label in (("correct_no_thought", "no thought"), ("correct_thought", "thought")):
            by_hops[f"QS {row}: {label}"] = {k: mean_se([mean(pick(r["after"][metric], at[k])) for r in runs]) for k in at}
        comparisons[f"quietstar/{row}: own sampled vs shuffled thoughts, answer NLL"] = paired(
            [a["own_sampled_nll"] for a in after], [a["shuffled_nll"] for a in after], lower_is_better=True)
        comparisons[f"quietstar/{row}: own sampled thoughts vs base, answer NLL"] = paired(
            [a["own_sampled_nll"] for a in after], [a["base_nll"] for a in after], lower_is_better=True)
        comparisons[f"quietstar/{row}: greedy accuracy with vs without thoughts"] = paired(
            [a["correct_thought"] for a in after], [a["correct_no_thought"] for a in after], lower_is_better=False)
    for row in cfg.coconut_row_list:
        runs = [jobs[("coconut", row, s)]["after"] for s in seeds]
        coconut[row] = {"accuracy": mean_se([mean(pick(r["correct"], hard)) for r in runs]),
                        "generated_tokens": mean_se([mean(pick(r["generated_tokens"], hard)) for r in runs])}
        by_hops[f"Coconut {row}"] = {k: mean_se([mean(pick(r["correct"], at[k])) for r in runs]) for k in at}
    for a, b in (("coconut", "no_cot"), ("coconut", "pause_as_thought"), ("coconut", "cot"), ("coconut", "no_curriculum")):
        if a in coconut and b in coconut:
            comparisons[f"coconut: {a} vs {b}, accuracy"] = paired(
                [pick(jobs[("coconut", a, s)]["after"]["correct"], hard) for s in seeds],
                [pick(jobs[("coconut", b, s)]["after"]["correct"], hard) for s in seeds], lower_is_better=False)
    return {"seeds": list(seeds), "split": cfg.eval_split, "items": cfg.eval_problems, "hops": cfg.hops,
            "hop_range": list(cfg.hop_range), "quietstar": quiet, "coconut": coconut, "by_hops": by_hops,
            "comparisons": comparisons}


def _cell(value: tuple[float, float], percent: bool = False) -> str:
    m, se = value
    return f"{100 * m:.1f} ± {100 * se:.1f}" if percent else f"{m:.3f} ± {se:.3f}"


def markdown(summary: dict, base: dict) -> str:
    """table.md: the base, both arms' rows and the comparisons."""
    hops = summary["hop_range"]
    lines = [f"# Reasoning testbed: {summary['hops']} hops, {summary['items']} {summary['split']} problems per difficulty "
             f"({', '.join(map(str, hops))} hops), seeds {', '.join(map(str, summary['seeds']))}", "",
             f"Every table but the accuracy against difficulty is at the hardest difficulty, {summary['hops']} hops.", "",
             f"Base LM: greedy accuracy {100 * base['free_accuracy']:.1f} % as it likes (opens the aside "
             f"{100 * base['opened_aside']:.1f} %), {100 * base['direct_accuracy']:.1f} % answering at once, "
             f"{100 * base['worked_accuracy']:.1f} % when the aside is opened for it.", ""]
    if summary["quietstar"]:
        lines += ["## Quiet-STaR (answer token after `?`; mean ± SE over seeds)", "",
                  "| row | base NLL | own sampled | own greedy | shuffled | oracle chain | acc. no thought % | acc. thought % "
                  "| chain exact before → after % | mixing weight |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row, r in summary["quietstar"].items():
            lines.append(f"| {row} | {_cell(r['base_nll'])} | {_cell(r['own_sampled_nll'])} | {_cell(r['own_greedy_nll'])} | "
                         f"{_cell(r['shuffled_nll'])} | {_cell(r['oracle_nll'])} | {_cell(r['correct_no_thought'], True)} | "
                         f"{_cell(r['correct_thought'], True)} | {_cell(r['before_chain_exact'], True)} → "
                         f"{_cell(r['chain_exact'], True)} | {_cell(r['answer_mixing_weight'])} |")
        lines.append("")
    if summary["coconut"]:
        lines += ["## Coconut (greedy accuracy, generated tokens incl. latents; mean ± SE over seeds)", "",
                  "| row | accuracy % | generated tokens |", "|---|---|---|"]
        for row, r in summary["coconut"].items():
            lines.append(f"| {row} | {_cell(r['accuracy'], True)} | {r['generated_tokens'][0]:.1f} |")
        lines.append("")
    base_by_hops = {int(k): v for k, v in base["by_hops"].items()}
    lines += ["## Accuracy against difficulty (greedy answer accuracy %; mean ± SE over seeds)", "",
              "| row | " + " | ".join(f"{k} hops" for k in hops) + " |", "|---" * (len(hops) + 1) + "|",
              "| base LM, answering at once | " + " | ".join(f"{100 * base_by_hops[k]['direct_accuracy']:.1f}" for k in hops) + " |",
              "| base LM, as it likes | " + " | ".join(f"{100 * base_by_hops[k]['free_accuracy']:.1f}" for k in hops) + " |"]
    for name, values in summary["by_hops"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(values[k], True) for k in hops) + " |")
    lines.append("")
    lines += ["## Paired comparisons (a - b over seeds ± SE; sign test over seed × item pairs)", "",
              "| comparison | a - b | wins / losses | sign-test p | beyond 2 SE |", "|---|---|---|---|---|"]
    for name, c in summary["comparisons"].items():
        lines.append(f"| {name} | {c['difference']:+.3f} ± {c['se']:.3f} | {c['wins']} / {c['losses']} | {c['p_sign']:.2g} | "
                     f"{('yes' if c['beyond_2se'] else 'no') if c['seeds'] > 1 else 'one seed: no SE'} |")
    return "\n".join(lines) + "\n"


def plots(cfg: TestbedConfig, jobs: dict, summary: dict, out: Path) -> None:
    """own_vs_shuffled.png (held-out NLL against step, mean over seeds) and accuracy.png (accuracy against difficulty,
    every row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in cfg.quiet_star_rows if r != "oracle"]
    if rows:
        fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.2), squeeze=False, sharey=True)
        for ax, row in zip(axes[0], rows):
            logs = [jobs[("quietstar", row, s)]["log"] for s in cfg.seed_list]
            steps = [entry["step"] for entry in logs[0]]
            for key, label in (("probe_own_sampled_nll", "own thoughts"), ("probe_shuffled_nll", "shuffled thoughts"),
                               ("probe_base_nll", "no thought (base)")):
                ax.plot(steps, [mean(log[i][key] for log in logs) for i in range(len(steps))], label=label)
            ax.set_title(row)
            ax.set_xlabel("training step")
        axes[0][0].set_ylabel("held-out answer NLL (nats)")
        axes[0][-1].legend()
        fig.tight_layout()
        fig.savefig(out / "own_vs_shuffled.png", dpi=110)
        plt.close(fig)
    hops = summary["hop_range"]
    panels = [(title, {n: v for n, v in summary["by_hops"].items() if n.startswith(prefix)})
              for title, prefix in (("Quiet-STaR (dashed: no thought)", "QS "), ("Coconut", "Coconut "))]
    panels = [(title, lines) for title, lines in panels if lines]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False, sharey=True)
        for ax, (title, lines) in zip(axes[0], panels):
            rows = list(dict.fromkeys(name.split(": ")[0] for name in lines))  # one colour per row
            for name, values in lines.items():
                row = name.split(": ")[0]
                thought = not name.endswith("no thought")
                ax.errorbar(hops, [100 * values[k][0] for k in hops], yerr=[100 * values[k][1] for k in hops],
                            fmt="-o" if thought else "--o", color=f"C{rows.index(row)}", capsize=3, markersize=3,
                            label=row.removeprefix("QS ").removeprefix("Coconut ") if thought else None)
            ax.set_title(title, fontsize=10)
            ax.set_xticks(hops)
            ax.set_xlabel("hops (difficulty)")
            ax.set_ylim(0, 102)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, frameon=False)
        axes[0][0].set_ylabel(f"greedy answer accuracy % ({summary['split']})")
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=110)
        plt.close(fig)


def run_table(cfg: TestbedConfig, out: Path, cache: Path) -> dict:
    """Train the base (or find it in ``cache``), run every missing job, then write the table and plots into ``out``
    (held by this run: a second table into it is refused; every file is written whole, so a killed job is rerun)."""
    run_lock.hold_directory(out, "--out")
    (out / "jobs").mkdir(exist_ok=True)
    write_text_whole(out / "config.json", json.dumps(cfg.to_dict(), indent=1) + "\n")
    torch.set_num_threads(cfg.threads)
    train, held_out = cfg.train_problems(), cfg.held_out_problems()
    base = base_report(cfg, train, held_out, cache)
    base_dir = base["directory"]
    write_text_whole(out / "base.json", json.dumps(base, indent=1) + "\n")
    wanted = [("quietstar", row, s) for row in cfg.quiet_star_rows for s in cfg.seed_list]
    wanted += [("coconut", row, s) for row in cfg.coconut_row_list for s in cfg.seed_list]
    path = {key: out / "jobs" / f"{job_name(*key)}.json" for key in wanted}
    missing = [key for key in wanted if not path[key].is_file()]
    if missing:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(cfg.workers, len(missing)), mp_context=context) as pool:
            futures = [pool.submit(run_job, cfg, *key, str(base_dir), str(path[key])) for key in missing]
            for future in tqdm(futures, desc="testbed jobs", unit="job"):
                future.result()
    jobs = {key: json.loads(path[key].read_text()) for key in wanted}
    summary = summarise(cfg, jobs, held_out)
    write_text_whole(out / "table.json", json.dumps({"base": base, **summary}, indent=1) + "\n")
    write_text_whole(out / "table.md", markdown(summary, base))
    plots(cfg, jobs, summary, out)
    print((out / "table.md").read_text())
    return summary

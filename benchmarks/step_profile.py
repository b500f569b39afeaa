"""Where a Quiet-STaR training step's time goes: a torch.profiler table per phase.

    python benchmarks/step_profile.py                                   # L=256, M=16, K=4, R=2, llama-23m, 1 thread
    python benchmarks/step_profile.py --formulation oracle --json prof.json
    python benchmarks/step_profile.py --formulation one_pass

One step (forward, backward, AdamW) of the model ``benchmarks/train_step.py`` builds, after one untimed step,
under ``torch.profiler``. The phases are labelled from outside the model (the library's functions are wrapped in
``record_function`` here, never in the package): sampling the thoughts (no gradients), the decoder pass that
replays them with gradients (or, for ``one_pass``, the forwards that sample and train at once, and within
them the head and the draw that choose each token), the logits, the mixing head, the losses, backward and the optimizer. Attention is
reported across phases as the kernels' own time (ops whose name holds ``attention`` or ``flash``). The table
gives each phase's wall time and share of the step, then the ten ops with the most self time.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

from train_step import MODELS, build

PHASES = {  # (module in quietstar.quiet_star, function name) -> phase label
    ("model", "sample_thoughts"): "sampling (no grad)",
    ("model", "replay_thoughts"): "replay (decoder, grad)",
    ("model", "one_pass_rollout"): "one pass (decoder, grad)",
    ("one_pass", "choose_tokens"): "sampling in the one pass (head, draw)",
    ("model", "sequential_rollout"): "rollout (oracle decoder)",
    ("model", "chunked_token_logprobs"): "logits",
    ("model", "future_targets"): "losses",
    ("model", "nll"): "losses",
    ("model", "talk_nll"): "losses",
    ("model", "thought_rewards"): "losses",
    ("model", "reinforce_loss"): "losses",
}


def labelled(fn, label):
    from torch.profiler import record_function

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-23m", choices=sorted(MODELS))
    parser.add_argument("--formulation", default="efficient", choices=["one_pass", "efficient", "oracle"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--thought-len", type=int, default=16)
    parser.add_argument("--n-true", type=int, default=4)
    parser.add_argument("--n-thoughts", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the phase table here")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import importlib

    from quietstar import build_param_groups

    torch.set_num_threads(args.threads)
    model, cfg = build("cpu", args.model, "float32", args.formulation, args.thought_len, args.n_true, args.n_thoughts)
    for (module_name, name), label in PHASES.items():
        module = importlib.import_module(f"quietstar.quiet_star.{module_name}")
        if hasattr(module, name):
            setattr(module, name, labelled(getattr(module, name), label))
    model.mixing_head.forward = labelled(model.mixing_head.forward, "mixing head")
    model.train()
    optimizer = torch.optim.AdamW(build_param_groups(model, lr=1e-6, weight_decay=0.0))
    ids = torch.randint(2, cfg.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        with record_function("forward"):
            out = model(ids)
        with record_function("backward"):
            out.loss.backward()
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # untimed
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    wall = time.perf_counter() - started
    events = prof.key_averages()
    totals = {}
    for e in events:
        if e.key in set(PHASES.values()) | {"forward", "backward", "optimizer", "mixing head"}:
            totals[e.key] = totals.get(e.key, 0.0) + e.cpu_time_total / 1e6
    attention = sum(e.self_cpu_time_total for e in events if "attention" in e.key.lower() or "flash" in e.key.lower()) / 1e6
    step_s = sum(totals.get(k, 0.0) for k in ("forward", "backward", "optimizer"))
    order = ["sampling (no grad)", "replay (decoder, grad)", "one pass (decoder, grad)", "sampling in the one pass (head, draw)",
             "rollout (oracle decoder)", "logits", "mixing head", "losses", "forward", "backward", "optimizer"]
    rows = [(k, totals[k]) for k in order if k in totals] + [("attention kernels (all phases, self)", attention)]
    print(f"{args.formulation} step, {args.model}, L={args.seq_len} M={args.thought_len} K={args.n_true} R={args.n_thoughts}, "
          f"{args.threads} thread(s): {wall:.2f} s under the profiler")
    print(f"| phase | seconds | share of step |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / step_s:.0%} |")
    print()
    print(events.table(sort_by="self_cpu_time_total", row_limit=10))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "step_s": step_s, "phases": dict(rows)}, f, indent=1)


if __name__ == "__main__":
    main()

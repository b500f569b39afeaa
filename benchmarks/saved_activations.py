"""What autograd keeps for the backward of one Quiet-STaR step: the bound on a step's memory without recomputation.

    python benchmarks/saved_activations.py --seq-len 256 --thought-len 16     # one pass, efficient, oracle

One forward of each formulation on the model ``train_step.py`` builds (llama-23m by default), under
``torch.autograd.graph.saved_tensors_hooks``; every tensor saved for the backward is counted once per
storage. Prints MB per formulation and the ratio to the oracle's.
"""

from __future__ import annotations

import argparse

import torch

from train_step import MODELS, build


def saved_mb(model, ids) -> float:
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids)
    return sum(storages.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-23m", choices=sorted(MODELS))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--thought-len", type=int, default=16)
    parser.add_argument("--n-true", type=int, default=4)
    parser.add_argument("--n-thoughts", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    for formulation in ("one_pass", "efficient", "oracle"):
        model, cfg = build("cpu", args.model, "float32", formulation, args.thought_len, args.n_true, args.n_thoughts)
        model.train()
        ids = torch.randint(2, cfg.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
        rows[formulation] = saved_mb(model, ids)
    for formulation, mb in rows.items():
        print(f"{formulation:<10} {mb:9.1f} MB saved for backward ({mb / rows['oracle']:.2f}x the oracle's)")


if __name__ == "__main__":
    main()

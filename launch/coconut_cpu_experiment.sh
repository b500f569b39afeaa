#!/usr/bin/env bash
# The first Coconut experiment on a CPU (about an hour on 2 cores): data, then four trainings, then the eval.
#
#   bash launch/coconut_cpu_experiment.sh [OUT_DIR]      # default runs/exp
#
# 1. a small ProsQA-style set from quietstar.coconut.prosqa: 112 train, 32 validation, 200 test items
#    (graphs of ~10 nodes, 2-3 steps; seeds 11, 12, 13);
# 2. the modes cot, no_cot, coconut and pause_as_thought with launch/configs/coconut_cpu_experiment.yaml;
# 3. each run's best/ on the 200 test items with `python -m quietstar.evaluation.coconut` into OUT_DIR/eval_<mode>.json;
# 4. full size: coconut on 96 items of the generator's default (real-size) graphs (seeds 21, 22), 4 epochs,
#    evaluated on the real ../shared/data/prosqa_valid.jsonl when that file exists (OUT_DIR/eval_full_coconut_real.json).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-runs/exp}"
mkdir -p "$out"
small=(--set n_nodes=12 --set min_steps=2 --set max_steps=3 --set vocab_size=24)
for split in "train 112 11" "val 32 12" "test 200 13"; do
  set -- $split
  python -m quietstar.coconut.prosqa generate --n "$2" --seed "$3" --output "$out/prosqa_mini_$1.jsonl" "${small[@]}"
done
modes=(cot no_cot coconut pause_as_thought)
for mode in "${modes[@]}"; do
  [[ -f "$out/$mode/summary.json" ]] && continue
  bash "$ROOT/launch/coconut.sh" --config "$ROOT/launch/configs/coconut_cpu_experiment.yaml" --mode "$mode" \
    --train-file "$out/prosqa_mini_train.jsonl" --val-file "$out/prosqa_mini_val.jsonl" --output-dir "$out/$mode"
done
for mode in "${modes[@]}"; do
  python -m quietstar.evaluation.coconut --model "$out/$mode/best" --task prosqa --data-file "$out/prosqa_mini_test.jsonl" \
    --output "$out/eval_$mode.json"
done

# 4. full-size graphs, evaluated on the real validation split
for split in "train 96 21" "val 16 22"; do
  set -- $split
  python -m quietstar.coconut.prosqa generate --n "$2" --seed "$3" --output "$out/prosqa_full_$1.jsonl"
done
if [[ ! -f "$out/full_coconut/summary.json" ]]; then
  bash "$ROOT/launch/coconut.sh" --config "$ROOT/launch/configs/coconut_cpu_experiment.yaml" --mode coconut --num-epochs 4 \
    --train-file "$out/prosqa_full_train.jsonl" --val-file "$out/prosqa_full_val.jsonl" --output-dir "$out/full_coconut"
fi
real="$ROOT/../shared/data/prosqa_valid.jsonl"
if [[ -f "$real" ]]; then
  python -m quietstar.evaluation.coconut --model "$out/full_coconut/best" --task prosqa --data-file "$real" \
    --output "$out/eval_full_coconut_real.json"
fi

#!/usr/bin/env bash
# The embedded Coconut default (launch/configs/coconut_demo.yaml) over training seeds: coconut, pause_as_thought, no_cot;
# each best/ evaluated on the 200 fresh test items (generator seed 13) and, for the latent modes, analysed.
set -uo pipefail
cd /work/wt_seeds
export PATH="/work/wt_seeds/.venv/bin:$PATH"
out=/work/exp/seeds
test=/work/exp/coco/prosqa_mini_test.jsonl
for job in coconut:1 pause_as_thought:1 no_cot:1 coconut:2 pause_as_thought:2 no_cot:2 no_cot:0; do
  mode=${job%%:*}; seed=${job##*:}; run=$out/${mode}_s$seed
  while [[ -f /work/exp/QUIET ]]; do sleep 10; done
  echo "$(date +%T) start $mode seed $seed"
  [[ -f $run/summary.json ]] || bash launch/coconut.sh --config launch/configs/coconut_demo.yaml --mode $mode --seed $seed --output-dir $run > $run.log 2>&1
  quietstar coconut-eval --model $run/best --task prosqa --data-file $test --output $out/eval_${mode}_s$seed.json > $out/eval_${mode}_s$seed.log 2>&1
  if [[ $mode != no_cot ]]; then
    quietstar coconut-analyze --model $run/best --data-file $test --output-dir $out/analysis_${mode}_s$seed > $out/analysis_${mode}_s$seed.log 2>&1
  fi
  echo "$(date +%T) done $mode seed $seed: $(grep -o '"accuracy": [0-9.]*' $out/eval_${mode}_s$seed.json | head -1)"
done
echo "$(date +%T) all done"

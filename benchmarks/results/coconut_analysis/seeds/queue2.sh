#!/usr/bin/env bash
# Re-planned for time: seeds queue cut to coconut/pause seed 2 (no_cot dropped), then the no-shortcut probe
# (coconut, no_cot; pause only if there is time), then the testbed demo alone, timed.
set -uo pipefail
seeds=/work/exp/seeds
while [[ ! -f $seeds/analysis_pause_as_thought_s1/report.json ]]; do sleep 10; done
sleep 5; kill 3657 2>/dev/null; sleep 2; pkill -f "wt_seeds/launch/coconut.sh"; sleep 10
echo "$(date +%T) seeds queue stopped after pause seed 1"
export PATH="/work/wt_seeds/.venv/bin:$PATH"
test=/work/exp/coco/prosqa_mini_test.jsonl
cd /work/wt_seeds
rm -rf $seeds/no_cot_s1 $seeds/no_cot_s1.log
for job in coconut:2 pause_as_thought:2; do
  mode=${job%%:*}; seed=${job##*:}; run=$seeds/${mode}_s$seed
  echo "$(date +%T) start $mode seed $seed"
  bash launch/coconut.sh --config launch/configs/coconut_demo.yaml --mode $mode --seed $seed --output-dir $run > $run.log 2>&1
  quietstar coconut-eval --model $run/best --task prosqa --data-file $test --output $seeds/eval_${mode}_s$seed.json > $seeds/eval_${mode}_s$seed.log 2>&1
  quietstar coconut-analyze --model $run/best --data-file $test --output-dir $seeds/analysis_${mode}_s$seed > $seeds/analysis_${mode}_s$seed.log 2>&1
  echo "$(date +%T) done $mode seed $seed: $(grep -o '"accuracy": [0-9.]*' $seeds/eval_${mode}_s$seed.json | head -1)"
done
cd /work/wt_noshort
export PATH="/work/wt_noshort/.venv/bin:$PATH"
out=/work/exp/noshort
S="--set n_nodes=12 --set min_steps=2 --set max_steps=3 --set vocab_size=24 --set no_shortcut=true"
python -m quietstar.coconut.prosqa generate --n 96 --seed 1234 --output $out/train.jsonl $S
python -m quietstar.coconut.prosqa generate --n 16 --seed 5678 --output $out/valid.jsonl $S
python -m quietstar.coconut.prosqa generate --n 200 --seed 13 --output $out/test.jsonl $S
for mode in coconut no_cot pause_as_thought; do
  if [[ $mode == pause_as_thought && $(date +%H%M) > 0915 ]]; then echo "$(date +%T) no time for $mode"; continue; fi
  run=$out/${mode}_s0
  echo "$(date +%T) start noshort $mode"
  bash launch/coconut.sh --config launch/configs/coconut_demo.yaml --mode $mode --seed 0 \
      --train-file $out/train.jsonl --val-file $out/valid.jsonl --output-dir $run > $run.log 2>&1
  quietstar coconut-eval --model $run/best --task prosqa --data-file $out/test.jsonl --output $out/eval_${mode}_s0.json > $out/eval_${mode}_s0.log 2>&1
  if [[ $mode == coconut ]]; then
    quietstar coconut-analyze --model $run/best --data-file $out/test.jsonl --output-dir $out/analysis_${mode}_s0 > $out/analysis_${mode}_s0.log 2>&1
  fi
  echo "$(date +%T) done noshort $mode: $(grep -o '"accuracy": [0-9.]*' $out/eval_${mode}_s0.json | head -1)"
done
echo "$(date +%T) testbed demo, alone"
cd /work/wt_tb
rm -rf /work/exp/tbdemo/alone
/usr/bin/time -v .venv/bin/quietstar testbed table --config launch/configs/testbed_demo.yaml --out /work/exp/tbdemo/alone/out \
    --cache /work/exp/tbdemo/alone/cache > /work/exp/tbdemo/alone.log 2>&1
echo "$(date +%T) all done"

#!/usr/bin/env bash
# The scale-out GPU checks, in the order the work lists them, sized for one short session on a
# lent GPU (about 9 minutes in all; each part is stopped at its cap and the next one starts):
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]      # default: $OUT if set, else benchmarks/results/gpu
#
#   1. tests/test_gpu.py: compiled FlexAttention against the sequential oracle on CUDA, and a
#      1-GPU ZeRO-3 run (zero.Init) of the recipe                                       cap 180 s
#   2. the 1B-class Llama grid in bf16, L = 256/512, M = 8/16/24, efficient and oracle,
#      with MFU and the efficient/oracle ratios                                        cap 240 s
#   3. SmolLM2-135M's shape at the paper's L = 256, M = 9, K = 4, R = 2, a batch of 8:
#      steps/s and peak memory, with and without activation checkpointing             cap 90 s
#
# Each part's output goes to OUT_DIR/<part>.log and its rows to OUT_DIR/<part>.json (written
# after every row). The checkout need not be installed: the repository root goes on PYTHONPATH.
# A machine without internet that lacks packages (deepspeed, datasets, a recent transformers)
# takes them as wheels in .whl/ at the repository root (git ignores it: carry it), installed
# first into /tmp/site. Fill it where pip works, for the GPU machine's Python (here 3.12):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl transformers==5.24.0 datasets dill multiprocess \
#       hjson pydantic pydantic-core annotated-types typing-inspection
#   pip download --no-deps -d /tmp/ds deepspeed==0.19.8 && DS_BUILD_OPS=0 pip wheel --no-deps \
#       --no-build-isolation -w .whl /tmp/ds/deepspeed-0.19.8.tar.gz
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/quietstar-inductor}  # shared by every row's process
if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site" PATH="/tmp/site/bin:$PATH"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
"$python" - <<'EOF' 2>&1 | tee -a "$out/device.txt" || exit 1
import importlib
for name in ("torch", "transformers", "deepspeed", "datasets", "pyarrow", "peft", "quietstar"):
    print(name, getattr(importlib.import_module(name), "__version__", "(no version)"))
EOF

part() {  # part NAME CAP_SECONDS COMMAND...
    local name=$1 cap=$2
    shift 2
    echo "== $name (cap ${cap} s): $*" | tee "$out/$name.log"
    local start=$SECONDS
    timeout --kill-after 10 "$cap" "$@" 2>&1 | tee -a "$out/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$out/$name.log"
}

part flex_and_zero3 180 "$python" -m pytest -q -p no:cacheprovider tests/test_gpu.py
part train_step_1b 240 "$python" benchmarks/train_step.py --device cuda --seq-lens 256 512 --thought-lens 8 16 24 \
    --formulations efficient oracle --steps 2 --warmup 1 --row-timeout 45 --generation-tokens 0 --no-checkpointing-rows \
    --json "$out/train_step_1b.json"
part smollm2_paper 90 "$python" benchmarks/train_step.py --device cuda --model smollm2-135m --seq-lens 256 \
    --thought-lens 9 --n-true 4 --batch-size 8 --formulations efficient --steps 3 --warmup 1 --row-timeout 40 \
    --generation-tokens 0 --json "$out/smollm2_paper.json"

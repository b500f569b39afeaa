#!/usr/bin/env bash
# Coconut training through the DeepSpeed launcher (over `python -m quietstar.training.coconut`).
#
#   bash launch/coconut.sh                         # the embedded default: SmolLM2-135M on a generated ProsQA-style set
#   bash launch/coconut.sh --config launch/configs/coconut_prontoqa.yaml --train-file D/prontoqa_train.jsonl \
#       --val-file D/prontoqa_valid.jsonl --output-dir runs/prontoqa
#   bash launch/coconut.sh --config launch/configs/coconut_gsm8k.yaml --mode cot ...      # a baseline: any CoconutConfig.mode
#   deepspeed [--num_gpus N] [--hostfile H] launch/coconut.sh [recipe arguments]   # the launcher's own form
#
# Launcher settings (a flag, or the environment variable next to it):
#   --num-gpus N        NUM_GPUS      processes per node (default: every GPU; 2 on a machine without one)
#   --hostfile FILE     HOSTFILE      several nodes; DeepSpeed's format, one "hostname slots=N" per line
#   --master-addr HOST  MASTER_ADDR   the first node's address (several nodes)
#   --master-port PORT  MASTER_PORT   default: a free port
#   (DeepSpeed config)  DS_CONFIG     same as the recipe flag --deepspeed FILE
# Every other argument goes to the recipe: `python -m quietstar.training.coconut --help` lists them.
# With no recipe arguments, the embedded default runs: launch/configs/coconut_demo.yaml into runs/coconut-demo-<time>.
# Any recipe argument leaves the embedded default for the library's defaults; to change one setting of the
# embedded default, name its config too:
#   bash launch/coconut.sh --config launch/configs/coconut_demo.yaml --num-epochs 3
#
# This file is bash and Python at once (quietstar/training/launch_scripts.py says how): bash runs
# the next line, the DeepSpeed launcher over this file (found through any symlink to it); each rank's
# Python runs the recipe.
''''exec bash "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/deepspeed_recipe.sh" "$(readlink -f "${BASH_SOURCE[0]}")" "$@" # '''
from quietstar.training.launch_scripts import run; run(__file__)  # noqa: E702

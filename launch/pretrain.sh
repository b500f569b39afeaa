#!/usr/bin/env bash
# Quiet-STaR continued pretraining through the DeepSpeed launcher (over `python -m quietstar.training.pretrain`).
#
#   bash launch/pretrain.sh                        # the embedded default: SmolLM2-135M on the offline corpus
#   bash launch/pretrain.sh --config launch/configs/paper.yaml --deepspeed ds_configs/zero3.json
#   bash launch/pretrain.sh --hostfile hosts --config launch/configs/paper.yaml --output-dir runs/paper
#   deepspeed [--num_gpus N] [--hostfile H] launch/pretrain.sh [recipe arguments]   # the launcher's own form
#
# Launcher settings (a flag, or the environment variable next to it):
#   --num-gpus N        NUM_GPUS      processes per node (default: every GPU; 2 on a machine without one)
#   --hostfile FILE     HOSTFILE      several nodes; DeepSpeed's format, one "hostname slots=N" per line
#   --master-addr HOST  MASTER_ADDR   the first node's address (several nodes)
#   --master-port PORT  MASTER_PORT   default: a free port
#   (DeepSpeed config)  DS_CONFIG     same as the recipe flag --deepspeed FILE
# Every other argument goes to the recipe: `python -m quietstar.training.pretrain --help` lists them.
# With no recipe arguments, the embedded default runs: launch/configs/demo.yaml into runs/demo-<time>.
# Any recipe argument leaves the embedded default for the library's defaults (sized for GPUs: on a CPU
# they need about 17 GB per rank); to change one setting of the embedded default, name its config too:
#   bash launch/pretrain.sh --config launch/configs/demo.yaml --max-steps 5
#
# This file is bash and Python at once (quietstar/training/launch_scripts.py says how): bash runs
# the next line, the DeepSpeed launcher over this file (found through any symlink to it); each rank's
# Python runs the recipe.
''''exec bash "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/deepspeed_recipe.sh" "$(readlink -f "${BASH_SOURCE[0]}")" "$@" # '''
from quietstar.training.launch_scripts import run; run(__file__)  # noqa: E702

#!/usr/bin/env bash
# Quiet-STaR continued pretraining through the DeepSpeed launcher (over `python -m quietstar.training.pretrain`).
#
#   bash launch/pretrain.sh                        # the embedded default: SmolLM2-135M on the offline corpus
#   bash launch/pretrain.sh --config launch/configs/paper.yaml --deepspeed ds_configs/zero3.json
#   bash launch/pretrain.sh --hostfile hosts --config launch/configs/paper.yaml --output-dir runs/paper
#
# Launcher settings (a flag, or the environment variable next to it):
#   --num-gpus N        NUM_GPUS      processes per node (default: every GPU; 2 on a machine without one)
#   --hostfile FILE     HOSTFILE      several nodes; DeepSpeed's format, one "hostname slots=N" per line
#   --master-addr HOST  MASTER_ADDR   the first node's address (several nodes)
#   --master-port PORT  MASTER_PORT   default: a free port
#   (DeepSpeed config)  DS_CONFIG     same as the recipe flag --deepspeed FILE
# Every other argument goes to the recipe: `python -m quietstar.training.pretrain --help` lists them.
# With no recipe arguments, the embedded default runs: launch/configs/demo.yaml into runs/demo-<time>.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

num_gpus="${NUM_GPUS:-}"
hostfile="${HOSTFILE:-}"
master_addr="${MASTER_ADDR:-}"
master_port="${MASTER_PORT:-}"
recipe=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num-gpus) num_gpus="$2"; shift 2 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    --master-addr) master_addr="$2"; shift 2 ;;
    --master-port) master_port="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) recipe+=("$1"); shift ;;
  esac
done

if ! command -v deepspeed >/dev/null; then
  echo "launch/pretrain.sh: error: 'deepspeed' is not on PATH; run 'make install' and activate .venv" >&2
  exit 2
fi
if [[ -n "$hostfile" && ! -f "$hostfile" ]]; then
  echo "launch/pretrain.sh: error: hostfile not found: $hostfile" >&2
  exit 2
fi

launcher=()
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  gpus="$(nvidia-smi -L | wc -l)"
  if [[ -z "$hostfile" || -n "$num_gpus" ]]; then launcher+=(--num_gpus "${num_gpus:-$gpus}"); fi
else
  # CPU: one process per share of the cores, each single-threaded math (ZeRO-3 is erratic otherwise).
  procs="${num_gpus:-2}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / procs > 0 ? $(nproc) / procs : 1 ))}"
  launcher+=(--num_gpus "$procs")
fi
[[ -n "$hostfile" ]] && launcher+=(--hostfile "$hostfile")
[[ -n "$master_addr" ]] && launcher+=(--master_addr "$master_addr")
if [[ -z "$master_port" ]]; then
  master_port="$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
fi
launcher+=(--master_port "$master_port")

if [[ ${#recipe[@]} -eq 0 ]]; then
  recipe=(--config "$ROOT/launch/configs/demo.yaml" --output-dir "runs/demo-$(date +%Y%m%d-%H%M%S)")
fi
[[ -n "${DS_CONFIG:-}" ]] && recipe=(--deepspeed "$DS_CONFIG" "${recipe[@]}")

echo "+ deepspeed ${launcher[*]} --module quietstar.training.pretrain ${recipe[*]}" >&2
exec deepspeed "${launcher[@]}" --module quietstar.training.pretrain "${recipe[@]}"

#!/usr/bin/env bash
# What launch/pretrain.sh and launch/coconut.sh share: run a training recipe under the DeepSpeed launcher.
#
#   bash launch/deepspeed_recipe.sh MODULE DEFAULT_CONFIG RUN_NAME [launcher settings] [recipe arguments]
#
# Launcher settings (a flag, or the environment variable next to it):
#   --num-gpus N        NUM_GPUS      processes per node (default: every GPU; 2 on a machine without one)
#   --hostfile FILE     HOSTFILE      several nodes; DeepSpeed's format, one "hostname slots=N" per line
#   --master-addr HOST  MASTER_ADDR   the first node's address (several nodes)
#   --master-port PORT  MASTER_PORT   default: a free port
#   (DeepSpeed config)  DS_CONFIG     same as the recipe flag --deepspeed FILE
# Every other argument goes to the recipe (`python -m MODULE --help` lists them).
# With no recipe arguments, the embedded default runs: DEFAULT_CONFIG into runs/RUN_NAME-<time>.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
module="$1"; default_config="$2"; run_name="$3"; caller="${CALLER:-launch/deepspeed_recipe.sh}"
shift 3

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
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$ROOT/$caller"; exit 0 ;;
    *) recipe+=("$1"); shift ;;
  esac
done

if ! command -v deepspeed >/dev/null; then
  echo "$caller: error: 'deepspeed' is not on PATH; run 'make install' and activate .venv" >&2
  exit 2
fi
if [[ -n "$hostfile" && ! -f "$hostfile" ]]; then
  echo "$caller: error: hostfile not found: $hostfile" >&2
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
  recipe=(--config "$default_config" --output-dir "runs/$run_name-$(date +%Y%m%d-%H%M%S)")
fi
[[ -n "${DS_CONFIG:-}" ]] && recipe=(--deepspeed "$DS_CONFIG" "${recipe[@]}")

echo "+ deepspeed ${launcher[*]} --module $module ${recipe[*]}" >&2
exec deepspeed "${launcher[@]}" --module "$module" "${recipe[@]}"

#!/usr/bin/env bash
# What launch/pretrain.sh and launch/coconut.sh share: run one of them under the DeepSpeed launcher.
#
#   bash launch/deepspeed_recipe.sh SCRIPT [launcher settings] [recipe arguments]
#
# SCRIPT is launch/pretrain.sh or launch/coconut.sh, which exec this with themselves as SCRIPT;
# the launcher then runs SCRIPT as Python on every rank (quietstar/training/launch_scripts.py).
# Launcher settings (a flag, or the environment variable next to it):
#   --num-gpus N        NUM_GPUS      processes per node (default: every GPU; 2 on a machine without one)
#   --hostfile FILE     HOSTFILE      several nodes; DeepSpeed's format, one "hostname slots=N" per line
#   --master-addr HOST  MASTER_ADDR   the first node's address (several nodes)
#   --master-port PORT  MASTER_PORT   default: a free port
#   (DeepSpeed config)  DS_CONFIG     same as the recipe flag --deepspeed FILE
# Every other argument goes to the recipe (`python SCRIPT --help` lists them). With no recipe
# arguments, SCRIPT runs its embedded default into runs/<name>-<time>.
set -euo pipefail
script="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
caller="launch/$(basename "$1")"
shift

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
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$script"; exit 0 ;;
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
  # With a hostfile and no --num-gpus, its slots say how many processes.
  procs="${num_gpus:-2}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / procs > 0 ? $(nproc) / procs : 1 ))}"
  if [[ -z "$hostfile" || -n "$num_gpus" ]]; then launcher+=(--num_gpus "$procs"); fi
fi
if [[ -n "$hostfile" ]]; then
  launcher+=(--hostfile "$hostfile")
  # A hostfile naming only this machine needs no ssh: skip DeepSpeed's ssh check and use loopback.
  hosts="$(awk '!/^[[:space:]]*(#|$)/ { print $1 }' "$hostfile" | sort -u)"
  if [[ "$hosts" == localhost || "$hosts" == 127.0.0.1 || "$hosts" == "$(hostname)" ]]; then
    launcher+=(--no_ssh_check)
    master_addr="${master_addr:-127.0.0.1}"
  fi
fi
[[ -n "$master_addr" ]] && launcher+=(--master_addr "$master_addr")
if [[ -z "$master_port" ]]; then
  master_port="$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
fi
launcher+=(--master_port "$master_port")

[[ -n "${DS_CONFIG:-}" ]] && recipe=(--deepspeed "$DS_CONFIG" "${recipe[@]}")

echo "+ deepspeed ${launcher[*]} $script ${recipe[*]}" >&2
# The launcher's own processes log as DeepSpeed does (on a machine without a GPU that includes its
# "Setting accelerator to CPU" notice); the ranks run the recipe, which hides that notice (engine.run_recipe).
exec deepspeed "${launcher[@]}" "$script" "${recipe[@]}"

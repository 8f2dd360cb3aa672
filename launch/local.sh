#!/usr/bin/env bash
# Run N training processes on this machine: a multi-host run in miniature,
# for testing. Process i gets --coordinator_address=127.0.0.1:PORT
# --num_processes=N --process_id=i and, with --devices=D, D simulated CPU
# devices (XLA_FLAGS from the environment is kept).
#
#   launch/local.sh [--dry-run] [--processes=N] [--devices=D] [--port=PORT]
#                   [--log_dir=DIR] -- --config=configs/tiny.py --workdir=runs/local
#
# Defaults: 2 processes, 2 devices each, port 12355, logs in runs/local_logs
# (process_<i>.log). $PYTHON picks the interpreter (default python3).
# --dry-run prints the commands instead of running them. The exit status is
# the first failing process's; the others are then stopped.
set -euo pipefail

usage() { sed -n '2,14s/^# \{0,1\}//p' "$0"; }
die() { echo "error: $*" >&2; exit 2; }

dry_run=0
processes=2
devices=2
port=12355
log_dir=runs/local_logs
python=${PYTHON:-python3}
while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    --processes=*) processes=${1#*=} ;;
    --devices=*) devices=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --log_dir=*) log_dir=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (training flags go after --)" ;;
  esac
  shift
done
[[ $processes =~ ^[1-9][0-9]*$ ]] || die "--processes=$processes must be a positive integer"
[[ $devices =~ ^[0-9]+$ ]] || die "--devices=$devices must be a non-negative integer"
[[ $port =~ ^[1-9][0-9]*$ ]] || die "--port=$port must be a port number"
(($#)) || die "pass the training flags after --, e.g. -- --config=configs/tiny.py"

xla_flags=${XLA_FLAGS:-}
if ((devices > 0)); then
  xla_flags="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$devices"
fi

# The command of process $1 (training flags after it), into the array `cmd`.
command_for() {
  local i=$1
  shift
  cmd=(env "XLA_FLAGS=$xla_flags")
  if ((devices > 0)); then cmd+=(JAX_PLATFORMS=cpu); fi
  cmd+=("$python" -m nitp_jax.train "$@" "--coordinator_address=127.0.0.1:$port"
    "--num_processes=$processes" "--process_id=$i")
}

if ((dry_run)); then
  for ((i = 0; i < processes; i++)); do
    command_for "$i" "$@"
    printf -v line '%q ' "${cmd[@]}"
    printf '%s> %q 2>&1 &\n' "$line" "$log_dir/process_$i.log"
  done
  echo wait
  exit 0
fi

mkdir -p "$log_dir"
pids=()
stop_all() { kill "${pids[@]}" 2>/dev/null || true; }
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < processes; i++)); do
  command_for "$i" "$@"
  "${cmd[@]}" >"$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
done
echo "started $processes processes; logs in $log_dir/process_<i>.log"

status=0
remaining=$processes
while ((remaining > 0)); do
  if wait -n; then
    remaining=$((remaining - 1))
  else
    status=$?
    echo "a process failed with status $status; stopping the others" >&2
    stop_all
    break
  fi
done
wait || true
for ((i = 0; i < processes; i++)); do
  echo "--- process $i ($log_dir/process_$i.log), last lines:"
  tail -n 5 "$log_dir/process_$i.log"
done
exit "$status"

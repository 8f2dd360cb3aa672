#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it, copy this checkout to every
# worker, install the requirements there (a venv with jax[tpu]), run the same
# training command on all workers at once (`--worker=all`; they join through
# jax.distributed), collect every worker's log, and delete the VM.
#
#   launch/tpu_vm.sh [--dry-run] --name=NAME --zone=ZONE --accelerator=TYPE
#       --version=RUNTIME [--project=P] [--spot] [--auto_resume]
#       [--max_restarts=N] [--keep] [--log_dir=DIR]
#       -- --config=configs/moe_9b.py --workdir=gs://BUCKET/runs/moe_9b
#
# e.g. --accelerator=v5litepod-16 --version=v2-alpha-tpuv5-lite. The runtime
# needs Python >= 3.11 ($PYTHON on the workers, default python3). --workdir
# must outlive the VM and, with several workers, be shared by all of them:
# a gs:// bucket (checkpoints are written by all processes together).
# --auto_resume (for --spot or other preemptible capacity): when copying,
# setup or training fails and the VM was preempted (state PREEMPTED) or is
# gone, delete and recreate it and rerun the same command, which resumes from
# the newest checkpoint in --workdir; at most --max_restarts times (default
# 10). Other failures are not retried. Logs (of the last VM) land in
# DIR/logs/<worker hostname>.log (default runs/tpu_logs). The VM is deleted at
# the end, also after a failure, unless --keep. --dry-run prints the commands.
set -euo pipefail

usage() { sed -n '2,22s/^# \{0,1\}//p' "$0"; }
die() { echo "error: $*" >&2; exit 2; }

root=$(cd "$(dirname "$0")/.." && pwd)
dry_run=0
name=""
zone=""
accelerator=""
version=""
project=""
spot=0
auto_resume=0
max_restarts=10
keep=0
log_dir=runs/tpu_logs
python=${PYTHON:-python3}
while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --accelerator=*) accelerator=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --spot) spot=1 ;;
    --auto_resume) auto_resume=1 ;;
    --max_restarts=*) max_restarts=${1#*=} ;;
    --keep) keep=1 ;;
    --log_dir=*) log_dir=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (training flags go after --)" ;;
  esac
  shift
done
for required in name zone accelerator version; do
  [[ -n ${!required} ]] || die "--$required=... is required (see --help)"
done
(($#)) || die "pass the training flags after --, e.g. -- --config=configs/tiny.py"
[[ $max_restarts =~ ^[0-9]+$ ]] || die "--max_restarts=$max_restarts must be a non-negative integer"
if ((auto_resume)) && [[ " $* " != *" --workdir=gs://"* ]]; then
  echo "warning: --auto_resume: pass --workdir=gs://BUCKET/... (or another place that" \
    "outlives the VM), or every restart trains from scratch" >&2
fi

jax_version=$(sed -n 's/^jax==//p' "$root/requirements.txt")
archive="$log_dir/nitp_jax.tar.gz"
where=("--zone=$zone")
[[ -n $project ]] && where+=("--project=$project")
tpu=(gcloud compute tpus tpu-vm)

# Print (--dry-run) or run one command.
run() {
  if ((dry_run)); then
    printf -v line '%q ' "$@"
    echo "${line% }"
  else
    "$@"
  fi
}

# Commands for the workers' shell ($HOME there); the training flags are quoted.
printf -v train_flags '%q ' "$@"
setup="rm -rf nitp_jax && mkdir -p nitp_jax && tar -xzf nitp_jax.tar.gz -C nitp_jax"
setup+=" && $python -m venv nitp_venv && nitp_venv/bin/python -m pip install -q"
setup+=" -r nitp_jax/requirements.txt 'jax[tpu]==$jax_version'"
# shellcheck disable=SC2016  # $(hostname) is for the worker's shell
log='logs/$(hostname).log'
train="set -o pipefail; cd nitp_jax && mkdir -p logs && ../nitp_venv/bin/python"
train+=" -m nitp_jax.train --distributed=on ${train_flags% } 2>&1 | tee $log"

created=0
finish() {
  local status=$?
  if ((created)); then
    run "${tpu[@]}" scp --recurse "$name:nitp_jax/logs" "$log_dir" --worker=all "${where[@]}" ||
      echo "warning: could not collect the logs" >&2
    if ((keep)); then
      echo "kept $name; delete it with: ${tpu[*]} delete $name ${where[*]} --quiet" >&2
    else
      run "${tpu[@]}" delete "$name" "${where[@]}" --quiet
    fi
  fi
  exit "$status"
}
trap finish EXIT

create=("${tpu[@]}" create "$name" "${where[@]}" "--accelerator-type=$accelerator"
  "--version=$version")
((spot)) && create+=(--spot)
run mkdir -p "$log_dir"
run tar -czf "$archive" --exclude=./.git --exclude=./runs --exclude=./.venv \
  --exclude=__pycache__ --exclude=nitp_jax.tar.gz -C "$root" .

# Copy, set up and train on the current VM; the status of the first failure.
attempt() {
  run "${tpu[@]}" scp "$archive" "$name:nitp_jax.tar.gz" --worker=all "${where[@]}" &&
    run "${tpu[@]}" ssh "$name" --worker=all "${where[@]}" "--command=$setup" &&
    run "${tpu[@]}" ssh "$name" --worker=all "${where[@]}" "--command=$train"
}

# Prints "preempted" or "gone" when the VM was taken away, nothing when it is
# still there (then the failure was the command's own).
vm_lost() {
  local state errors="$log_dir/describe.err"
  if state=$("${tpu[@]}" describe "$name" "${where[@]}" '--format=value(state)' 2>"$errors"); then
    if [[ $state == PREEMPTED ]]; then echo preempted; fi
  elif grep -q NOT_FOUND "$errors"; then
    echo gone
  fi
}

run "${create[@]}"
created=1
restarts=0
until attempt; do
  status=$?
  lost=""
  if ((auto_resume)); then lost=$(vm_lost); fi
  [[ -n $lost ]] || exit "$status"
  if [[ $lost == gone ]]; then created=0; fi  # nothing left to collect or delete
  if ((restarts >= max_restarts)); then
    echo "error: $name was $lost again after $restarts restarts (--max_restarts=$max_restarts)" >&2
    exit "$status"
  fi
  restarts=$((restarts + 1))
  echo "$name was $lost: recreating it (restart $restarts of at most $max_restarts);" \
    "the run resumes from the newest checkpoint in --workdir" >&2
  if ((created)); then run "${tpu[@]}" delete "$name" "${where[@]}" --quiet; fi
  created=0
  run "${create[@]}"
  created=1
done

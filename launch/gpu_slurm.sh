#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one task per node, each seeing all of its
# node's GPUs. The processes find each other from the SLURM environment
# (coordinator = first node of the step, rank = SLURM_PROCID; see
# nitp_jax/distributed.py), so the same command runs on every node.
#
#   launch/gpu_slurm.sh [--dry-run] --nodes=N [--gpus_per_node=8]
#       [--partition=P] [--account=A] [--time=HH:MM:SS] [--job_name=nitp]
#       [--log_dir=runs/slurm] -- --config=configs/moe_9b.py --workdir=/shared/runs/moe_9b
#
# Outside an allocation it submits a batch job (sbatch; output in
# LOG_DIR/<job name>-<job id>.out); inside one (SLURM_JOB_ID set, e.g. under
# salloc) it runs srun directly. Run it from this checkout with its
# environment active ($PYTHON, default python3, must have the requirements on
# every node); --workdir must be on a filesystem all nodes share. Across
# nodes, set --config.mesh.dcn_data (or dcn_fsdp) to the node count so only
# that axis crosses the slower network. --dry-run prints the command.
set -euo pipefail

usage() { sed -n '2,18s/^# \{0,1\}//p' "$0"; }
die() { echo "error: $*" >&2; exit 2; }

dry_run=0
nodes=""
gpus_per_node=8
partition=""
account=""
time_limit=""
job_name=nitp
log_dir=runs/slurm
python=${PYTHON:-python3}
while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    --nodes=*) nodes=${1#*=} ;;
    --gpus_per_node=*) gpus_per_node=${1#*=} ;;
    --partition=*) partition=${1#*=} ;;
    --account=*) account=${1#*=} ;;
    --time=*) time_limit=${1#*=} ;;
    --job_name=*) job_name=${1#*=} ;;
    --log_dir=*) log_dir=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (training flags go after --)" ;;
  esac
  shift
done
[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes=N (a positive integer) is required"
[[ $gpus_per_node =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node=$gpus_per_node must be a positive integer"
(($#)) || die "pass the training flags after --, e.g. -- --config=configs/tiny.py"

train=("$python" -m nitp_jax.train "$@")
step=(srun "--nodes=$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 "${train[@]}")

if [[ -n ${SLURM_JOB_ID:-} ]]; then
  cmd=("${step[@]}")
else
  printf -v wrapped '%q ' "${step[@]}"
  cmd=(sbatch "--job-name=$job_name" "--nodes=$nodes" --ntasks-per-node=1
    "--gpus-per-node=$gpus_per_node" "--output=$log_dir/%x-%j.out")
  [[ -n $partition ]] && cmd+=("--partition=$partition")
  [[ -n $account ]] && cmd+=("--account=$account")
  [[ -n $time_limit ]] && cmd+=("--time=$time_limit")
  cmd+=("--wrap=${wrapped% }")
fi

if ((dry_run)); then
  printf -v line '%q ' "${cmd[@]}"
  echo "${line% }"
  exit 0
fi
[[ -n ${SLURM_JOB_ID:-} ]] || mkdir -p "$log_dir"
exec "${cmd[@]}"

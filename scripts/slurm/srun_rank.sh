#!/usr/bin/env bash
# Runs one rank under `srun` (one task per rank): exports what torch.distributed's env:// init
# and Megatron read, from the variables srun sets for each task, then execs "$@".
#   usage: MASTER_ADDR=host MASTER_PORT=port srun ... scripts/slurm/srun_rank.sh python train.py ...
set -euo pipefail

: "${MASTER_ADDR:?set MASTER_ADDR to the first node of the job}"
: "${MASTER_PORT:?set MASTER_PORT}"
export MASTER_ADDR MASTER_PORT
export RANK="$SLURM_PROCID"
export LOCAL_RANK="$SLURM_LOCALID"
export WORLD_SIZE="$SLURM_NTASKS"
# Tasks on this node: SLURM_STEP_TASKS_PER_NODE lists them per node, compressed ("4(x2),3").
local_tasks() {
    local entries entry count repeat node=0
    IFS=, read -r -a entries <<< "$SLURM_STEP_TASKS_PER_NODE"
    for entry in "${entries[@]}"; do
        count="${entry%%(*}"
        repeat=1
        if [[ "$entry" == *"(x"* ]]; then repeat="${entry##*(x}"; repeat="${repeat%)}"; fi
        if (( SLURM_NODEID < node + repeat )); then echo "$count"; return; fi
        node=$(( node + repeat ))
    done
    echo 1
}
LOCAL_WORLD_SIZE="$(local_tasks)"
export LOCAL_WORLD_SIZE
export GROUP_RANK="$SLURM_NODEID"
# Like torchrun: one OpenMP thread per rank unless the user chose otherwise.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

exec "$@"

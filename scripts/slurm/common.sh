# shellcheck shell=bash
# Shared logic of the megatron_lora SLURM batch scripts; sourced, never run.
#
# One home per concern: defaults of the user-facing variables, the rendezvous endpoint,
# requeue-safe resume detection, the job header, and running the launch command so that a
# USR1 sent before the time limit requeues the job. The batch scripts only say how to launch.

# ---- user-facing variables (all overridable from the environment sbatch passes in) ----------
CONFIG="${CONFIG:-configs/cpu_demo.yaml}"
RUN_DIR="${RUN_DIR:-runs/${SLURM_JOB_NAME:-megatron-lora}}"
SCRIPT="${SCRIPT:-scripts/finetune_gpt.py}"
PYTHON="${PYTHON:-python}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
CKPT_DIR="${RUN_DIR}/checkpoints"

die() { echo "error: $*" >&2; exit 2; }

[[ -n "${SLURM_JOB_ID:-}" ]] || die "run this with sbatch, not directly"
[[ -f "$CONFIG" ]] || die "CONFIG=$CONFIG not found (relative paths are from $PWD)"
[[ -f "$SCRIPT" ]] || die "SCRIPT=$SCRIPT not found (relative paths are from $PWD)"
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found"

# Processes per node: the GPUs this job sees; on a CPU-only node at most 2 ranks (the CPU
# demo's TP=2), since more CPU ranks only fight over the same cores.
default_nproc_per_node() {
    local gpus=0
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        gpus="$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    fi
    if (( gpus > 0 )); then
        echo "$gpus"
    else
        local cpus="${SLURM_CPUS_ON_NODE:-1}"
        echo $(( cpus < 2 ? cpus : 2 ))
    fi
}
NPROC_PER_NODE="${NPROC_PER_NODE:-$(default_nproc_per_node)}"

# ---- rendezvous: the first node of the allocation, a port that differs between jobs ---------
# Deriving the port from the job id lets two jobs share a node without colliding.
RDZV_HOST="${RDZV_HOST:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}"
RDZV_PORT="${RDZV_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}"

# ---- resume: only when a checkpoint was completed -------------------------------------------
# The training script errors on --load of a folder without a checkpoint, and a requeued job
# must pick up where the last one stopped: decide from the tracker file the saver writes last.
mkdir -p logs "$RUN_DIR"
RESUME_ARGS=()
RESUME_ITER=""
if [[ -f "$CKPT_DIR/latest_checkpointed_iteration.txt" ]]; then
    RESUME_ITER="$(tr -d '[:space:]' < "$CKPT_DIR/latest_checkpointed_iteration.txt")"
    RESUME_ARGS=(--load "$CKPT_DIR")
fi

# EXTRA_ARGS is split on spaces and newlines, like on a command line (no quoting inside it).
read -r -d '' -a EXTRA_ARRAY <<< "$EXTRA_ARGS" || true

# Arguments every launcher passes to the training script.
TRAIN_ARGS=(--config "$CONFIG" --save "$CKPT_DIR" "${RESUME_ARGS[@]}" "${EXTRA_ARRAY[@]}")

print_header() {  # $1: how the ranks are launched
    echo "=================================================================="
    echo "megatron_lora job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-?}) restart ${SLURM_RESTART_COUNT:-0}"
    echo "  started    $(date -Is) in $PWD (commit $(git rev-parse --short HEAD 2>/dev/null || echo ?))"
    echo "  nodes      ${SLURM_NNODES:-1}: ${SLURM_JOB_NODELIST}"
    echo "  launch     $1, ${NPROC_PER_NODE} processes per node"
    echo "  rendezvous ${RDZV_HOST}:${RDZV_PORT}"
    echo "  script     ${SCRIPT} (${PYTHON})"
    echo "  config     ${CONFIG}"
    echo "  run dir    ${RUN_DIR}"
    if [[ -n "$RESUME_ITER" ]]; then
        echo "  mode       resume from iteration ${RESUME_ITER} (--load ${CKPT_DIR})"
    else
        echo "  mode       fresh start (no checkpoint in ${CKPT_DIR})"
    fi
    echo "  extra args ${EXTRA_ARGS:-none}"
    echo "=================================================================="
}

# Runs "$@" (an srun command) in the background so the shell can take USR1, which sbatch's
# --signal=B:USR1@T sends T seconds before the time limit: the handler requeues the job, SLURM
# then stops the step (SIGTERM, SIGKILL after KillWait) and later starts the script again, which
# resumes from the last checkpoint. bash runs traps only between commands, hence `&` + `wait`.
on_usr1() {
    echo "$(date -Is) USR1: time limit near, requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID" || echo "warning: scontrol requeue failed" >&2
}
run_requeueable() {
    trap on_usr1 USR1
    echo "+ $*"
    "$@" &
    local pid=$! rc=0
    while :; do
        rc=0
        wait "$pid" || rc=$?
        # A trapped signal interrupts `wait` with rc > 128 while the step still runs: wait again.
        if (( rc > 128 )) && kill -0 "$pid" 2>/dev/null; then continue; fi
        break
    done
    trap - USR1
    echo "$(date -Is) step finished with exit code $rc"
    return "$rc"
}

# ---- the launchers ---------------------------------------------------------------------------
# srun since 22.05 does not pass sbatch's --cpus-per-task on to its steps: pass it explicitly.
srun_cpu_args() {
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then echo "--cpus-per-task=$SLURM_CPUS_PER_TASK"; fi
}

# One torchrun per node (srun task), each starting NPROC_PER_NODE ranks that meet at the c10d
# rendezvous on the first node. `python -m torch.distributed.run` is torchrun, run by $PYTHON.
launch_torchrun() {
    print_header "srun, one torchrun per node (c10d rendezvous)"
    # shellcheck disable=SC2046  # srun_cpu_args prints zero or one word
    run_requeueable srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks-per-node=1 \
        $(srun_cpu_args) \
        "$PYTHON" -m torch.distributed.run \
            --nnodes "$SLURM_NNODES" --nproc-per-node "$NPROC_PER_NODE" \
            --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d \
            --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" \
            "$SCRIPT" "${TRAIN_ARGS[@]}"
}

# One srun task per rank, no torchrun: srun_rank.sh turns SLURM's task variables into the
# RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT that torch's env:// init reads.
# The job's --ntasks-per-node sets the ranks per node (NPROC_PER_NODE is not used).
launch_srun_ranks() {
    NPROC_PER_NODE="${SLURM_NTASKS_PER_NODE:-$(( SLURM_NTASKS / SLURM_NNODES ))}"
    print_header "srun, one task per rank (env:// init)"
    # shellcheck disable=SC2046
    run_requeueable srun --kill-on-bad-exit=1 $(srun_cpu_args) \
        env MASTER_ADDR="$RDZV_HOST" MASTER_PORT="$RDZV_PORT" \
        bash scripts/slurm/srun_rank.sh "$PYTHON" "$SCRIPT" "${TRAIN_ARGS[@]}"
}

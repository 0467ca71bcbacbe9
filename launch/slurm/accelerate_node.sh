#!/usr/bin/env bash
# One SLURM task per node (started by srun from launch/slurm/finetune.sbatch): builds this node's `accelerate launch`
# command from the SLURM environment and runs it. DPMIX_DRY_RUN=1 prints it instead (one line, shell-quoted): what
# tests/test_recipes.py checks under a fake SLURM environment.
#
# From SLURM:  SLURM_NNODES        machines (--num_machines)
#              SLURM_NODEID        this machine's rank, 0 on the first host of the node list (--machine_rank)
#              SLURM_JOB_NODELIST  its first host (`scontrol show hostnames`) is the head (--main_process_ip)
#              SLURM_GPUS_ON_NODE  processes per machine; --num_processes is the total, machines x GPUs per machine
# Overrides:   GPUS_PER_NODE, MAIN_PROCESS_PORT (29500), ACCELERATE_CONFIG (configs/accelerate/multinode.yaml, whose
#              machine counts and addresses the flags above replace), SCRIPT (launch/finetune.py)
# Arguments:   passed to SCRIPT unchanged, e.g. --config NAME KEY=VALUE ... --output-dir DIR [--resume]
set -euo pipefail

fail() {
    echo "error: $*" >&2
    exit 2
}

for var in SLURM_NNODES SLURM_NODEID SLURM_JOB_NODELIST; do
    [[ -n "${!var:-}" ]] ||
        fail "$var is not set: run this through srun in a SLURM allocation (launch/slurm/finetune.sbatch)"
done
gpus_per_node=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
[[ "$gpus_per_node" =~ ^[1-9][0-9]*$ ]] ||
    fail "GPUs per node unknown (SLURM_GPUS_ON_NODE='${SLURM_GPUS_ON_NODE:-}'): request them with" \
        "#SBATCH --gpus-per-node=N, or set GPUS_PER_NODE"

# The head is the node of machine rank 0: SLURM numbers nodes (SLURM_NODEID) in the order of the expanded list.
host_lines=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
mapfile -t hosts <<<"$host_lines"
((${#hosts[@]} == SLURM_NNODES)) ||
    fail "SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST expands to ${#hosts[@]} hosts but SLURM_NNODES=$SLURM_NNODES"
((SLURM_NODEID >= 0 && SLURM_NODEID < SLURM_NNODES)) ||
    fail "SLURM_NODEID=$SLURM_NODEID is not below SLURM_NNODES=$SLURM_NNODES"

command=(
    accelerate launch
    --config_file "${ACCELERATE_CONFIG:-configs/accelerate/multinode.yaml}"
    --num_machines "$SLURM_NNODES"
    --machine_rank "$SLURM_NODEID"
    --main_process_ip "${hosts[0]}"
    --main_process_port "${MAIN_PROCESS_PORT:-29500}"
    --num_processes "$((SLURM_NNODES * gpus_per_node))"
    "${SCRIPT:-launch/finetune.py}"
    "$@"
)
if [[ "${DPMIX_DRY_RUN:-0}" == 1 ]]; then
    printf '%q' "${command[0]}"
    printf ' %q' "${command[@]:1}"
    printf '\n'
    exit 0
fi
exec "${command[@]}"

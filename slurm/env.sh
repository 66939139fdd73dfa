# shellcheck shell=bash
# The one place for a lowbit Slurm job's environment. Sourced by slurm/train.sbatch in the batch
# shell (srun passes the exported variables on to every rank) and by the Hydra Slurm launcher's
# `setup` (conf/hydra/launcher/slurm.yaml). Safe under `set -u`; outside a job it only sets defaults.
#
# Site-specific NCCL settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) belong in the submitting
# shell or a site file; export them before sbatch and they reach the ranks unchanged.

# One OpenMP thread per CPU Slurm gave the task (2 ranks on 2 cores run ~40x slower without this).
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK
else
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

# torch.distributed rendezvous: the first node of the job, a port derived from the job id so that
# two jobs sharing a node do not collide. Always recomputed inside a job: a MASTER_* left over in
# the submitting shell (sbatch exports it) would point at the wrong host.
if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    export MASTER_ADDR
    export MASTER_PORT=$((20000 + ${SLURM_JOB_ID:-0} % 20000))
else
    export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
    export MASTER_PORT=${MASTER_PORT:-29500}
fi

# NCCL: surface errors instead of hanging; quiet unless asked.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-0}

# Logging: W&B offline unless the user opted in (`WANDB_MODE=online sbatch ...`); no buffering so
# the job log follows the run.
export WANDB_MODE=${WANDB_MODE:-offline}
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

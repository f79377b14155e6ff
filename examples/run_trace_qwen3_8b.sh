#!/usr/bin/env bash
# TRACE on Qwen3-8B across nodes of 8 GPUs: TP=4 inside a node, data parallel across the rest.
#   HF_DIR=/ckpt/Qwen3-8B DATA=/data/math.jsonl NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 bash examples/run_trace_qwen3_8b.sh
#   sbatch --nodes 4 --gpus-per-node 8 --wrap "srun --ntasks-per-node=1 bash examples/run_trace_qwen3_8b.sh"
#   sbatch --nodes 4 --gpus-per-node 8 --wrap "bash examples/run_trace_qwen3_8b.sh"   # starts itself per node
# (Slurm: NNODES, NODE_RANK, MASTER_ADDR read from SLURM_*; HF_DIR/DATA/MEGATRON_DIR on a filesystem all nodes see.)
# Extra arguments are dotted config overrides (e.g. rollout.group_size=16).
CONFIG=examples/configs/qwen3_8b.yaml TP=${TP:-4} PP=${PP:-1}
source "$(dirname "$0")/lib/launch_trace.sh"

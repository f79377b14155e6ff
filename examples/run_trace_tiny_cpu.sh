#!/usr/bin/env bash
# The tiny TRACE run on CPU (what `make demo` runs), ~4 minutes on a 2-core machine (40 s of them the warm-start):
#   1. supervised warm-start of a random tiny Qwen3 on the shipped worked arithmetic solutions (student and
#      privileged-prompt formats), so that sampling finds some correct answers;
#   2. TRACE from that checkpoint: rollouts on real vLLM (CPU build) in a colocated generation server (one per
#      node, started by its local rank 0, asleep while training, refreshed through /dev/shm after each step),
#      rewards by math-verify, error spans by the rule-based reference-match annotator, reverse KL to the
#      privileged teacher on the error spans of incorrect responses (annealed away after the warm-up; the best
#      TRACE arm of the tiny grid, docs/results_tiny_cpu.md), GRPO everywhere else; TP=2 over two gloo processes;
#   3. the reward curve, then this run beside the shipped GRPO curve of the results page (mean of its 3 seeds).
#
#   OUTPUT_DIR=runs/tiny_cpu bash examples/run_trace_tiny_cpu.sh   # metrics in $OUTPUT_DIR/metrics.jsonl
# Extra dotted overrides go to the TRACE run: bash examples/run_trace_tiny_cpu.sh train.steps=10
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUTPUT_DIR=${OUTPUT_DIR:-runs/tiny_cpu}
NPROC=${NPROC:-2}
SFT_STEPS=${SFT_STEPS:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# --standalone: torchrun picks a free local port (MASTER_PORT pins one instead)
rdzv=(--standalone)
[[ -n "${MASTER_PORT:-}" ]] && rdzv=(--master-port "$MASTER_PORT")
run() { "$PY" -m torch.distributed.run --nproc-per-node "$NPROC" "${rdzv[@]}" -m megatron_trace.train "$@"; }

echo "== 1/3 supervised warm-start (tiny Qwen3, TP=$NPROC) -> $OUTPUT_DIR/sft"
# checkpoint.overwrite: the demo starts over each time it is run (a run refuses, by default, to start fresh in a
# folder that holds another run's checkpoints).
run --config examples/configs/tiny_cpu_sft.yaml "parallel.tp=$NPROC" "logging.output_dir=$OUTPUT_DIR/sft" \
    checkpoint.overwrite=true \
    ${SFT_STEPS:+"train.steps=$SFT_STEPS"}

echo "== 2/3 TRACE from the warm-start -> $OUTPUT_DIR"
run --config examples/configs/tiny_cpu.yaml "parallel.tp=$NPROC" "logging.output_dir=$OUTPUT_DIR" checkpoint.overwrite=true \
    "model.load=$OUTPUT_DIR/sft/checkpoints" rollout.placement=colocated "$@"

echo "== 3/3 reward over the TRACE run"
"$PY" tools/show_metrics.py "$OUTPUT_DIR/metrics.jsonl" --key reward_mean --extra lambda kl_rkl entropy response_len \
    --reference docs/results_tiny_cpu/grpo_reward_mean.json

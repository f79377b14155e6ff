#!/usr/bin/env bash
# TRACE on Qwen3-1.7B with reverse KL on error spans (the route the paper found best at 1.7B); one node of
# 8 GPUs is plenty: TP=2, data parallel 4.
#   HF_DIR=/ckpt/Qwen3-1.7B DATA=/data/math.jsonl bash examples/run_trace_qwen3_1p7b.sh
CONFIG=examples/configs/qwen3_1p7b.yaml TP=${TP:-2} PP=${PP:-1}
source "$(dirname "$0")/lib/launch_trace.sh"

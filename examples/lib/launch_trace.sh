# Shared by the multi-node launch scripts: rendezvous from Slurm or the environment, HF -> Megatron conversion on
# first use, then one torchrun of the trainer per node. Source it after setting CONFIG (relative to the repository
# root), HF_DIR, TP, PP.
#
# Environment (all optional except HF_DIR and DATA; relative paths are taken from the directory you launch from):
#   HF_DIR           the Hugging Face checkpoint (config.json + safetensors + tokenizer)
#   DATA             a local JSONL/Parquet of problems with reference solutions
#   MEGATRON_DIR     where the converted checkpoint goes (default: $HF_DIR-megatron-tp$TP-pp$PP); with several
#                    nodes it must be on a filesystem every node sees (node 0 converts, the others wait for it)
#   OUTPUT_DIR       run directory (metrics.jsonl, TensorBoard, checkpoints)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE   (read from Slurm under srun/sbatch)
#   CONVERT_WAIT_S   how long other nodes wait for node 0's conversion (default 7200 s)
#   CONVERT_START_S  how long they wait for it to START, i.e. for its marker to appear (default 600 s): a node
#                    that never sees it does not share MEGATRON_DIR's filesystem with node 0
#   ROLLOUT_URL      an already running generation server (tools/serve_rollout.py); default: the recipe's
#                    rollout.placement (colocated: servers on every node's GPUs, started by the trainer)
#   ROLLOUT_URLS     several running generation servers, comma-separated (e.g. one per rollout node:
#                    http://node5:8100,http://node6:8100), used in data parallel: each step's prompts are split
#                    over them and every weight update goes to all; all must accept the same bearer token
#                    ($MEGATRON_TRACE_ROLLOUT_TOKEN). Set ROLLOUT_URL or ROLLOUT_URLS, not both.
#
# Slurm: `sbatch --nodes N --wrap "srun --ntasks-per-node=1 bash examples/run_....sh"`, or plain
# `sbatch --nodes N --wrap "bash examples/run_....sh"` (the batch script then starts itself on every node through
# srun). Under srun with several tasks per node, only each node's first task launches (torchrun starts one process
# per GPU itself); the others exit 0.
set -euo pipefail
: "${HF_DIR:?set HF_DIR to the Hugging Face checkpoint folder}"
: "${DATA:?set DATA to a local JSONL/Parquet file of problems with reference solutions}"
_trace_lib="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
_trace_abs() { if [[ "$1" == /* ]]; then printf '%s' "$1"; else printf '%s/%s' "$PWD" "$1"; fi; }
# Relative paths are the caller's: resolve them before the cd below.
HF_DIR=$(_trace_abs "$HF_DIR")
DATA=$(_trace_abs "$DATA")
[[ -n "${MEGATRON_DIR:-}" ]] && MEGATRON_DIR=$(_trace_abs "$MEGATRON_DIR")
[[ -n "${OUTPUT_DIR:-}" ]] && OUTPUT_DIR=$(_trace_abs "$OUTPUT_DIR")
cd "$(dirname "$_trace_lib")/../.."
PY=${PY:-python}
_trace_log() { echo "[launch_trace node ${NODE_RANK:-?}] $*" >&2; }

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  if [[ -z "${SLURM_STEP_ID:-${SLURM_STEPID:-}}" && "${SLURM_NNODES:-1}" -gt 1 && -z "${NNODES:-}" ]]; then
    # The batch script itself (plain sbatch, no srun): it runs on the first node only. Start this launcher once
    # per node as a job step; every variable it needs travels in the environment.
    export CONFIG TP PP HF_DIR DATA PY
    [[ -n "${MEGATRON_DIR:-}" ]] && export MEGATRON_DIR
    [[ -n "${OUTPUT_DIR:-}" ]] && export OUTPUT_DIR
    _trace_log "batch script on ${SLURM_NNODES} nodes: starting one launcher per node with srun"
    exec srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
      bash -c 'source "$0" "$@"' "$_trace_lib" "$@"
  fi
  if [[ -n "${SLURM_STEP_ID:-${SLURM_STEPID:-}}" && "${SLURM_LOCALID:-0}" != 0 ]]; then
    _trace_log "srun task ${SLURM_PROCID:-?} is local task ${SLURM_LOCALID} of its node: its first task launches" \
      "torchrun for the whole node; exiting"
    exit 0
  fi
  NNODES=${NNODES:-${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}}}
  NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
  # sed reads the whole list: `head -n 1` would close the pipe early, and under pipefail scontrol's SIGPIPE
  # fails the assignment.
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}" | sed -n 1p)}
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MEGATRON_DIR=${MEGATRON_DIR:-${HF_DIR%/}-megatron-tp${TP}-pp${PP}}

# Convert once (node 0); the other nodes wait for the finished (atomically renamed) folder. Node 0 leaves markers
# beside it on the shared filesystem, tagged with this run's id: `.converting` when it starts, `.failed` if the
# conversion fails, so the others stop waiting instead of hanging.
_run_id="${SLURM_JOB_ID:-}:${MASTER_ADDR}:${MASTER_PORT}"
_marker_for_this_run() { [[ -f "$1" ]] && [[ "$(cat "$1" 2>/dev/null)" == "$_run_id" ]]; }
if [[ ! -d "$MEGATRON_DIR" ]]; then
  if [[ "$NODE_RANK" == 0 ]]; then
    mkdir -p "$(dirname "$MEGATRON_DIR")"
    rm -f "$MEGATRON_DIR.failed"
    echo "$_run_id" > "$MEGATRON_DIR.converting"
    if ! "$PY" tools/convert_checkpoint.py hf-to-megatron --hf-dir "$HF_DIR" --out-dir "$MEGATRON_DIR" \
        --tp "$TP" --pp "$PP"; then
      echo "$_run_id" > "$MEGATRON_DIR.failed"
      rm -f "$MEGATRON_DIR.converting"
      _trace_log "conversion of $HF_DIR failed; the other nodes stop waiting"
      exit 1
    fi
    rm -f "$MEGATRON_DIR.converting"
  else
    _start=$SECONDS
    _seen_start=0
    while [[ ! -d "$MEGATRON_DIR" ]]; do
      if _marker_for_this_run "$MEGATRON_DIR.failed"; then
        _trace_log "node 0 failed to convert $HF_DIR into $MEGATRON_DIR (see node 0's log)"
        exit 1
      fi
      _marker_for_this_run "$MEGATRON_DIR.converting" && _seen_start=1
      _waited=$((SECONDS - _start))
      if [[ "$_seen_start" == 0 && "$_waited" -ge "${CONVERT_START_S:-600}" ]]; then
        _trace_log "after ${_waited}s this node sees neither $MEGATRON_DIR nor node 0's marker" \
          "$MEGATRON_DIR.converting: MEGATRON_DIR must be on a filesystem shared by all nodes"
        exit 1
      fi
      if [[ "$_waited" -ge "${CONVERT_WAIT_S:-7200}" ]]; then
        _trace_log "waited ${_waited}s for node 0's conversion into $MEGATRON_DIR (CONVERT_WAIT_S); giving up"
        exit 1
      fi
      sleep "${CONVERT_POLL_S:-10}"
    done
  fi
fi

overrides=("parallel.tp=$TP" "parallel.pp=$PP" "model.hf_config=$HF_DIR" "model.tokenizer=$HF_DIR"
           "model.load=$MEGATRON_DIR" "data.path=$DATA")
[[ -n "${OUTPUT_DIR:-}" ]] && overrides+=("logging.output_dir=$OUTPUT_DIR")
# Servers run elsewhere replace the recipe's colocated ones.
[[ -n "${ROLLOUT_URL:-}${ROLLOUT_URLS:-}" ]] && overrides+=("rollout.placement=separate")
[[ -n "${ROLLOUT_URL:-}" ]] && overrides+=("rollout.server_url=$ROLLOUT_URL")
if [[ -n "${ROLLOUT_URLS:-}" ]]; then  # a YAML list: rollout.server_urls=[url1,url2,...]
  IFS=, read -r -a urls <<< "${ROLLOUT_URLS// /}"
  overrides+=("rollout.server_urls=[$(IFS=,; echo "${urls[*]}")]")
fi

export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron's TP/SP comm-compute overlap needs ordered kernels
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megatron_trace.train --config "$CONFIG" "${overrides[@]}" "$@"

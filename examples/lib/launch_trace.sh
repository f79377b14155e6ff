# Shared by the multi-node launch scripts: rendezvous from Slurm or the environment, HF -> Megatron conversion on
# first use, then torchrun of the trainer. Source it after setting CONFIG, HF_DIR, TP, PP.
#
# Environment (all optional except HF_DIR and DATA):
#   HF_DIR           the Hugging Face checkpoint (config.json + safetensors + tokenizer)
#   DATA             a local JSONL/Parquet of problems with reference solutions
#   MEGATRON_DIR     where the converted checkpoint goes (default: $HF_DIR-megatron-tp$TP-pp$PP)
#   OUTPUT_DIR       run directory (metrics.jsonl, TensorBoard, checkpoints)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE   (read from Slurm when under srun/sbatch)
#   ROLLOUT_URL      an already running generation server (tools/serve_rollout.py); default: one beside rank 0
#   ROLLOUT_URLS     several running generation servers, comma-separated (e.g. one per rollout node:
#                    http://node5:8100,http://node6:8100), used in data parallel: each step's prompts are split
#                    over them and every weight update goes to all; all must accept the same bearer token
#                    ($MEGATRON_TRACE_ROLLOUT_TOKEN). Set ROLLOUT_URL or ROLLOUT_URLS, not both.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PY:-python}
: "${HF_DIR:?set HF_DIR to the Hugging Face checkpoint folder}"
: "${DATA:?set DATA to a local JSONL/Parquet file of problems with reference solutions}"

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  NNODES=${NNODES:-$SLURM_NNODES}
  NODE_RANK=${NODE_RANK:-$SLURM_NODEID}
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MEGATRON_DIR=${MEGATRON_DIR:-${HF_DIR%/}-megatron-tp${TP}-pp${PP}}

# Convert once (node 0); the other nodes wait for the finished (atomically renamed) folder.
if [[ ! -d "$MEGATRON_DIR" ]]; then
  if [[ "$NODE_RANK" == 0 ]]; then
    "$PY" tools/convert_checkpoint.py hf-to-megatron --hf-dir "$HF_DIR" --out-dir "$MEGATRON_DIR" --tp "$TP" --pp "$PP"
  else
    while [[ ! -d "$MEGATRON_DIR" ]]; do sleep 10; done
  fi
fi

overrides=("parallel.tp=$TP" "parallel.pp=$PP" "model.hf_config=$HF_DIR" "model.tokenizer=$HF_DIR"
           "model.load=$MEGATRON_DIR" "data.path=$DATA")
[[ -n "${OUTPUT_DIR:-}" ]] && overrides+=("logging.output_dir=$OUTPUT_DIR")
[[ -n "${ROLLOUT_URL:-}" ]] && overrides+=("rollout.server_url=$ROLLOUT_URL")
if [[ -n "${ROLLOUT_URLS:-}" ]]; then  # a YAML list: rollout.server_urls=[url1,url2,...]
  IFS=, read -r -a urls <<< "${ROLLOUT_URLS// /}"
  overrides+=("rollout.server_urls=[$(IFS=,; echo "${urls[*]}")]")
fi

export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron's TP/SP comm-compute overlap needs ordered kernels
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megatron_trace.train --config "$CONFIG" "${overrides[@]}" "$@"

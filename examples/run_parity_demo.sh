#!/usr/bin/env bash
# Parity demo: a tiny random Qwen3 built with transformers is saved as
# an HF checkpoint, loaded into Megatron-Core at tensor parallel 2 (two gloo processes under torchrun), and both
# models score the same tokenised prompt. Prints the largest |logit difference|; exits non-zero above tolerance.
#
#   bash examples/run_parity_demo.sh            # CPU: gloo, fp32, megatron's local layer spec
#   NPROC=1 bash examples/run_parity_demo.sh    # TP=1 instead
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NPROC=${NPROC:-2}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/megatron-trace-demo.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

cat > "$WORK/make_hf.py" <<'EOF'
"""Step 1: a tiny random Qwen3 (config `tiny`, real 151936-token vocab) and its logits on a real prompt."""
import sys

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from megatron_trace.data.tokenizer import load_tokenizer
from megatron_trace.models import load_hf_config

out = sys.argv[1]
torch.manual_seed(0)
cfg = load_hf_config("tiny")
model = Qwen3ForCausalLM(Qwen3Config(**cfg)).float().eval()
with torch.no_grad():  # random norm weights, so that every weight matters
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.2 * torch.randn_like(p))
model.save_pretrained(out)  # config.json + model.safetensors

tokens = load_tokenizer()("Question: what is 17 * 23? Think step by step, then answer in \\boxed{}.",
                          return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = model(input_ids=tokens).logits
torch.save({"tokens": tokens, "logits": logits}, f"{out}/reference.pt")
print(f"transformers Qwen3 '{'tiny'}': {sum(p.numel() for p in model.parameters()):,} parameters, "
      f"prompt of {tokens.shape[1]} tokens")
EOF

cat > "$WORK/megatron_forward.py" <<'EOF'
"""Step 2 (every rank): load the HF checkpoint into Megatron at TP=WORLD_SIZE and compare logits."""
import sys

import torch

torch.set_num_threads(1)

from megatron.core import tensor_parallel

from megatron_trace.checkpoint.hf_mapping import load_hf_state_into_model
from megatron_trace.distributed import destroy_distributed, initialize_distributed
from megatron_trace.models import build_qwen3_model, load_hf_config

hf_dir, tol = sys.argv[1], float(sys.argv[2])
layout = initialize_distributed(tp=int(__import__("os").environ["WORLD_SIZE"]))
try:
    cfg = load_hf_config(hf_dir)
    model = build_qwen3_model(cfg).eval()
    load_hf_state_into_model(model, hf_dir, cfg)
    ref = torch.load(f"{hf_dir}/reference.pt")
    tokens = ref["tokens"]
    with torch.no_grad():
        logits = model(input_ids=tokens, position_ids=torch.arange(tokens.shape[1])[None], attention_mask=None)
        full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)  # [b, s, padded vocab]
    diff = (full[..., : cfg["vocab_size"]] - ref["logits"]).abs().max().item()
    if layout.rank == 0:
        print(f"Megatron-Core Qwen3 at TP={layout.tp}: logits {tuple(full.shape)} (vocab padded to "
              f"{full.shape[-1]}), |logits| up to {ref['logits'].abs().max().item():.3f}")
        print(f"max |logit diff| vs transformers: {diff:.3e} (tolerance {tol:g})")
    ok = diff <= tol
finally:
    destroy_distributed()
sys.exit(0 if ok else 1)
EOF

echo "== 1/2 transformers: build a tiny random Qwen3 and save it as an HF checkpoint"
"$PY" "$WORK/make_hf.py" "$WORK/hf"
echo "== 2/2 Megatron-Core: load it at TP=$NPROC ($NPROC gloo processes) and compare logits"
# --standalone: a local rendezvous on a free port (no clash with other jobs on this machine)
OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    "$WORK/megatron_forward.py" "$WORK/hf" 1e-4
echo "demo OK"

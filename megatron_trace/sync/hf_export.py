"""Write a live Megatron model (any TP/PP) as a Hugging Face folder, streaming through the weight bridge.

Used to start a generation engine from the current policy (a fresh or resumed run whose weights are not an HF
folder yet). Collective: every rank calls it; global rank 0 writes. Atomic: written to a temp folder beside
`out_dir` and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping

import torch.distributed as dist

from megatron_trace.distributed import collectives
from megatron_trace.sync.weight_bridge import export_hf_buckets

__all__ = ["save_hf_folder"]


def save_hf_folder(model, hf_config: Mapping, out_dir: str, *, tokenizer=None, bucket_bytes: int = 1 << 30,
                   dtype=None) -> None:
    """Export `model` to `out_dir` (config.json, model-XXXXX.safetensors + index, tokenizer files if given).

    One safetensors file per bridge bucket, so at most one bucket is in memory at a time.
    """
    from safetensors.torch import save_file

    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = None
    if rank == 0:
        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        weight_map: dict[str, str] = {}
        total = 0
        for i, bucket in enumerate(export_hf_buckets(model, hf_config, bucket_bytes=bucket_bytes, dst=0,
                                                     dtype=dtype)):
            fname = f"model-{i + 1:05d}.safetensors"
            save_file({n: t.contiguous() for n, t in bucket}, os.path.join(tmp, fname), metadata={"format": "pt"})
            for n, t in bucket:
                weight_map[n] = fname
                total += t.numel() * t.element_size()
        if rank == 0:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
            config = dict(hf_config)
            config.setdefault("architectures", ["Qwen3ForCausalLM"])
            config.setdefault("model_type", "qwen3")
            if dtype is not None:
                config["torch_dtype"] = str(dtype).removeprefix("torch.")
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=1)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if os.path.exists(out_dir):
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
            tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        collectives.barrier()

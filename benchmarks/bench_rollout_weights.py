#!/usr/bin/env python
"""How fast do new weights reach vLLM? In-process reload vs HTTP push to a generation server vs a plain memcpy.

Builds a synthetic Qwen3-shaped HF model (Qwen3-0.6B widths, --layers deep, fp32, random weights), starts the
in-process engine on it and pushes the same HF-named tensors (in buckets of --bucket-mb) R times; then does the
same through `tools/serve_rollout.py` (started by `ManagedServer`, as the trainer starts it) + `RolloutClient`.
The baseline is the fastest plain copy of the same bytes into preallocated tensors (copy_yardstick.py: the C
library's memcpy, torch's `copy_` on one thread and on every CPU; the floor for any update). Prints medians,
GB/s, and each method's time as a multiple of the fastest copy's. Each method gets one untimed warm-up call.

    .venv/bin/python benchmarks/bench_rollout_weights.py --layers 16 --repeats 3   # ~7 GB peak RAM
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time

import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from copy_yardstick import copy_references, fastest  # noqa: E402

TOKEN_ENV = "BENCH_ROLLOUT_TOKEN"


def synthetic_qwen3(path: str, layers: int, seed: int) -> dict[str, torch.Tensor]:
    """Write a Qwen3-0.6B-wide model with `layers` layers into `path`; returns its HF-named tensors."""
    from safetensors.torch import save_file
    from transformers import Qwen3Config

    from megatron_trace.data.tokenizer import qwen3_tokenizer_dir

    hidden, inter, heads, kv, hd, vocab = 1024, 3072, 16, 8, 128, 151936
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd, tie_word_embeddings=True,
                      max_position_embeddings=4096, torch_dtype="float32")
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * hd, hidden), p + "self_attn.k_proj.weight": (kv * hd, hidden),
            p + "self_attn.v_proj.weight": (kv * hd, hidden), p + "self_attn.o_proj.weight": (hidden, heads * hd),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    tensors = {n: (torch.randn(s, generator=g) * 0.02 if len(s) == 2 else torch.ones(s)) for n, s in shapes.items()}
    os.makedirs(path, exist_ok=True)
    cfg.save_pretrained(path)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    tok = qwen3_tokenizer_dir()
    for name in os.listdir(tok):
        shutil.copy(os.path.join(tok, name), path)
    return tensors


def buckets_of(tensors: dict[str, torch.Tensor], bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    out, cur, size = [], [], 0
    for name, t in tensors.items():
        cur.append((name, t))
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            out.append(cur)
            cur, size = [], 0
    return out + ([cur] if cur else [])


def timed(fn, repeats: int) -> list[float]:
    """Seconds of `repeats` calls, after one untimed warm-up (first-touch page faults, lazy initialisation)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16,
                    help="depth at Qwen3-0.6B width (16 = 0.41B params, 1.6 GB; 8 = 0.28B); peak RAM ~4x the bytes")
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-http", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # before vLLM replaces it with a no-op; the machine is shared

    work = tempfile.mkdtemp(prefix="bench_rollout_weights_")
    try:
        model_dir = os.path.join(work, "model")
        src = synthetic_qwen3(model_dir, args.layers, seed=0)
        new = {n: t + 0.001 for n, t in src.items()}  # the "trained" weights pushed each repeat
        del src
        nbytes = sum(t.numel() * t.element_size() for t in new.values())
        nparams = sum(t.numel() for t in new.values())
        buckets = buckets_of(new, args.bucket_mb << 20)
        rows = []

        dst = {n: torch.empty_like(t) for n, t in new.items()}
        refs = copy_references([(dst[n], t) for n, t in new.items()], args.repeats)
        rows += [(f"memcpy: {label}", times) for label, times in refs.items()]
        del dst

        from megatron_trace.rollout.engine import EngineConfig, VLLMEngine

        engine = VLLMEngine(EngineConfig(model_dir, max_model_len=128))
        rows.append(("vLLM in-process reload", timed(lambda: engine.update_weights(buckets), args.repeats)))
        engine.close()
        del engine
        gc.collect()  # free the in-process engine's copy before the server process loads its own

        if not args.skip_http:
            rows.append(("HTTP push to server", http_times(model_dir, buckets, args.repeats, work)))

        base = statistics.median(fastest(refs)[1])  # the yardstick
        print(f"\nweights: {nparams / 1e9:.3f} B params, {nbytes / 1e9:.2f} GB fp32, {len(buckets)} buckets of "
              f"~{args.bucket_mb} MiB; {args.repeats} repeats; torch threads 1; host CPUs {os.cpu_count()}")
        print(f"{'method':<40} {'median s':>9} {'min s':>8} {'GB/s':>7} {'x memcpy':>9}")
        for name, times in rows:
            med = statistics.median(times)
            print(f"{name:<40} {med:>9.3f} {min(times):>8.3f} {nbytes / med / 1e9:>7.2f} {med / base:>9.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def http_times(model_dir, buckets, repeats, work) -> list[float]:
    from megatron_trace.rollout.client import ClientConfig, RolloutClient
    from megatron_trace.rollout.launch import ManagedServer

    log_path = os.path.join(work, "server.log")
    try:
        with ManagedServer(model_dir, log_path=log_path, token_env=TOKEN_ENV, token=os.urandom(16).hex(),
                           max_model_len=128, kv_cache_memory_bytes=64 << 20, extra_env={"OMP_NUM_THREADS": "1"},
                           die_with_parent=True) as server:
            cfg = ClientConfig(base_url=server.url, token_env=TOKEN_ENV, timeout_s=600, retries=0)
            with RolloutClient(cfg) as client:
                return timed(lambda: client.update_weights(buckets), repeats)
    finally:
        if os.path.exists(log_path):
            with open(log_path) as log:
                print("server-side timings:\n" + "".join(line for line in log if "rollout.server" in line))


if __name__ == "__main__":
    main()

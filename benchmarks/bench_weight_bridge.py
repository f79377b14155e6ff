#!/usr/bin/env python
"""How long does a weight sync take from a Megatron model at TP=2 into vLLM? Bridge, in-process reload, HTTP push,
against a plain memcpy of the same bytes.

A synthetic Qwen3 (Qwen3-0.6B widths, --layers deep, tied embedding, fp32, random weights) is built by Megatron at
TP=2 on two local ranks (gloo). Rows, each the median of --repeats runs:
- memcpy: plain copies of every exported tensor into preallocated tensors (copy_yardstick.py: the C library's
  memcpy, torch's `copy_` on one thread and on every CPU; the floor for any update), the fastest the yardstick.
- bridge only: `export_hf_buckets` on both ranks, rank 0 dropping each bucket (TP gather + merge + HF layout).
- bridge -> HTTP server: rank 0 streams the bridge's buckets into `RolloutClient.update_weights`, which pushes
  them to `tools/serve_rollout.py` (a separate process), timed until the server has applied them: the path of a
  multi-rank trainer.
- in-process reload: `VLLMEngine.update_weights` of the same buckets, in a process of its own (vLLM cannot share
  a process with a multi-rank gloo world), and bridge + in-process = the sum of the two medians (what a
  colocated trainer would pay if the bridge could feed an engine in its own process).
Ratios are each row's median over the fastest copy's median, measured in the same run.

    .venv/bin/python benchmarks/bench_weight_bridge.py --layers 16 --repeats 3     # ~9 GB peak RAM, ~6 min
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from copy_yardstick import copy_references, fastest  # noqa: E402
from dist_harness import run_distributed  # noqa: E402

TOKEN_ENV = "BENCH_WEIGHT_BRIDGE_TOKEN"


def hf_config(layers: int) -> dict:
    """Qwen3-0.6B's widths (hidden 1024, 16 heads, 8 KV heads, head_dim 128, vocab 151,936), `layers` deep."""
    return dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
                intermediate_size=3072, num_hidden_layers=layers, max_window_layers=layers,
                num_attention_heads=16, num_key_value_heads=8, head_dim=128, hidden_act="silu",
                max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None,
                tie_word_embeddings=True, attention_bias=False, attention_dropout=0.0, torch_dtype="float32",
                initializer_range=0.02, use_cache=True, use_sliding_window=False, sliding_window=None,
                bos_token_id=151643, eos_token_id=151645)


def write_initial_folder(path: str, cfg: dict) -> None:
    """The folder the engines start from: config, tokenizer, and constant weights (overwritten by every sync)."""
    from safetensors.torch import save_file

    from megatron_trace.checkpoint.hf_mapping import Qwen3Dims, hf_param_shapes
    from megatron_trace.data.tokenizer import qwen3_tokenizer_dir

    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    shapes = hf_param_shapes(Qwen3Dims.from_hf_config(cfg))
    shapes.pop("lm_head.weight", None)  # tied
    save_file({n: torch.full(s, 0.01) for n, s in shapes.items()}, os.path.join(path, "model.safetensors"))
    for name in os.listdir(qwen3_tokenizer_dir()):
        shutil.copy(os.path.join(qwen3_tokenizer_dir(), name), path)


def start_server(model_dir: str, work: str, token: str):
    """`tools/serve_rollout.py` on the initial folder, as the trainer starts it (dies with this process)."""
    from megatron_trace.rollout.launch import ManagedServer

    return ManagedServer(model_dir, log_path=os.path.join(work, "server.log"), token_env=TOKEN_ENV, token=token,
                         max_model_len=128, kv_cache_memory_bytes=64 << 20, extra_env={"OMP_NUM_THREADS": "1"},
                         die_with_parent=True)


def trainer_ranks(rank: int, world_size: int, cfg: dict, bucket_bytes: int, repeats: int, url: str | None,
                  token: str, export_dir: str) -> dict:
    """Megatron TP=2: time the bridge alone and the bridge streaming into the HTTP server; save one export."""
    import torch.distributed as dist

    from megatron_trace.distributed import destroy_distributed, initialize_distributed
    from megatron_trace.models import build_qwen3_model
    from megatron_trace.sync.hf_export import save_hf_folder
    from megatron_trace.sync.weight_bridge import export_hf_buckets

    initialize_distributed(tp=2, pp=1, seed=0)
    try:
        model = build_qwen3_model(cfg)
        out = dict(bridge=[], http=[])
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            for bucket in export_hf_buckets(model, cfg, bucket_bytes=bucket_bytes):
                del bucket
            dist.barrier()
            out["bridge"].append(time.perf_counter() - t0)
        if url is not None:
            from megatron_trace.rollout.client import ClientConfig, RolloutClient

            os.environ[TOKEN_ENV] = token
            client = RolloutClient(ClientConfig(base_url=url, token_env=TOKEN_ENV, retries=0)) if rank == 0 else None
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                buckets = export_hf_buckets(model, cfg, bucket_bytes=bucket_bytes)
                if rank == 0:
                    client.update_weights(buckets)
                else:
                    for _ in buckets:
                        pass
                dist.barrier()
                out["http"].append(time.perf_counter() - t0)
            if client is not None:
                client.close()
        save_hf_folder(model, cfg, export_dir, bucket_bytes=bucket_bytes)
        return out
    finally:
        destroy_distributed()


def load_buckets(folder: str) -> list[list[tuple[str, torch.Tensor]]]:
    """The saved export, one bucket per safetensors file (save_hf_folder writes one file per bridge bucket)."""
    from safetensors.torch import load_file

    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    return [sorted(load_file(os.path.join(folder, n)).items()) for n in files]


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def in_process_times(model_dir: str, buckets, repeats: int) -> list[float]:
    from megatron_trace.rollout.engine import EngineConfig, VLLMEngine

    engine = VLLMEngine(EngineConfig(model_dir, max_model_len=128))
    try:
        return timed(lambda: engine.update_weights(buckets), repeats)
    finally:
        engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16,
                    help="depth at Qwen3-0.6B width (16 = 0.41B params = 1.6 GB fp32; 20 = 0.47B)")
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-http", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # before vLLM replaces it with a no-op; the machine is shared
    bucket_bytes = args.bucket_mb << 20
    cfg = hf_config(args.layers)

    work = tempfile.mkdtemp(prefix="bench_weight_bridge_")
    server = None
    try:
        initial = os.path.join(work, "initial")
        write_initial_folder(initial, cfg)
        url = token = None
        if not args.skip_http:
            token = os.urandom(16).hex()
            server = start_server(initial, work, token)
            url = server.url
        export_dir = os.path.join(work, "exported")
        t0 = time.perf_counter()
        trainer = run_distributed(trainer_ranks, 2, cfg, bucket_bytes, args.repeats, url, token, export_dir,
                                  timeout=3600)[0]
        launch_s = time.perf_counter() - t0
        if server is not None:
            server.close()
            server = None
        gc.collect()

        for name in os.listdir(initial):  # the engine's folder: the exported weights + the tokenizer
            if not name.startswith("model") and not os.path.exists(os.path.join(export_dir, name)):
                shutil.copy(os.path.join(initial, name), export_dir)
        buckets = load_buckets(export_dir)
        nbytes = sum(t.numel() * t.element_size() for b in buckets for _, t in b)
        nparams = sum(t.numel() for b in buckets for _, t in b)
        dst = [[torch.empty_like(t) for _, t in b] for b in buckets]
        refs = copy_references([(d, t) for db, b in zip(dst, buckets) for d, (_, t) in zip(db, b)], args.repeats)
        memcpy = fastest(refs)[1]
        del dst
        gc.collect()
        reload = in_process_times(export_dir, buckets, args.repeats)

        base = statistics.median(memcpy)
        rows = [(f"memcpy: {label}", times) for label, times in refs.items()]
        rows += [("bridge only (TP=2 -> rank 0)", trainer["bridge"]),
                ("in-process vLLM reload", reload)]
        composed = statistics.median(trainer["bridge"]) + statistics.median(reload)
        if trainer["http"]:
            rows.append(("bridge -> HTTP server", trainer["http"]))
        print(f"\nweights: {nparams / 1e9:.3f} B params, {nbytes / 1e9:.2f} GB fp32, {len(buckets)} buckets of "
              f"<= {args.bucket_mb} MiB; {args.repeats} repeats; 1 torch thread per process; host CPUs "
              f"{os.cpu_count()}; load average at end {os.getloadavg()[0]:.1f}; trainer launch {launch_s:.0f} s")
        print(f"{'method':<40} {'median s':>9} {'min s':>8} {'GB/s':>7} {'x memcpy':>9}")
        for name, times in rows:
            med = statistics.median(times)
            print(f"{name:<40} {med:>9.3f} {min(times):>8.3f} {nbytes / med / 1e9:>7.2f} {med / base:>9.1f}")
        print(f"{'bridge + in-process (sum)':<40} {composed:>9.3f} {'':>8} {nbytes / composed / 1e9:>7.2f} "
              f"{composed / base:>9.1f}")
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

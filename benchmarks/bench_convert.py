#!/usr/bin/env python
"""Checkpoint conversion speed against plain safetensors I/O of the same bytes.

Writes a synthetic Qwen3-shaped HF checkpoint (random bf16, sharded safetensors + index json; default ~1.1B
parameters: Qwen3-1.7B's widths with 16 layers, tied) to a temp dir, then times, each in a fresh process
(imports excluded), median of --repeats runs:

  baseline        read every shard with safetensors and write it back out (the same bytes, no conversion),
                  without and with fsync (both converters fsync what they write before renaming it into place)
  hf-to-megatron  tools' convert_hf_to_megatron at --tp (PP=1)
  megatron-to-hf  convert_megatron_to_hf of that output

and prints a table with the ratios to the baselines and each process's peak RSS (VmHWM: resident memory,
which also counts the pages of memory-mapped input files that were read).

    python benchmarks/bench_convert.py [--layers 16] [--repeats 3] [--tp 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time


def qwen3_config(layers: int) -> dict:
    return dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=2048,
        intermediate_size=6144, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, torch_dtype="bfloat16", hidden_act="silu", attention_bias=False,
    )


def write_synthetic_hf(path: str, config: dict, shard_bytes: int) -> int:
    """Random bf16 weights for every tensor of `config`, sharded like save_pretrained. Returns the byte count."""
    import torch

    from megatron_trace.checkpoint.hf_io import TensorInfo, plan_shards, write_safetensors_shards
    from megatron_trace.checkpoint.hf_mapping import Qwen3Dims, hf_param_shapes

    shapes = hf_param_shapes(Qwen3Dims.from_hf_config(config))
    plan = plan_shards(((n, TensorInfo(s, torch.bfloat16)) for n, s in shapes.items()), shard_bytes)
    gen = torch.Generator().manual_seed(0)
    os.makedirs(path)

    def tensors():
        for name, shape in shapes.items():
            yield name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    write_safetensors_shards(path, plan, tensors())
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return sum(2 * torch.Size(s).numel() for s in shapes.values())


def _baseline(src: str, dst: str, fsync: bool) -> None:
    from safetensors.torch import load_file, save_file

    from megatron_trace.checkpoint.hf_io import fsync_file

    os.makedirs(dst)
    for name in sorted(os.listdir(src)):
        if name.endswith(".safetensors"):
            save_file(load_file(os.path.join(src, name)), os.path.join(dst, name), metadata={"format": "pt"})
        else:
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
        if fsync:
            fsync_file(os.path.join(dst, name))


def _child(task: str, src: str, dst: str, tp: int, queue) -> None:
    import torch

    torch.set_num_threads(1)
    import megatron.core.dist_checkpointing  # noqa: F401  (imports are not what is measured)
    import torch.distributed.checkpoint  # noqa: F401

    from megatron_trace.checkpoint.convert import convert_hf_to_megatron, convert_megatron_to_hf

    shutil.rmtree(dst, ignore_errors=True)
    start = time.perf_counter()
    if task.startswith("baseline"):
        _baseline(src, dst, fsync=task == "baseline+fsync")
    elif task == "hf-to-megatron":
        convert_hf_to_megatron(src, dst, tp=tp, pp=1)
    else:
        convert_megatron_to_hf(src, dst)
    seconds = time.perf_counter() - start
    queue.put((seconds, _peak_rss_bytes()))


def _peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def timed(task: str, src: str, dst: str, tp: int) -> tuple[float, int]:
    # Start every run with no dirty pages pending, so that one run's write-back does not slow the next one's.
    os.sync()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(task, src, dst, tp, queue))
    proc.start()
    result = queue.get(timeout=3600)
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--workdir", default=None, help="where the temp folders go (default: system temp)")
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir)
    try:
        config = qwen3_config(args.layers)
        hf, mg, back, base = (os.path.join(root, n) for n in ("hf", "megatron", "hf-back", "baseline"))
        t0 = time.perf_counter()
        nbytes = write_synthetic_hf(hf, config, int(args.shard_gb * 2**30))
        print(f"synthetic checkpoint: {nbytes / 2 / 1e9:.2f}B params, {nbytes / 2**30:.2f} GiB bf16, "
              f"{len([n for n in os.listdir(hf) if n.endswith('.safetensors')])} shards "
              f"(written in {time.perf_counter() - t0:.1f}s)")
        rows = {}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits every row alike
            for task, src, dst in (("baseline", hf, base), ("baseline+fsync", hf, base), ("hf-to-megatron", hf, mg),
                                   ("megatron-to-hf", mg, back)):
                rows.setdefault(task, []).append(timed(task, src, dst, args.tp))
        base_s = statistics.median(s for s, _ in rows["baseline"])
        sync_s = statistics.median(s for s, _ in rows["baseline+fsync"])
        labels = {"baseline": "read+write safetensors", "baseline+fsync": "read+write+fsync safetensors",
                  "hf-to-megatron": f"hf-to-megatron (tp={args.tp})", "megatron-to-hf": "megatron-to-hf"}
        print("\n| step                          | median s | min s | max s | x read+write | x read+write+fsync "
              "| GiB/s | peak RSS GiB |")
        print("|-------------------------------|---------:|------:|------:|-------------:|-------------------:"
              "|------:|-------------:|")
        for task, runs in rows.items():
            secs = [s for s, _ in runs]
            med = statistics.median(secs)
            print(f"| {labels[task]:<29} | {med:8.2f} | {min(secs):5.2f} | {max(secs):5.2f} | {med / base_s:12.2f} | "
                  f"{med / sync_s:18.2f} | {nbytes / 2**30 / med:5.2f} | {max(r for _, r in runs) / 2**30:12.2f} |")
        print(f"\nmedian of {args.repeats} runs each; checkpoint {nbytes / 2**30:.2f} GiB; {os.cpu_count()} CPU cores")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

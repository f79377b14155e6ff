#!/usr/bin/env python
"""Packed token-budget micro-batches against padded ones: training tokens/s and peak memory of a TRACE update.

The real trainer (`Trainer.update`: span-sparse teacher pass, routed loss forward/backward, Megatron optimizer
step) on the tiny Qwen3 (Qwen3's 151,936-row vocabulary) at TP=2 on gloo processes, the SAME batch both ways:
32 responses whose lengths are drawn like reasoning rollouts (lognormal, clipped to [64, 512] tokens: maximum 8x
the minimum, mean ~30% of the maximum) after 16-token prompts, 25% of each response in forward-KL key spans,
privileged prompts 64 tokens longer.
- padded: optim.micro_batch_size sequences per micro-batch, every row padded to the step's longest sequence;
- packed: optim.max_tokens_per_microbatch tokens per micro-batch (sequences back to back, block-diagonal
  attention on CPU, THD + TE attention on GPU).
tokens/s = response tokens of the batch / update time (median of --repeats after one warm-up). Peak memory: on
GPU torch.cuda.max_memory_allocated; on CPU the growth of the process's peak RSS over the update (each layout
runs in fresh processes, so one layout's peak cannot hide the other's), rank 0, TP shard of the model.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_packing.py [--tp 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

MIN_LEN, MAX_LEN, PROMPT, PRIVILEGED_EXTRA = 64, 512, 16, 64


def response_lengths(n: int = 32, seed: int = 0) -> list[int]:
    """Lognormal lengths clipped to [MIN_LEN, MAX_LEN], the extremes present once each."""
    rng = random.Random(seed)
    out = [min(MAX_LEN, max(MIN_LEN, round(rng.lognormvariate(4.85, 0.55)))) for _ in range(n - 2)]
    return out + [MIN_LEN, MAX_LEN]


def _samples(vocab=151_000, coverage=0.25, seed=0):
    from megatron_trace.routes import Route
    from megatron_trace.train.batching import Sample

    rng = random.Random(seed)
    out = []
    for i, length in enumerate(response_lengths(seed=seed)):
        k = int(coverage * length)
        start = rng.randrange(length - k)
        routes = [int(Route.FKL) if start <= t < start + k else int(Route.PG) for t in range(length)]
        out.append(Sample(prompt_ids=[rng.randrange(vocab) for _ in range(PROMPT)],
                          response_ids=[rng.randrange(vocab) for _ in range(length)], sampler_logprobs=[-5.0] * length,
                          routes=routes, advantage=rng.uniform(-1, 1), reward=float(i % 2), group=i // 4,
                          teacher_prompt_ids=[rng.randrange(vocab) for _ in range(PROMPT + PRIVILEGED_EXTRA)]))
    return out


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _bench(rank, world_size, tp, repeats, micro_batch_size, budget):
    import torch

    from megatron_trace.config import load_config
    from megatron_trace.train.trainer import Trainer

    cfg = load_config("examples/configs/tiny_cpu.yaml", [
        f"parallel.tp={tp}", "checkpoint.resume=none", "model.hf_config=tiny", "model.tokenizer=null",
        f"optim.micro_batch_size={micro_batch_size}", f"optim.max_tokens_per_microbatch={budget}",
        f"rollout.max_response_tokens={MAX_LEN}", "logging.output_dir=/tmp/bench_packing",
        "logging.tensorboard=false"])
    trainer = Trainer(cfg, start_rollout=False)
    samples = _samples()
    on_gpu = torch.cuda.is_available()
    base = torch.cuda.memory_allocated() if on_gpu else _peak_rss_bytes()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    times, metrics = [], {}
    for i in range(repeats + 1):  # the first is the warm-up
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics = trainer.update(samples, 0.5)
        if on_gpu:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if on_gpu else _peak_rss_bytes()) - base
    trainer.close()
    return {"time": statistics.median(times), "times": times, "peak": peak,
            "padding_frac": metrics["padding_frac"], "microbatches": metrics["microbatches"],
            "loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--micro-batch-size", type=int, default=4, help="padded layout: sequences per micro-batch")
    p.add_argument("--budget", type=int, default=2 * (MAX_LEN + PROMPT + PRIVILEGED_EXTRA),
                   help="packed layout: tokens per micro-batch")
    args = p.parse_args(argv)
    from dist_harness import run_distributed

    lengths = response_lengths()
    tokens = sum(lengths)
    res = {}
    for name, mbs, budget in (("padded", args.micro_batch_size, 0), ("packed", args.micro_batch_size, args.budget)):
        res[name] = run_distributed(_bench, args.tp, args.tp, args.repeats, mbs, budget, init_gloo=False,
                                    timeout=3600)[0]
    print(f"\nTRACE update of the tiny Qwen3 at TP={args.tp}: {len(lengths)} responses of {min(lengths)}-{max(lengths)} "
          f"tokens (mean {tokens / len(lengths):.0f} = {tokens / len(lengths) / max(lengths):.0%} of the max), "
          f"{PROMPT}-token prompts, teacher on; median of {args.repeats}")
    print(f"padded: micro_batch_size={args.micro_batch_size}; packed: max_tokens_per_microbatch={args.budget}\n")
    print("| layout | micro-batches | padding_frac | update s | tokens/s | peak memory MiB | tokens/s vs padded "
          "| memory vs padded |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    ref = res["padded"]
    for name, r in res.items():
        print(f"| {name} | {r['microbatches']:.0f} | {r['padding_frac']:.2f} | {r['time']:.2f} | "
              f"{tokens / r['time']:.0f} | {r['peak'] / 2**20:.0f} | {ref['time'] / r['time']:.2f}x | "
              f"{r['peak'] / ref['peak']:.2f}x |")
    print(f"\nsame update: loss {ref['loss']:.6f} vs {res['packed']['loss']:.6f}, grad norm "
          f"{ref['grad_norm']:.6f} vs {res['packed']['grad_norm']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

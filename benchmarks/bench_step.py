#!/usr/bin/env python
"""Cost of a TRACE update against a pure GRPO update of the same tiny model, and of the span-sparse teacher
against a dense one (output layer on every row, then rows picked).

Runs the real trainer (`Trainer.update`: teacher pass, routed loss forward/backward, Megatron optimizer step) at
TP=2 on two gloo processes, on a synthetic batch shaped like the tiny CPU run: 32 responses of 40 tokens after
60-token prompts, 25% of response tokens in key spans (forward KL), privileged prompts of 120 tokens. Rollout,
reward and weight sync do not depend on the loss route; their times are in each run's metrics.jsonl
(`time/rollout`, `time/sync`). Median of --repeats timed updates after one warm-up.

    .venv/bin/python benchmarks/bench_step.py [--tp 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def _samples(n=32, prompt=60, length=40, teacher_prompt=120, coverage=0.25, vocab=151_000, seed=0):
    from megatron_trace.routes import Route
    from megatron_trace.train.batching import Sample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = int(coverage * length)
        start = rng.randrange(length - k)
        routes = [int(Route.FKL) if start <= t < start + k else int(Route.PG) for t in range(length)]
        out.append(Sample(prompt_ids=[rng.randrange(vocab) for _ in range(prompt)],
                          response_ids=[rng.randrange(vocab) for _ in range(length)], sampler_logprobs=[-5.0] * length,
                          routes=routes, advantage=rng.uniform(-1, 1), reward=float(i % 2), group=i // 4,
                          teacher_prompt_ids=[rng.randrange(vocab) for _ in range(teacher_prompt)]))
    return out


def _bench(rank, world_size, tp, repeats):
    import torch

    from megatron_trace.config import load_config
    from megatron_trace.routes import Route
    from megatron_trace.train.trainer import Trainer

    # Qwen3's real 151,936-row vocabulary (the demo's 4k one would hide the output layer's share of the cost)
    cfg = load_config("examples/configs/tiny_cpu.yaml", [f"parallel.tp={tp}", "checkpoint.resume=none",
                                                         "model.hf_config=tiny", "model.tokenizer=null",
                                                         "logging.output_dir=/tmp/bench_step", "logging.tensorboard=false"])
    trainer = Trainer(cfg, start_rollout=False)
    trace = _samples()
    grpo = [s.__class__(**{**s.__dict__, "routes": [int(Route.PG)] * len(s.routes), "teacher_prompt_ids": None})
            for s in trace]

    def timed(samples, kl_weight):
        trainer.timer.pop()
        t0 = time.perf_counter()
        trainer.update(samples, kl_weight)
        total = time.perf_counter() - t0
        split = trainer.timer.pop()
        return total, split.get("time/teacher", 0.0), split.get("time/train", 0.0)

    results = {}
    for name, samples, klw, sparse in (("grpo", grpo, 0.0, True), ("trace (sparse teacher)", trace, 0.5, True),
                                       ("trace (dense teacher)", trace, 0.5, False)):
        trainer.teacher.sparse_output = sparse
        timed(samples, klw)  # warm-up
        runs = [timed(samples, klw) for _ in range(repeats)]
        results[name] = tuple(statistics.median(r[i] for r in runs) for i in range(3))
    trainer.close()
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    from dist_harness import run_distributed

    res = run_distributed(_bench, args.tp, args.tp, args.repeats, init_gloo=False, timeout=1800)[0]
    base = res["grpo"][0]
    sparse_t = res["trace (sparse teacher)"][1]
    print(f"\nTrainer update of the tiny Qwen3 at TP={args.tp} (32 x 40-token responses, 25% key-span tokens), "
          f"median of {args.repeats}\n")
    print(f"| update | total s | teacher s | train s | total / GRPO | teacher / sparse teacher |")
    print(f"|---|---:|---:|---:|---:|---:|")
    for name, (total, teacher, train) in res.items():
        ratio_t = f"{teacher / sparse_t:.2f}" if teacher and sparse_t else "-"
        print(f"| {name} | {total:.3f} | {teacher:.3f} | {train:.3f} | {total / base:.2f} | {ratio_t} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

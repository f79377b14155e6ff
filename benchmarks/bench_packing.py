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
Both layouts run with the recipes' memory settings (examples/configs/qwen3_8b.yaml): teacher logits for one
micro-batch at a time (teacher.microbatches_per_pass 1), and the packed budget sized as the recipes size theirs
(see RECIPE_BUDGET); and with the loss kernels the recipes run (`loss.kernels` auto compiles them on GPU; here
`--kernels compiled` by default, `eager` for the CPU default of small vocabularies).
tokens/s = response tokens of the batch / update time (median of --repeats after one warm-up). Peak memory, rank 0
(its TP shard of the model), each layout in fresh processes, over the timed updates: on GPU
torch.cuda.max_memory_allocated minus the memory allocated after the warm-up; on CPU likewise the process's
resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs after the warm-up and a malloc_trim)
minus its resident set at that moment. What the first update allocates once and keeps (the optimizer's Adam
moments, the compiled kernels' code: the same in both layouts) is not an update's working memory and is left out.
What the peak is made of (measured per phase, rank 0): at Qwen3's vocabulary everything of size
[rows, vocab/tp] (fp32, 297 KiB a row at TP=2) dominates; the peak is in the routed loss's forward: the output
layer's logits of the whole micro-batch row(s), the padding-masked copy of its response rows, the teacher's span
logits and the loss kernels' scratch ([min(response rows, chunk_rows), vocab/tp] buffers). All of these follow the
rows of ONE micro-batch, so packing saves memory only when a packed micro-batch holds fewer rows than a padded one
(micro_batch_size x the step's longest sequence): hence the budget. Attention (scores [heads/tp, s, s] per layer)
and the packed row's block-diagonal mask (bool [1, 1, s, s], built once per micro-batch, broadcast over layers
and heads) are a few MiB at these lengths.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_packing.py [--tp 2] [--repeats 3] [--budget 768]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

MIN_LEN, MAX_LEN, PROMPT, PRIVILEGED_EXTRA = 64, 512, 16, 64
LONGEST_TEACHER = PROMPT + PRIVILEGED_EXTRA + MAX_LEN  # the longest sequence a packed micro-batch must hold
# The recipes (qwen3_8b.yaml, qwen3_1p7b.yaml) pack 12,288 tokens per micro-batch for an 8,192-token maximum
# response: 1.5x the maximum response, i.e. the longest teacher sequence (512 + 1,024 + 8,192 = 9,728 tokens)
# plus room for about one mean response beside it. The same rule at this benchmark's 512-token maximum: 768 tokens
# (>= the longest teacher sequence, 592).
RECIPE_BUDGET = 3 * MAX_LEN // 2
TEACHER_MICROBATCHES_PER_PASS = 1  # the recipes' teacher.microbatches_per_pass


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


def _proc_status_bytes(field: str) -> int:
    """VmRSS (resident set now) or VmHWM (its high-water mark) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field} line: the CPU peak needs Linux's /proc")


def _reset_peak_rss() -> None:
    """Set the resident-set high-water mark (VmHWM) to the current resident set (Linux >= 4.0), as
    torch.cuda.reset_peak_memory_stats does on GPU: the peak then covers the updates only, not model building."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        raise RuntimeError(f"cannot reset the peak RSS through /proc/self/clear_refs ({e}): the CPU peak of the "
                           "update alone cannot be measured here") from e


def _trim_heap() -> None:
    """Hand glibc's free heap memory back to the OS (malloc_trim), so the resident set counts live memory only."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the resident set may then include freed memory, lowering the measured growth
        pass


def _bench(rank, world_size, tp, repeats, micro_batch_size, budget, teacher_per_pass, kernels="compiled"):
    import torch

    from megatron_trace.config import load_config
    from megatron_trace.train.trainer import Trainer

    cfg = load_config("examples/configs/tiny_cpu.yaml", [
        f"parallel.tp={tp}", "checkpoint.resume=none", "model.hf_config=tiny", "model.tokenizer=null",
        f"optim.micro_batch_size={micro_batch_size}", f"optim.max_tokens_per_microbatch={budget}",
        f"rollout.max_response_tokens={MAX_LEN}", f"rollout.max_model_len={2 * MAX_LEN}",
        f"teacher.microbatches_per_pass={teacher_per_pass}", f"loss.kernels={kernels}",
        "logging.output_dir=/tmp/bench_packing",
        "logging.tensorboard=false"])
    trainer = Trainer(cfg, start_rollout=False)
    samples = _samples()
    on_gpu = torch.cuda.is_available()
    times, metrics, base = [], {}, 0
    for i in range(repeats + 1):  # the first is the warm-up
        if i == 1:  # the peak covers the timed updates
            if on_gpu:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                _trim_heap()
                base = _proc_status_bytes("VmRSS")
                _reset_peak_rss()
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics = trainer.update(samples, 0.5)
        if on_gpu:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if on_gpu else _proc_status_bytes("VmHWM")) - base
    trainer.close()
    return {"time": statistics.median(times), "times": times, "peak": peak,
            "padding_frac": metrics["padding_frac"], "microbatches": metrics["microbatches"],
            "loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--micro-batch-size", type=int, default=4,
                   help="padded layout: sequences per micro-batch (optim.micro_batch_size's default)")
    p.add_argument("--budget", type=int, default=RECIPE_BUDGET,
                   help="packed layout: tokens per micro-batch (default: the recipes' rule, 1.5x the maximum "
                        f"response = {RECIPE_BUDGET}; at least the longest teacher sequence, {LONGEST_TEACHER})")
    p.add_argument("--kernels", choices=["compiled", "eager"], default="compiled",
                   help="loss.kernels of both layouts (default: compiled, what the recipes run on GPU)")
    p.add_argument("--teacher-microbatches-per-pass", type=int, default=TEACHER_MICROBATCHES_PER_PASS,
                   help="teacher.microbatches_per_pass of both layouts (the recipes' 1: one micro-batch's teacher "
                        "logits held at a time)")
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.budget < LONGEST_TEACHER:
        p.error(f"--budget {args.budget} < the longest teacher sequence {LONGEST_TEACHER} (prompt {PROMPT} + "
                f"privileged extra {PRIVILEGED_EXTRA} + response {MAX_LEN}): that step would raise")
    from dist_harness import run_distributed

    lengths = response_lengths()
    tokens = sum(lengths)
    res = {}
    for name, mbs, budget in (("padded", args.micro_batch_size, 0), ("packed", args.micro_batch_size, args.budget)):
        res[name] = run_distributed(_bench, args.tp, args.tp, args.repeats, mbs, budget,
                                    args.teacher_microbatches_per_pass, args.kernels, init_gloo=False,
                                    timeout=3600)[0]
    print(f"\nTRACE update of the tiny Qwen3 at TP={args.tp}: {len(lengths)} responses of {min(lengths)}-{max(lengths)} "
          f"tokens (mean {tokens / len(lengths):.0f} = {tokens / len(lengths) / max(lengths):.0%} of the max), "
          f"{PROMPT}-token prompts, teacher on; median of {args.repeats}")
    print(f"padded: micro_batch_size={args.micro_batch_size}; packed: max_tokens_per_microbatch={args.budget}; "
          f"both: teacher.microbatches_per_pass={args.teacher_microbatches_per_pass}, loss.kernels={args.kernels}; "
          f"peak = rank 0's growth over its memory after the warm-up update\n")
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

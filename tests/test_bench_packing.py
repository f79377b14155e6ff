"""benchmarks/bench_packing.py: its default packed budget and teacher setting are the recipes', and its CPU peak
measure covers what is allocated after the reset, not the process's earlier high-water mark."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_packing", os.path.join(ROOT, "benchmarks", "bench_packing.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("recipe", ["qwen3_8b.yaml", "qwen3_1p7b.yaml"])
def test_default_budget_and_teacher_pass_follow_the_recipes(bench, recipe):
    with open(os.path.join(ROOT, "examples", "configs", recipe)) as f:
        cfg = yaml.safe_load(f)
    budget, longest = cfg["optim"]["max_tokens_per_microbatch"], cfg["rollout"]["max_response_tokens"]
    # the same budget / maximum-response ratio (12,288 / 8,192 = 768 / 512), computed without rounding
    assert bench.RECIPE_BUDGET * longest == budget * bench.MAX_LEN
    assert bench.TEACHER_MICROBATCHES_PER_PASS == cfg["teacher"]["microbatches_per_pass"]
    args = bench._parser().parse_args([])  # what a plain run uses
    assert (args.budget, args.teacher_microbatches_per_pass) == (bench.RECIPE_BUDGET, bench.TEACHER_MICROBATCHES_PER_PASS)


def test_default_budget_holds_the_batch_in_fewer_rows_than_a_padded_microbatch(bench):
    from megatron_trace.train.batching import make_step_batches

    samples = bench._samples()
    assert bench.RECIPE_BUDGET >= bench.LONGEST_TEACHER == max(
        len(s.teacher_prompt_ids) + len(s.response_ids) for s in samples)
    padded = make_step_batches(samples, dp_size=1, dp_rank=0, micro_batch_size=4, with_teacher=True)
    packed = make_step_batches(samples, dp_size=1, dp_rank=0, micro_batch_size=4,
                               max_tokens_per_microbatch=bench.RECIPE_BUDGET, with_teacher=True)
    assert packed.seq_length <= bench.RECIPE_BUDGET < padded.micro_batch_size * padded.seq_length
    # every response token is scored exactly once either way
    assert sum(mb["rows"].numel() for mb in packed.microbatches) == sum(len(s.response_ids) for s in samples)


def test_cpu_peak_measure_starts_at_the_reset(bench):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.fail("the CPU peak measure needs Linux's /proc/self/clear_refs")
    big = torch.ones(256 * MIB // 4)  # touched: resident
    del big  # freed (mmap'd: returned), but it stays in the high-water mark
    base = bench._proc_status_bytes("VmRSS")
    assert bench._proc_status_bytes("VmHWM") >= base + 200 * MIB
    bench._reset_peak_rss()
    small = torch.ones(64 * MIB // 4)
    del small
    growth = bench._proc_status_bytes("VmHWM") - base
    assert 56 * MIB <= growth < 128 * MIB, growth / MIB

"""Evaluation: benchmarks (local files and packaged copies), avg@k / pass@k with bootstrap intervals, and the
evaluation loop through the training generation engine. See docs/evaluation.md."""

from megatron_trace.eval.benchmarks import (BENCHMARKS, Benchmark, BenchmarkError, BenchmarkProblem, load_benchmark,
                                            load_benchmark_file)
from megatron_trace.eval.metrics import avg_at_k, bootstrap_ci, pass_at_k, pass_at_k_per_problem, score_benchmark

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkError", "BenchmarkProblem", "load_benchmark", "load_benchmark_file",
           "avg_at_k", "bootstrap_ci", "pass_at_k", "pass_at_k_per_problem", "score_benchmark"]

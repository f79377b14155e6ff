"""Evaluate a policy on benchmarks through the generation engine used in training: sample k responses per problem
with the paper's sampling, score them with the benchmark's verifier, and report avg@k / pass@k with bootstrap
intervals per benchmark and averaged over benchmarks.

The engine is anything with the `GenerationEngine` protocol (the in-process `VLLMEngine`, or the generation
server's client), so evaluation samples exactly as rollouts do.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from megatron_trace.data.prompts import build_prompt_ids, student_messages
from megatron_trace.eval.benchmarks import Benchmark, instruction_for
from megatron_trace.eval.metrics import Score, score_benchmark
from megatron_trace.rollout.types import GenerationEngine, SamplingConfig

__all__ = ["EvalConfig", "BenchmarkResult", "EvalReport", "evaluate", "benchmark_prompts"]

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Sampling and scoring settings. Defaults are the paper's (Qwen3's recommended thinking-mode sampling)."""

    k: int = 16  # responses per problem (avg@k over them; pass@j for j in pass_ks, j <= k)
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    max_tokens: int = 32768  # new tokens per response
    enable_thinking: bool = True  # Qwen3 thinking mode in the chat template
    seed: int = 0  # sampling seed of each generate call (same weights + seed = same samples)
    pass_ks: tuple[int, ...] = (1,)  # pass@j to report besides avg@k (those with j > k are dropped)
    confidence: float = 0.95  # bootstrap interval level
    resamples: int = 2000  # bootstrap resamples
    reward_timeout_s: float = 10.0  # verifier time limit per response
    reward_workers: int = 2
    prompts_per_call: int = 64  # problems per generate call (bounds memory of outputs held at once)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k={self.k} must be >= 1")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if any(j < 1 for j in self.pass_ks):
            raise ValueError(f"pass_ks={self.pass_ks}: every k must be >= 1")
        if self.prompts_per_call < 1:
            raise ValueError(f"prompts_per_call={self.prompts_per_call} must be >= 1")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_tokens=self.max_tokens, n=self.k, seed=self.seed, logprobs=False)


@dataclass
class BenchmarkResult:
    """One benchmark's outcome. correct: [problems, k] 0/1; response_tokens: [problems, k] generated lengths."""

    name: str
    source: str
    problem_ids: list[str]
    correct: list[list[int]]
    response_tokens: list[list[int]]
    truncated: int  # responses that hit max_tokens (finish_reason "length")
    scoring_errors: int  # responses whose verifier timed out or raised (scored 0)
    scores: dict[str, Score] = field(default_factory=dict)

    @property
    def mean_response_tokens(self) -> float:
        return float(np.mean(self.response_tokens))


@dataclass
class EvalReport:
    """All benchmarks of one evaluation plus the average over benchmarks (each benchmark weighs the same)."""

    model: str
    config: EvalConfig
    results: list[BenchmarkResult]
    seconds: float = 0.0

    def average(self) -> dict[str, float]:
        """Metric -> mean of the benchmarks' point estimates, for metrics every benchmark has."""
        if not self.results:
            return {}
        common = set.intersection(*(set(r.scores) for r in self.results))
        return {m: float(np.mean([r.scores[m].value for r in self.results])) for m in sorted(common)}

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "config": asdict(self.config),
            "seconds": self.seconds,
            "benchmarks": {
                r.name: {
                    "source": r.source,
                    "problems": len(r.problem_ids),
                    "scores": {m: s.as_dict() for m, s in r.scores.items()},
                    "mean_response_tokens": r.mean_response_tokens,
                    "truncated": r.truncated,
                    "scoring_errors": r.scoring_errors,
                    "per_problem": {pid: c for pid, c in zip(r.problem_ids, r.correct)},
                }
                for r in self.results
            },
            "average": self.average(),
        }

    def to_markdown(self) -> str:
        """One row per benchmark (value and [low, high] interval, in percent) and an 'average' row."""
        metrics = sorted({m for r in self.results for m in r.scores}, key=_metric_order)
        head = ["benchmark", "problems"] + metrics + ["mean tokens", "truncated"]
        rows = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
        for r in self.results:
            cells = [r.name, str(len(r.problem_ids))]
            for m in metrics:
                s = r.scores.get(m)
                cells.append(f"{100 * s.value:.1f} [{100 * s.ci_low:.1f}, {100 * s.ci_high:.1f}]" if s else "-")
            cells += [f"{r.mean_response_tokens:.0f}", str(r.truncated)]
            rows.append("| " + " | ".join(cells) + " |")
        avg = self.average()
        if len(self.results) > 1:
            cells = ["**average**", str(sum(len(r.problem_ids) for r in self.results))]
            cells += [f"{100 * avg[m]:.1f}" if m in avg else "-" for m in metrics] + ["", ""]
            rows.append("| " + " | ".join(cells) + " |")
        c = self.config
        note = (f"\n{c.k} samples per problem; temperature {c.temperature}, top-p {c.top_p}, top-k {c.top_k}, "
                f"max {c.max_tokens} new tokens, thinking {'on' if c.enable_thinking else 'off'}; "
                f"{int(100 * c.confidence)}% percentile-bootstrap intervals over problems ({c.resamples} resamples). "
                "Scores in percent.\n")
        return f"# Evaluation of {self.model}\n\n" + "\n".join(rows) + "\n" + note

    def write(self, out_dir: str) -> tuple[str, str]:
        """Write results.json and results.md into out_dir (each via a temp file renamed when complete)."""
        os.makedirs(out_dir, exist_ok=True)
        paths = []
        for name, text in (("results.json", json.dumps(self.to_json(), indent=2)),
                           ("results.md", self.to_markdown())):
            path = os.path.join(out_dir, name)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
            paths.append(path)
        return paths[0], paths[1]


def _metric_order(m: str) -> tuple[int, int]:
    kind, _, k = m.partition("@")
    return (0 if kind == "avg" else 1, int(k))


def benchmark_prompts(tokenizer, bench: Benchmark, *, enable_thinking: bool) -> list[list[int]]:
    """Prompt token ids [problems][prompt_len] of a benchmark: the student prompt with its answer instruction."""
    instruction = instruction_for(bench.name)
    return [build_prompt_ids(tokenizer, student_messages(p.problem, instruction=instruction),
                             enable_thinking=enable_thinking) for p in bench.problems]


def evaluate(engine: GenerationEngine, tokenizer, benchmarks: Sequence[Benchmark], cfg: EvalConfig, *,
             model_name: str = "model", responses_path: str | None = None) -> EvalReport:
    """Sample cfg.k responses per problem of every benchmark, score them, and compute the scores.

    responses_path: optional JSONL written with every response (benchmark, id, sample, text, correct, tokens).
    """
    from megatron_trace.rewards.batch import RewardScorer

    t0 = time.perf_counter()
    sampling = cfg.sampling()
    pass_ks = tuple(j for j in cfg.pass_ks if j <= cfg.k)
    results = []
    out = None
    if responses_path:
        os.makedirs(os.path.dirname(os.path.abspath(responses_path)), exist_ok=True)
        out = open(responses_path + ".tmp", "w")
    try:
        for bench in benchmarks:
            prompts = benchmark_prompts(tokenizer, bench, enable_thinking=cfg.enable_thinking)
            gens = []
            for start in range(0, len(prompts), cfg.prompts_per_call):
                gens += engine.generate(prompts[start:start + cfg.prompts_per_call], sampling)
            texts = [tokenizer.decode(g.token_ids, skip_special_tokens=True) for group in gens for g in group]
            golds = [p.answer for p in bench.problems for _ in range(cfg.k)]
            with RewardScorer(bench.reward, workers=cfg.reward_workers) as scorer:
                verdict = scorer.score(texts, golds, timeout_s=cfg.reward_timeout_s)
            correct = (np.asarray(verdict.scores) > 0.5).astype(int).reshape(len(bench.problems), cfg.k)
            lengths = [[len(g.token_ids) for g in group] for group in gens]
            result = BenchmarkResult(
                name=bench.name, source=bench.source, problem_ids=[p.id for p in bench.problems],
                correct=correct.tolist(), response_tokens=lengths,
                truncated=sum(g.finish_reason == "length" for group in gens for g in group),
                scoring_errors=verdict.timeouts + verdict.errors,
                scores=score_benchmark(correct, pass_ks=pass_ks, confidence=cfg.confidence,
                                       resamples=cfg.resamples, seed=cfg.seed))
            results.append(result)
            logger.info("%s: %s", bench.name, {m: round(s.value, 4) for m, s in result.scores.items()})
            if out is not None:
                for i, p in enumerate(bench.problems):
                    for j in range(cfg.k):
                        out.write(json.dumps({"benchmark": bench.name, "id": p.id, "sample": j,
                                              "text": texts[i * cfg.k + j], "correct": int(correct[i, j]),
                                              "tokens": lengths[i][j]}) + "\n")
    finally:
        if out is not None:
            out.close()
    if responses_path:
        os.replace(responses_path + ".tmp", responses_path)
    return EvalReport(model_name, cfg, results, seconds=time.perf_counter() - t0)

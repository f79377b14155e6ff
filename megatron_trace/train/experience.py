"""The driver's half of a TRACE step: rollout -> reward -> (annotate -> route) -> a `RolloutBatch`.

Runs on one rank (the driver, global rank 0), which talks to the generation engine, the reward workers and the
annotator; the batch is then broadcast to every trainer rank. Pure orchestration: the math lives in
`loss.grpo` (advantages), `annotate.spans` (spans -> token masks) and `routes`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

from megatron_trace.annotate.pipeline import AnnotationRequest, Annotator, annotation_metrics
from megatron_trace.annotate.spans import decode_with_offsets, response_routes
from megatron_trace.data.dataset import Problem
from megatron_trace.data.prompts import build_prompt_ids, privileged_messages, student_messages
from megatron_trace.loss.grpo import dynamic_sampling_mask, group_advantages, overlong_penalty
from megatron_trace.loss.trace_loss import all_token_routes
from megatron_trace.rollout.types import GenerationEngine, SamplingConfig
from megatron_trace.routes import Route
from megatron_trace.train.batching import RolloutBatch, Sample

__all__ = ["ExperienceMaker"]


class ExperienceMaker:
    """Makes each step's `RolloutBatch`.

    cfg: the run's `TraceConfig`; engine: the generation engine (vLLM in-process or the server's client);
    scorer: a `rewards.batch.RewardScorer`; annotator: an annotator (None when the run never distills).
    """

    def __init__(self, cfg, tokenizer, engine: GenerationEngine, scorer, annotator: Annotator | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.engine = engine
        self.scorer = scorer
        self.annotator = annotator
        self._prompt_cache: dict[str, list[int]] = {}
        self.last_scores: list[float] = []  # the last make()'s rewards, [P x G] problem-major (teacher probe)

    def close(self) -> None:
        """Stop the reward workers and close the annotator (the engine belongs to the caller)."""
        if self.annotator is not None:
            self.annotator.close()
        self.scorer.close()

    def student_prompt(self, problem: Problem) -> list[int]:
        ids = self._prompt_cache.get(problem.id)
        if ids is None:
            ids = build_prompt_ids(self.tokenizer, student_messages(problem.problem),
                                   enable_thinking=self.cfg.rollout.enable_thinking)
            self._prompt_cache[problem.id] = ids
        return ids

    def teacher_prompt(self, problem: Problem, labels: Sequence[str]) -> list[int]:
        return build_prompt_ids(self.tokenizer, privileged_messages(problem.problem, problem.solution, labels),
                                enable_thinking=self.cfg.rollout.enable_thinking)

    def make(self, problems: list[Problem], *, step: int, kl_weight: float, timer=None) -> RolloutBatch:
        """The step's batch; `timer` (a `train.metrics.Timer`) gets the reward and annotate phases."""
        cfg = self.cfg
        phase = timer if timer is not None else (lambda name: nullcontext())
        G = cfg.rollout.group_size
        prompts = [self.student_prompt(p) for p in problems]
        sampling = SamplingConfig(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                  top_k=cfg.rollout.top_k, max_tokens=cfg.rollout.max_response_tokens, n=G,
                                  seed=cfg.train.seed * 100_003 + step, logprobs=True)
        generations = self.engine.generate(prompts, sampling)
        flat = [(gi, g) for gi, gens in enumerate(generations) for g in gens]
        if len(flat) != len(problems) * G:
            raise RuntimeError(f"engine returned {len(flat)} responses for {len(problems)} prompts x {G}")
        texts = [self.tokenizer.decode(g.token_ids, skip_special_tokens=True) for _, g in flat]
        golds = [problems[gi].answer for gi, _ in flat]
        with phase("reward"):
            scored = self.scorer.score(texts, golds, timeout_s=cfg.reward.timeout_s)
        rewards = torch.tensor(scored.scores, dtype=torch.float32)
        self.last_scores = list(scored.scores)
        correct = rewards > 0.5
        lengths = torch.tensor([len(g.token_ids) for _, g in flat], dtype=torch.float32)
        shaped = rewards.clone()
        if cfg.loss.overlong_buffer:
            shaped = shaped + overlong_penalty(lengths, cfg.rollout.max_response_tokens, cfg.loss.overlong_buffer,
                                               cfg.loss.overlong_penalty)
        advantages = group_advantages(shaped, G, normalize_std=cfg.loss.normalize_std)
        keep_group = torch.ones(len(problems), dtype=torch.bool)
        if cfg.loss.dynamic_sampling:
            keep_group = dynamic_sampling_mask(shaped, G)

        metrics = {
            "reward_mean": float(rewards.mean()), "pass_rate": float(correct.float().mean()),
            "response_len": float(lengths.mean()), "response_len_max": float(lengths.max()),
            "truncated_frac": sum(g.finish_reason == "length" for _, g in flat) / len(flat),
            "reward_timeouts": float(scored.timeouts), "reward_errors": float(scored.errors),
            "groups_kept": float(keep_group.sum()), "groups": float(len(problems)),
        }
        kept = [i for i, (gi, _) in enumerate(flat) if bool(keep_group[gi])]
        routes = {i: [int(Route.PG)] * len(flat[i][1].token_ids) for i in kept}
        teacher_prompts: dict[int, list[int]] = {}
        if kl_weight > 0 and cfg.distills and kept:
            with phase("annotate"):
                routes, teacher_prompts, ann_metrics = self._route(problems, flat, kept, correct, golds, step)
            metrics.update(ann_metrics)

        samples = []
        for i in kept:
            gi, g = flat[i]
            samples.append(Sample(
                prompt_ids=prompts[gi], response_ids=list(g.token_ids), sampler_logprobs=list(g.logprobs),
                routes=routes[i], advantage=float(advantages[i]), reward=float(rewards[i]), group=gi,
                teacher_prompt_ids=teacher_prompts.get(i), finish_reason=g.finish_reason))
        return RolloutBatch(samples=samples, metrics=metrics)

    def _route(self, problems, flat, kept, correct, golds, step):
        """Spans -> routes and privileged prompts for the kept responses."""
        cfg = self.cfg
        spans_cfg = cfg.annotate.spans
        decoded = {i: decode_with_offsets(self.tokenizer, flat[i][1].token_ids) for i in kept}
        labels: dict[int, list[str]] = {i: [] for i in kept}
        char_spans: dict[int, list[tuple[int, int]]] = {i: [] for i in kept}
        metrics: dict[str, float] = {}
        if spans_cfg.mode in ("annotator", "random_spans"):
            requests = [AnnotationRequest(problem=problems[flat[i][0]].problem,
                                          solution=problems[flat[i][0]].solution,
                                          response_text=decoded[i][0], correct=bool(correct[i])) for i in kept]
            annotations = self.annotator.annotate(requests, [golds[i] for i in kept],
                                                  max_spans=cfg.annotate.max_spans)
            metrics.update(annotation_metrics(annotations))
            for i, ann in zip(kept, annotations):
                char_spans[i] = list(ann.char_spans)
                labels[i] = list(ann.labels)
        routes, teacher_prompts = {}, {}
        for i in kept:
            _, offsets = decoded[i]
            L = len(flat[i][1].token_ids)
            if spans_cfg.mode == "all_tokens":
                r = all_token_routes(torch.ones(L, dtype=torch.bool), bool(correct[i]),
                                     reverse_on_incorrect=spans_cfg.rkl)
            else:
                r = response_routes(offsets, char_spans[i], bool(correct[i]), spans_cfg,
                                    seed=cfg.train.seed * 1_000_003 + step * 10_007 + i)
            routes[i] = [int(x) for x in r]
            if any(x != Route.PG for x in routes[i]):
                teacher_prompts[i] = self.teacher_prompt(problems[flat[i][0]], labels[i])
        return routes, teacher_prompts, metrics

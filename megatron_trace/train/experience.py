"""The driver's half of a TRACE step: rollout -> reward -> (annotate -> route) -> a `RolloutBatch`.

Runs on one rank (the driver, global rank 0), which talks to the generation engine, the reward workers and the
annotator; the batch is then broadcast to every trainer rank. Pure orchestration: the math lives in
`loss.grpo` (advantages), `annotate.spans` (spans -> token masks) and `routes`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Sequence

import torch

from megatron_trace.annotate.labels import normalize_type, unique_in_order
from megatron_trace.annotate.pipeline import AnnotationRequest, Annotator, annotation_metrics
from megatron_trace.annotate.spans import decode_with_offsets, response_routes, spans_in_capped_mask
from megatron_trace.data.dataset import Problem
from megatron_trace.data.prompts import build_prompt_ids, privileged_messages, student_messages
from megatron_trace.loss.grpo import group_advantages, overlong_penalty
from megatron_trace.loss.trace_loss import all_token_routes
from megatron_trace.rollout.types import GenerationEngine, SamplingConfig
from megatron_trace.routes import Route
from megatron_trace.train.batching import RolloutBatch, Sample
from megatron_trace.train.dynamic_sampling import groups_with_signal, merge_round_metrics, prompts_for_next_round

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
        self.last_scores: list[float] = []  # the last make()'s first-round rewards, [P x G] problem-major

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

    def teacher_prompt(self, problem: Problem, labels: Sequence[str] = (), *, correct: bool = True,
                       types: Sequence[str] = ()) -> list[int]:
        """The privileged prompt: reference solution plus the coarse types (label_mode type) or free-text labels
        (free_text) of the response's surviving spans, under the key (correct) or error (incorrect) heading.
        With neither (the teacher probe): the problem and the reference solution only."""
        if self.cfg.annotate.label_mode == "type":
            kinds = unique_in_order(types)
            sections = {"key_types": kinds} if correct else {"error_types": kinds}
        else:
            sections = {"labels": list(labels)} if correct else {"error_labels": list(labels)}
        return build_prompt_ids(self.tokenizer, privileged_messages(problem.problem, problem.solution, **sections),
                                enable_thinking=self.cfg.rollout.enable_thinking)

    def make(self, problems: list[Problem], *, step: int, kl_weight: float, timer=None,
             next_problems: Callable[[int], list[Problem]] | None = None) -> RolloutBatch:
        """The step's batch; `timer` (a `train.metrics.Timer`) gets the reward and annotate phases.

        With loss.dynamic_sampling, groups without signal are dropped after annotation and routing
        (train.dynamic_sampling); with rollout.max_rounds > 1 and `next_problems` (n -> the next n problems),
        further rounds refill the batch to len(problems) groups (DAPO).
        """
        cfg = self.cfg
        phase = timer if timer is not None else (lambda name: nullcontext())
        dynamic = cfg.loss.dynamic_sampling
        max_rounds = cfg.rollout.max_rounds if (dynamic and next_problems is not None) else 1
        target = len(problems)
        kept: list[list[Sample]] = []
        rounds: list[tuple[dict, int]] = []
        sampled = 0
        while True:
            groups, metrics = self._round(problems, step=step, kl_weight=kl_weight, round_index=len(rounds),
                                          phase=phase)
            rounds.append((metrics, len(problems) * cfg.rollout.group_size))
            sampled += len(problems)
            kept += groups
            if not dynamic or len(kept) >= target or len(rounds) >= max_rounds:
                break
            problems = next_problems(prompts_for_next_round(target - len(kept), len(kept), sampled, target))
        metrics = merge_round_metrics(rounds)
        surplus = max(0, len(kept) - target)
        kept = kept[:target]
        samples = []
        for group_index, group in enumerate(kept):
            for sample in group:
                sample.group = group_index
                samples.append(sample)
        metrics.update({"groups_kept": float(len(kept)), "groups": float(sampled),
                        "dynamic/rounds": float(len(rounds)), "dynamic/extra_rounds": float(len(rounds) - 1),
                        "dynamic/groups_dropped": float(sampled - len(kept) - surplus),
                        "dynamic/groups_surplus": float(surplus)})
        return RolloutBatch(samples=samples, metrics=metrics)

    def _round(self, problems: list[Problem], *, step: int, kl_weight: float, round_index: int, phase
               ) -> tuple[list[list[Sample]], dict]:
        """One generate round: rollout -> reward -> advantages -> (annotate -> route) -> the kept groups' samples
        (a list per group) and the round's metrics."""
        cfg = self.cfg
        G = cfg.rollout.group_size
        prompts = [self.student_prompt(p) for p in problems]
        sampling = SamplingConfig(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                  top_k=cfg.rollout.top_k, max_tokens=cfg.rollout.max_response_tokens, n=G,
                                  seed=cfg.train.seed * 100_003 + step + round_index * 1_000_000_007,
                                  logprobs=True)
        generations = self.engine.generate(prompts, sampling)
        flat = [(gi, g) for gi, gens in enumerate(generations) for g in gens]
        if len(flat) != len(problems) * G:
            raise RuntimeError(f"engine returned {len(flat)} responses for {len(problems)} prompts x {G}")
        texts = [self.tokenizer.decode(g.token_ids, skip_special_tokens=True) for _, g in flat]
        golds = [problems[gi].answer for gi, _ in flat]
        with phase("reward"):
            scored = self.scorer.score(texts, golds, timeout_s=cfg.reward.timeout_s)
        rewards = torch.tensor(scored.scores, dtype=torch.float32)
        if round_index == 0:  # the problems given to make(), in order (the teacher probe reads these)
            self.last_scores = list(scored.scores)
        correct = rewards > 0.5
        lengths = torch.tensor([len(g.token_ids) for _, g in flat], dtype=torch.float32)
        shaped = rewards.clone()
        if cfg.loss.overlong_buffer:
            shaped = shaped + overlong_penalty(lengths, cfg.rollout.max_response_tokens, cfg.loss.overlong_buffer,
                                               cfg.loss.overlong_penalty)
        advantages = group_advantages(shaped, G, normalize_std=cfg.loss.normalize_std)

        metrics = {
            "reward_mean": float(rewards.mean()), "pass_rate": float(correct.float().mean()),
            "response_len": float(lengths.mean()), "response_len_max": float(lengths.max()),
            "truncated_frac": sum(g.finish_reason == "length" for _, g in flat) / len(flat),
            "reward_timeouts": float(scored.timeouts), "reward_errors": float(scored.errors),
        }
        everything = list(range(len(flat)))
        routes = {i: [int(Route.PG)] * len(flat[i][1].token_ids) for i in everything}
        teacher_prompts: dict[int, list[int]] = {}
        kl_active = kl_weight > 0 and cfg.distills
        if kl_active:
            with phase("annotate"):
                routes, teacher_prompts, ann_metrics = self._route(problems, flat, everything, correct, golds, step,
                                                                   seed_offset=round_index * 100_003)
            metrics.update(ann_metrics)
        keep_group = torch.ones(len(problems), dtype=torch.bool)
        if cfg.loss.dynamic_sampling:
            kl_rows = torch.tensor([sum(1 for r in routes[i] if r != Route.PG) for i in everything])
            keep_group, kl_only = groups_with_signal(shaped, G, kl_rows, kl_active=kl_active)
            metrics["groups_kept_kl_only"] = float(kl_only.sum())

        groups: list[list[Sample]] = []
        for gi in range(len(problems)):
            if not bool(keep_group[gi]):
                continue
            group = []
            for i in range(gi * G, (gi + 1) * G):
                g = flat[i][1]
                group.append(Sample(
                    prompt_ids=prompts[gi], response_ids=list(g.token_ids), sampler_logprobs=list(g.logprobs),
                    routes=routes[i], advantage=float(advantages[i]), reward=float(rewards[i]), group=gi,
                    teacher_prompt_ids=teacher_prompts.get(i), finish_reason=g.finish_reason))
            groups.append(group)
        return groups, metrics

    def _route(self, problems, flat, kept, correct, golds, step, *, seed_offset: int = 0):
        """Spans -> routes and privileged prompts for the kept responses."""
        cfg = self.cfg
        spans_cfg = cfg.annotate.spans
        decoded = {i: decode_with_offsets(self.tokenizer, flat[i][1].token_ids) for i in kept}
        labels: dict[int, list[str]] = {i: [] for i in kept}
        types: dict[int, list[str]] = {i: [] for i in kept}
        taxonomy = cfg.annotate.taxonomy
        char_spans: dict[int, list[tuple[int, int]]] = {i: [] for i in kept}
        metrics: dict[str, float] = {}
        if spans_cfg.mode in ("annotator", "random_spans"):
            requests = [AnnotationRequest(problem=problems[flat[i][0]].problem,
                                          solution=problems[flat[i][0]].solution,
                                          response_text=decoded[i][0], correct=bool(correct[i])) for i in kept]
            annotations = self.annotator.annotate(requests, [golds[i] for i in kept],
                                                  max_spans=cfg.annotate.max_spans, taxonomy=taxonomy)
            metrics.update(annotation_metrics(annotations))
            for i, ann in zip(kept, annotations):
                char_spans[i] = list(ann.char_spans)
                labels[i] = list(ann.labels)
                if taxonomy is not None:  # only types of the configured taxonomy reach the teacher
                    allowed = taxonomy[0] if bool(correct[i]) else taxonomy[1]
                    types[i] = [normalize_type(t, allowed) for t in ann.types]
        routes, teacher_prompts = {}, {}
        for i in kept:
            _, offsets = decoded[i]
            L = len(flat[i][1].token_ids)
            if spans_cfg.mode == "all_tokens":
                r = all_token_routes(torch.ones(L, dtype=torch.bool), bool(correct[i]),
                                     reverse_on_incorrect=spans_cfg.rkl)
            else:
                r = response_routes(offsets, char_spans[i], bool(correct[i]), spans_cfg,
                                    seed=cfg.train.seed * 1_000_003 + step * 10_007 + seed_offset + i)
            routes[i] = [int(x) for x in r]
            if any(x != Route.PG for x in routes[i]):
                survivors = spans_in_capped_mask(offsets, char_spans[i], coverage_cap=spans_cfg.coverage_cap)
                teacher_prompts[i] = self.teacher_prompt(
                    problems[flat[i][0]], correct=bool(correct[i]),
                    labels=[labels[i][k] for k in survivors],
                    types=[types[i][k] for k in survivors if k < len(types[i])])
        return routes, teacher_prompts, metrics

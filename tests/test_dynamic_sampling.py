"""Dynamic sampling after annotation and routing, with refill (DAPO), on the driver's ExperienceMaker.

Fake engine and scorer, the rule-based annotator, the shipped 4k tokenizer. Group kinds (G = 2):
  all_right  both correct: equal rewards, key spans -> FKL rows: kept while lambda > 0 (KL only, advantages 0)
  mixed      one correct, one wrong: rewards differ: kept
  all_wrong  both wrong: equal rewards; error spans would be RKL but rkl is off -> no KL rows: dropped
"""

from __future__ import annotations

import pytest
import torch

from megatron_trace.annotate.reference_match import ReferenceMatchAnnotator, numbers_in
from megatron_trace.config import load_config
from megatron_trace.data.dataset import Problem
from megatron_trace.rewards.batch import BatchScores
from megatron_trace.rollout.types import Generation
from megatron_trace.routes import Route
from megatron_trace.train.dynamic_sampling import groups_with_signal, merge_round_metrics, prompts_for_next_round
from megatron_trace.train.experience import ExperienceMaker


def _problem(i: int, kind: str) -> Problem:
    a, b = i + 2, i + 3
    return Problem(id=f"{kind}{i}", problem=f"What is {a} times {b}? ({kind})",
                   solution=f"{a} times {b} is {a * b}.", answer=str(a * b))


class FakeEngine:
    def __init__(self, tokenizer, maker_ref):
        self.tokenizer = tokenizer
        self.maker = maker_ref
        self.calls = []

    def generate(self, prompts, sampling):
        self.calls.append((len(prompts), sampling.seed))
        out = []
        for ids in prompts:
            problem = self.maker.by_prompt[tuple(ids)]
            kind = problem.id.rstrip("0123456789")
            right = f"The product is {problem.answer}."
            wrong = f"The product is {int(problem.answer) + 1}."
            texts = {"all_right": [right, right], "mixed": [right, wrong], "all_wrong": [wrong, wrong]}[kind]
            gens = []
            for text in texts:
                ids_ = self.tokenizer.encode(text, add_special_tokens=False)
                gens.append(Generation(token_ids=ids_, logprobs=[-0.5] * len(ids_), finish_reason="stop"))
            out.append(gens)
        return out


class FakeScorer:
    def score(self, texts, golds, timeout_s=None):
        return BatchScores(scores=[1.0 if numbers_in(t)[-1:] == [g] else 0.0 for t, g in zip(texts, golds)])

    def close(self):
        pass


def _maker(max_rounds: int):
    from megatron_trace.data.tokenizer import load_tokenizer

    cfg = load_config(None, ["rollout.group_size=2", "rollout.prompts_per_step=3", f"rollout.max_rounds={max_rounds}",
                             "loss.dynamic_sampling=true", "annotate.annotator=reference_match",
                             "annotate.spans.coverage_cap=1.0", "annotate.spans.rkl=false"])
    tok = load_tokenizer("qwen3-bpe4k")

    class Ref:
        by_prompt = {}

    maker = ExperienceMaker(cfg, tok, FakeEngine(tok, Ref), FakeScorer(), ReferenceMatchAnnotator(max_spans=2))
    pool = [_problem(0, "all_right"), _problem(1, "mixed"), _problem(2, "all_wrong"), _problem(3, "mixed"),
            _problem(4, "all_wrong"), _problem(5, "mixed")]
    for p in pool:
        Ref.by_prompt[tuple(maker.student_prompt(p))] = p
    queue = list(pool[3:])
    taken = []

    def next_problems(n):
        taken.append(n)
        return [queue.pop(0) for _ in range(n)]

    return maker, pool[:3], next_problems, taken


def test_all_correct_group_is_kept_for_its_key_spans_and_refill_reaches_prompts_per_step():
    maker, first, next_problems, taken = _maker(max_rounds=3)
    batch = maker.make(first, step=0, kl_weight=0.3, next_problems=next_problems)
    m = batch.metrics
    # round 1 keeps all_right (KL only) + mixed, drops all_wrong; 1 group short, keep rate 2/3 -> ceil(1 * 3/2) = 2
    # prompts (mixed3, all_wrong4); round 2 keeps mixed3: 3 groups = prompts_per_step
    assert taken == [2]
    assert m["groups_kept"] == 3 and m["groups"] == 5 and m["dynamic/rounds"] == 2 and m["dynamic/extra_rounds"] == 1
    assert m["dynamic/groups_dropped"] == 2 and m["dynamic/groups_surplus"] == 0 and m["groups_kept_kl_only"] == 1
    assert len(batch.samples) == 6 and [s.group for s in batch.samples] == [0, 0, 1, 1, 2, 2]
    assert len(maker.engine.calls) == 2
    assert maker.engine.calls[0][1] != maker.engine.calls[1][1], "each round samples with its own seed"
    right = batch.samples[:2]
    for s in right:  # the all-correct group: PG advantage 0, its key spans carry FKL rows and a teacher prompt
        assert s.advantage == 0.0 and s.reward == 1.0
        assert any(r == Route.FKL for r in s.routes) and s.teacher_prompt_ids is not None
    mixed = batch.samples[2:4]
    assert mixed[0].advantage > 0 > mixed[1].advantage
    assert all(r == Route.PG for r in mixed[1].routes)  # rkl off: the wrong response is plain PG


def test_without_kl_channel_equal_reward_groups_are_dropped_and_one_round_lets_the_batch_shrink():
    maker, first, next_problems, taken = _maker(max_rounds=1)
    batch = maker.make(first, step=40, kl_weight=0.0, next_problems=next_problems)
    assert taken == [] and batch.metrics["groups_kept"] == 1 and batch.metrics["dynamic/groups_dropped"] == 2
    assert [s.reward for s in batch.samples] == [1.0, 0.0]


def test_refill_stops_at_max_rounds_and_drops_surplus():
    maker, first, next_problems, taken = _maker(max_rounds=2)
    batch = maker.make(first, step=40, kl_weight=0.0, next_problems=next_problems)
    # lambda = 0: only mixed groups count; round 1 keeps 1 of 3 -> ask min(3, ceil(2 * 3 / 1)) = 3 prompts
    assert taken == [3] and batch.metrics["groups_kept"] == 3 and batch.metrics["dynamic/rounds"] == 2


def test_groups_with_signal_hand_values():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    kl_rows = torch.tensor([3, 0, 0, 0, 0, 0])
    keep, kl_only = groups_with_signal(rewards, 2, kl_rows, kl_active=True)
    assert keep.tolist() == [True, True, False] and kl_only.tolist() == [True, False, False]
    keep, kl_only = groups_with_signal(rewards, 2, kl_rows, kl_active=False)
    assert keep.tolist() == [False, True, False] and not kl_only.any()
    with pytest.raises(ValueError, match="kl_rows"):
        groups_with_signal(rewards, 2, torch.zeros(4), kl_active=True)
    assert prompts_for_next_round(1, 2, 3, 3) == 2 and prompts_for_next_round(5, 0, 8, 8) == 8
    assert prompts_for_next_round(0, 3, 3, 3) == 0
    merged = merge_round_metrics([({"reward_mean": 1.0, "groups": 2.0, "response_len_max": 5.0}, 4),
                                  ({"reward_mean": 0.0, "groups": 1.0, "response_len_max": 9.0}, 2)])
    assert merged == {"reward_mean": pytest.approx(4 / 6), "groups": 3.0, "response_len_max": 9.0,
                      "responses_sampled": 6.0}

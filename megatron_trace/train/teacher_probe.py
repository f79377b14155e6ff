"""Teacher informativeness: how often the policy, reading the privileged prompt, solves the step's problems.

TRACE's distillation can only help where the self-teacher knows more than the student. Every
`teacher.probe_every` steps the driver samples the first `teacher.probe_problems` problems of the step again,
this time from the privileged prompt (problem + reference solution, no annotator labels), through the same
generation engine and weights that produced the step's rollouts, scores the responses with the same reward, and
logs

    teacher_pass_rate                  fraction of those privileged-prompt responses that are correct
    teacher_probe_student_pass_rate    the student's pass rate on the same problems (this step's rollouts)

so the gap between the two is read on identical problems and identical weights. Driver only; costs one extra
generate call of probe_problems x group_size responses on the steps it runs.
"""

from __future__ import annotations

from typing import Sequence

from megatron_trace.data.dataset import Problem
from megatron_trace.rollout.types import GenerationEngine, SamplingConfig

__all__ = ["probe_due", "teacher_pass_rate", "probe_teacher"]


def probe_due(every: int, step: int) -> bool:
    """Whether step `step` (0-based) runs the probe: every `every` steps from step 0; 0 = never."""
    return every > 0 and step % every == 0


def teacher_pass_rate(engine: GenerationEngine, scorer, teacher_prompts: Sequence[Sequence[int]],
                      golds: Sequence[str], sampling: SamplingConfig, *, decode, timeout_s: float) -> float:
    """Fraction of `sampling.n` responses per privileged prompt that score > 0.5.

    teacher_prompts: [P] token-id lists; golds: [P] reference answers; decode: token ids -> text;
    scorer: anything with `score(texts, golds, timeout_s=...) -> .scores` (a `rewards.batch.RewardScorer`).
    """
    if len(teacher_prompts) != len(golds):
        raise ValueError(f"teacher_pass_rate: {len(teacher_prompts)} prompts but {len(golds)} reference answers")
    if not teacher_prompts:
        raise ValueError("teacher_pass_rate: no problems to probe")
    generations = engine.generate(teacher_prompts, sampling)
    if len(generations) != len(teacher_prompts) or any(len(g) != sampling.n for g in generations):
        raise RuntimeError(f"engine returned {[len(g) for g in generations]} responses for "
                           f"{len(teacher_prompts)} prompts x {sampling.n}")
    texts = [decode(g.token_ids) for gens in generations for g in gens]
    flat_golds = [gold for gold, gens in zip(golds, generations) for _ in gens]
    scores = scorer.score(texts, flat_golds, timeout_s=timeout_s).scores
    return sum(s > 0.5 for s in scores) / len(scores)


def probe_teacher(maker, problems: Sequence[Problem], *, step: int) -> dict[str, float]:
    """The probe of one step, on the driver. maker: the run's `train.experience.ExperienceMaker`, right after
    `maker.make(problems, ...)` (its engine holds the weights that sampled the step, `maker.last_scores` the
    step's first-round [P x G] rewards, problem-major: the problems given to `make`, before any refill round); problems: the step's problems, in the order given to `make`.

    Returns {"teacher_pass_rate", "teacher_probe_student_pass_rate", "teacher_probe_problems"}.
    """
    cfg = maker.cfg
    k = min(cfg.teacher.probe_problems, len(problems))
    G = cfg.rollout.group_size
    probed = list(problems[:k])
    student = list(maker.last_scores[:k * G])
    # no span, no type: the privileged prompt is the problem and its reference solution only
    if len(student) != k * G:
        raise RuntimeError(f"probe_teacher: the step scored {len(maker.last_scores)} responses, expected at least "
                           f"{k} problems x {G}; call it right after ExperienceMaker.make on the same problems")
    # Unseeded (the engine's own generator): vLLM's CPU build fails seeded requests whose prefill it chunks
    # ("CPU Generator does not use offset", HTTP 409 from the server), which 64 privileged prompts of ~130 tokens
    # trigger. The rollouts stay seeded per request, so the probe never moves the training run's samples; the
    # probe's own draws are not reproducible.
    sampling = SamplingConfig(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                              top_k=cfg.rollout.top_k, max_tokens=cfg.rollout.max_response_tokens, n=G,
                              seed=None, logprobs=False)
    rate = teacher_pass_rate(maker.engine, maker.scorer, [maker.teacher_prompt(p, correct=True) for p in probed],
                             [p.answer for p in probed], sampling,
                             decode=lambda ids: maker.tokenizer.decode(ids, skip_special_tokens=True),
                             timeout_s=cfg.reward.timeout_s)
    return {"teacher_pass_rate": rate,
            "teacher_probe_student_pass_rate": sum(s > 0.5 for s in student) / len(student),
            "teacher_probe_problems": float(k)}

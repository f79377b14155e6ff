"""The teacher-informativeness probe against a scripted engine: it samples the step's first `probe_problems`
problems from the privileged prompt (exactly the token ids the teacher reads, no labels), through the engine that
made the step's rollouts, unseeded, scores them with the run's reward, and reports the teacher's and the
student's pass rates on the same problems (hand-counted below)."""

from __future__ import annotations

import os

import pytest

from megatron_trace.config import ConfigError, load_config
from megatron_trace.data.dataset import load_problems
from megatron_trace.data.prompts import build_prompt_ids, privileged_messages
from megatron_trace.data.tokenizer import load_tokenizer
from megatron_trace.rewards import get_reward_fn
from megatron_trace.rewards.batch import BatchScores
from megatron_trace.rollout.types import Generation
from megatron_trace.train.experience import ExperienceMaker
from megatron_trace.train.teacher_probe import probe_due, probe_teacher, teacher_pass_rate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G = 4
# correct responses out of G per problem: (student prompt, privileged prompt)
SCRIPT = [(1, 4), (0, 3), (2, 2), (4, 4)]


class ScriptedEngine:
    """Answers problem i correctly in the first SCRIPT[i][teacher] of its G samples, wrongly otherwise."""

    def __init__(self, tokenizer, problems):
        self.tok = tokenizer
        self.problems = problems
        self.calls = []

    def generate(self, prompts, sampling):
        self.calls.append(([list(p) for p in prompts], sampling))
        out = []
        for ids in prompts:
            text = self.tok.decode(ids)
            i = next(k for k, p in enumerate(self.problems) if p.problem in text)
            teacher = "Here is a reference solution" in text
            right = SCRIPT[i][int(teacher)]
            gens = []
            for j in range(sampling.n):
                answer = self.problems[i].answer if j < right else f"{self.problems[i].answer}1"
                ids_out = self.tok.encode(f"So it is \\boxed{{{answer}}}.", add_special_tokens=False)
                gens.append(Generation(ids_out, [-0.5] * len(ids_out), "stop"))
            out.append(gens)
        return out


class InlineScorer:
    """The run's reward function, in this process (RewardScorer's interface)."""

    def __init__(self, name):
        self.fn = get_reward_fn(name)

    def score(self, texts, golds, *, timeout_s):
        return BatchScores([float(self.fn(t, g)) for t, g in zip(texts, golds)])


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(os.path.join(ROOT, "examples/configs/tiny_cpu.yaml"),
                      [f"data.path={ROOT}/megatron_trace/data/assets/arith_train.jsonl", "loss.mode=grpo",
                       f"rollout.group_size={G}", "rollout.prompts_per_step=4", "teacher.probe_every=5",
                       "teacher.probe_problems=3", "train.seed=11"])
    tok = load_tokenizer(cfg.model.tokenizer_source())
    problems = load_problems(cfg.data)[:4]
    return cfg, tok, problems


def test_probe_reports_the_teacher_and_student_pass_rates_on_the_same_problems(setup):
    cfg, tok, problems = setup
    engine = ScriptedEngine(tok, problems)
    maker = ExperienceMaker(cfg, tok, engine, InlineScorer("math"))
    batch = maker.make(problems, step=10, kl_weight=0.0)
    assert batch.metrics["pass_rate"] == pytest.approx((1 + 0 + 2 + 4) / 16)  # the step's own, all 4 problems

    out = probe_teacher(maker, problems, step=10)
    # only the first 3 problems are probed: teacher 4 + 3 + 2 of 12, student 1 + 0 + 2 of 12
    assert out == {"teacher_pass_rate": pytest.approx(9 / 12), "teacher_probe_student_pass_rate": pytest.approx(3 / 12),
                   "teacher_probe_problems": 3.0}
    (rollout_prompts, rollout_sampling), (probe_prompts, probe_sampling) = engine.calls
    # exactly the teacher's privileged prompt (problem + reference solution, no labels), in step order
    assert probe_prompts == [build_prompt_ids(tok, privileged_messages(p.problem, p.solution),
                                              enable_thinking=False) for p in problems[:3]]
    assert probe_prompts[0] != rollout_prompts[0]
    assert probe_sampling.n == G and probe_sampling.max_tokens == rollout_sampling.max_tokens
    assert probe_sampling.temperature == rollout_sampling.temperature == 1.0
    # unseeded (vLLM's CPU build fails seeded chunked prefills); the rollout keeps its per-step seed
    assert probe_sampling.seed is None and rollout_sampling.seed == 11 * 100_003 + 10


def test_probe_asks_for_no_more_problems_than_the_step_has(setup):
    cfg, tok, problems = setup
    cfg.teacher.probe_problems = 50
    try:
        engine = ScriptedEngine(tok, problems)
        maker = ExperienceMaker(cfg, tok, engine, InlineScorer("math"))
        maker.make(problems[:2], step=0, kl_weight=0.0)
        out = probe_teacher(maker, problems[:2], step=0)
    finally:
        cfg.teacher.probe_problems = 3
    assert out["teacher_probe_problems"] == 2.0
    assert out["teacher_pass_rate"] == pytest.approx(7 / 8) and out["teacher_probe_student_pass_rate"] == 1 / 8


def test_probe_schedule_and_bad_input():
    assert [s for s in range(12) if probe_due(5, s)] == [0, 5, 10]
    assert not any(probe_due(0, s) for s in range(12))
    with pytest.raises(ConfigError, match="probe_every"):
        load_config(os.path.join(ROOT, "examples/configs/tiny_cpu.yaml"), ["teacher.probe_every=-1"])
    with pytest.raises(ConfigError, match="probe_problems"):
        load_config(os.path.join(ROOT, "examples/configs/tiny_cpu.yaml"), ["teacher.probe_problems=0"])
    with pytest.raises(ValueError, match="2 prompts but 1 reference answers"):
        teacher_pass_rate(None, None, [[1], [2]], ["3"], None, decode=str, timeout_s=1.0)


def test_probe_reads_the_first_round_when_dynamic_sampling_refills(setup):
    cfg, tok, problems = setup
    cfg.loss.dynamic_sampling, cfg.rollout.max_rounds = True, 2
    try:
        engine = ScriptedEngine(tok, problems)
        maker = ExperienceMaker(cfg, tok, engine, InlineScorer("math"))
        # problem 1 (0 of 4 right from the student prompt) has no signal and is dropped; a refill round samples
        # problems 2 and 3
        maker.make(problems[:2], step=3, kl_weight=0.0, next_problems=lambda n: problems[2:2 + max(n, 2)])
        assert len(engine.calls) == 2  # the refill round ran
        out = probe_teacher(maker, problems[:2], step=3)
    finally:
        cfg.loss.dynamic_sampling, cfg.rollout.max_rounds = False, 1
    # the step's own problems 0 and 1: student 1 + 0 of 8, teacher 4 + 3 of 8 (not the refill's 2 + 4 of 8)
    assert out["teacher_probe_student_pass_rate"] == 1 / 8 and out["teacher_pass_rate"] == 7 / 8

"""Math reward: the last boxed answer, checked for equivalence with the gold answer by math-verify.

math-verify guards its own parsing and comparison with `signal.alarm`, which only works on the main thread of
the main interpreter. We switch that off (`parsing_timeout=None`, `timeout_seconds=None`) so the reward works on
any thread or worker process; the time limit is enforced outside, by `rewards.batch.RewardScorer`, which kills
a worker stuck on a pathological expression.
"""

from __future__ import annotations

import logging

from megatron_trace.rewards.extract import extract_boxed_answer

# math-verify warns once that its signal timeout is off and we must time out ourselves: we do (rewards.batch).
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _parse(latex: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(
        latex,
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        parsing_timeout=None,
    )


def answers_equivalent(answer: str, gold_answer: str) -> bool:
    """Whether the extracted `answer` (LaTeX, no `\\boxed`) equals `gold_answer` per math-verify.

    Both are parsed as math (`$...$`): fractions, decimals, percent, intervals, tuples, sets, equations like
    `x=3` against `3`, and text wrappers (`\\text{}`, units) are handled by math-verify.
    """
    gold = _parse(f"${gold_answer}$")
    if not gold:
        # A gold string math-verify cannot read as math (e.g. a word): compare it as text.
        gold = [gold_answer.strip()]
    pred = _parse(f"$\\boxed{{{answer}}}$")
    if not pred:
        return False
    from math_verify import verify

    return bool(verify(gold, pred, timeout_seconds=None))


def math_reward(response: str, gold_answer: str) -> float:
    """1.0 when the response's final `\\boxed{}` answer equals `gold_answer`, else 0.0.

    response: the decoded response text (a Qwen3 `<think>` block is skipped; an unclosed one means no answer).
    gold_answer: the dataset's answer, LaTeX or plain. No boxed answer scores 0.0.
    May run for a long time on pathological expressions: call it through `rewards.batch` for a time limit.
    """
    if not isinstance(response, str) or not isinstance(gold_answer, str):
        raise TypeError(f"math_reward takes (str, str), got ({type(response).__name__}, {type(gold_answer).__name__})")
    if not gold_answer.strip():
        raise ValueError("math_reward: the gold answer is empty")
    answer = extract_boxed_answer(response)
    if answer is None or not answer:
        return 0.0
    return 1.0 if answers_equivalent(answer, gold_answer) else 0.0

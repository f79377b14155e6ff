"""Multiple-choice reward (GPQA-style): the chosen letter against the gold letter."""

from __future__ import annotations

import re

from megatron_trace.rewards.extract import last_boxed, strip_think

# A boxed choice may be written `B`, `(B)`, `\text{B}`, `\textbf{(B)}`, `B) 42` or `B. 42`.
_BOXED_LETTER = re.compile(r"^\s*(?:\\text(?:bf)?\{)?\s*\(?([A-Za-z])\)?(?:[\s.):}]|$)")
# Unboxed fallbacks, last occurrence wins: "answer is (C)", "Answer: C", "**Answer:** C". The letter must be
# upper case, so that "the answer is a bit tricky" names no option.
_STATED_LETTER = re.compile(r"(?i:answer)\s*(?:(?i:is)|:)?\s*[:*]*\s*\(?\b([A-Z])\b\)?")


def extract_choice(response: str) -> str | None:
    """The chosen option letter (upper case) of a response, or None.

    The last `\\boxed{}` wins; without one, the last "answer is X" / "Answer: X" statement.
    """
    body = strip_think(response)
    if body is None:
        return None
    boxed = last_boxed(body)
    if boxed is not None:
        m = _BOXED_LETTER.match(boxed)
        return m.group(1).upper() if m else None
    found = _STATED_LETTER.findall(body)
    return found[-1].upper() if found else None


def choice_reward(response: str, gold_answer: str) -> float:
    """1.0 when the response chose `gold_answer` (one letter, any case, optionally in parentheses), else 0.0."""
    gold = gold_answer.strip().strip("()").upper()
    if len(gold) != 1 or not gold.isalpha():
        raise ValueError(f"choice_reward: gold answer must be one option letter, got {gold_answer!r}")
    return 1.0 if extract_choice(response) == gold else 0.0

"""Math and multiple-choice rewards against a hand-checked table of verdicts."""

import pytest

from megatron_trace.config_base import ConfigError, from_dict
from megatron_trace.rewards import REWARD_FNS, RewardConfig, get_reward_fn
from megatron_trace.rewards.choice import choice_reward, extract_choice
from megatron_trace.rewards.extract import extract_boxed_answer, last_boxed, strip_think
from megatron_trace.rewards.math import math_reward

B = "\\boxed"

# (response, gold answer, expected reward). Every verdict was checked by hand.
MATH_TABLE = [
    # fractions
    (f"So the answer is ${B}{{\\frac{{1}}{{2}}}}$.", "1/2", 1.0),
    (f"${B}{{\\dfrac{{1}}{{2}}}}$", "\\frac12", 1.0),
    (f"${B}{{1/2}}$", "\\frac{1}{2}", 1.0),
    (f"${B}{{\\frac{{2}}{{4}}}}$", "\\frac{1}{2}", 1.0),
    (f"${B}{{\\frac{{1}}{{3}}}}$", "\\frac{1}{2}", 0.0),
    (f"${B}{{-\\frac{{3}}{{4}}}}$", "-3/4", 1.0),
    # decimals
    (f"${B}{{0.5}}$", "\\frac{1}{2}", 1.0),
    (f"${B}{{0.75}}$", "\\frac{3}{4}", 1.0),
    (f"${B}{{0.76}}$", "3/4", 0.0),
    (f"${B}{{5.0}}$", "5", 1.0),
    (f"${B}{{0.333}}$", "1/3", 0.0),
    # percent
    (f"${B}{{50\\%}}$", "50", 1.0),
    (f"${B}{{50}}$", "50\\%", 1.0),
    (f"${B}{{0.5}}$", "50\\%", 1.0),
    (f"${B}{{40\\%}}$", "50\\%", 0.0),
    # intervals
    (f"${B}{{(1, 2]}}$", "(1,2]", 1.0),
    (f"${B}{{[1,2]}}$", "(1,2]", 0.0),
    (f"${B}{{(-\\infty,3)}}$", "(-\\infty, 3)", 1.0),
    (f"${B}{{(-\\infty,3]}}$", "(-\\infty, 3)", 0.0),
    # tuples and sets
    (f"${B}{{(2, 1)}}$", "(2,1)", 1.0),
    (f"${B}{{(1, 2)}}$", "(2,1)", 0.0),
    (f"${B}{{\\{{2,1\\}}}}$", "\\{1,2\\}", 1.0),
    # LaTeX variants
    (f"${B}{{\\text{{10}}}}$", "10", 1.0),
    (f"${B}{{\\mathbf{{12}}}}$", "12", 1.0),
    (f"${B}{{1,000}}$", "1000", 1.0),
    (f"${B}{{1{{,}}000}}$", "1000", 1.0),
    (f"${B}{{90^\\circ}}$", "90", 1.0),
    (f"${B}{{7 \\text{{ apples}}}}$", "7", 1.0),
    (f"${B}{{\\frac{{\\sqrt2}}{{2}}}}$", "\\sqrt{2}/2", 1.0),
    (f"${B}{{\\pi \\cdot 2}}$", "2\\pi", 1.0),
    (f"${B}{{(x+1)^2}}$", "x^2+2x+1", 1.0),
    (f"${B}{{x=3}}$", "3", 1.0),
    (f"${B}{{- 2}}$", "-2", 1.0),
    ("\\fbox{42}", "42", 1.0),
    # wrong answers
    (f"${B}{{80}}$", "81", 0.0),
    (f"${B}{{3.14159}}$", "\\pi", 0.0),
    (f"${B}{{-5}}$", "5", 0.0),
    # no boxed answer
    ("The answer is 81.", "81", 0.0),
    ("", "81", 0.0),
    (f"${B}{{81", "81", 0.0),  # truncated: the box never closed
    (f"${B}{{}}$", "81", 0.0),
    # nested braces, and the last box wins
    (f"${B}{{\\frac{{\\frac{{1}}{{2}}}}{{2}}}}$", "1/4", 1.0),
    (f"First ${B}{{3}}$, no wait: ${B}{{4}}$", "4", 1.0),
    (f"First ${B}{{4}}$, no wait: ${B}{{3}}$", "4", 0.0),
    # Qwen3 think blocks
    (f"<think>\nmaybe {B}{{7}}\n</think>\n\nThe answer is ${B}{{8}}$.", "8", 1.0),
    (f"<think>\nmaybe {B}{{8}}\n</think>\n\nThe answer is ${B}{{7}}$.", "8", 0.0),
    (f"<think>\nit is {B}{{8}} and then I ran out of tok", "8", 0.0),
    (f"<think>\n\n</think>\n\n23 + 58 = 81.\n${B}{{81}}$", "81", 1.0),
]


def test_table_is_large_enough():
    assert len(MATH_TABLE) >= 40


@pytest.mark.parametrize("response,gold,expected", MATH_TABLE)
def test_math_reward_verdict(response, gold, expected):
    assert math_reward(response, gold) == expected


def test_last_boxed_balances_nested_and_escaped_braces():
    assert last_boxed("x \\boxed{\\frac{a}{b}} y") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert last_boxed("\\boxed 5$") == "5"
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2") is None
    assert last_boxed("no box here") is None


def test_strip_think_returns_text_after_the_last_close_tag():
    assert strip_think("<think>a</think>b</think>c") == "c"
    assert strip_think("<think>never closed") is None
    assert strip_think("plain") == "plain"
    assert extract_boxed_answer("<think>\\boxed{1}</think> none") is None


CHOICE_TABLE = [
    ("The answer is \\boxed{B}.", "B", 1.0),
    ("\\boxed{(C)}", "C", 1.0),
    ("\\boxed{\\text{D}}", "d", 1.0),
    ("\\boxed{A) 42}", "A", 1.0),
    ("\\boxed{A}", "B", 0.0),
    ("Answer: C", "C", 1.0),
    ("I think the answer is (A). Actually, the answer is (D).", "D", 1.0),
    ("<think>the answer is A</think> Answer: B", "A", 0.0),
    ("no letter here", "A", 0.0),
    ("the answer is a bit tricky", "A", 0.0),
    ("**Answer:** (B)", "B", 1.0),
    ("\\boxed{42}", "A", 0.0),
]


@pytest.mark.parametrize("response,gold,expected", CHOICE_TABLE)
def test_choice_reward_verdict(response, gold, expected):
    assert choice_reward(response, gold) == expected


def test_extract_choice_prefers_the_box_over_stated_letters():
    assert extract_choice("The answer is A. \\boxed{C}") == "C"


def test_registry_maps_names_to_functions():
    assert get_reward_fn("math") is math_reward
    assert get_reward_fn("choice") is choice_reward
    assert set(REWARD_FNS) == {"math", "choice"}


def test_unknown_reward_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown reward 'maths'.*choice, math"):
        get_reward_fn("maths")


def test_bad_gold_answers_are_rejected_with_the_cause():
    with pytest.raises(ValueError, match="gold answer is empty"):
        math_reward("\\boxed{1}", "  ")
    with pytest.raises(ValueError, match="one option letter"):
        choice_reward("\\boxed{A}", "AB")
    with pytest.raises(TypeError, match="math_reward takes"):
        math_reward(None, "1")


def test_reward_config_rejects_an_unknown_name_at_load():
    assert from_dict(RewardConfig, {"name": "choice", "timeout_s": 2}).timeout_s == 2.0
    with pytest.raises(ConfigError, match="name: unknown reward 'maths'; valid rewards: choice, math"):
        from_dict(RewardConfig, {"name": "maths"})


def test_math_reward_works_off_the_main_thread():
    """No signal-based timeout inside: math-verify's default would raise in a worker thread."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        out = list(pool.map(math_reward, ["$\\boxed{\\frac{1}{2}}$", "$\\boxed{3}$"], ["0.5", "4"]))
    assert out == [1.0, 0.0]

"""Verifiable rewards, registered by name for the config (`reward: math` or `reward: choice`).

A reward function takes (response text, gold answer) and returns 1.0 or 0.0. Batches go through
`rewards.batch.score_batch` / `RewardScorer`, which add a per-item time limit in worker processes.
"""

from __future__ import annotations

from typing import Callable

from megatron_trace.rewards.choice import choice_reward
from megatron_trace.rewards.math import math_reward

RewardFn = Callable[[str, str], float]

REWARD_FNS: dict[str, RewardFn] = {
    "math": math_reward,
    "choice": choice_reward,
}


def get_reward_fn(name: str) -> RewardFn:
    """The reward function registered as `name`; an unknown name raises ValueError listing the valid ones."""
    try:
        return REWARD_FNS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(REWARD_FNS))}") from None

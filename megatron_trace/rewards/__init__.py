"""Verifiable rewards, registered by name for the config (`reward: math` or `reward: choice`).

A reward function takes (response text, gold answer) and returns 1.0 or 0.0. Batches go through
`rewards.batch.score_batch` / `RewardScorer`, which add a per-item time limit in worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megatron_trace.config_base import ConfigError

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


@dataclass
class RewardConfig:
    """The verifier: which registered reward, and the batch scorer's limits."""

    name: str = "math"  # a key of REWARD_FNS
    timeout_s: float = 5.0  # per response; a response that takes longer scores 0 and is counted
    workers: int = 2  # scoring processes

    def __post_init__(self) -> None:
        if self.name not in REWARD_FNS:
            raise ConfigError(f"name: unknown reward {self.name!r}; valid rewards: {', '.join(sorted(REWARD_FNS))}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s: must be > 0, got {self.timeout_s}")
        if self.workers < 1:
            raise ConfigError(f"workers: must be >= 1, got {self.workers}")

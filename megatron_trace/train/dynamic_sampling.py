"""Dynamic sampling that keeps the KL signal, with DAPO's refill (plain functions; the driver's ExperienceMaker
calls them after annotation and routing).

A GRPO group (the n responses of one prompt) is kept when it carries any learning signal:
  - its (shaped) rewards differ: nonzero advantages, a GRPO gradient; or
  - while lambda_k > 0, any of its responses carries KL rows (FKL on key spans of a correct response, RKL on error
    spans of an incorrect one): an all-correct or all-wrong group then still teaches through the KL channel, while
    its PG advantages stay 0.
With `rollout.max_rounds` > 1, further rounds sample fresh prompts until `prompts_per_step` groups with signal are
collected or the rounds run out; surplus groups of the last round are dropped (the batch size stays fixed).
"""

from __future__ import annotations

import math

import torch

from megatron_trace.loss.grpo import dynamic_sampling_mask

__all__ = ["groups_with_signal", "prompts_for_next_round", "merge_round_metrics"]


def groups_with_signal(rewards: torch.Tensor, group_size: int, kl_rows: torch.Tensor, *,
                       kl_active: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [num_groups] bool, kept_for_kl_only [num_groups] bool).

    rewards: [num_groups * n] the rewards the advantages are computed from (after any overlong shaping);
    kl_rows: [num_groups * n] number of KL rows (FKL/RKL tokens) of each response after routing; kl_active:
    lambda_k > 0 for this step (else KL rows are ignored: the KL channel is off).
    """
    differs = dynamic_sampling_mask(rewards, group_size)
    kl_rows = torch.as_tensor(kl_rows)
    if kl_rows.shape != (differs.shape[0] * group_size,):
        raise ValueError(f"kl_rows must be [{differs.shape[0] * group_size}] (one count per response), got "
                         f"{tuple(kl_rows.shape)}")
    has_kl = (kl_rows.view(-1, group_size) > 0).any(dim=1) if kl_active else torch.zeros_like(differs)
    return differs | has_kl, has_kl & ~differs


def prompts_for_next_round(needed: int, kept_so_far: int, sampled_so_far: int, prompts_per_step: int) -> int:
    """Prompts to sample in the next refill round: the groups still needed divided by the keep rate seen so far
    (at least `needed`, at most `prompts_per_step`)."""
    if needed <= 0:
        return 0
    if kept_so_far <= 0 or sampled_so_far <= 0:
        return prompts_per_step
    return max(needed, min(prompts_per_step, math.ceil(needed * sampled_so_far / kept_so_far)))


# Counts add up over rounds; `*_max` keys take the max; every other key is a per-response mean, weighted by the
# responses of its round.
_SUM_KEYS = ("reward_timeouts", "reward_errors", "groups_kept", "groups", "annotate/failed", "annotate/dropped",
             "annotate/skipped_too_long", "annotate/shortened", "groups_kept_kl_only")


def merge_round_metrics(rounds: list[tuple[dict, int]]) -> dict:
    """One step's rollout metrics from its rounds' (metrics, responses) pairs."""
    out: dict[str, float] = {}
    total = sum(n for _, n in rounds)
    keys = {k for m, _ in rounds for k in m}
    for key in sorted(keys):
        values = [(m[key], n) for m, n in rounds if key in m]
        if key in _SUM_KEYS:
            out[key] = float(sum(v for v, _ in values))
        elif key.endswith("_max"):
            out[key] = float(max(v for v, _ in values))
        else:
            weight = sum(n for _, n in values)
            out[key] = float(sum(v * n for v, n in values) / weight) if weight else 0.0
    out["responses_sampled"] = float(total)
    return out

"""PPO mini-batches: a rollout batch split into optimizer-step batches, each pass (epoch) over all of them.

verl's `ppo_mini_batch_size` / `ppo_epochs`, NeMo-RL's `train_global_batch_size`: with N responses and
`global_batch_size` B (0 = N), one epoch takes ceil(N / B) optimizer steps on near-equal mini-batches (sizes differ
by at most one, so a dynamic-sampling batch that is not a multiple of B has no tiny last step). Responses are dealt
to mini-batches by a seeded permutation (the same on every rank), so one mini-batch mixes prompts; the split is
fixed for all epochs. Each mini-batch is then handed to the ordinary data-parallel split and micro-batching.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ["minibatch_indices", "optimizer_steps_per_batch", "combine_step_metrics"]

# Each step's loss is already its mini-batch's token mean: averaged over steps, not added.
_PER_STEP_MEANS = ("loss", "pg_loss", "kl_loss", "grad_norm")
# Token counts are reported per pass over the rollout batch.
_PER_PASS_COUNTS = ("tokens", "pg_tokens", "fkl_tokens", "rkl_tokens", "span_tokens")


def minibatch_indices(num_samples: int, global_batch_size: int, *, seed: int) -> list[list[int]]:
    """Indices of the samples in each mini-batch (each list ascending), ceil(N / B) lists; B = 0 -> one list."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if global_batch_size < 0:
        raise ValueError(f"global_batch_size must be >= 0, got {global_batch_size}")
    if global_batch_size == 0 or global_batch_size >= num_samples:
        return [list(range(num_samples))]
    count = -(-num_samples // global_batch_size)
    order = np.random.default_rng(seed).permutation(num_samples)
    return [sorted(int(i) for i in part) for part in np.array_split(order, count)]


def combine_step_metrics(steps: Sequence[Mapping[str, float]], reductions: Mapping[str, object], *,
                         epochs: int) -> dict[str, float]:
    """The metrics of one rollout batch from its optimizer steps' (already globally reduced) metrics.

    reductions: the loss's declared reduction per metric: "sum" (added over steps), "max", or a mean of two sums
    (an object with `.total` / `.count`, or a (total, count) pair), recomputed from the summed totals, so e.g.
    clip_frac is clipped tokens / tokens over all steps. Then: loss, pg_loss, kl_loss, grad_norm are means over
    steps; token counts are divided by `epochs` (per pass over the batch); grad_norm_max, update_skipped (sum),
    optimizer_steps and kl_active (max) are added.
    """
    if not steps:
        raise ValueError("combine_step_metrics needs at least one step")
    out: dict[str, float] = {}
    means = {}
    for name, r in reductions.items():
        if r == "sum":
            out[name] = float(sum(m[name] for m in steps))
        elif r == "max":
            out[name] = float(max(m[name] for m in steps))
        else:
            means[name] = (r.total, r.count) if hasattr(r, "total") else tuple(r)
    for name, (total, count) in means.items():
        out[name] = out[total] / out[count] if out[count] else 0.0
    n = len(steps)
    for key in _PER_STEP_MEANS:
        if all(key in m for m in steps):
            out[key] = float(sum(m[key] for m in steps) / n)
    for key in _PER_PASS_COUNTS:
        if key in out:
            out[key] /= epochs
    out["grad_norm_max"] = float(max(m["grad_norm"] for m in steps))
    out["update_skipped"] = float(sum(m["update_skipped"] for m in steps))
    out["kl_active"] = float(max(m.get("kl_active", 0.0) for m in steps))
    out["optimizer_steps"] = float(n)
    return out


def optimizer_steps_per_batch(num_samples: int, global_batch_size: int, epochs: int) -> int:
    """Optimizer steps one rollout batch of `num_samples` responses takes."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    return epochs * len(minibatch_indices(num_samples, global_batch_size, seed=0))

"""The KL weight lambda_k over training steps and the PG weight on distilled tokens (plain functions).

TRACE's anneal (paper, section 3): lambda_k = w0 for k < W, then w0 * max(0, 1 - (k - W + 1) / D), so lambda is held
at w0 for exactly W steps (k = 0 .. W-1), steps down by w0 / D at k = W, and is 0 from k = W + D - 1 on (the KL
channel, the annotator and the teacher pass are then off). `constant` keeps lambda_k = w0 for every step (the
all-token self-distillation baselines that never switch the KL channel off).

The PG weight on tokens that carry a KL row ("distilled tokens"):
    anneal: 1 - lambda_k / w0  (TRACE: GRPO takes over as the KL channel fades; 0 while lambda_k = w0)
    full:   1                  (GRPO on every token, KL added on top: "GRPO + all-token KL")
    off:    0                  (pure distillation on those tokens)
Tokens without a KL row always take PG weight 1. Once lambda_k = 0 the trainer routes no token to a KL row, so every
mode is plain GRPO from then on.
"""

from __future__ import annotations

from typing import Literal

ScheduleKind = Literal["anneal", "constant"]
PgOnKlTokens = Literal["anneal", "full", "off"]

__all__ = ["ScheduleKind", "PgOnKlTokens", "kl_weight_at", "last_active_step", "pg_weight_on_kl_tokens"]


def kl_weight_at(step: int, *, w0: float, warmup_steps: int, decay_steps: int, kind: ScheduleKind = "anneal") -> float:
    """lambda_k for 0-based step `step` (see the module docstring). decay_steps = 0: 0 right after warm-up."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if kind == "constant":
        return float(w0)
    if kind != "anneal":
        raise ValueError(f"kind must be 'anneal' or 'constant', got {kind!r}")
    if step < warmup_steps:
        return float(w0)
    if decay_steps == 0:
        return 0.0
    # integer arithmetic first: exact 0.0 at and after k = W + D - 1
    remaining = decay_steps - (step - warmup_steps + 1)
    return float(w0) * remaining / decay_steps if remaining > 0 else 0.0


def last_active_step(*, w0: float, warmup_steps: int, decay_steps: int, kind: ScheduleKind = "anneal") -> int | None:
    """Last step with lambda_k > 0: -1 if none, None if lambda never reaches 0 (constant schedule, w0 > 0)."""
    if w0 == 0:
        return -1
    if kind == "constant":
        return None
    if decay_steps <= 1:  # D = 1: w0 * (1 - 1/1) = 0 already at k = W
        return warmup_steps - 1
    return warmup_steps + decay_steps - 2


def pg_weight_on_kl_tokens(kl_weight: float, w0: float, mode: PgOnKlTokens = "anneal") -> float:
    """The PG (clipped surrogate) weight of a token that carries a KL row, for lambda_k = kl_weight."""
    if mode == "anneal":
        if kl_weight == 0:  # also covers w0 = 0 (no KL channel)
            return 1.0
        if w0 <= 0:
            raise ValueError(f"w0 must be > 0 for the anneal PG weight with lambda_k={kl_weight}, got {w0}")
        return 1.0 - kl_weight / w0
    if mode == "full":
        return 1.0
    if mode == "off":
        return 0.0
    raise ValueError(f"pg_on_kl_tokens must be anneal, full or off, got {mode!r}")

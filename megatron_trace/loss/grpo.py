"""GRPO pieces (docs/design.md, "The step" 2 and "The loss"): group-normalised advantages, DAPO's dynamic-sampling
filter and soft overlong penalty, and the clipped policy-gradient surrogate with asymmetric ("clip-higher") bounds.

Rewards of one GRPO group (the n responses sampled for one prompt) are contiguous: index i belongs to group
i // group_size. Token-level tensors are flat `[T]` over the packed responses of a micro-batch.
"""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "dynamic_sampling_mask", "overlong_penalty", "clipped_surrogate", "token_mean",
           "LOG_RATIO_BOUND", "bounded_log_ratio", "truncated_is_weights", "approx_kl_terms"]

# |log rho| is clamped to this many nats before exp (verl's bound): exp(20) ~ 4.9e8 is finite in fp32/bf16, while an
# unbounded log-ratio above ~88 nats overflows to inf and the loss or its gradient to inf/NaN.
LOG_RATIO_BOUND = 20.0


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards [G*n] or [G, n] -> float [G, n]."""
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.as_tensor(rewards)
    if rewards.dim() == 2:
        if rewards.shape[1] != group_size:
            raise ValueError(f"rewards of shape {tuple(rewards.shape)} are [num_groups, n] with n != group_size "
                             f"{group_size}")
        grouped = rewards
    elif rewards.dim() == 1:
        if rewards.numel() % group_size:
            raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
        grouped = rewards.view(-1, group_size)
    else:
        raise ValueError(f"rewards must be [G*n] or [num_groups, n], got shape {tuple(rewards.shape)}")
    if not bool(torch.isfinite(grouped).all()):
        raise ValueError("rewards contain NaN/inf")
    return grouped.to(torch.float64 if grouped.dtype == torch.float64 else torch.float32)


def group_advantages(rewards: torch.Tensor, group_size: int, *, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages A_i = (R_i - mean_g R) / (std_g R + eps)  (std off: R_i - mean_g R).

    rewards: [num_groups * n] (groups contiguous) or [num_groups, n]. std is the unbiased (n - 1) sample standard
    deviation of the group, as in GRPO/verl; a group of one response gets advantage 0. Returns [num_groups * n].
    """
    grouped = _grouped(rewards, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std and group_size > 1:
        denom = grouped.std(dim=1, keepdim=True, unbiased=True) + eps
        # a group whose rewards are all equal has advantage 0 even with eps = 0 (not 0/0)
        centered = torch.where(denom > 0, centered / denom.clamp(min=torch.finfo(denom.dtype).tiny),
                               torch.zeros_like(centered))
    return centered.reshape(-1)


def dynamic_sampling_mask(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling: bool [num_groups], True = keep the group (its rewards are not all equal).

    A group whose responses all score the same has zero advantage everywhere and contributes no GRPO gradient.
    """
    grouped = _grouped(rewards, group_size)
    return (grouped != grouped[:, :1]).any(dim=1)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment, added to the reward: float [N], <= 0.

    0 for |y| <= max_len - buffer; -penalty * (|y| - (max_len - buffer)) / buffer inside the last `buffer` tokens
    (a linear ramp from 0 to -penalty); -penalty for |y| > max_len.
    """
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be [N], got shape {tuple(lengths.shape)}")
    if bool((lengths < 0).any()):
        raise ValueError("lengths must be non-negative")
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer must be in (0, max_len={max_len}], got {buffer}")
    if penalty < 0:
        raise ValueError(f"overlong penalty must be >= 0, got {penalty}")
    start = max_len - buffer
    ramp = (lengths.double() - start) / buffer
    return (-penalty * ramp.clamp(min=0.0, max=1.0)).float()


def clipped_surrogate(logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor, *,
                      eps_low: float = 0.2, eps_high: float = 0.28) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped policy-gradient loss  l(t) = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A).

    logprob [T] (differentiable), old_logprob [T] (sampling policy, no grad), advantages [T] (each token carries
    its response's advantage); rho = exp(clamp(logprob - old_logprob, +-LOG_RATIO_BOUND)) (a clamped token gets no
    gradient through rho, as in verl). Returns (per_token_loss [T], clipped_mask [T]
    bool): clipped_mask marks tokens where the clipped branch is selected and differs from the unclipped one, so
    the token gets no gradient (the "clip fraction" numerator).
    """
    if logprob.dim() != 1:
        raise ValueError(f"logprob must be [T], got shape {tuple(logprob.shape)}")
    for name, t in (("old_logprob", old_logprob), ("advantages", advantages)):
        if t.shape != logprob.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logprob has {tuple(logprob.shape)}")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    ratio = torch.exp(bounded_log_ratio(logprob, old_logprob.detach()))
    adv = advantages.detach().to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def bounded_log_ratio(logprob: torch.Tensor, old_logprob: torch.Tensor) -> torch.Tensor:
    """log rho = logprob - old_logprob clamped to [-LOG_RATIO_BOUND, LOG_RATIO_BOUND] nats; [T] like the inputs."""
    return (logprob - old_logprob).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)


def truncated_is_weights(old_logprob: torch.Tensor, sampler_logprob: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights for the sampler/trainer mismatch: min(pi_old / pi_sampler, cap), [T], no grad.

    old_logprob [T]: the trainer's log p_old (recomputed with the training engine); sampler_logprob [T]: the
    rollout engine's log-probs of the same tokens. The per-token PG loss is multiplied by this weight (TIS, as
    verl's `tis_imp_ratio_cap` and slime offer; the log-ratio is bounded like rho's before exp).
    """
    if old_logprob.shape != sampler_logprob.shape:
        raise ValueError(f"old_logprob {tuple(old_logprob.shape)} and sampler_logprob "
                         f"{tuple(sampler_logprob.shape)} differ in shape")
    if not cap > 0:
        raise ValueError(f"tis cap must be > 0, got {cap}")
    with torch.no_grad():
        log_w = bounded_log_ratio(old_logprob.detach(), sampler_logprob.detach().to(old_logprob.dtype))
        return torch.exp(log_w).clamp(max=cap)


def approx_kl_terms(logprob: torch.Tensor, old_logprob: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi_old || pi) between the policy that sampled (old) and the current one: the k1
    estimator old - new (its token mean is verl's `ppo_kl`), on the bounded log-ratio. [T], no grad."""
    with torch.no_grad():
        return -bounded_log_ratio(logprob.detach(), old_logprob.detach())


def token_mean(per_token: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """sum_t mask_t x_t / num_tokens (default: mask.sum()); the trainer passes the global-batch token count so
    micro-batches and data-parallel ranks sum to the token mean of the whole batch."""
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} differ in shape")
    denom = float(mask.sum()) if num_tokens is None else float(num_tokens)
    if denom <= 0:
        raise ValueError(f"token count must be positive, got {denom}")
    return (per_token * mask.to(per_token.dtype)).sum() / denom

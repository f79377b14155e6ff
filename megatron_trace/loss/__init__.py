"""Losses: vocabulary-parallel token statistics, GRPO pieces, and the routed TRACE objective."""

from megatron_trace.loss.grpo import (clipped_surrogate, dynamic_sampling_mask, group_advantages, overlong_penalty,
                                      token_mean)
from megatron_trace.loss.trace_loss import (ExposureTracker, KLSchedule, TraceLossConfig, all_token_routes,
                                            random_span_routes, trace_loss)
from megatron_trace.loss.vocab_parallel import TokenStats, token_stats

__all__ = ["TokenStats", "token_stats", "group_advantages", "dynamic_sampling_mask", "overlong_penalty",
           "clipped_surrogate", "token_mean", "KLSchedule", "TraceLossConfig", "trace_loss", "ExposureTracker",
           "all_token_routes", "random_span_routes"]

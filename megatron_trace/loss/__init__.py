"""Losses: vocabulary-parallel token statistics, GRPO pieces, the routed TRACE objective and how loss metrics are
reduced."""

from megatron_trace.loss.fused_output import fused_output_token_stats
from megatron_trace.loss.grpo import (clipped_surrogate, dynamic_sampling_mask, group_advantages, overlong_penalty,
                                      token_mean)
from megatron_trace.loss.reductions import MAX, SUM, MeanOf, reduce_metrics
from megatron_trace.loss.trace_loss import (ExposureTracker, LossConfig, TraceLoss, all_token_routes,
                                            random_span_routes)
from megatron_trace.loss.vocab_parallel import TokenStats, token_stats

__all__ = ["TokenStats", "token_stats", "fused_output_token_stats", "group_advantages", "dynamic_sampling_mask",
           "overlong_penalty", "clipped_surrogate", "token_mean", "LossConfig", "TraceLoss", "ExposureTracker",
           "all_token_routes", "random_span_routes", "SUM", "MAX", "MeanOf", "reduce_metrics"]

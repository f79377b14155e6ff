"""How a loss's metrics become the step's metrics: each loss declares, per metric, how it is reduced over the
micro-batches of a step and the data-parallel ranks.

A loss returns, per micro-batch, a dict of 0-d tensors (detached; no host sync). `reduce_metrics` stacks them,
reduces them over the micro-batches and the process group in one collective per reduction kind (one host sync per
step), then forms the declared means:

    SUM              added over micro-batches and ranks (counts, and sums already divided by global counts)
    MAX              the largest value (a setting every micro-batch reports, e.g. the KL weight)
    MeanOf(t, c)     sum of t / sum of c after both are reduced (0.0 when the count is 0), e.g. a per-token mean
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import torch
import torch.distributed as dist

from megatron_trace.distributed import collectives

__all__ = ["SUM", "MAX", "MeanOf", "Reduction", "reduce_metrics"]

SUM = "sum"
MAX = "max"


@dataclass(frozen=True)
class MeanOf:
    """A derived metric: `total` / `count`, both SUM metrics of the same loss."""

    total: str
    count: str


Reduction = Union[str, MeanOf]


def reduce_metrics(per_microbatch: Sequence[Mapping[str, torch.Tensor]], reductions: Mapping[str, Reduction], *,
                   contribute: bool = True, group=None) -> dict[str, float]:
    """The step's metrics from the micro-batches' metric dicts (collective over `group` when torch.distributed is
    initialised: every rank calls it).

    per_microbatch: this rank's micro-batch metrics (a padding micro-batch may return {}); contribute: False on
    ranks whose values must not count (e.g. all but one TP rank and all but the last pipeline stage, where the
    loss is computed), which still join the collectives. Returns every declared metric as a float.
    """
    sums = [k for k, r in reductions.items() if r == SUM]
    maxes = [k for k, r in reductions.items() if r == MAX]
    for name, r in reductions.items():
        if isinstance(r, MeanOf) and not (reductions.get(r.total) == SUM and reductions.get(r.count) == SUM):
            raise ValueError(f"metric {name!r}: MeanOf({r.total!r}, {r.count!r}) needs two SUM metrics")
        if not isinstance(r, MeanOf) and r not in (SUM, MAX):
            raise ValueError(f"metric {name!r}: unknown reduction {r!r}")
    out: dict[str, float] = {}
    for keys, op, neutral in ((sums, dist.ReduceOp.SUM, 0.0), (maxes, dist.ReduceOp.MAX, float("-inf"))):
        if not keys:
            continue
        rows = [torch.stack([m[k].detach().to(torch.float64).reshape(()) for k in keys])
                for m in per_microbatch if m] if contribute else []
        if not rows:
            vec = torch.full((len(keys),), neutral, dtype=torch.float64)
        else:
            table = torch.stack(rows)
            vec = table.sum(0) if op == dist.ReduceOp.SUM else table.amax(0)
        if dist.is_initialized():
            # Placed on the backend's device for the call (NCCL reduces CUDA tensors, gloo CPU ones); then one copy
            # to the host (`tolist`)
            collectives.all_reduce(vec, op=op, group=group)
        for k, v in zip(keys, vec.tolist()):
            out[k] = 0.0 if v == float("-inf") else v
    for name, r in reductions.items():
        if isinstance(r, MeanOf):
            out[name] = out[r.total] / out[r.count] if out[r.count] else 0.0
    return out

"""Token routes: which loss each response token receives (docs/design.md, "The step", 4).

PG  - the clipped GRPO surrogate (every token not in a span);
FKL - forward KL(teacher || student) on key spans of correct responses;
RKL - reverse KL(student || teacher) on error spans of incorrect responses.
"""

from __future__ import annotations

from enum import IntEnum

import torch


class Route(IntEnum):
    PG = 0
    FKL = 1
    RKL = 2


def routes_from_spans(span_mask: torch.Tensor, correct: bool, *, fkl: bool = True, rkl: bool = False) -> torch.Tensor:
    """Route ids for one response.

    span_mask: [L] bool, tokens inside the annotator's (capped) spans; correct: the verifier's verdict.
    Spans of a correct response are key spans (FKL when enabled); of an incorrect one, error spans (RKL when
    enabled). A disabled route falls back to PG. Returns [L] int64 route ids.
    """
    if span_mask.dim() != 1:
        raise ValueError(f"span_mask must be [L], got shape {tuple(span_mask.shape)}")
    routes = torch.full(span_mask.shape, int(Route.PG), dtype=torch.long)
    kind = Route.FKL if correct else Route.RKL
    enabled = fkl if correct else rkl
    if enabled:
        routes[span_mask.bool()] = int(kind)
    return routes

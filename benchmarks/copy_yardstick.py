"""The yardstick of the weight benchmarks: the fastest plain copy of the same bytes, measured in the same run.

Three plain copies of every (destination, source) pair, both preallocated and faulted in: the C library's memcpy on
one thread (numpy's copy of contiguous arrays; non-temporal stores for big blocks), torch's `copy_` on one thread
and on every CPU. Which is fastest depends on the machine (on the 2-core development machine: torch on both CPUs
and memcpy on one are close, torch on one thread is 1.5-2x slower), so each is timed and the fastest median is
the yardstick a benchmark divides by.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = ["COPIES", "copy_references", "fastest"]


def _memcpy(dst: torch.Tensor, src: torch.Tensor) -> None:
    np.copyto(dst.reshape(-1).view(torch.uint8).numpy(), src.reshape(-1).view(torch.uint8).numpy())


def _torch_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


# (label, copy(dst, src), torch threads: None = every CPU)
COPIES: tuple[tuple[str, Callable[[torch.Tensor, torch.Tensor], None], int | None], ...] = (
    ("C memcpy (np.copyto), 1 thread", _memcpy, 1),
    ("tensor.copy_, 1 thread", _torch_copy, 1),
    ("tensor.copy_, every CPU", _torch_copy, None),
)


def copy_references(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], repeats: int) -> dict[str, list[float]]:
    """{label: seconds per repeat} of copying every (dst, src) pair (contiguous CPU tensors, same shapes and
    dtypes) with each of COPIES; a warm-up pass first. Torch's thread count is restored afterwards."""
    threads = torch.get_num_threads()
    out: dict[str, list[float]] = {}
    try:
        for label, copy, n in COPIES:
            torch.set_num_threads(n or os.cpu_count() or 1)
            for dst, src in pairs:
                copy(dst, src)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for dst, src in pairs:
                    copy(dst, src)
                times.append(time.perf_counter() - t0)
            out[label] = times
    finally:
        torch.set_num_threads(threads)
    return out


def fastest(refs: dict[str, list[float]]) -> tuple[str, list[float]]:
    """(label, times) of the reference with the smallest median."""
    label = min(refs, key=lambda k: statistics.median(refs[k]))
    return label, refs[label]

"""Gather-free node-local export: every TP rank of a replica that lives inside one node writes its own shards
straight into the node's /dev/shm bucket segments, at their HF offsets, so no rank gathers the others' shards
(`export_hf_buckets` gathers them onto the leader over the process group: on CPU, gloo over loopback).

Every rank computes the same bucket plan from the config alone (`bucket_plan`: the bridge's order and bucket rule,
the shared-memory slot layout); per bucket the leader picks a segment (`acquire`, which owns the release
bookkeeping), broadcasts its name, every rank maps it and writes its shards (`write_shard_into_hf`), and after a
barrier the leader yields the `/weights/shm` descriptor. One copy per byte, made by the rank that holds it.
Supported: pipeline size 1 (the whole replica in the node), any TP, CPU parameters (the trainer uses it for the
colocated CPU refresh; on GPU, untested here, it keeps the gathering bridge).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch
import torch.distributed as dist

from megatron_trace.checkpoint.hf_mapping import Qwen3Dims, hf_param_shapes, write_shard_into_hf
from megatron_trace.rollout.shm_weights import DTYPES, SHM_DIR, check_segment_name, slot_layout
from megatron_trace.sync.weight_bridge import bucket_names, local_named_params

__all__ = ["PlannedBucket", "bucket_plan", "write_buckets"]


@dataclass
class PlannedBucket:
    params: list[str] = field(default_factory=list)  # Megatron parameters with an HF tensor in this bucket
    entries: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)  # (HF name, dtype, shape)
    slots: list[list] = field(default_factory=list)  # [[name, dtype, shape, offset], ...] (shm_weights layout)
    nbytes: int = 0


def bucket_plan(hf_config: Mapping, dtype: torch.dtype, bucket_bytes: int) -> list[PlannedBucket]:
    """The buckets `export_hf_buckets(bucket_bytes=...)` yields for this model (`weight_bridge.bucket_names`), as
    names, shapes and the shared-memory slot offsets."""
    dname = str(dtype).removeprefix("torch.")
    if dname not in DTYPES:
        raise ValueError(f"dtype {dtype} cannot be sent through shared memory (expected one of {sorted(DTYPES)})")
    shapes = hf_param_shapes(Qwen3Dims.from_hf_config(hf_config))
    out = []
    for names in bucket_names(hf_config, DTYPES[dname].itemsize, bucket_bytes):
        b = PlannedBucket(params=list(dict.fromkeys(m for _, m in names)),
                          entries=[(n, dname, tuple(shapes[n])) for n, _ in names])
        b.slots, b.nbytes = slot_layout(b.entries)
        out.append(b)
    return out


def _map(cache: dict, name: str, nbytes: int) -> torch.Tensor:
    """A read-write uint8 view of /dev/shm/<name>, at least `nbytes` long (remapped when the segment grew)."""
    hit = cache.get(name)
    if hit is not None and hit[1] >= nbytes:
        return hit[2]
    check_segment_name(name)
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size < nbytes:
            raise ValueError(f"segment {name}: {size} bytes, the bucket needs {nbytes}")
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    flat = torch.frombuffer(mm, dtype=torch.uint8)
    cache[name] = (mm, size, flat)
    return flat


def write_buckets(model, hf_config: Mapping, *, bucket_bytes: int, group, leader: int,
                  acquire: Callable[[int, int], str] | None, tp_rank: int, tp_size: int,
                  dtype: torch.dtype | None = None, mappings: dict | None = None) -> Iterator[dict]:
    """Collective over `group` (the replica's TP ranks, pipeline size 1): write every bucket of `bucket_plan` into
    the segments the leader (global rank `leader`) acquires, each rank its own shards; yields on the leader, per
    bucket once every rank wrote it, the `/weights/shm` descriptor {index, segment, nbytes, tensors}. Elsewhere
    yields nothing (iterate it all the same). acquire(index, nbytes) -> segment name: on the leader only.

    mappings: the caller's cache of segment mappings, kept from one refresh to the next (None: mapped for this
    call only). The segments persist across refreshes, and writing through a fresh mapping faults every page in
    again: 120 ms for a 311 MB shard against 57 ms through a mapping kept. Entries of segments this call did not
    use are closed, so the cache holds the ones in use (normally two)."""
    dims = Qwen3Dims.from_hf_config(hf_config)
    params = local_named_params(model, dims, 1, 0)
    wire = dtype or next(iter(params.values())).dtype
    rank = dist.get_rank()
    cache: dict = {} if mappings is None else mappings
    used: set[str] = set()
    try:
        for index, bucket in enumerate(bucket_plan(hf_config, wire, bucket_bytes)):
            box = [acquire(index, bucket.nbytes) if rank == leader else None]
            dist.broadcast_object_list(box, src=leader, group=group)
            flat = _map(cache, box[0], bucket.nbytes)
            used.add(box[0])
            views = {}
            for name, dname, shape, offset in bucket.slots:
                dt = DTYPES[dname]
                n = dt.itemsize
                for d in shape:
                    n *= d
                views[name] = flat[offset:offset + n].view(dt).view(shape)
            with torch.no_grad():
                for mname in bucket.params:
                    write_shard_into_hf(mname, params[mname], dims, tp_rank, tp_size, views)
            del views
            dist.barrier(group=group)
            if rank == leader:
                yield {"index": index, "segment": box[0], "nbytes": bucket.nbytes, "tensors": bucket.slots}
    finally:
        for name in [n for n in cache if mappings is None or n not in used]:
            del cache[name]  # each mapping closes once no view of it is left

"""Megatron -> rollout engine weight resharding: HF-named full tensors from a model at any TP/PP, in buckets.

Every rank calls `export_hf_buckets` together (it is collective). For each pipeline stage in order, the stage's
data-parallel-rank-0 TP ranks gather each parameter's TP shards onto the stage leader (tp_rank 0), which merges
them (`merge_tp_shards`), converts Megatron -> HF names and layouts (un-fused QKV and gate/up, vocab padding
stripped; `iter_hf_tensors_from_megatron`) and sends the HF tensors to the destination rank (global rank 0 by
default), which groups them into buckets of at most `bucket_bytes` and yields them. The engine (in-process
vLLM or the generation server) re-shards for its own TP.

Memory: at any moment the destination holds one bucket plus one parameter in flight, and a stage leader one
gathered parameter. A parameter in flight is its gathered TP shards and, briefly beside them, their merged copy
(the HF tensors are views or same-size copies of it): peak extra memory on the destination is
max(bucket_bytes, largest parameter) + 2 x the largest parameter, on a stage leader 2 x the largest parameter,
never the whole model. A parameter larger than the bucket travels alone in its own bucket.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist

from megatron_trace.checkpoint.hf_mapping import (
    EMBEDDING, FINAL_NORM, OUTPUT_LAYER, Qwen3Dims, canonical_megatron_name, global_layer_index,
    hf_param_shapes, iter_hf_tensors_from_megatron, layers_for_stage, megatron_param_names,
    merge_tp_shards, split_layer_name, tp_rule,
)
from megatron_trace.distributed import collectives
from megatron_trace.models.qwen3 import unwrap_model

__all__ = ["export_hf_buckets", "export_announcement", "stage_of", "local_named_params"]

Bucket = list[tuple[str, torch.Tensor]]


def stage_of(megatron_name: str, dims: Qwen3Dims, pp: int) -> int:
    """Pipeline stage that owns a (global-index) Megatron parameter."""
    name = canonical_megatron_name(megatron_name)
    if name == EMBEDDING:
        return 0
    if name in (FINAL_NORM, OUTPUT_LAYER):
        return pp - 1
    layer, _ = split_layer_name(name)
    if layer is None:
        raise KeyError(f"unknown Megatron parameter {megatron_name!r}")
    for stage in range(pp):
        if layer in layers_for_stage(dims.layers, pp, stage):
            return stage
    raise KeyError(f"{megatron_name}: layer {layer} is outside the model's {dims.layers} layers")


def local_named_params(model, dims: Qwen3Dims, pp: int, pp_rank: int) -> dict[str, torch.Tensor]:
    """This rank's parameters keyed by canonical Megatron name with GLOBAL layer indices.

    A tied model's last-stage copy of the embedding (`output_layer.weight` under PP) is left out: stage 0's
    embedding is the one exported.
    """
    out = {}
    for name, param in unwrap_model(model).named_parameters():
        layer, suffix = split_layer_name(name)
        if layer is not None:
            name = f"decoder.layers.{global_layer_index(layer, dims.layers, pp, pp_rank)}.{suffix}"
        name = canonical_megatron_name(name)
        if name == OUTPUT_LAYER and dims.tied:
            continue
        out[name] = param
    return out


def export_hf_buckets(model, hf_config: Mapping, *, bucket_bytes: int, dst: int = 0,
                      dtype: torch.dtype | None = None, dsts=None) -> Iterator[Bucket]:
    """Yield, on global rank `dst`, buckets of (HF name, full tensor) covering the whole model; collective.

    model: this rank's model chunk (a GPTModel or a DDP wrapper). dtype: cast exported tensors (None = as
    trained). On ranks other than `dst` the generator yields nothing but takes part in the gathers and sends,
    so every rank must exhaust it. Ranks of data-parallel replicas other than 0 only iterate.
    dsts: several destinations at once (node-local sync: each node's local rank 0), every one yielding the whole
    model, each fed by the data-parallel replica it belongs to (a replica inside one node sends nothing across
    nodes; one spanning nodes, PP across nodes, sends its other stages' tensors to it over the network). Every
    rank passes the same list; replicas that feed no destination only iterate. Default [dst].
    """
    from megatron.core import parallel_state as ps

    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    dims = Qwen3Dims.from_hf_config(hf_config)
    hf_shapes = hf_param_shapes(dims)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    pp = ps.get_pipeline_model_parallel_world_size() if distributed else 1
    pp_rank = ps.get_pipeline_model_parallel_rank() if distributed else 0
    tp = ps.get_tensor_model_parallel_world_size() if distributed else 1
    tp_rank = ps.get_tensor_model_parallel_rank() if distributed else 0
    dp_rank = ps.get_data_parallel_rank() if distributed else 0
    tp_group = ps.get_tensor_model_parallel_group() if distributed else None
    dsts = sorted({int(d) for d in ([dst] if dsts is None else dsts)})
    if not dsts:
        raise ValueError("dsts: at least one destination rank")
    if dsts == [dst]:
        # Global rank of each stage's leader (dp 0, tp 0); every rank computes the same table.
        leaders = _stage_leaders(pp) if distributed else [0]
        sources, my_dsts, source = {0}, dsts, dst
    else:
        replica_of, leader_of = _replica_table(pp)
        sources = {replica_of[d] for d in dsts}
        leaders = [leader_of.get((dp_rank, s), -1) for s in range(pp)]
        my_dsts = [d for d in dsts if replica_of[d] == dp_rank]  # the destinations this rank's replica feeds
        source = rank if rank in dsts else -1
    params = local_named_params(model, dims, pp, pp_rank)
    device = next(unwrap_model(model).parameters()).device
    wire = dtype or params_dtype_of(model)
    bucket_of = {n: i for i, names in enumerate(bucket_names(hf_config, wire.itemsize, bucket_bytes))
                 for n, _ in names}

    bucket: Bucket = []
    current = 0
    with torch.no_grad():
        for mname in megatron_param_names(dims):
            stage = stage_of(mname, dims, pp)
            on_stage = distributed and stage == pp_rank and dp_rank in sources
            leader = leaders[stage]
            hf_tensors: list[tuple[str, torch.Tensor]] = []
            if on_stage or not distributed:
                local = params[mname].detach()
                if tp > 1:
                    full = shards = None
                    if tp_rank == 0 and tp_rule(mname) in ("vocab", "column"):
                        # Shards stack along rows: gather straight into row blocks of the merged tensor (the
                        # merge's concatenation, a copy of the whole parameter, is not needed).
                        full = torch.empty((local.shape[0] * tp, *local.shape[1:]), dtype=local.dtype,
                                           device=local.device)
                        shards = list(full.chunk(tp, dim=0))
                    elif tp_rank == 0:
                        shards = [torch.empty_like(local) for _ in range(tp)]
                    collectives.gather(local.contiguous(), shards, dst=leader, group=tp_group)
                    if full is None and tp_rank == 0:
                        full = merge_tp_shards(mname, shards)
                    # Free the shards now: held until the next parameter's gather they would add a third copy.
                    del shards
                else:
                    full = local
                if full is not None:
                    hf_tensors = list(iter_hf_tensors_from_megatron([(mname, full)], hf_config))
                    if dtype is not None:
                        hf_tensors = [(n, t.to(dtype)) for n, t in hf_tensors]
                    del full
            # Move the HF tensors from the stage leader to its destination(s) (nothing when they are the same rank).
            if distributed and (leader != source or len(my_dsts) > 1):
                if rank == leader and dp_rank in sources:
                    for d in my_dsts:
                        if d != rank:
                            for _, t in hf_tensors:
                                collectives.send(t.contiguous(), dst=d)
                    if rank not in dsts:
                        hf_tensors = []
                elif rank == source:
                    for n in _hf_names(mname, dims):
                        # On the model's device (CUDA under NCCL): the leader sends from there too.
                        buf = torch.empty(hf_shapes[n], dtype=wire, device=device)
                        collectives.recv(buf, src=leader)
                        hf_tensors.append((n, buf))
            if rank != source:
                continue
            for name, t in hf_tensors:
                if bucket and bucket_of[name] != current:
                    yield bucket
                    bucket = []
                current = bucket_of[name]
                t = t if (t.is_contiguous() and not _is_view_of_param(t, params)) else t.contiguous()
                bucket.append((name, t.clone() if _is_view_of_param(t, params) else t))
    if rank == source and bucket:
        yield bucket


def bucket_names(hf_config: Mapping, itemsize: int, bucket_bytes: int) -> list[list[tuple[str, str]]]:
    """The buckets of an export, from the config alone: [[(HF name, Megatron name), ...], ...] in export order.
    A parameter's HF tensors (q, k, v; gate, up) share a bucket when they fit in one (the engine fuses them again,
    from one mapping without a copy when they lie back to back); a bucket closes before the tensor that would take
    it past `bucket_bytes`; a tensor larger than that travels alone. itemsize: bytes per element on the wire."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    dims = Qwen3Dims.from_hf_config(hf_config)
    shapes = hf_param_shapes(dims)

    def nbytes(n: str) -> int:
        return int(torch.Size(shapes[n]).numel()) * itemsize

    out: list[list[tuple[str, str]]] = []
    cur: list[tuple[str, str]] = []
    size = 0
    for mname in megatron_param_names(dims):
        names = _hf_names(mname, dims)
        group = sum(nbytes(n) for n in names)
        if cur and size + group > bucket_bytes >= group:
            out.append(cur)
            cur, size = [], 0
        for n in names:
            if cur and size + nbytes(n) > bucket_bytes:
                out.append(cur)
                cur, size = [], 0
            cur.append((n, mname))
            size += nbytes(n)
    if cur:
        out.append(cur)
    return out


def export_announcement(hf_config: Mapping, dtype: torch.dtype):
    """What `export_hf_buckets(..., dtype=dtype)` will yield, in its order, as `nccl_weights.TensorMeta`s (HF
    name, dtype name, shape), computed from the config alone: the NCCL path announces an update before any
    tensor exists. dtype: the export dtype (or the model's parameter dtype when exporting as trained)."""
    from megatron_trace.rollout.nccl_weights import TensorMeta

    dims = Qwen3Dims.from_hf_config(hf_config)
    shapes = hf_param_shapes(dims)
    wire = str(dtype).removeprefix("torch.")
    return [TensorMeta(n, wire, tuple(shapes[n])) for m in megatron_param_names(dims) for n in _hf_names(m, dims)]


def _replica_table(pp: int) -> tuple[dict[int, int], dict[tuple[int, int], int]]:
    """({global rank: its data-parallel rank}, {(dp rank, stage): global rank of that stage's leader (tp 0, cp 0)}),
    agreed by every rank (one all_gather)."""
    from megatron.core import parallel_state as ps

    leader = ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
    mine = torch.tensor([ps.get_data_parallel_rank(), ps.get_pipeline_model_parallel_rank(), int(leader)],
                        dtype=torch.long)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    collectives.all_gather(rows, mine)  # CPU bookkeeping tensors: placed for the backend (NCCL on GPU)
    replica_of = {r: int(row[0]) for r, row in enumerate(rows)}
    leader_of = {(int(row[0]), int(row[1])): r for r, row in enumerate(rows) if int(row[2])}
    return replica_of, leader_of


def _is_view_of_param(t: torch.Tensor, params: dict[str, torch.Tensor]) -> bool:
    """True if `t` shares storage with a live parameter: buckets must hold copies, not views the optimizer
    will overwrite before the engine reads them."""
    ptr = t.untyped_storage().data_ptr()
    return any(p.untyped_storage().data_ptr() == ptr for p in params.values())


def params_dtype_of(model) -> torch.dtype:
    return next(unwrap_model(model).parameters()).dtype


def _hf_names(megatron_name: str, dims: Qwen3Dims) -> list[str]:
    from megatron_trace.checkpoint.hf_mapping import hf_names_for

    name = canonical_megatron_name(megatron_name)
    if name == OUTPUT_LAYER and dims.tied:
        return []
    return hf_names_for(name, dims)


def _stage_leaders(pp: int) -> list[int]:
    """Global rank of (dp 0, tp 0, cp 0) on each pipeline stage, agreed by every rank."""
    from megatron.core import parallel_state as ps

    mine = torch.tensor([dist.get_rank() if (ps.get_tensor_model_parallel_rank() == 0
                                             and ps.get_data_parallel_rank(with_context_parallel=True) == 0)
                         else -1], dtype=torch.long)
    table = torch.full((pp,), -1, dtype=torch.long)
    table[ps.get_pipeline_model_parallel_rank()] = mine[0]
    # MAX over the world: exactly one rank per stage writes a non-negative value.
    collectives.all_reduce(table, op=dist.ReduceOp.MAX)
    return [int(x) for x in table]

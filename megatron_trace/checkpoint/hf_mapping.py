"""Qwen3 weights between Hugging Face and Megatron-Core `GPTModel`: names, fusions, vocab padding, TP/PP layout.

Pure functions on tensors and config dicts; the only function that touches process state is
`load_hf_state_into_model`, which reads this rank's TP/PP coordinates from megatron's parallel_state.

Names. A *Megatron name* is a `GPTModel` parameter name with the GLOBAL layer index and the local-spec module
names (`decoder.layers.7.input_layernorm.weight`). The Transformer-Engine spec fuses the two pre-norms into the
following linear (`self_attention.linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`); those
names are accepted everywhere as aliases (`canonical_megatron_name`), which is also how megatron's distributed
checkpoints name them, so local-spec and TE-spec checkpoints are interchangeable.

    HF (Qwen3ForCausalLM)                           Megatron (GPTModel)
    model.embed_tokens.weight        [V, H]         embedding.word_embeddings.weight      [Vp, H]  (zero pad rows)
    model.layers.i.input_layernorm.weight           decoder.layers.i.input_layernorm.weight
    model.layers.i.self_attn.{q,k,v}_proj.weight    decoder.layers.i.self_attention.linear_qkv.weight  (fused)
    model.layers.i.self_attn.{q,k}_norm.weight      decoder.layers.i.self_attention.{q,k}_layernorm.weight
    model.layers.i.self_attn.o_proj.weight          decoder.layers.i.self_attention.linear_proj.weight
    model.layers.i.post_attention_layernorm.weight  decoder.layers.i.pre_mlp_layernorm.weight
    model.layers.i.mlp.{gate,up}_proj.weight        decoder.layers.i.mlp.linear_fc1.weight  (fused [gate; up])
    model.layers.i.mlp.down_proj.weight             decoder.layers.i.mlp.linear_fc2.weight
    model.norm.weight                               decoder.final_layernorm.weight
    lm_head.weight (untied only)     [V, H]         output_layer.weight                   [Vp, H]  (untied only)

Fused QKV layout (what megatron's attention splits): per query group g, the group's q heads, then its k head,
then its v head: `[groups, (q_per_group + 2) * head_dim, H]` flattened to rows. Groups are contiguous, so
tensor parallelism splits the fused tensor by plain row chunks = by query groups.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_trace.fast_copy import copy_into

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
HF_EMBEDDING = "model.embed_tokens.weight"
HF_LM_HEAD = "lm_head.weight"
HF_FINAL_NORM = "model.norm.weight"

# Per-layer Megatron suffix -> HF suffixes (under `model.layers.i.`), in fusion order.
_LAYER_MAP: dict[str, tuple[str, ...]] = {
    "input_layernorm.weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.v_proj.weight"),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight",),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight",),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
}
# Transformer-Engine spec / distributed-checkpoint names of the pre-norms (megatron's
# `sharded_state_dict_keys_map` of the local spec maps onto these).
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

TPRule = Literal["vocab", "column", "row", "gate_up", "replicated"]
_TP_RULES: dict[str, TPRule] = {
    "input_layernorm.weight": "replicated",
    "self_attention.linear_qkv.weight": "column",
    "self_attention.q_layernorm.weight": "replicated",
    "self_attention.k_layernorm.weight": "replicated",
    "self_attention.linear_proj.weight": "row",
    "pre_mlp_layernorm.weight": "replicated",
    "mlp.linear_fc1.weight": "gate_up",
    "mlp.linear_fc2.weight": "row",
}


@dataclass(frozen=True)
class Qwen3Dims:
    """The shape-defining fields of a Qwen3 HF config."""

    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    groups: int  # key/value heads = query groups
    head_dim: int
    tied: bool

    @property
    def q_per_group(self) -> int:
        return self.heads // self.groups

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.groups) * self.head_dim

    @classmethod
    def from_hf_config(cls, hf_config: Mapping) -> "Qwen3Dims":
        """Read and check the fields; ValueError naming the field for anything missing or unsupported."""
        model_type = hf_config.get("model_type")
        if model_type not in (None, "qwen3"):
            raise ValueError(f"HF config model_type={model_type!r}: only 'qwen3' (dense Qwen3) is supported")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in hf_config]
        if missing:
            raise ValueError(f"HF config lacks required field(s) {missing}")
        if hf_config.get("attention_bias", False):
            raise ValueError("HF config attention_bias=true is not supported (Qwen3 has no attention biases)")
        for key in (*required, "num_key_value_heads", "head_dim"):
            v = hf_config.get(key)
            if key not in hf_config or (v is None and key not in required):  # optional ones may be null
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"HF config {key}={v!r}: expected a positive integer")
        heads = int(hf_config["num_attention_heads"])
        groups = int(hf_config.get("num_key_value_heads") or heads)
        hidden = int(hf_config["hidden_size"])
        head_dim = int(hf_config.get("head_dim") or hidden // heads)
        if heads % groups:
            raise ValueError(f"HF config num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}")
        return cls(
            vocab=int(hf_config["vocab_size"]), hidden=hidden, ffn=int(hf_config["intermediate_size"]),
            layers=int(hf_config["num_hidden_layers"]), heads=heads, groups=groups, head_dim=head_dim,
            tied=bool(hf_config.get("tie_word_embeddings", False)),
        )


# ---------------------------------------------------------------------------------------------------------- names

def split_layer_name(megatron_name: str) -> tuple[int | None, str]:
    """`decoder.layers.7.mlp.linear_fc2.weight` -> (7, 'mlp.linear_fc2.weight'); non-layer names -> (None, name)."""
    m = _LAYER_RE.match(megatron_name)
    return (int(m.group(1)), m.group(2)) if m else (None, megatron_name)


def canonical_megatron_name(megatron_name: str) -> str:
    """Map Transformer-Engine pre-norm names onto the local-spec names; other names unchanged."""
    layer, suffix = split_layer_name(megatron_name)
    if layer is not None and suffix in _TE_ALIASES:
        return f"decoder.layers.{layer}.{_TE_ALIASES[suffix]}"
    return megatron_name


def megatron_param_names(dims: Qwen3Dims) -> list[str]:
    """All Megatron parameter names of the full model (global layer indices), in model order."""
    names = [EMBEDDING]
    for i in range(dims.layers):
        names += [f"decoder.layers.{i}.{s}" for s in _LAYER_MAP]
    names.append(FINAL_NORM)
    if not dims.tied:
        names.append(OUTPUT_LAYER)
    return names


def hf_names_for(megatron_name: str, dims: Qwen3Dims) -> list[str]:
    """The HF tensor names that make up one Megatron parameter, in fusion order (q, k, v / gate, up).

    For `output_layer.weight` of a tied model (the last pipeline stage's copy) this is the embedding.
    """
    name = canonical_megatron_name(megatron_name)
    if name == EMBEDDING:
        return [HF_EMBEDDING]
    if name == OUTPUT_LAYER:
        return [HF_EMBEDDING if dims.tied else HF_LM_HEAD]
    if name == FINAL_NORM:
        return [HF_FINAL_NORM]
    layer, suffix = split_layer_name(name)
    if layer is None or suffix not in _LAYER_MAP:
        raise KeyError(f"no HF counterpart for Megatron parameter {megatron_name!r}")
    if layer >= dims.layers:
        raise KeyError(f"Megatron parameter {megatron_name!r}: layer {layer} >= num_hidden_layers={dims.layers}")
    return [f"model.layers.{layer}.{s}" for s in _LAYER_MAP[suffix]]


def hf_param_shapes(dims: Qwen3Dims) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of the model and its shape, in model order (the order conversions write)."""
    h, d = dims.hidden, dims.head_dim
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (dims.heads * d, h),
        "self_attn.k_proj.weight": (dims.groups * d, h),
        "self_attn.v_proj.weight": (dims.groups * d, h),
        "self_attn.q_norm.weight": (d,),
        "self_attn.k_norm.weight": (d,),
        "self_attn.o_proj.weight": (h, dims.heads * d),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (dims.ffn, h),
        "mlp.up_proj.weight": (dims.ffn, h),
        "mlp.down_proj.weight": (h, dims.ffn),
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for name in megatron_param_names(dims):
        for hf in hf_names_for(name, dims):
            layer = _HF_LAYER_RE.match(hf)
            if layer:
                shapes[hf] = per_layer[layer.group(2)]
            elif hf in (HF_EMBEDDING, HF_LM_HEAD):
                shapes[hf] = (dims.vocab, h)
            else:
                shapes[hf] = (h,)
    return shapes


def megatron_param_shape(megatron_name: str, dims: Qwen3Dims, padded_vocab: int) -> tuple[int, ...]:
    """Full (unsharded) shape of a Megatron parameter."""
    name = canonical_megatron_name(megatron_name)
    if name in (EMBEDDING, OUTPUT_LAYER):
        return (padded_vocab, dims.hidden)
    if name == FINAL_NORM:
        return (dims.hidden,)
    _, suffix = split_layer_name(name)
    h = dims.hidden
    return {
        "input_layernorm.weight": (h,),
        "self_attention.linear_qkv.weight": (dims.qkv_rows, h),
        "self_attention.q_layernorm.weight": (dims.head_dim,),
        "self_attention.k_layernorm.weight": (dims.head_dim,),
        "self_attention.linear_proj.weight": (h, dims.heads * dims.head_dim),
        "pre_mlp_layernorm.weight": (h,),
        "mlp.linear_fc1.weight": (2 * dims.ffn, h),
        "mlp.linear_fc2.weight": (h, dims.ffn),
    }[suffix]


# ------------------------------------------------------------------------------------------------------ fusions

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int,
             head_dim: int) -> torch.Tensor:
    """HF q [heads*d, ...], k/v [groups*d, ...] -> Megatron rows [groups * (q_per_group + 2) * d, ...]."""
    rest = q.shape[1:]
    q = q.reshape(num_query_groups, -1, *rest)
    k = k.reshape(num_query_groups, head_dim, *rest)
    v = v.reshape(num_query_groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_query_groups: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`: Megatron fused rows -> (q, k, v) in HF head order (contiguous)."""
    rest = qkv.shape[1:]
    per_group = qkv.shape[0] // num_query_groups
    x = qkv.reshape(num_query_groups, per_group, *rest)
    q, k, v = x.split([per_group - 2 * head_dim, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))  # type: ignore[return-value]


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU fc1 = [gate; up] along rows (megatron applies silu to the first half)."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_vocab(weight: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """[V, H] -> [padded_vocab, H] with zero rows appended (zero embeddings / zero logits for pad ids)."""
    rows = weight.shape[0]
    if rows > padded_vocab:
        raise ValueError(f"vocab rows {rows} exceed the padded vocab size {padded_vocab}")
    if rows == padded_vocab:
        return weight
    return torch.cat([weight, weight.new_zeros(padded_vocab - rows, *weight.shape[1:])], dim=0)


def unpad_vocab(weight: torch.Tensor, vocab: int) -> torch.Tensor:
    """[Vp, H] -> [vocab, H]: drop megatron's pad rows, which never belong in an HF checkpoint."""
    if weight.shape[0] < vocab:
        raise ValueError(f"vocab-parallel tensor has {weight.shape[0]} rows, fewer than vocab_size={vocab}")
    return weight[:vocab].contiguous() if weight.shape[0] > vocab else weight


# ------------------------------------------------------------------------------------------------ tensor parallel

def tp_rule(megatron_name: str) -> TPRule:
    """How a Megatron parameter is split across tensor-parallel ranks."""
    name = canonical_megatron_name(megatron_name)
    if name in (EMBEDDING, OUTPUT_LAYER):
        return "vocab"
    if name == FINAL_NORM:
        return "replicated"
    layer, suffix = split_layer_name(name)
    if layer is None or suffix not in _TP_RULES:
        raise KeyError(f"no tensor-parallel rule for Megatron parameter {megatron_name!r}")
    return _TP_RULES[suffix]


def _check_divisible(megatron_name: str, size: int, tp_size: int, what: str) -> None:
    if size % tp_size:
        raise ValueError(f"{megatron_name}: {what} {size} is not divisible by tensor parallel size {tp_size}")


def shard_for_tp(megatron_name: str, full_tensor: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of a full Megatron tensor (contiguous).

    vocab/column: rows chunked (fused QKV: contiguous query groups). row: columns chunked. gate_up: the gate
    and up halves chunked separately, rank r gets [gate_r; up_r]. replicated: the full tensor.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} outside [0, {tp_size})")
    rule = tp_rule(megatron_name)
    if rule == "replicated" or tp_size == 1:
        return full_tensor
    if rule in ("vocab", "column"):
        _check_divisible(megatron_name, full_tensor.shape[0], tp_size, "rows")
        return full_tensor.chunk(tp_size, dim=0)[tp_rank].contiguous()
    if rule == "row":
        _check_divisible(megatron_name, full_tensor.shape[1], tp_size, "columns")
        return full_tensor.chunk(tp_size, dim=1)[tp_rank].contiguous()
    gate, up = full_tensor.chunk(2, dim=0)
    _check_divisible(megatron_name, gate.shape[0], tp_size, "ffn rows")
    return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)


def merge_tp_shards(megatron_name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `shard_for_tp`: the full tensor from all ranks' shards in rank order.

    Replicated tensors must agree across ranks (ValueError otherwise: a sign of diverged replicas).
    """
    if not shards:
        raise ValueError(f"{megatron_name}: no shards to merge")
    rule = tp_rule(megatron_name)
    if len(shards) == 1:
        return shards[0]
    if rule == "replicated":
        if any(not torch.equal(shards[0], s) for s in shards[1:]):
            raise ValueError(f"{megatron_name}: replicated tensor differs across tensor-parallel ranks")
        return shards[0]
    if rule in ("vocab", "column"):
        return torch.cat(shards, dim=0)
    if rule == "row":
        return torch.cat(shards, dim=1)
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


# ---------------------------------------------------------------------------------------------- pipeline parallel

def layers_for_stage(num_layers: int, pp: int, pp_rank: int) -> range:
    """Global layer indices held by pipeline stage `pp_rank` (megatron's even split)."""
    if num_layers % pp:
        raise ValueError(f"pipeline parallel size {pp} does not divide num_hidden_layers={num_layers}")
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank={pp_rank} outside [0, {pp})")
    per = num_layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)


def global_layer_index(local_index: int, num_layers: int, pp: int, pp_rank: int) -> int:
    stage = layers_for_stage(num_layers, pp, pp_rank)
    if not 0 <= local_index < len(stage):
        raise ValueError(f"local layer {local_index} outside stage {pp_rank}'s {len(stage)} layers")
    return stage[local_index]


def local_layer_index(global_index: int, num_layers: int, pp: int) -> tuple[int, int]:
    """(pp_rank, local index) of a global layer index."""
    if not 0 <= global_index < num_layers:
        raise ValueError(f"layer {global_index} outside [0, {num_layers})")
    per = layers_for_stage(num_layers, pp, 0).stop
    return global_index // per, global_index % per


def check_parallel_layout(dims: Qwen3Dims, tp: int, pp: int, padded_vocab: int | None = None) -> None:
    """ValueError naming every field that `tp`/`pp` does not divide."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor/pipeline parallel sizes must be >= 1, got tp={tp}, pp={pp}")
    problems = []
    for field, value in (("num_attention_heads", dims.heads), ("num_key_value_heads (query groups)", dims.groups),
                         ("intermediate_size", dims.ffn)):
        if value % tp:
            problems.append(f"tensor parallel size {tp} does not divide {field}={value}")
    if padded_vocab is not None and padded_vocab % tp:
        problems.append(f"tensor parallel size {tp} does not divide the (padded) vocab size {padded_vocab}")
    if dims.layers % pp:
        problems.append(f"pipeline parallel size {pp} does not divide num_hidden_layers={dims.layers}")
    if problems:
        raise ValueError("; ".join(problems))


# ---------------------------------------------------------------------------------------------------- conversion

def megatron_tensor_from_hf(megatron_name: str, get_hf: Callable[[str], torch.Tensor], dims: Qwen3Dims,
                            padded_vocab: int) -> torch.Tensor:
    """The full Megatron tensor of one parameter, built from the HF tensors it fuses (read via `get_hf`)."""
    name = canonical_megatron_name(megatron_name)
    parts = [get_hf(n) for n in hf_names_for(name, dims)]
    if name in (EMBEDDING, OUTPUT_LAYER):
        return pad_vocab(parts[0], padded_vocab)
    _, suffix = split_layer_name(name)
    if suffix == "self_attention.linear_qkv.weight":
        return fuse_qkv(*parts, num_query_groups=dims.groups, head_dim=dims.head_dim)
    if suffix == "mlp.linear_fc1.weight":
        return fuse_gate_up(*parts)
    return parts[0]


def megatron_shard_from_hf(megatron_name: str, source, dims: Qwen3Dims, padded_vocab: int, tp_rank: int,
                           tp_size: int) -> torch.Tensor:
    """This TP rank's shard of one Megatron parameter, reading only the HF rows/columns it needs.

    Equal to `shard_for_tp(name, megatron_tensor_from_hf(...), tp_rank, tp_size)` without materialising the full
    tensor: at TP=8 each rank reads 1/8 of every sharded weight. `source` is an `HFTensorSource`.
    """
    name = canonical_megatron_name(megatron_name)
    rule = tp_rule(name)
    hf_names = hf_names_for(name, dims)
    if rule == "replicated" or tp_size == 1:
        return shard_for_tp(name, megatron_tensor_from_hf(name, source.get, dims, padded_vocab), tp_rank, tp_size)
    if rule == "vocab":
        _check_divisible(name, padded_vocab, tp_size, "rows")
        per = padded_vocab // tp_size
        start, stop = tp_rank * per, (tp_rank + 1) * per
        real = source.get_slice(hf_names[0], 0, min(start, dims.vocab), min(stop, dims.vocab))
        return pad_vocab(real, per)  # rows past the real vocab are zero
    if rule == "column":  # fused QKV: this rank's query groups
        _check_divisible(name, dims.groups, tp_size, "query groups")
        g = dims.groups // tp_size
        d, qg = dims.head_dim, dims.q_per_group
        q = source.get_slice(hf_names[0], 0, tp_rank * g * qg * d, (tp_rank + 1) * g * qg * d)
        k, v = (source.get_slice(n, 0, tp_rank * g * d, (tp_rank + 1) * g * d) for n in hf_names[1:])
        return fuse_qkv(q, k, v, num_query_groups=g, head_dim=d)
    if rule == "gate_up":
        _check_divisible(name, dims.ffn, tp_size, "ffn rows")
        per = dims.ffn // tp_size
        return fuse_gate_up(*(source.get_slice(n, 0, tp_rank * per, (tp_rank + 1) * per) for n in hf_names))
    cols = source.info(hf_names[0]).shape[1]  # row parallel: a slice of the input columns
    _check_divisible(name, cols, tp_size, "columns")
    per = cols // tp_size
    return source.get_slice(hf_names[0], 1, tp_rank * per, (tp_rank + 1) * per).contiguous()


def write_shard_into_hf(megatron_name: str, shard: torch.Tensor, dims: Qwen3Dims, tp_rank: int, tp_size: int,
                        hf: Mapping[str, torch.Tensor]) -> int:
    """Write this TP rank's shard of one Megatron parameter into its place in the full HF tensors `hf[name]`
    (e.g. views of a shared segment that every TP rank of a node maps), so that after every rank wrote its shard
    the HF tensors equal `iter_hf_tensors_from_megatron` of the merged parameter, without any rank gathering.
    HF names absent from `hf` are skipped (a parameter whose q, k, v land in two buckets is written bucket by
    bucket).

    The inverse of `megatron_shard_from_hf`: vocab rows (padding rows dropped), the rank's query groups of q, k and
    v, its rows of gate and up, its input columns of a row-parallel weight. A replicated tensor is written by TP
    rank 0 only. Returns the bytes this rank wrote. A tied model's output layer writes nothing (no lm_head).
    """
    name = canonical_megatron_name(megatron_name)
    if name == OUTPUT_LAYER and dims.tied:
        return 0
    rule = tp_rule(name) if tp_size > 1 else "replicated"
    hf_names = hf_names_for(name, dims)
    shard = shard.detach()
    if rule == "replicated":
        if tp_rank != 0:
            return 0
        if name in (EMBEDDING, OUTPUT_LAYER):
            return _copy_rows(hf[hf_names[0]], 0, shard, dims.vocab) if hf_names[0] in hf else 0
        return sum(_put(hf, n, None, part) for n, part in zip(hf_names, _split_megatron(name, shard, dims, dims.groups)))
    if rule == "vocab":
        start = tp_rank * shard.shape[0]
        return _copy_rows(hf[hf_names[0]], start, shard, dims.vocab) if hf_names[0] in hf else 0
    if rule == "column":  # fused QKV: this rank's query groups
        _check_divisible(name, dims.groups, tp_size, "query groups")
        g, d, qg = dims.groups // tp_size, dims.head_dim, dims.q_per_group
        q, k, v = _split_megatron(name, shard, dims, g)  # [g, rows per group, H] views
        return (_put(hf, hf_names[0], slice(tp_rank * g * qg * d, (tp_rank + 1) * g * qg * d), q)
                + _put(hf, hf_names[1], slice(tp_rank * g * d, (tp_rank + 1) * g * d), k)
                + _put(hf, hf_names[2], slice(tp_rank * g * d, (tp_rank + 1) * g * d), v))
    if rule == "gate_up":
        gate, up = shard.chunk(2, dim=0)
        per = gate.shape[0]
        rows = slice(tp_rank * per, (tp_rank + 1) * per)
        return _put(hf, hf_names[0], rows, gate) + _put(hf, hf_names[1], rows, up)
    per = shard.shape[1]  # row parallel: this rank's input columns
    return _put(hf, hf_names[0], (slice(None), slice(tp_rank * per, (tp_rank + 1) * per)), shard)


def _put(hf: Mapping[str, torch.Tensor], name: str, index, part: torch.Tensor) -> int:
    """hf[name][index] = part (the destination viewed as part's shape: rows of a contiguous tensor); 0 bytes when
    `name` is not in `hf`."""
    if name not in hf:
        return 0
    dst = hf[name] if index is None else hf[name][index]
    copy_into(dst.view(part.shape) if dst.is_contiguous() else dst, part)
    return part.numel() * part.element_size()


def _copy_rows(dst: torch.Tensor, start: int, rows: torch.Tensor, vocab: int) -> int:
    """dst[start:start + n] = rows[:n], n the rows below `vocab` (megatron's padding rows are dropped)."""
    n = max(0, min(rows.shape[0], vocab - start))
    if n:
        copy_into(dst[start:start + n], rows[:n])
    return n * rows[0].numel() * rows.element_size() if n else 0


def _split_megatron(name: str, tensor: torch.Tensor, dims: Qwen3Dims, groups: int) -> list[torch.Tensor]:
    """The HF parts of a (shard of a) Megatron tensor as views, no copy: q, k, v of `groups` query groups of a
    fused QKV weight as `[groups, rows per group, H]` strided views (the destination rows, contiguous, are viewed
    the same way), gate and up of fc1, else the tensor itself."""
    _, suffix = split_layer_name(name)
    if suffix == "self_attention.linear_qkv.weight":
        d, qg = dims.head_dim, dims.q_per_group
        x = tensor.reshape(groups, (qg + 2) * d, *tensor.shape[1:])
        return list(x.split([qg * d, d, d], dim=1))
    if suffix == "mlp.linear_fc1.weight":
        return list(tensor.chunk(2, dim=0))
    return [tensor]


def iter_hf_tensors_from_megatron(
    named_full_tensors: Iterable[tuple[str, torch.Tensor]], hf_config: Mapping
) -> Iterator[tuple[str, torch.Tensor]]:
    """Megatron (name, full tensor) pairs (global layer indices, TP-merged) -> HF (name, tensor) pairs.

    Un-fuses QKV and gate/up, strips vocab padding. The tied model's `output_layer.weight` (the last pipeline
    stage's copy of the embedding) yields nothing. Lazy: one input tensor is handled at a time.
    ValueError naming the parameter if a tensor's shape does not match `hf_config`.
    """
    dims = Qwen3Dims.from_hf_config(hf_config)
    hf_shapes = hf_param_shapes(dims)
    for megatron_name, tensor in named_full_tensors:
        name = canonical_megatron_name(megatron_name)
        if name == OUTPUT_LAYER and dims.tied:
            continue
        hf_names = hf_names_for(name, dims)
        if name in (EMBEDDING, OUTPUT_LAYER):
            if tensor.dim() != 2 or tensor.shape[1] != dims.hidden or tensor.shape[0] < dims.vocab:
                raise ValueError(f"{megatron_name}: shape {tuple(tensor.shape)} does not fit vocab_size={dims.vocab}, "
                                 f"hidden_size={dims.hidden}")
            parts = [unpad_vocab(tensor, dims.vocab)]
        else:
            expected = megatron_param_shape(name, dims, padded_vocab=dims.vocab)
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{megatron_name}: shape {tuple(tensor.shape)} != {expected} expected from the HF config")
            _, suffix = split_layer_name(name)
            if suffix == "self_attention.linear_qkv.weight":
                parts = list(split_qkv(tensor, dims.groups, dims.head_dim))
            elif suffix == "mlp.linear_fc1.weight":
                parts = list(split_gate_up(tensor))
            else:
                parts = [tensor]
        for hf_name, part in zip(hf_names, parts):
            assert tuple(part.shape) == hf_shapes[hf_name], (hf_name, part.shape)
            yield hf_name, part


def check_hf_tensors(source, dims: Qwen3Dims, needed: Iterable[str] | None = None) -> None:
    """ValueError listing every missing, extra and mis-shaped HF tensor of `source` (an `HFTensorSource`).

    `needed`: the names that must be present (default: all of the model). A tied model's `lm_head.weight` is
    tolerated only if it equals the embedding bit for bit (some exporters write the tied copy).
    """
    expected = hf_param_shapes(dims)
    needed = list(expected) if needed is None else list(needed)
    missing = [n for n in needed if n not in source]
    extra = [n for n in source.names() if n not in expected]
    if dims.tied and HF_LM_HEAD in extra and HF_EMBEDDING in source:
        if torch.equal(source.get(HF_LM_HEAD), source.get(HF_EMBEDDING)):
            extra.remove(HF_LM_HEAD)
        else:
            extra[extra.index(HF_LM_HEAD)] = f"{HF_LM_HEAD} (tie_word_embeddings=true but it differs from the embedding)"
    misshaped = [f"{n} {tuple(source.info(n).shape)} (config implies {expected[n]})"
                 for n in expected if n in source and tuple(source.info(n).shape) != expected[n]]
    not_float = [f"{n} ({source.info(n).dtype})" for n in expected
                 if n in source and not source.info(n).dtype.is_floating_point]
    problems = [f"tensors that are not floating-point: {_abbrev(not_float)}"] if not_float else []
    if missing:
        problems.append(f"missing tensors: {_abbrev(missing)}")
    if extra:
        problems.append(f"extra tensors not in a Qwen3 model of this config: {_abbrev(extra)}")
    if misshaped:
        problems.append(f"tensor shapes do not match config.json: {_abbrev(misshaped)}")
    if problems:
        raise ValueError(f"{source.description}: " + "; ".join(problems))


def _abbrev(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def load_hf_state_into_model(model, hf: str | Mapping[str, torch.Tensor], hf_config: Mapping) -> None:
    """Copy HF Qwen3 weights into THIS rank's `GPTModel` stage and TP shard, in place.

    model: megatron `GPTModel` (local or TE spec; wrappers with `.module` are unwrapped) built for `hf_config`.
    hf: an HF folder (safetensors, single file or sharded with an index json; read tensor by tensor) or an
        in-memory HF state dict. TP/PP coordinates come from megatron's parallel_state, the padded vocab from
        the model. Every parameter of the model is set exactly once; ValueError names missing, extra and
        mis-shaped tensors before any parameter is touched.
    """
    from megatron.core import parallel_state

    from megatron_trace.checkpoint.hf_io import HFTensorSource
    from megatron_trace.models.qwen3 import unwrap_model

    model = unwrap_model(model)
    dims = Qwen3Dims.from_hf_config(hf_config)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if model.config.tensor_model_parallel_size != tp or model.config.pipeline_model_parallel_size != pp:
        raise ValueError(f"model was built for tp={model.config.tensor_model_parallel_size}, "
                         f"pp={model.config.pipeline_model_parallel_size} but parallel_state has tp={tp}, pp={pp}")
    if model.config.num_layers != dims.layers:
        raise ValueError(f"model has num_layers={model.config.num_layers}, HF config num_hidden_layers={dims.layers}")
    padded_vocab = int(model.vocab_size)
    check_parallel_layout(dims, tp, pp, padded_vocab)
    if padded_vocab < dims.vocab:
        raise ValueError(f"model vocab {padded_vocab} is smaller than HF vocab_size={dims.vocab}")

    # Pass 1: plan every parameter (global name, shard shape) and validate the source, touching nothing.
    plan: list[tuple[str, torch.nn.Parameter]] = []
    seen: set[str] = set()
    for local_name, param in model.named_parameters():
        layer, suffix = split_layer_name(local_name)
        if layer is not None:
            # layer_number is megatron's 1-based GLOBAL index (it includes this stage's pipeline offset).
            global_name = f"decoder.layers.{model.decoder.layers[layer].layer_number - 1}.{suffix}"
        else:
            global_name = local_name
        name = canonical_megatron_name(global_name)
        if name in seen:
            raise ValueError(f"Megatron parameter {name!r} appears twice in the model")
        seen.add(name)
        tp_rule(name)  # KeyError naming an unknown parameter
        full_shape = megatron_param_shape(name, dims, padded_vocab)
        shard_shape = list(full_shape)
        rule = tp_rule(name)
        if rule in ("vocab", "column", "gate_up"):
            shard_shape[0] //= tp
        elif rule == "row":
            shard_shape[1] //= tp
        if tuple(param.shape) != tuple(shard_shape):
            raise ValueError(f"model parameter {local_name} (= {name}) has shape {tuple(param.shape)}, "
                             f"the HF config implies {tuple(shard_shape)} at tp={tp}")
        plan.append((name, param))

    source = HFTensorSource(hf)
    try:
        needed = [n for name, _ in plan for n in hf_names_for(name, dims)]
        check_hf_tensors(source, dims, needed)
        # Pass 2: one Megatron parameter at a time, reading only this rank's rows/columns of the HF tensors.
        with torch.no_grad():
            for name, param in plan:
                param.copy_(megatron_shard_from_hf(name, source, dims, padded_vocab, tp_rank, tp))
    finally:
        source.close()

"""Offline checkpoint conversion: HF safetensors <-> Megatron-Core distributed checkpoint (torch_dist format).

Runs in ONE process (no torchrun): a world-size-1 gloo group is created for `dist_checkpointing`. A distributed
checkpoint stores every parameter as one *global* tensor (layers stacked under `decoder.layers.*`), so the same
checkpoint loads at any TP/PP; the one layout-dependent thing is the padded vocabulary, a multiple of 128 * TP.
The conversion metadata (`content_metadata` in the checkpoint's common state) records it with TP, PP and the
HF config:

    {"format": "megatron-trace/hf-qwen3", "version": 1, "hf_config": {...}, "tensor_model_parallel_size": TP,
     "pipeline_model_parallel_size": PP, "vocab_size": V, "padded_vocab_size": Vp}

HF side files (tokenizer, generation config) are kept in `<megatron dir>/hf_assets/` and copied back.
Outputs are written into a temporary folder beside OUT and renamed when complete; on any error OUT is left as it
was (absent, unless it existed and `overwrite` was not given).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_trace.checkpoint import safe_pickle  # noqa: F401 - .metadata is read through an allowlist from here on
from megatron_trace.parent_death import pid_alive
from megatron_trace.checkpoint.hf_io import (
    HF_ASSET_FILES,
    HFTensorSource,
    TensorInfo,
    WriteFailed,
    plan_shards,
    read_hf_config,
    write_failure_cause,
    write_json,
    write_safetensors_shards,
)
from megatron_trace.checkpoint.hf_mapping import (
    EMBEDDING,
    FINAL_NORM,
    OUTPUT_LAYER,
    Qwen3Dims,
    canonical_megatron_name,
    check_hf_tensors,
    check_parallel_layout,
    hf_names_for,
    hf_param_shapes,
    iter_hf_tensors_from_megatron,
    megatron_param_names,
    megatron_param_shape,
    megatron_tensor_from_hf,
    split_layer_name,
)

CONVERSION_FORMAT = "megatron-trace/hf-qwen3"
CONVERSION_VERSION = 1
HF_ASSETS_DIR = "hf_assets"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# Local-spec layer suffix -> distributed-checkpoint key suffix. megatron's local spec maps the pre-norms onto
# the Transformer-Engine names (`sharded_state_dict_keys_map`), so these keys are what both specs load.
_DIST_LAYER_KEYS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
# Layer modules whose `_extra_state` (Transformer Engine's FP8 metadata; empty on the local spec's linears) is a
# ShardedObject per layer in the sharded state dict of the TE spec: the four linears and, with qk_layernorm, the q/k
# RMSNorms (TENorm). TEDotProductAttention has an `_extra_state` in its plain state dict only (its sharded state
# dict leaves it out), so it is never in a checkpoint; loading tolerates that (checkpoint/tolerant_load.py).
_EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "self_attention.q_layernorm",
                        "self_attention.k_layernorm", "mlp.linear_fc1", "mlp.linear_fc2")
# Non-layer modules with one `_extra_state` object: the final RMSNorm (TENorm under TE).
_GLOBAL_EXTRA_STATE = ("decoder.final_layernorm._extra_state",)


class ConversionError(ValueError):
    """The input cannot be converted; the message names the cause."""


def dist_checkpoint_key(megatron_name: str) -> tuple[str, int | None]:
    """(checkpoint key, global layer index or None) of a Megatron parameter in a distributed checkpoint."""
    layer, suffix = split_layer_name(canonical_megatron_name(megatron_name))
    if layer is None:
        return megatron_name, None
    return f"decoder.layers.{_DIST_LAYER_KEYS.get(suffix, suffix)}", layer


_NON_MODEL_PREFIXES = ("optimizer.", "teacher.")


def _read_common_state(megatron_dir: str) -> dict:
    """The checkpoint's common (non-sharded) state, read from `common.pt` alone (no tensor data). ConversionError
    naming metadata.json or common.pt when either is not what a distributed checkpoint holds."""
    from megatron.core.dist_checkpointing.serialization import verify_checkpoint_and_load_strategy

    config = os.path.join(megatron_dir, "metadata.json")
    if not os.path.isfile(config):
        raise ConversionError(f"{megatron_dir!r} is not a Megatron distributed checkpoint (no metadata.json)")
    try:
        _, common_strategy = verify_checkpoint_and_load_strategy(megatron_dir)
    except Exception as e:  # noqa: BLE001 - JSONDecodeError, TypeError (unknown keys), CheckpointingException
        raise ConversionError(f"{config}: not a distributed checkpoint's metadata.json ({type(e).__name__}: "
                              f"{_first_line(e)})") from None
    common = os.path.join(megatron_dir, "common.pt")
    try:
        state = common_strategy.load_common(megatron_dir)
    except Exception as e:  # noqa: BLE001 - UnpicklingError (weights-only), EOFError, zip errors
        raise ConversionError(f"{common}: truncated or not a checkpoint's common state (a torch.save file): "
                              f"{type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(state, dict):
        raise ConversionError(f"{common}: not a checkpoint's common state (holds a {type(state).__name__}, not a "
                              "dict)")
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else repr(e)


_META_INTS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "vocab_size", "padded_vocab_size")


def read_conversion_metadata(megatron_dir: str) -> dict:
    """The metadata a conversion recorded in a distributed checkpoint (ConversionError if there is none, or if
    it lacks a field, naming common.pt and the field)."""
    meta = _read_common_state(megatron_dir).get("content_metadata")
    if not isinstance(meta, dict) or meta.get("format") != CONVERSION_FORMAT:
        raise ConversionError(f"{megatron_dir!r} has no {CONVERSION_FORMAT} conversion metadata "
                              f"(content_metadata={meta!r}); it was not written by this converter")
    where = os.path.join(megatron_dir, "common.pt")
    if not isinstance(meta.get("hf_config"), dict):
        raise ConversionError(f"{where}: conversion metadata hf_config={meta.get('hf_config')!r}: expected the HF "
                              "config.json object")
    for key in _META_INTS:
        v = meta.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConversionError(f"{where}: conversion metadata {key}={v!r}: expected a positive integer")
    return meta


def _read_dcp_metadata(megatron_dir: str):
    """torch DCP `Metadata` of the checkpoint (through the allowlist); ConversionError naming `.metadata`."""
    from torch.distributed.checkpoint import FileSystemReader

    path = os.path.join(megatron_dir, ".metadata")
    try:
        return FileSystemReader(megatron_dir).read_metadata()
    except safe_pickle.UnsafeCheckpointError:
        raise
    except FileNotFoundError:
        raise ConversionError(f"{path}: missing (not a complete distributed checkpoint)") from None
    except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, AttributeError...
        raise ConversionError(f"{path}: truncated or not a distributed-checkpoint .metadata ({type(e).__name__}: "
                              f"{_first_line(e)})") from None


def _check_data_files(megatron_dir: str, metadata) -> None:
    """Every byte range the `.metadata` places in a data file (`*.distcp`) must lie inside that file: a truncated
    or missing file is named before anything is read or written."""
    sizes: dict[str, int] = {}
    storage = getattr(metadata, "storage_data", None) or {}
    for index, info in storage.items():
        rel = info.relative_path
        if rel not in sizes:
            path = os.path.join(megatron_dir, rel)
            if os.path.basename(rel) != rel or not os.path.isfile(path):
                raise ConversionError(f"{path}: missing (the checkpoint's .metadata places {index.fqn!r} in it)")
            sizes[rel] = os.path.getsize(path)
        if info.offset + info.length > sizes[rel]:
            raise ConversionError(f"{os.path.join(megatron_dir, rel)}: truncated ({sizes[rel]} bytes, but "
                                  f"{index.fqn!r} is stored at bytes {info.offset}..{info.offset + info.length})")


class _SliceLoadPlanner(DefaultLoadPlanner):
    """A torch DCP load planner that reads arbitrary slices of stored global tensors into given buffers.

    megatron's own loader cannot read one layer of a stacked `decoder.layers.*` tensor in a single process
    (it assumes the missing grid cells belong to other ranks), so megatron-to-hf reads the torch_dist files
    through torch.distributed.checkpoint directly. requests: {stored key: (global offsets, buffer)}.
    """

    def __init__(self, requests: dict[str, tuple[tuple[int, ...], torch.Tensor]]):
        super().__init__()
        self.requests = requests

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (offsets, buf) in self.requests.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buf.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index) -> torch.Tensor:
        return self.requests[index.fqn][1]


def _read_slices(megatron_dir: str, requests: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> None:
    """Fill each buffer of `requests` ({key: (global offsets, buffer)}) from the checkpoint, in place."""
    import warnings

    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(megatron_dir)
    try:
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({k: buf for k, (_, buf) in requests.items()}, storage_reader=reader,
                     planner=_SliceLoadPlanner(requests), no_dist=True)
    except Exception as e:  # noqa: BLE001 - CheckpointException wraps the reader's own error
        files = sorted({info.relative_path for index, info in (reader.storage_data or {}).items()
                        if index.fqn in requests})
        where = ", ".join(os.path.join(megatron_dir, f) for f in files) or megatron_dir
        raise ConversionError(f"{where}: cannot read {', '.join(sorted(requests))} (a corrupt data file?): "
                              f"{type(e).__name__}: {_first_line(e)}") from None


@contextlib.contextmanager
def _single_process_group():
    """A world-size-1 gloo group for dist_checkpointing, unless the caller already has one of size 1.

    On a CPU-only torch the CPU shim is applied: the torch_dist writer calls torch.cuda.synchronize().
    """
    import torch.distributed as dist

    from megatron_trace.distributed.cpu_shim import apply_cpu_shim

    apply_cpu_shim()

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError("checkpoint conversion runs in a single process; torch.distributed is already "
                                  f"initialised with world size {dist.get_world_size()}")
        yield
        return
    with tempfile.TemporaryDirectory(prefix="convert-pg-") as store:
        dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def check_output_dir(in_dir: str, out_dir: str) -> None:
    """Refuse an output folder that is, or contains, the input: replacing it (--overwrite) would delete the input
    and whatever else lies in the output folder."""
    src, dst = os.path.realpath(in_dir), os.path.realpath(out_dir)
    if src == dst or src.startswith(dst.rstrip(os.sep) + os.sep):
        what = "is the input folder" if src == dst else "contains the input folder"
        raise ConversionError(f"output folder {dst!r} {what} {src!r}: replacing it would delete the input; "
                              "choose another --out-dir")


def _temp_prefix(out_dir: str, kind: str) -> str:
    return f".{os.path.basename(out_dir)}.{kind}-"


def _clean_stale_temps(out_dir: str) -> None:
    """Remove temp folders beside `out_dir` left by conversions that were killed (their pid, in the name, is no
    longer running; names without a pid come from versions before the pid was recorded)."""
    parent = os.path.dirname(out_dir)
    for kind in ("tmp", "old"):
        prefix = _temp_prefix(out_dir, kind)
        for entry in os.listdir(parent):
            if not entry.startswith(prefix):
                continue
            pid = entry[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and pid_alive(int(pid)):
                continue
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


@contextlib.contextmanager
def _atomic_output_dir(out_dir: str, overwrite: bool, in_dir: str) -> Iterator[str]:
    """Yield a temp folder beside `out_dir`; on success it replaces `out_dir`, on error it is removed.
    `out_dir` may not be or contain `in_dir`; stale temp folders of killed earlier runs are removed first."""
    check_output_dir(in_dir, out_dir)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise ConversionError(f"output folder {out_dir!r} already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        _clean_stale_temps(out_dir)
        tmp = tempfile.mkdtemp(prefix=f"{_temp_prefix(out_dir, 'tmp')}{os.getpid()}-", dir=parent)
    except OSError as e:
        raise ConversionError(f"cannot write beside the output folder {out_dir!r}: {e.strerror or e}") from e
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f"{_temp_prefix(out_dir, 'old')}{os.getpid()}-", dir=parent)
        os.replace(out_dir, os.path.join(old, "x"))
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _naming_write_failures(tmp: str, out_dir: str) -> Iterator[None]:
    """Turn a failed write into `tmp` into a ConversionError naming the file and the cause (a full output
    filesystem said so); `_atomic_output_dir` then removes `tmp`, so nothing is left half-written.

    The file comes from the error (WriteFailed, an OSError's filename) or, for megatron's checkpoint writer,
    from `torch.save`, watched for the duration (it writes `common.pt` by path; the tensor files are written by
    forked workers whose errors name no file: then the newest file in `tmp` is the one that was being written).
    """
    import torch

    writing: list[str] = []
    save = torch.save

    def watched_save(obj, f, *args, **kwargs):
        name = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", None)
        if isinstance(name, (str, os.PathLike)):
            writing.append(os.fspath(name))
        return save(obj, f, *args, **kwargs)

    torch.save = watched_save
    try:
        yield
    except ValueError:  # ConversionError, an unreadable input file (named by its reader): not a write failure
        raise
    except Exception as e:  # noqa: BLE001 - torch's, megatron's and safetensors' writers have their own errors
        path = getattr(e, "path", None) or _error_filename(e) or (writing[-1] if writing else None) \
            or _newest_file(tmp)
        what = f"writing {path}" if path else f"writing into {tmp}"
        raise ConversionError(f"{what} failed: {write_failure_cause(e.__cause__ if isinstance(e, WriteFailed) else e)}"
                              f"; nothing was left half-written (the temporary folder {tmp} was removed, "
                              f"{out_dir} is as it was)") from e
    finally:
        torch.save = save


def _error_filename(e: BaseException) -> str | None:
    for x in (e, e.__cause__, e.__context__):
        name = getattr(x, "filename", None)
        if isinstance(name, (str, os.PathLike)):
            return os.fspath(name)
    return None


def _newest_file(folder: str) -> str | None:
    paths = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    return max(paths, key=os.path.getmtime, default=None)


def _dims_or_error(hf_config: dict, where: str) -> Qwen3Dims:
    try:
        return Qwen3Dims.from_hf_config(hf_config)
    except ValueError as e:
        raise ConversionError(f"{where}: {e}") from None


def convert_hf_to_megatron(hf_dir: str, out_dir: str, tp: int, pp: int, *, overwrite: bool = False) -> dict:
    """HF Qwen3 folder -> Megatron distributed checkpoint loadable at tensor/pipeline parallel sizes `tp`/`pp`.

    Every HF tensor is checked against config.json (missing/extra/mis-shaped tensors, TP/PP divisibility) before
    anything is written. HF tensors are read one at a time; the converted model is held once, in the
    checkpoint's dtype (= the HF dtype). Returns the conversion metadata.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    from megatron_trace.models.qwen3 import padded_vocab_size

    hf_config = read_hf_config(hf_dir)
    dims = _dims_or_error(hf_config, os.path.join(hf_dir, "config.json"))
    if tp < 1 or pp < 1:
        raise ConversionError(f"--tp and --pp must be >= 1, got tp={tp}, pp={pp}")
    padded_vocab = padded_vocab_size(dims.vocab, tp)
    try:
        check_parallel_layout(dims, tp, pp, padded_vocab)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    source = HFTensorSource(hf_dir)
    try:
        check_hf_tensors(source, dims)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    check_output_dir(hf_dir, out_dir)
    if os.path.exists(out_dir) and not overwrite:  # fail before the (long) conversion
        raise ConversionError(f"output folder {os.path.abspath(out_dir)!r} already exists (pass --overwrite to replace it)")

    meta = {
        "format": CONVERSION_FORMAT, "version": CONVERSION_VERSION, "hf_config": hf_config,
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
        "vocab_size": dims.vocab, "padded_vocab_size": padded_vocab,
    }
    with _atomic_output_dir(out_dir, overwrite, hf_dir) as tmp, _naming_write_failures(tmp, out_dir), \
            _single_process_group():
        sharded: dict[str, object] = {}
        for name in megatron_param_names(dims):
            tensor = megatron_tensor_from_hf(name, source.get, dims, padded_vocab)
            key, layer = dist_checkpoint_key(name)
            if layer is None:
                sharded[name] = ShardedTensor.from_rank_offsets(key, tensor, replica_id=0)
            else:  # one slice of the stacked [num_layers, ...] global tensor, as megatron's TransformerBlock writes
                sharded[name] = ShardedTensor.from_rank_offsets(
                    key, tensor, (0, layer, dims.layers), replica_id=0, prepend_axis_num=1)
        for layer in range(dims.layers):
            for module in _EXTRA_STATE_MODULES:
                key = f"decoder.layers.{module}._extra_state"
                sharded[f"decoder.layers.{layer}.{module}._extra_state"] = ShardedObject(
                    key, None, (dims.layers,), (layer,), replica_id=0)
        for key in _GLOBAL_EXTRA_STATE:  # megatron's offsets for an object outside the layer stack: (1,), (0,)
            sharded[key] = ShardedObject(key, None, (1,), (0,), replica_id=0)
        source.close()
        dist_checkpointing.save(sharded, tmp, content_metadata=meta)
        del sharded
        _copy_assets(hf_dir, os.path.join(tmp, HF_ASSETS_DIR))
    return meta


def _copy_assets(src_dir: str, dst_dir: str) -> None:
    names = [n for n in HF_ASSET_FILES if os.path.isfile(os.path.join(src_dir, n))]
    if names:
        os.makedirs(dst_dir, exist_ok=True)
        for n in names:
            shutil.copy2(os.path.join(src_dir, n), os.path.join(dst_dir, n))


def _iter_megatron_tensors(megatron_dir: str, dims: Qwen3Dims, stored: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Full Megatron tensors (global names) read from the checkpoint one layer at a time.

    stored: DCP metadata by key (`TensorStorageMetadata`: global size and dtype).
    """
    names = megatron_param_names(dims)
    groups: list[list[str]] = [[EMBEDDING]]
    for layer in range(dims.layers):
        groups.append([n for n in names if split_layer_name(n)[0] == layer])
    groups.append([FINAL_NORM] + ([] if dims.tied else [OUTPUT_LAYER]))
    for group in groups:
        requests = {}
        for n in group:
            key, layer = dist_checkpoint_key(n)
            size, dtype = tuple(stored[key].size), stored[key].properties.dtype
            if layer is None:
                requests[key] = ((0,) * len(size), torch.empty(size, dtype=dtype))
            else:  # one [1, ...] slice of the stacked [num_layers, ...] tensor
                requests[key] = ((layer,) + (0,) * (len(size) - 1), torch.empty((1, *size[1:]), dtype=dtype))
        _read_slices(megatron_dir, requests)
        for n in group:
            key, layer = dist_checkpoint_key(n)
            buf = requests.pop(key)[1]
            yield n, (buf if layer is None else buf[0])


def convert_megatron_to_hf(megatron_dir: str, out_dir: str, *, overwrite: bool = False,
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Megatron distributed checkpoint written by `convert_hf_to_megatron` (or carrying the same metadata) -> HF
    folder: config.json, safetensors (sharded with an index json above `max_shard_bytes`), tokenizer files.

    Every stored tensor is checked against the recorded HF config before anything is written. Reads one layer
    at a time and holds at most one output shard file in memory; each HF tensor keeps the stored dtype.
    """
    check_output_dir(megatron_dir, out_dir)
    meta = read_conversion_metadata(megatron_dir)
    hf_config = meta["hf_config"]
    dims = _dims_or_error(hf_config, f"{os.path.join(megatron_dir, 'common.pt')}: conversion metadata")
    metadata = _read_dcp_metadata(megatron_dir)
    _check_data_files(megatron_dir, metadata)
    stored = metadata.state_dict_metadata
    expected: dict[str, tuple[int, ...]] = {}
    for name in megatron_param_names(dims):
        key, layer = dist_checkpoint_key(name)
        shape = megatron_param_shape(name, dims, meta["padded_vocab_size"])
        expected[key] = shape if layer is None else (dims.layers, *shape)
    # Trainer checkpoints also hold optimizer states and a teacher snapshot: not part of the model.
    tensor_keys = {k for k in stored if "._extra_state" not in k and not k.startswith(_NON_MODEL_PREFIXES)}
    missing = sorted(set(expected) - tensor_keys)
    extra = sorted(tensor_keys - set(expected))
    misshaped = [f"{k} {tuple(stored[k].size)} (config implies {expected[k]})"
                 for k in expected if k in stored and tuple(stored[k].size) != expected[k]]
    problems = ([f"missing tensors: {', '.join(missing)}"] if missing else []) + \
               ([f"extra tensors: {', '.join(extra)}"] if extra else []) + \
               ([f"tensor shapes do not match the recorded HF config: {', '.join(misshaped)}"] if misshaped else [])
    if problems:
        raise ConversionError(f"{megatron_dir}: " + "; ".join(problems))

    hf_dtype = {hf_name: stored[dist_checkpoint_key(name)[0]].properties.dtype
                for name in megatron_param_names(dims) for hf_name in hf_names_for(name, dims)}
    plan = plan_shards(((n, TensorInfo(shape, hf_dtype[n])) for n, shape in hf_param_shapes(dims).items()),
                       max_shard_bytes)
    with _atomic_output_dir(out_dir, overwrite, megatron_dir) as tmp, _naming_write_failures(tmp, out_dir):
        write_safetensors_shards(tmp, plan, iter_hf_tensors_from_megatron(
            _iter_megatron_tensors(megatron_dir, dims, stored), hf_config))
        write_json(os.path.join(tmp, "config.json"), hf_config)
        assets = os.path.join(megatron_dir, HF_ASSETS_DIR)
        if os.path.isdir(assets):
            _copy_assets(assets, tmp)


def load_converted_checkpoint(model, megatron_dir: str) -> None:
    """Load a converted checkpoint into THIS rank's `GPTModel` at its TP/PP layout (collective over all ranks).

    `dist_checkpointing.load(model.sharded_state_dict(), dir)` plus the checks a bare load lacks: the model's
    padded vocab must equal the recorded one (it depends on the TP the checkpoint was converted for), and the
    conversion metadata is dropped from the state dict before a strict load that tolerates only absent
    Transformer Engine `_extra_state` entries (a checkpoint converted before they were written).
    """
    from megatron_trace.checkpoint.tolerant_load import dist_load, load_module_state
    from megatron_trace.models.qwen3 import unwrap_model

    meta = read_conversion_metadata(megatron_dir)
    model = unwrap_model(model)
    if int(model.vocab_size) != meta["padded_vocab_size"]:
        raise ConversionError(
            f"model padded vocab {model.vocab_size} != checkpoint's {meta['padded_vocab_size']} (converted for "
            f"tp={meta['tensor_model_parallel_size']}); re-convert with --tp {model.config.tensor_model_parallel_size}")
    state = dist_load(model.sharded_state_dict(), megatron_dir)
    state.pop("content_metadata", None)
    load_module_state(model, state, megatron_dir)

"""Reading and writing Hugging Face checkpoint folders (`config.json` + safetensors, single file or sharded).

Reading is lazy: `HFTensorSource` learns names, shapes and dtypes from the safetensors headers and loads one
tensor at a time with `safe_open`, so converting a model never holds the HF copy in memory at once.
Writing plans the shard files from (name, shape, dtype) first, then fills them in order, one file in memory
at a time, into the caller's (temporary) folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"
# Files of an HF model folder that are neither config nor weights and travel through a conversion unchanged.
HF_ASSET_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_hf_config(hf_dir: str) -> dict:
    """The parsed `config.json` of an HF model folder; FileNotFoundError naming the path if absent."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in HF folder {hf_dir!r}")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


class HFTensorSource:
    """HF weights by name: an HF folder (read lazily from safetensors) or an in-memory `{name: tensor}` dict.

    `info(name)` costs no tensor read; `get(name)` reads exactly one tensor.
    """

    def __init__(self, hf: str | Mapping[str, torch.Tensor]):
        self._dict: Mapping[str, torch.Tensor] | None = None
        self._file_of: dict[str, str] = {}
        self._handles: dict[str, object] = {}
        self._info: dict[str, TensorInfo] = {}
        if isinstance(hf, Mapping):
            self._dict = hf
            self._info = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in hf.items()}
            self.description = "the given HF state dict"
            return
        if not isinstance(hf, (str, os.PathLike)):
            raise TypeError(f"hf must be an HF folder path or a dict of tensors, got {type(hf).__name__}")
        hf = os.fspath(hf)
        self.description = f"HF folder {hf!r}"
        index_path = os.path.join(hf, SAFETENSORS_INDEX)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_path} has no 'weight_map'")
            self._file_of = {name: os.path.join(hf, fname) for name, fname in weight_map.items()}
        elif os.path.isfile(os.path.join(hf, SINGLE_SAFETENSORS)):
            single = os.path.join(hf, SINGLE_SAFETENSORS)
            self._file_of = {name: single for name in self._read_header(single)}
        else:
            raise FileNotFoundError(
                f"{self.description} has neither {SINGLE_SAFETENSORS} nor {SAFETENSORS_INDEX} "
                "(only safetensors weights are supported)"
            )
        for path in sorted(set(self._file_of.values())):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{index_path} names a shard that does not exist: {path}")
            for name, info in self._read_header(path).items():
                if self._file_of.get(name) == path:
                    self._info[name] = info
        unlisted = sorted(n for n in self._file_of if n not in self._info)
        if unlisted:
            raise ValueError(f"{index_path} maps tensors that are not in their shard file: {unlisted[:8]}")

    @staticmethod
    def _read_header(path: str) -> dict[str, TensorInfo]:
        """Names, shapes and dtypes from a safetensors header (8-byte length + JSON), without reading data."""
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        out = {}
        for name, meta in header.items():
            if meta["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
            out[name] = TensorInfo(tuple(meta["shape"]), _SAFETENSORS_DTYPES[meta["dtype"]])
        return out

    def names(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from disk (folder) or returned as stored (dict)."""
        if self._dict is not None:
            return self._dict[name]
        from safetensors import safe_open

        path = self._file_of[name]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(path, framework="pt", device="cpu")
        return handle.get_tensor(name)

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows/columns [start, stop) of one tensor along `dim` (0 or 1); from a folder only those bytes are read."""
        if self._dict is not None:
            return self._dict[name].narrow(dim, start, stop - start)
        from safetensors import safe_open

        path = self._file_of[name]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(path, framework="pt", device="cpu")
        sl = handle.get_slice(name)
        return sl[start:stop] if dim == 0 else sl[:, start:stop]

    def close(self) -> None:
        self._handles.clear()


def plan_shards(infos: Iterable[tuple[str, TensorInfo]], max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into files of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, info in infos:
        nbytes = info.dtype.itemsize * int(torch.Size(info.shape).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards if shards[0] else []


def write_safetensors_shards(
    out_dir: str,
    plan: list[list[str]],
    tensors: Iterator[tuple[str, torch.Tensor]],
) -> None:
    """Write `tensors` (arriving in plan order) into the planned files; an index json when more than one file.

    Holds one file's tensors in memory at a time. Raises ValueError if the stream disagrees with the plan.
    """
    from safetensors.torch import save_file

    if len(plan) == 1:
        files = [SINGLE_SAFETENSORS]
    else:
        files = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    weight_map: dict[str, str] = {}
    total = 0
    stream = iter(tensors)
    for fname, names in zip(files, plan):
        chunk: dict[str, torch.Tensor] = {}
        for expected in names:
            name, tensor = next(stream, (None, None))
            if name != expected:
                raise ValueError(f"tensor stream out of plan order: expected {expected!r}, got {name!r}")
            chunk[name] = tensor.contiguous()
            total += tensor.numel() * tensor.element_size()
            weight_map[name] = fname
        save_file(chunk, os.path.join(out_dir, fname), metadata={"format": "pt"})
        del chunk
        fsync_file(os.path.join(out_dir, fname))
    leftover = next(stream, None)
    if leftover is not None:
        raise ValueError(f"tensor stream has a tensor the plan does not: {leftover[0]!r}")
    if len(files) > 1:
        with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())


def fsync_file(path: str) -> None:
    """Flush a written file to disk, so that renaming its folder into place publishes complete data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

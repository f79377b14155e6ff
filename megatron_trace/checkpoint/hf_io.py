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


def _read_weight_map(index_path: str) -> dict[str, str]:
    """The `weight_map` ({tensor name: shard file name}) of a safetensors index; ValueError naming the path."""
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{index_path}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        got = type(index).__name__ if not isinstance(index, dict) else f"weight_map={weight_map!r}"
        raise ValueError(f"{index_path}: an empty safetensors index (expected a non-empty 'weight_map' of tensor "
                         f"name -> shard file, got {got})")
    bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v or os.path.isabs(v)
           or os.path.normpath(v).startswith("..")]
    if bad:
        raise ValueError(f"{index_path}: weight_map entry {bad[0][0]!r} -> {bad[0][1]!r} is not a shard file name "
                         "inside the folder")
    return weight_map


class WriteFailed(OSError):
    """Writing one output file failed; `path` is the file, the message says why (a full disk said so)."""

    def __init__(self, path: str, error: BaseException):
        super().__init__(f"writing {path} failed: {write_failure_cause(error)}")
        self.path = path


def write_failure_cause(e: BaseException) -> str:
    """Why a write failed, in words: a full output filesystem is recognised in the forms torch's and
    safetensors' writers report it (ENOSPC/EDQUOT; torch's zip writer: "unexpected pos 704 vs 598" after a short
    write; safetensors: "No space left on device (os error 28)")."""
    import errno

    text = f"{type(e).__name__}: {e}"
    codes = {getattr(x, "errno", None) for x in (e, e.__cause__, e.__context__) if x is not None}
    if codes & {errno.ENOSPC, errno.EDQUOT} or "No space left on device" in text or "os error 28" in text \
            or "Disk quota exceeded" in text:
        return f"the output filesystem is full ({text})"
    if "unexpected pos" in text or "file write failed" in text:  # torch's zip writer after a short write
        return f"the write failed, most likely because the output filesystem is full ({text})"
    if codes & {errno.EACCES, errno.EPERM, errno.EROFS}:
        return f"the output is not writable ({text})"
    return text


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
            self._file_of = {name: os.path.join(hf, fname) for name, fname in _read_weight_map(index_path).items()}
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
        """Names, shapes and dtypes from a safetensors header (8-byte length + JSON), without reading data.

        The header is checked against the file: a truncated file (the header, or a tensor's bytes, running past
        its end) or one that is not safetensors at all is a ValueError naming the path, before any tensor is read.
        """
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size < 8:
                raise ValueError(f"{path}: truncated or not a safetensors file ({size} bytes, less than the 8-byte "
                                 "header length)")
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                raise ValueError(f"{path}: truncated or not a safetensors file (its header claims {n} bytes, the "
                                 f"file has {size})")
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: not a safetensors file (its header is not a JSON object)")
        header.pop("__metadata__", None)
        out, data_bytes = {}, size - 8 - n
        for name, meta in header.items():
            try:
                dtype, shape, (start, end) = meta["dtype"], tuple(int(x) for x in meta["shape"]), meta["data_offsets"]
                start, end = int(start), int(end)
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: not a safetensors file (header entry {name!r} is {meta!r})") from None
            if dtype not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
            if end > data_bytes:
                raise ValueError(f"{path}: truncated (tensor {name!r} needs data bytes up to {end}, the file holds "
                                 f"{data_bytes} after its header)")
            out[name] = TensorInfo(shape, _SAFETENSORS_DTYPES[dtype])
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
        try:
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = safe_open(path, framework="pt", device="cpu")
            return handle.get_tensor(name)
        except Exception as e:  # SafetensorError (its own class), OSError: name the file
            raise ValueError(f"{path}: cannot read tensor {name!r} ({type(e).__name__}: {e})") from e

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows/columns [start, stop) of one tensor along `dim` (0 or 1); from a folder only those bytes are read."""
        if self._dict is not None:
            return self._dict[name].narrow(dim, start, stop - start)
        from safetensors import safe_open

        path = self._file_of[name]
        try:
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = safe_open(path, framework="pt", device="cpu")
            sl = handle.get_slice(name)
            return sl[start:stop] if dim == 0 else sl[:, start:stop]
        except Exception as e:  # SafetensorError (its own class), OSError: name the file
            raise ValueError(f"{path}: cannot read tensor {name!r} ({type(e).__name__}: {e})") from e

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
        path = os.path.join(out_dir, fname)
        try:
            save_file(chunk, path, metadata={"format": "pt"})
            fsync_file(path)
        except Exception as e:  # noqa: BLE001 - SafetensorError is its own class; the caller removes out_dir
            raise WriteFailed(path, e) from e
        del chunk
    leftover = next(stream, None)
    if leftover is not None:
        raise ValueError(f"tensor stream has a tensor the plan does not: {leftover[0]!r}")
    if len(files) > 1:
        write_json(os.path.join(out_dir, SAFETENSORS_INDEX), {"metadata": {"total_size": total},
                                                               "weight_map": weight_map})


def write_json(path: str, obj) -> None:
    """Write `obj` as indented JSON and flush it to disk; WriteFailed naming `path` (and a full disk) on error."""
    try:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise WriteFailed(path, e) from e


def fsync_file(path: str) -> None:
    """Flush a written file to disk, so that renaming its folder into place publishes complete data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

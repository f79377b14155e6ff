"""Reading checkpoints without executing code from them.

torch's distributed-checkpoint reader unpickles the checkpoint's `.metadata` file with plain `pickle.load`: a
crafted `.metadata` runs any command when a checkpoint is converted, loaded as `model.load`, or resumed. Here
that read goes through a restricted unpickler that resolves only the classes a distributed-checkpoint
`.metadata` legitimately holds (torch's checkpoint metadata/planner classes, torch.Size, dtypes, layouts);
anything else is refused with `UnsafeCheckpointError` naming the file and the global. `install()` swaps the
reader's `pickle` for this one (every FileSystemReader in the process, torch's and megatron's, reads through it).
The other files of a checkpoint are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, BinaryIO

import torch


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file references a global outside the allowlist (it would run code if unpickled)."""


_DCP = "torch.distributed.checkpoint"
# (module, name) pairs a torch_dist `.metadata` pickles (recorded from checkpoints this project writes, trainer
# checkpoints with optimizer state included), plus their siblings of the same metadata schema.
_ALLOWED: set[tuple[str, str]] = {
    (f"{_DCP}.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    (f"{_DCP}.planner", n) for n in ("SavePlan", "LoadPlan", "WriteItem", "WriteItemType", "ReadItem",
                                     "LoadItemType", "TensorWriteData")
} | {
    (f"{_DCP}.filesystem", "_StorageInfo"), (f"{_DCP}.filesystem", "_StoragePrefix"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("torch", "device"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
}


def _allowed(module: str, name: str) -> bool:
    if (module, name) in _ALLOWED:
        return True
    # dtypes pickle as `torch.<name>` (torch.float32, torch.bfloat16, ...), memory formats likewise
    return module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format,
                                                                        torch.layout))


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only allowlisted globals (see module doc); `source` names the file in errors."""

    def __init__(self, file: BinaryIO, source: str = "<stream>"):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            raise UnsafeCheckpointError(
                f"{self.source}: refers to {module}.{name}, which a distributed-checkpoint .metadata does not "
                "hold; refusing to unpickle it (a crafted checkpoint could run code this way)")
        return super().find_class(module, name)


def restricted_load(file: BinaryIO) -> Any:
    """`pickle.load` through the allowlist."""
    return RestrictedUnpickler(file, source=str(getattr(file, "name", "<stream>"))).load()


def restricted_loads(data: bytes, source: str = "<bytes>") -> Any:
    return RestrictedUnpickler(io.BytesIO(data), source=source).load()


class _PickleForCheckpointReader:
    """Stands in for the `pickle` module inside torch's distributed-checkpoint filesystem module: writing is
    pickle's own, reading goes through the allowlist."""

    load = staticmethod(restricted_load)
    loads = staticmethod(restricted_loads)

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)


def install() -> None:
    """Make every distributed-checkpoint `.metadata` read in this process go through the allowlist (idempotent)."""
    import torch.distributed.checkpoint.filesystem as fs

    if not isinstance(fs.pickle, _PickleForCheckpointReader):
        fs.pickle = _PickleForCheckpointReader()


install()

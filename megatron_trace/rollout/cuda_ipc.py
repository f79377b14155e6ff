"""GPU form of the node-local weight update: the shared-memory protocol (shm_weights.py) with CUDA IPC handles in
place of /dev/shm segments, so a colocated server loads the trainer's exported bucket straight from the trainer's
GPU memory (one copy: into vLLM's parameters), as verl and NeMo-RL refit colocated engines.

Built on PyTorch's documented CUDA IPC (`torch.multiprocessing.reductions.reduce_tensor` in the producer,
`rebuild_cuda_tensor` in the consumer), keyed by the physical GPU's UUID and with the consumer's own device index
written into the rebuild arguments, the way vLLM's own IPC weight-transfer engine does it
(vllm/distributed/weight_transfer/ipc_engine.py). The descriptor of `POST /weights/shm` then carries
`"ipc": [{gpu uuid: rebuild args}, ...]` (pickled, base64) instead of `segment`/offsets; everything else (announce,
in-order buckets, `released`, finish, the driver's commit) is the same, and the tensors go into the same streamed
vLLM reload.

UNTESTED ON A GPU: no GPU was available when this was written. tests/test_cuda_ipc.py checks the call protocol on
CPU with recording stand-ins for the CUDA calls (handles produced per tensor, looked up by GPU UUID, rebuilt on the
server's device, references held until released). Only `tensor_parallel_size` 1 servers (the engine in the server's
process) can take tensors this way; for TP > 1 the rebuild has to run in each vLLM worker (a worker-extension
method per bucket), which is not written yet.
"""

from __future__ import annotations

import base64
import pickle
from typing import Any, Callable

import torch

from megatron_trace.rollout.shm_weights import DTYPES, ShmProtocolError, dtype_name

__all__ = ["IpcBucketWriter", "IpcBucketMapping", "gpu_uuid"]

_DEVICE_INDEX_ARG = 6  # position of the device index in reduce_tensor's rebuild_cuda_tensor arguments


def gpu_uuid(device_index: int) -> str:
    return str(torch.cuda.get_device_properties(device_index).uuid)


def _reduce(t: torch.Tensor):
    from torch.multiprocessing.reductions import reduce_tensor

    return reduce_tensor(t)


def _rebuild(*args):
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(*args)


class IpcBucketWriter:
    """Trainer side: the `/weights/shm` descriptor of a bucket on this GPU (no copy: the handles point at the
    bucket's own memory), holding each bucket alive until every server released it (`release`)."""

    def __init__(self, reduce: Callable = _reduce, uuid: Callable[[int], str] = gpu_uuid, require_cuda: bool = True):
        self._reduce, self._uuid, self._require_cuda = reduce, uuid, require_cuda  # (stand-ins: CPU tests)
        self._held: dict[int, list[torch.Tensor]] = {}
        self.max_held = 0

    def write(self, index: int, bucket: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
        tensors, handles, keep = [], [], []
        for name, t in bucket:
            if self._require_cuda and t.device.type != "cuda":
                raise ShmProtocolError(f"weight {name!r} is on {t.device}: CUDA IPC hands over GPU tensors")
            t = t.detach().contiguous()
            keep.append(t)
            _, args = self._reduce(t)
            handles.append({self._uuid(t.device.index or 0): args})
            tensors.append([name, dtype_name(name, t), list(t.shape)])
        self._held[index] = keep
        self.max_held = max(self.max_held, len(self._held))
        return {"index": index, "tensors": tensors,
                "ipc": base64.b64encode(pickle.dumps(handles)).decode("ascii")}

    def release(self, indices) -> None:
        for i in indices:
            self._held.pop(int(i), None)

    def release_all(self) -> None:
        self._held.clear()


class IpcBucketMapping:
    """Server side: the bucket's tensors rebuilt on this process's GPU from the descriptor's handles (views of the
    trainer's memory: no copy until vLLM loads them). The descriptor comes from an authenticated trainer (the
    bearer token): its handles are unpickled."""

    def __init__(self, descriptor: dict[str, Any], device_index: int, rebuild: Callable = _rebuild,
                 uuid: Callable[[int], str] = gpu_uuid):
        try:
            handles = pickle.loads(base64.b64decode(descriptor["ipc"]))
            slots = [(str(n), str(d), tuple(int(x) for x in s)) for n, d, s in descriptor["tensors"]]
        except Exception as e:  # noqa: BLE001 - any malformed descriptor is the client's error
            raise ShmProtocolError(f"expected ipc (base64 pickled handles) and tensors [[name, dtype, shape]]: "
                                   f"{type(e).__name__}: {e}") from e
        if len(handles) != len(slots):
            raise ShmProtocolError(f"{len(handles)} IPC handles for {len(slots)} tensors")
        mine = uuid(device_index)
        self.tensors = []
        for (name, dtype, shape), handle in zip(slots, handles):
            if dtype not in DTYPES:
                raise ShmProtocolError(f"weight {name!r}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
            if mine not in handle:
                raise ShmProtocolError(f"weight {name!r}: no IPC handle for this server's GPU {mine} (handles for "
                                       f"{sorted(handle)}): colocated servers must share the trainer's GPUs")
            args = list(handle[mine])
            args[_DEVICE_INDEX_ARG] = device_index  # the same GPU under this process's numbering
            t = rebuild(*args)
            if tuple(t.shape) != shape or str(t.dtype).removeprefix("torch.") != dtype:
                raise ShmProtocolError(f"weight {name!r}: the handle holds {t.dtype} {list(t.shape)}, the "
                                       f"descriptor says {dtype} {list(shape)}")
            self.tensors.append((name, t))
        self.base = None  # released when vLLM drops the tensors (the loader tracks the tensors themselves)

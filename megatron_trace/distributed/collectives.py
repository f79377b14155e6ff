"""The collectives the trainer, the loss and the weight bridge issue, each with its tensors on the backend's device.

NCCL (the default group on GPU) has no CPU path: a CPU tensor handed to it raises (or, for p2p, hangs the peer).
Gloo takes CPU tensors only. Code that builds small bookkeeping tensors on the CPU (metric sums, rank tables,
receive buffers) therefore goes through these functions, which move a tensor that is on the wrong device to
`comm_device(group)` for the call and copy the result back into the caller's tensor (in-place semantics are kept).
A tensor already on the right device (model parameters and activations on GPU) is used as it is: no copy.

Object collectives and barriers are forwarded unchanged: torch picks their device from the backend itself.
`tests/test_collectives.py` wraps torch.distributed to check that every collective of a TRACE update and a weight
export at TP=2 x PP=2 is issued from here with its tensors placed for NCCL.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["comm_device", "all_reduce", "all_gather", "gather", "send", "recv", "all_gather_object",
           "broadcast_object_list", "barrier"]


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device | None:
    """The device a collective on `group` needs its tensors on: the current CUDA device for NCCL, the CPU for
    gloo; None when the group takes either (a "cpu:gloo,cuda:nccl" pair) or there is no process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    backend = str(dist.get_backend(group)).lower()
    if "," in backend:  # one backend per device type: any device works
        return None
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return None


def _move(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of `t` on `device` (the one place a tensor changes device for a collective)."""
    return t.to(device)


def _placed(t: torch.Tensor, group) -> torch.Tensor:
    device = comm_device(group)
    if device is None or t.device == device:
        return t.contiguous() if not t.is_contiguous() else t
    return _move(t.contiguous(), device)


def _copy_back(dst: torch.Tensor, src: torch.Tensor) -> None:
    if src is not dst:
        dst.copy_(src)


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """In-place all-reduce of `t` (any device); returns `t`."""
    w = _placed(t, group)
    dist.all_reduce(w, op=op, group=group)
    _copy_back(t, w)
    return t


def all_gather(tensor_list: list[torch.Tensor], t: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """dist.all_gather with `t` and the receive buffers placed for the backend; results land in `tensor_list`'s
    own tensors."""
    w = _placed(t, group)
    wl = [_placed(g, group) for g in tensor_list]
    dist.all_gather(wl, w, group=group)
    for g, gw in zip(tensor_list, wl):
        _copy_back(g, gw)


def gather(t: torch.Tensor, gather_list: list[torch.Tensor] | None, dst: int,
           group: dist.ProcessGroup | None = None) -> None:
    """dist.gather with `t` and the receive buffers (on `dst`) placed for the backend; results land in
    `gather_list`'s own tensors."""
    w = _placed(t, group)
    wl = None if gather_list is None else [_placed(g, group) for g in gather_list]
    dist.gather(w, wl, dst=dst, group=group)
    if gather_list is not None:
        for g, gw in zip(gather_list, wl):
            _copy_back(g, gw)


def send(t: torch.Tensor, dst: int, group: dist.ProcessGroup | None = None) -> None:
    dist.send(_placed(t, group), dst=dst, group=group)


def recv(t: torch.Tensor, src: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Receive into `t` (any device); returns `t`."""
    w = _placed(t, group)
    dist.recv(w, src=src, group=group)
    _copy_back(t, w)
    return t


def all_gather_object(objects: list[Any], obj: Any, group: dist.ProcessGroup | None = None) -> None:
    dist.all_gather_object(objects, obj, group=group)


def broadcast_object_list(objects: list[Any], src: int = 0, group: dist.ProcessGroup | None = None) -> None:
    dist.broadcast_object_list(objects, src=src, group=group)


def barrier(group: dist.ProcessGroup | None = None) -> None:
    dist.barrier(group=group)

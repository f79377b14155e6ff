"""GPU fast path for weight updates: trainer rank 0 broadcasts HF-named tensors to the vLLM workers over NCCL.

This is the pattern of vLLM's RLHF examples: a process group outside torch.distributed's global state
(`StatelessProcessGroup` + `PyNcclCommunicator`) joins the trainer's sender (rank 0) and the vLLM workers
(ranks 1..world_size-1, one per vLLM worker), so world_size = 1 + the engine's TP x PP; with several servers in
one group (the trainer's `sync.nccl_push`), 1 + the sum of their TP x PP, server i's workers from rank_offset on.

Protocol of one update (nothing is broadcast until the engine accepted it):
1. announce: every (name, dtype, shape) in send order plus the target version; the engine validates them
   against its checkpoint and its own state (awake) and remembers it as the update the next broadcast carries
   (`VLLMEngine.prepare_nccl_update`). Every refusal happens here. A broadcast that arrives unannounced (a
   sleep or an HTTP update cancelled the announcement in between) is received, dropped and refused.
2. broadcast: the sender streams the tensors in announced order, one bucket alive at a time, then one status
   word (1 = complete, 0 = the sender failed part-way and padded the rest with zeros). Each worker receives
   them as a stream fed into vLLM's supported reload path (`Worker.reload_weights`, inside the vLLM config
   context; the same one the HTTP path uses). If the reload raises part-way, the worker still receives (and
   drops) the rest of the announced tensors and the status, so the sender never blocks on a missing receiver.

UNTESTED on GPU: no GPU was available when this was written; the CPU build of vLLM has no NCCL. The protocol's
logic (validation before the first byte, drain on failure, streaming, status word) is tested on CPU with fake
communicators (tests/test_nccl_weights.py). The HTTP path (`server.py` POST /weights) is the portable one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TensorMeta:
    """What one broadcast carries: HF name, dtype name (a key of DTYPES), shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @staticmethod
    def of(name: str, t: torch.Tensor) -> "TensorMeta":
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise ValueError(f"weight {name!r}: dtype {t.dtype} cannot be sent (expected one of {sorted(DTYPES)})")
        return TensorMeta(name, dtype, tuple(t.shape))


def _require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs CUDA and NCCL; on CPU push weights over HTTP (POST /weights)")


class WeightReceiverExtension:
    """Methods added to every vLLM worker (`worker_extension_cls`), called through `collective_rpc`.

    `self` is the vLLM worker (it has `device`, `rank` (its rank among the engine's TP x PP workers),
    `reload_weights`).
    """

    def weight_receiver_ready(self) -> bool:
        """True: the extension is installed (lets callers check before choosing the NCCL path)."""
        return True

    def init_weight_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int):
        """Join the trainer's weight group as rank `rank_offset + worker rank` (blocks until all ranks joined);
        world_size = 1 + the engine's TP x PP (1 + every server's, when several share the group)."""
        _require_cuda("init_weight_update_group")
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        pg = StatelessProcessGroup.create(host=master_address, port=master_port,
                                          rank=rank_offset + self.rank, world_size=world_size)
        self._weight_group = PyNcclCommunicator(pg, device=self.device)

    def _weight_broadcast(self):
        group = getattr(self, "_weight_group", None)
        if group is None:
            raise RuntimeError("receive_weights_nccl before init_weight_update_group")
        return lambda buf: group.broadcast(buf, src=0, stream=torch.cuda.current_stream())

    def receive_weights_nccl(self, metas: list[tuple[str, str, tuple[int, ...]]]) -> None:
        """Receive the announced tensors from rank 0, streaming them into vLLM's reload (one reload per update)."""
        receive_announced(metas, self._weight_broadcast(), self.device,
                          lambda it: self.reload_weights(weights_iterator=it, is_checkpoint_format=True))
        torch.cuda.synchronize()

    def drain_weights_nccl(self, metas: list[tuple[str, str, tuple[int, ...]]]) -> None:
        """Receive and drop an announced update the engine refused after the sender had started."""
        receive_announced(metas, self._weight_broadcast(), self.device, None)
        torch.cuda.synchronize()

    def close_weight_update_group(self) -> None:
        """Leave the weight group (the trainer is closing): its communicator is destroyed, not left to the GC."""
        group, self._weight_group = getattr(self, "_weight_group", None), None
        _destroy(group)


class WeightStreamAborted(RuntimeError):
    """The sender failed part-way through an update (its status word was 0): the weights received are a mix."""


def receive_announced(metas, broadcast: Callable[[torch.Tensor], None], device,
                      reload: Callable[[Iterator[tuple[str, torch.Tensor]]], None] | None) -> None:
    """Receiver side of one update: `len(metas)` tensors then the status word, each through `broadcast(buf)`.

    reload: consumes the (name, tensor) stream (vLLM's reload); None = drop everything. Whatever the reload does
    (raises part-way, stops early), every announced tensor and the status word are received before this
    returns or raises, so the sender's collectives always complete. Raises WeightStreamAborted when the sender
    reported a failure, RuntimeError when the reload left tensors unread.
    """
    received = 0
    status_received = False
    status = torch.zeros(1, dtype=torch.int32, device=device)

    def take(meta) -> torch.Tensor:
        nonlocal received
        name, dtype, shape = meta
        buf = torch.empty(tuple(shape), dtype=DTYPES[dtype], device=device)
        broadcast(buf)
        received += 1
        return buf

    def take_status() -> None:
        nonlocal status_received
        broadcast(status)
        status_received = True

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for meta in metas:
            yield meta[0], take(meta)
        take_status()
        if int(status.item()) != 1:
            raise WeightStreamAborted("the sender failed part-way through the weight update (status word 0)")

    def drain() -> None:
        for meta in metas[received:]:
            take(meta)
        if not status_received:
            take_status()

    if reload is None:
        drain()
        return
    it = stream()
    try:
        reload(it)
    except BaseException:
        drain()
        raise
    if received < len(metas):  # the reload stopped reading early: the rest is still on the wire
        read = received
        drain()
        raise RuntimeError(f"the weight reload read {read} of {len(metas)} announced tensors")
    if not status_received:  # it read every tensor but not the end of the stream: the status word is due
        for _ in it:
            pass


class NcclWeightSender:
    """Trainer side (rank 0 of the weight group): broadcasts each announced tensor from this GPU.

    world_size = 1 + the vLLM engines' TP x PP (one rank per vLLM worker, over every server). Create it at the same time as the
    server runs `init_weight_update_group` (both block until everyone joined): `sync.nccl_push.NcclPusher.init`
    does both, for every server of the run.
    """

    def __init__(self, master_address: str, master_port: int, world_size: int, device: torch.device | int = 0):
        _require_cuda("NcclWeightSender")
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        self.device = torch.device("cuda", device) if isinstance(device, int) else device
        pg = StatelessProcessGroup.create(host=master_address, port=master_port, rank=0, world_size=world_size)
        self.group = PyNcclCommunicator(pg, device=self.device)

    @staticmethod
    def announce(buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> list[TensorMeta]:
        """The announcement of already materialised buckets (tests, small models). For the trainer's streamed
        export use `weight_bridge.export_announcement`, which needs no tensor."""
        return [TensorMeta.of(n, t) for b in buckets for n, t in b]

    def _broadcast(self, t: torch.Tensor) -> None:
        self.group.broadcast(t, src=0, stream=torch.cuda.current_stream(self.device))

    def send(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], metas: Sequence[TensorMeta]) -> None:
        """Broadcast the tensors of `buckets` (consumed as a stream) in the order `metas` announced them."""
        send_announced(buckets, metas, self._broadcast, self.device)
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Leave the group (the trainer's close())."""
        group, self.group = self.group, None
        _destroy(group)


def _destroy(group) -> None:
    """Destroy a PyNcclCommunicator (vLLM's `destroy`: an abort bounded in time), if it has one."""
    destroy = getattr(group, "destroy", None)
    if destroy is not None:
        destroy()


def send_announced(buckets: Iterable[list[tuple[str, torch.Tensor]]], metas: Sequence[TensorMeta],
                   broadcast: Callable[[torch.Tensor], None], device) -> None:
    """Sender side of one update: each tensor (checked against its announcement), then the status word.

    `buckets` is consumed one bucket at a time (only the bucket being sent is referenced here). If a tensor does
    not match its announcement, or the buckets end early or raise, the rest of the announcement is sent as
    zeros and the status word 0 (the receivers then refuse the update instead of blocking), and the error is
    raised here.
    """
    sent = 0
    error: BaseException | None = None
    try:
        for bucket in buckets:
            for name, t in bucket:
                if sent >= len(metas):
                    raise ValueError(f"weight {name!r} is beyond the {len(metas)} announced tensors")
                got, want = TensorMeta.of(name, t), metas[sent]
                if got != want:
                    raise ValueError(f"tensor {sent} is {got}, the announcement says {want}")
                broadcast(t.to(device, non_blocking=True).contiguous())
                sent += 1
            del bucket
        if sent < len(metas):
            raise ValueError(f"the buckets carried {sent} of {len(metas)} announced tensors "
                             f"(first missing: {metas[sent].name!r})")
    except BaseException as e:  # noqa: BLE001 - the receivers must be released first
        error = e
    for meta in metas[sent:]:
        broadcast(torch.zeros(meta.shape, dtype=DTYPES[meta.dtype], device=device))
    broadcast(torch.tensor([0 if error else 1], dtype=torch.int32, device=device))
    if error is not None:
        raise error

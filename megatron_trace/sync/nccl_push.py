"""Trainer side of the NCCL weight update (`rollout.weight_sync: nccl`, GPU): global rank 0 broadcasts the weight
bridge's tensors once over one NCCL group that every generation server's vLLM workers joined, then commits every
server together.

The group is formed once (`init`, when the trainer builds its rollout stage) and left in `close` (the trainer's
close()): rank 0 of the trainer is rank 0 of the group; server i's workers are ranks 1 + i x W .. (i + 1) x W,
W = its TP x PP workers (`rollout.tensor_parallel_size`), so world size = 1 + servers x W (1 + TP x PP for one
server). One broadcast reaches every server, whatever their number.

One update (`announce`, then `push`), all-or-nothing across servers:
1. announce to every server (HTTP): names, dtypes, shapes in send order (`weight_bridge.export_announcement`,
   from the config alone) and the target version (the highest serving version + 1). Each server opens its one
   push slot for it and answers the push id the later requests quote (rollout/weight_staging.py). Every refusal
   (a bad announcement, an asleep engine, another update in progress) happens here, while nothing is broadcast;
   a refusal anywhere stops the update before the bridge exports anything, and the pushes the other servers
   opened are aborted.
2. every server is asked to receive it without serving it (`commit: false`, one request each, in flight), and
   rank 0 streams the bridge's buckets into the broadcast (`NcclWeightSender.send`: one bucket alive at a time,
   then a status word; a failing export pads the stream so no receiver blocks).
3. only if every server loaded it is every server committed (`/weights/nccl/commit`), so the run never serves two
   versions. A failure before the commit leaves every server on the previous version (a server whose weights
   were touched refuses to generate until a complete update), aborts the open pushes so the next update can
   start, and the error names the server(s).

What NCCL cannot do: a server that dies after its announcement leaves the broadcast waiting for it (NCCL has no
per-peer timeout); the trainer's run then ends at the process group's own timeout.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

import torch

from megatron_trace.rollout.client import RolloutClient, RolloutServerError, drain

logger = logging.getLogger(__name__)

__all__ = ["NcclPusher", "WeightSyncError", "clients_of"]


class WeightSyncError(RuntimeError):
    """A weight update failed; the message names the server(s) and says what each serves now."""


def clients_of(engine: Any) -> tuple[list[RolloutClient], list[str]]:
    """The HTTP clients of the trainer's engine (a RolloutClient, a ManagedServer or an EnginePool) and the names
    errors use for them (the pool's names, else the URLs)."""
    from megatron_trace.rollout.pool import EnginePool, _client_of

    if isinstance(engine, EnginePool):
        return list(engine.clients), list(engine.names)
    client = _client_of(engine)
    return [client], [client.cfg.base_url]


class NcclPusher:
    """Rank 0's end of the NCCL weight group over `clients` (every server of the run); see the module docstring.

    workers_per_server: each server's vLLM workers (TP x PP). make_sender(address, port, world_size, device): the
    group's rank 0; default `nccl_weights.NcclWeightSender` (CUDA + vLLM's PyNccl).
    """

    def __init__(self, clients: Sequence[RolloutClient], *, workers_per_server: int, master_address: str,
                 master_port: int, device: torch.device | int = 0, names: Sequence[str] | None = None,
                 make_sender: Callable[..., Any] | None = None):
        if not clients:
            raise ValueError("NcclPusher needs at least one server")
        if workers_per_server < 1:
            raise ValueError(f"workers_per_server={workers_per_server} must be >= 1")
        self.clients = list(clients)
        self.names = list(names) if names is not None else [c.cfg.base_url for c in self.clients]
        self.workers_per_server = int(workers_per_server)
        self.world_size = 1 + len(self.clients) * self.workers_per_server
        self.master_address, self.master_port, self.device = master_address, int(master_port), device
        self._make_sender = make_sender
        self.sender = None
        self._push_ids: dict[int, str | None] = {}  # server index -> push id of the announced update
        # One thread per server: the receives (and the group join) block until the broadcast is over.
        self._pool = ThreadPoolExecutor(max_workers=len(self.clients), thread_name_prefix="nccl-push")

    def _on_all(self, fn: Callable[[int], Any]) -> list[Future]:
        return [self._pool.submit(fn, i) for i in range(len(self.clients))]

    def _collect(self, futures: list[Future]) -> tuple[dict[int, Any], dict[int, BaseException]]:
        results, errors = {}, {}
        for i, fut in enumerate(futures):
            try:
                results[i] = fut.result()
            except Exception as e:  # noqa: BLE001 - named by the caller
                errors[i] = e
        return results, errors

    def _describe(self, errors: dict[int, BaseException]) -> str:
        return "; ".join(f"{self.names[i]} ({type(e).__name__}: {e})" for i, e in sorted(errors.items()))

    # ---------------------------------------------------------------- group
    def init(self) -> None:
        """Form the group: every server's workers join (one request each, in flight) while this process joins
        as rank 0 (all block until everyone joined). Once per run."""
        if self.sender is not None:
            raise RuntimeError("the NCCL weight group is already formed")
        make = self._make_sender
        if make is None:
            from megatron_trace.rollout.nccl_weights import NcclWeightSender as make
        w = self.workers_per_server
        joins = self._on_all(lambda i: self.clients[i].nccl_init(self.master_address, self.master_port,
                                                                  1 + i * w, self.world_size))
        try:
            sender = make(self.master_address, self.master_port, self.world_size, self.device)
        except Exception as e:
            raise WeightSyncError(f"joining the NCCL weight group at {self.master_address}:{self.master_port} "
                                  f"(world size {self.world_size}) as rank 0 failed: {type(e).__name__}: {e}") from e
        _, errors = self._collect(joins)
        if errors:
            raise WeightSyncError(f"the NCCL weight group (world size {self.world_size}) was not formed: "
                                  + self._describe(errors))
        self.sender = sender
        logger.info("NCCL weight group formed: rank 0 + %d server(s) x %d worker(s) at %s:%d", len(self.clients), w,
                    self.master_address, self.master_port)

    # ---------------------------------------------------------------- one update
    def announce(self, metas: Sequence[Any]) -> int:
        """Step 1: announce the update (`TensorMeta`s in send order) to every server; returns the target version.
        Raises WeightSyncError naming every server that refused (nothing has been broadcast)."""
        if self.sender is None:
            raise RuntimeError("announce before the NCCL weight group was formed (init)")
        versions, errors = self._collect(self._on_all(lambda i: self.clients[i].version()))
        if errors:
            raise WeightSyncError("reading the serving version failed on " + self._describe(errors))
        target = max(versions.values()) + 1
        wire = _wire(metas)
        push_ids, errors = self._collect(self._on_all(lambda i: self.clients[i].nccl_announce(target, wire)))
        self._push_ids = push_ids  # server index -> the push id its announcement opened (None: an older server)
        if errors:
            self._abort("the update was refused by another server")
            raise WeightSyncError(f"weight update to version {target} refused at its announcement by "
                                  + self._describe(errors) + "; nothing was broadcast, every server keeps "
                                  f"serving version {max(versions.values())} or its own")
        return target

    def _abort(self, why: str) -> None:
        """Close the pushes the last announcement opened (each server's one-push slot), so the next update can
        start; best effort (a server that failed may not answer). A server that loaded the update keeps refusing
        to generate until a complete update: its weights are no longer the version it serves."""
        push_ids, self._push_ids = self._push_ids, {}
        for i, push_id in push_ids.items():
            if push_id is not None:
                logger.warning("aborting NCCL weight push %s on %s: %s", push_id, self.names[i], why)
                self.clients[i].nccl_abort(push_id)

    def push(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], target: int, metas: Sequence[Any]) -> int:
        """Steps 2-3: broadcast `buckets` (consumed as a stream; drained to its end on failure, it is the bridge's
        collective generator) as the announced update, then commit every server. Returns `target`; raises
        WeightSyncError naming the servers that failed (no server serves `target` then, unless its commit had
        already succeeded, which the message lists)."""
        it = iter(buckets)
        wire = _wire(metas)
        push_ids = dict(self._push_ids)
        receives = self._on_all(lambda i: self.clients[i].nccl_receive(target, wire, push_ids.get(i), commit=False))
        send_error: BaseException | None = None
        try:
            self.sender.send(it, list(metas))
        except Exception as e:  # noqa: BLE001 - the receivers got status 0; their answers are collected below
            send_error = e
            drain(it)
        results, errors = self._collect(receives)
        wrong = {i: r for i, r in results.items() if r.get("loaded_version") != target}
        if send_error is not None or errors or wrong:
            parts = [f"rank 0's broadcast failed ({type(send_error).__name__}: {send_error})"] if send_error else []
            if errors:
                parts.append("receiving failed on " + self._describe(errors))
            if wrong:
                parts.append("; ".join(f"{self.names[i]} answered {r}" for i, r in wrong.items()))
            self._abort("the update failed")
            raise WeightSyncError(f"weight update to version {target} over NCCL: " + "; ".join(parts)
                                  + "; no server was committed: none serves the new version")
        from megatron_trace.sync.shm_push import commit_all

        index = {id(c): i for i, c in enumerate(self.clients)}
        try:
            commit_all(self.clients, target, self.names,
                       commit=lambda c, v: c.nccl_commit(v, push_ids.get(index[id(c)])))
        except RolloutServerError as e:
            self._abort("the commit failed on another server")
            raise WeightSyncError(f"weight update to version {target} over NCCL: {e}") from e
        self._push_ids = {}
        return target

    # ---------------------------------------------------------------- teardown
    def close(self) -> None:
        """Every server leaves the group (errors logged: a stopped server cannot answer), then rank 0 does."""
        if self.sender is not None:
            _, errors = self._collect(self._on_all(lambda i: self.clients[i].nccl_close()))
            for i, e in errors.items():
                logger.warning("closing the NCCL weight group on %s failed: %s", self.names[i], e)
            close = getattr(self.sender, "close", None)
            if close is not None:
                close()
            self.sender = None
        self._pool.shutdown(wait=False)


def _wire(metas: Sequence[Any]) -> list[list]:
    return [[m.name, m.dtype, list(m.shape)] for m in metas]

"""Trainer side of the node-local weight update: stream the weight bridge's buckets into this node's generation
servers through /dev/shm (protocol in shm_weights.py), then let the driver commit every server of the run.

`ShmPusher.load(buckets, version)` runs on the rank that owns the node's servers (its local rank 0): it announces
the update to each local server, writes every bucket once into a shared segment and hands the same segment to all
of them, and ends with `finish`. The next bucket is drawn from the (collective) bridge while the servers load the
previous one, so export and load overlap; one request per server is in flight. Nothing is served yet: `commit`
(called by the driver on every server of the run once every node's `load` succeeded) flips the version, so the run
never has servers on two versions. On any failure the local servers are told to abort and the bucket iterable is
drained (the bridge's generator is collective), then the error is raised naming the server.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Mapping, Sequence

import torch

from megatron_trace.rollout.client import RolloutClient, RolloutServerError, drain
from megatron_trace.rollout.shm_weights import ShmBucketWriter, announcement

logger = logging.getLogger(__name__)

__all__ = ["ShmPusher", "announce_model", "commit_all"]


def announce_model(hf_config: Mapping, dtype: torch.dtype) -> list[list]:
    """Every HF tensor the weight bridge exports for this model (a tied model has no lm_head), as `[[name,
    dtype, shape], ...]`: what `/weights/shm/begin` takes, known before the first bucket is produced."""
    from megatron_trace.checkpoint.hf_mapping import Qwen3Dims, hf_param_shapes

    dims = Qwen3Dims.from_hf_config(hf_config)
    shapes = hf_param_shapes(dims)
    if dims.tied:
        shapes.pop("lm_head.weight", None)
    name = str(dtype).removeprefix("torch.")
    return announcement((n, name, s) for n, s in shapes.items())


class ShmPushError(RolloutServerError):
    """A node-local update failed on `url` (the server named in the message)."""

    def __init__(self, message: str, url: str, status: int | None = None):
        super().__init__(message, status)
        self.url = url


class ShmPusher:
    """Pushes updates into one node's servers (`clients`, each a RolloutClient) over shared memory."""

    def __init__(self, clients: Sequence[RolloutClient], node: int = 0):
        if not clients:
            raise ValueError("ShmPusher needs at least one server")
        self.clients = list(clients)
        self.urls = [c.cfg.base_url for c in self.clients]
        self.node = node
        self.writer = ShmBucketWriter()
        self._pool = ThreadPoolExecutor(max_workers=len(self.clients), thread_name_prefix="shm-push")
        self._inflight = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shm-push-bucket")  # one bucket
        self.stats: dict[str, float] = {}  # seconds per stage of the last load (see load)
        self.refit: list[dict | None] = []  # per server, how the last load was applied (see load)

    def _on_all(self, what: str, fn) -> list[Any]:
        futures = [self._pool.submit(fn, c) for c in self.clients]
        out, failed = [], []
        for url, fut in zip(self.urls, futures):
            try:
                out.append(fut.result())
            except Exception as e:  # noqa: BLE001 - named below
                failed.append((url, e))
        if failed:
            url, e = failed[0]
            raise ShmPushError(f"node {self.node}: {what} failed on " +
                               "; ".join(f"{u} ({type(x).__name__}: {x})" for u, x in failed), url,
                               getattr(e, "status", None)) from e
        return out

    def acquire(self, index: int, nbytes: int) -> str:
        """For `load(..., written=True)`: the name of a segment of >= nbytes to write bucket `index` into."""
        return self.writer.acquire(index, nbytes).name

    def load(self, buckets: Iterable, version: int, tensors: list[list], written: bool = False) -> int:
        """Stream `buckets` into every local server as the update to `version` (announced as `tensors`); returns
        the bucket count. The servers hold the weights unserved until `commit_all`. stats afterwards: export
        (waiting for the bridge), handoff (writing segments), load (waiting for the servers beyond that),
        finish (the servers' last layers), in seconds.
        written: the buckets are `/weights/shm` descriptors of segments already written (sync/shm_direct.py, each
        rank writing its own shards into segments from `acquire`); the previous bucket is then waited for before
        the next is drawn, so that its segment can be reused (<= 2 segments alive) and export includes the
        writing."""
        it = iter(buckets)
        stats = dict(export=0.0, handoff=0.0, load=0.0, finish=0.0)
        inflight: Future | None = None
        released: list[set[int]] = [set() for _ in self.clients]
        count = 0

        def wait() -> None:
            nonlocal inflight
            if inflight is None:
                return
            t0 = time.perf_counter()
            answers = inflight.result()
            inflight = None
            stats["load"] += time.perf_counter() - t0
            for seen, a in zip(released, answers):
                seen.update(a.get("released", ()))
            self.writer.release(set.intersection(*released))

        try:
            self._on_all(f"announcing the update to version {version}", lambda c: c.shm_begin(version, tensors))
            self.writer.release_all()
            while True:
                if written:
                    wait()  # the segments the previous buckets let go of are free before the next is written
                t0 = time.perf_counter()
                bucket = next(it, None)
                stats["export"] += time.perf_counter() - t0
                if bucket is None:
                    break
                if written:
                    desc = bucket
                else:
                    wait()  # the previous bucket is taken (and the segments it let go of are free) before writing
                    t0 = time.perf_counter()
                    desc = self.writer.write(count, bucket)
                    stats["handoff"] += time.perf_counter() - t0
                del bucket
                index = count
                inflight = self._inflight.submit(
                    self._on_all, f"bucket {index} of the update to version {version}",
                    lambda c, d=desc: c.shm_load(version, d))
                count += 1
            wait()
            if count == 0:
                raise ValueError("a weight update needs at least one bucket")
            t0 = time.perf_counter()
            answers = self._on_all(f"finishing the update to version {version}",
                                   lambda c: c.shm_finish(version, count))
            stats["finish"] = time.perf_counter() - t0
            stats["server_load"] = max(float(a.get("load_s", 0.0)) for a in answers)
            # per server: the in-place refit's byte counts (rollout/cpu_refit.py), None where vLLM's reload ran
            self.refit = [a.get("in_place") for a in answers]
            self.writer.release_all()
            self.stats = stats
            return count
        except BaseException as e:
            if inflight is not None:
                try:
                    inflight.result()
                except Exception:  # noqa: BLE001 - the first error is the one raised
                    pass
            self.abort(f"{type(e).__name__}: {e}")
            drain(it)
            raise

    def abort(self, reason: str) -> None:
        """Tell every local server to drop its unfinished update (errors logged: a dead server cannot answer)."""
        for url, c in zip(self.urls, self.clients):
            try:
                c.shm_abort(reason)
            except Exception as e:  # noqa: BLE001
                logger.warning("aborting the shm update on %s failed: %s", url, e)
        self.writer.release_all()

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._inflight.shutdown(wait=False)
        self.writer.close()


def commit_all(clients: Sequence[RolloutClient], version: int, names: Sequence[str] | None = None,
               commit=None) -> int:
    """The driver's last step of a node-local update: every server of the run (all nodes) serves `version`.

    Called only after every node's `ShmPusher.load` succeeded, so each server holds `version` loaded; a failure
    here names the server (`names[i]`, default its URL) and lists the ones that did commit. commit(client,
    version) -> serving version: default `shm_commit` (the NCCL update passes its own, `sync/nccl_push.py`)."""
    names = list(names) if names is not None else [c.cfg.base_url for c in clients]
    commit = commit or (lambda c, v: c.shm_commit(v))
    with ThreadPoolExecutor(max_workers=max(1, len(clients))) as pool:
        futures = [pool.submit(commit, c, version) for c in clients]
        failed, done = [], []
        for name, fut in zip(names, futures):
            try:
                got = fut.result()
                (done if got == version else failed).append(name if got == version else
                                                            (name, f"serves version {got}"))
            except Exception as e:  # noqa: BLE001
                failed.append((name, f"{type(e).__name__}: {e}"))
    if failed:
        raise RolloutServerError(f"commit of weight version {version} failed on " +
                                 "; ".join(f"{n} ({m})" for n, m in failed) +
                                 (f"; committed on {', '.join(done)}" if done else "; committed on none"))
    return version

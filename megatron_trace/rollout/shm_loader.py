"""Server side of the shared-memory weight update (protocol in shm_weights.py): one streamed vLLM reload fed
bucket by bucket from the trainer's /dev/shm segments, committed to a version only when the driver says so.

`ShmWeightLoader` holds at most one update. `begin` validates the announcement and starts the reload in a thread
of its own (vLLM pulls tensors from a generator); `load` maps a bucket's segment and hands its tensors to that
generator, returning once vLLM has taken them; `finish` ends the stream and waits for vLLM to complete the reload;
`commit` makes the engine serve the loaded version; `abort` ends an update that will not be committed. A bucket
counts as released (its segment free for the trainer to reuse) when vLLM dropped the last of its tensors.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from typing import Any, Callable, Iterator, Sequence

from megatron_trace.rollout.shm_weights import BucketMapping, SegmentMaps, ShmProtocolError

logger = logging.getLogger(__name__)

__all__ = ["ShmWeightLoader", "ShmUpdateError"]

_END = object()


class ShmUpdateError(Exception):
    """status: the HTTP status the route answers with (400, 409, 422); message names the cause."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Aborted(Exception):
    pass


class _StreamedUpdate:
    def __init__(self, engine, version: int, announced: dict[str, tuple[str, tuple[int, ...]]]):
        self.engine = engine
        self.version = version
        self.announced = announced
        self.received: set[str] = set()
        self.next_index = 0
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.consumed = threading.Condition()
        self.consumed_upto = -1  # highest bucket index whose tensors vLLM has taken
        self._released: set[int] = set()  # added from whichever thread drops a bucket's last tensor
        self._released_lock = threading.RLock()  # re-entrant: a finalizer may run inside a locked read
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.load_s = 0.0  # seconds vLLM spent between asking for tensors (the load itself)
        self.thread = threading.Thread(target=self._run, name=f"shm-reload-v{version}", daemon=True)
        self.thread.start()

    def _release(self, index: int) -> None:
        with self._released_lock:
            self._released.add(index)

    @property
    def released(self) -> list[int]:
        with self._released_lock:
            return sorted(self._released)

    def _tensors(self) -> Iterator[tuple[str, Any]]:
        while True:
            item = self.queue.get()
            if item is _END:
                return
            if isinstance(item, _Aborted):
                raise item
            index, mapping = item
            del item
            tensors = mapping.tensors
            if mapping.base is not None:  # shm: the segment is free once nothing uses its mapping
                weakref.finalize(mapping.base, self._release, index)
            # (CUDA IPC: the trainer keeps every bucket until finish; views of the handles carry no owner to watch)
            del mapping  # from here only the tensors (and vLLM's references to them) keep the segment mapped
            while tensors:
                name, t = tensors.pop(0)
                t0 = time.perf_counter()
                yield name, t
                self.load_s += time.perf_counter() - t0
                del t
            with self.consumed:
                self.consumed_upto = index
                self.consumed.notify_all()

    def _run(self) -> None:
        try:
            self.engine.load_weights_stream(self._tensors(), self.version)
        except BaseException as e:  # noqa: BLE001 - reported to the route that waits
            self.error = e
        finally:
            self.done.set()
            with self.consumed:
                self.consumed.notify_all()

    def wait_consumed(self, index: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self.consumed:
            while self.consumed_upto < index and not self.done.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ShmUpdateError(409, f"bucket {index} of the update to version {self.version} was not "
                                              f"taken by the engine within {timeout_s:.0f}s")
                self.consumed.wait(min(left, 1.0))
        if self.consumed_upto < index:
            raise ShmUpdateError(422, f"the reload of version {self.version} failed at bucket {index}: "
                                      f"{type(self.error).__name__}: {self.error}")

    def stop(self, reason: str) -> None:
        """End the stream with an error (vLLM's reload is closed; the engine refuses to generate)."""
        if not self.done.is_set():
            try:
                self.queue.put(_Aborted(reason), timeout=60)
            except queue.Full:
                logger.error("could not stop the streamed reload of version %d", self.version)
            self.done.wait(120)


class ShmWeightLoader:
    """The shared-memory update routes' state for one engine (thread-safe); see the module docstring."""

    def __init__(self, engine, max_bucket_bytes: int, timeout_s: float = 600.0, idle_timeout_s: float = 300.0,
                 other_update: Callable[[], str | None] | None = None, clock=time.monotonic):
        """idle_timeout_s: an update idle this long may be replaced by a new `begin` (before that a second begin
        is refused, 409, as the HTTP push's staging does); other_update: describes another update in progress on
        the same engine (the HTTP push), or None; a begin meanwhile is refused (409)."""
        self.engine = engine
        self.max_bucket_bytes = max_bucket_bytes
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.other_update = other_update
        self._clock = clock
        self._lock = threading.Lock()
        self._update: _StreamedUpdate | None = None
        self._loaded: int | None = None  # version loaded by a finished update, awaiting commit
        self._announced: list | None = None  # the open update's announcement (a retried begin is answered again)
        self._last_activity = clock()
        self._segment_maps = SegmentMaps()  # the trainer's segments stay mapped from one update to the next

    def active(self) -> str | None:
        """A description of the shm update in progress (begun or loaded, not idle past idle_timeout_s), or None.
        Reads without the lock: a bucket load holds it while vLLM takes the tensors."""
        return self._active_locked()

    def _active_locked(self) -> str | None:
        u = self._update
        version = u.version if u is not None else self._loaded
        if version is None:
            return None
        idle = self._clock() - self._last_activity
        if idle >= self.idle_timeout_s:
            return None
        return f"a shared-memory update to version {version}, last active {idle:.0f}s ago"

    def _current(self, version: int, what: str) -> _StreamedUpdate:
        u = self._update
        if u is None or u.version != version:
            have = "none" if u is None else f"the update to version {u.version}"
            raise ShmUpdateError(409, f"{what} of an update to version {version}, but the update in progress is "
                                      f"{have}: an update starts with POST /weights/shm/begin")
        self._last_activity = self._clock()
        return u

    def _fail(self, u: _StreamedUpdate, status: int, message: str) -> ShmUpdateError:
        u.stop(message)
        self._update = None
        return ShmUpdateError(status, f"{message}; update to version {u.version} aborted, the engine refuses to "
                                      "generate until a complete update is committed")

    def begin(self, version: int, tensors: Sequence[Sequence]) -> dict[str, Any]:
        """Open an update; 409 while another one (shm, or an HTTP push: `other_update`) is in progress."""
        with self._lock:
            try:
                metas = [(str(n), str(d), tuple(int(x) for x in s)) for n, d, s in tensors]
            except (TypeError, ValueError) as e:
                raise ShmUpdateError(400, f"tensors: expected [[name, dtype, shape], ...] ({e})") from e
            u = self._update
            if u is not None and u.version == version and u.next_index == 0 and self._announced == metas:
                self._last_activity = self._clock()  # a retried begin whose answer was lost
                return {"status": "begun", "weight_version": self.engine.weight_version, "tensors": len(metas)}
            busy = self._active_locked()
            if busy is not None:
                raise ShmUpdateError(409, f"{busy} is in progress: one update at a time (it can be replaced after "
                                          f"{self.idle_timeout_s:.0f}s idle, or ended by /weights/shm/abort)")
            other = self.other_update() if self.other_update is not None else None
            if other is not None:
                raise ShmUpdateError(409, f"{other} is in progress: one update at a time")
            if u is not None:
                logger.warning("shm update to version %d begins: aborting the idle update to version %d",
                               version, u.version)
                u.stop(f"superseded by an update to version {version} after idling")
                self._update = None
            if version <= self.engine.weight_version:
                raise ShmUpdateError(409, f"target version {version} must exceed the serving version "
                                          f"{self.engine.weight_version}")
            try:
                self.engine.validate_announcement(metas, version)
            except ValueError as e:
                raise ShmUpdateError(422, f"update to version {version} rejected ({e})") from e
            self._loaded = None
            self._update = _StreamedUpdate(self.engine, version, {n: (d, s) for n, d, s in metas})
            self._announced = metas
            self._last_activity = self._clock()
            return {"status": "begun", "weight_version": self.engine.weight_version, "tensors": len(metas)}

    def load(self, version: int, descriptor: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            u = self._current(version, "bucket")
            try:
                index = int(descriptor["index"])
            except (KeyError, TypeError, ValueError) as e:
                raise ShmUpdateError(400, f"index: expected an integer ({e})") from e
            if index != u.next_index:
                raise self._fail(u, 409, f"bucket {index} arrived where bucket {u.next_index} was expected: "
                                         "buckets are sent once each, in order")
            t0 = time.perf_counter()
            try:
                if "ipc" in descriptor:  # GPU: CUDA IPC handles of the trainer's bucket (cuda_ipc.py)
                    import torch

                    from megatron_trace.rollout.cuda_ipc import IpcBucketMapping

                    mapping = IpcBucketMapping(descriptor, torch.cuda.current_device())
                else:
                    mapping = BucketMapping(descriptor, self.max_bucket_bytes, self._segment_maps)
                for name, t in mapping.tensors:
                    want = u.announced.get(name)
                    got = (str(t.dtype).removeprefix("torch."), tuple(t.shape))
                    if want is None:
                        raise ShmProtocolError(f"weight {name!r} was not announced by /weights/shm/begin")
                    if got != want:
                        raise ShmProtocolError(f"weight {name!r} is {got[0]} {list(got[1])}, announced as "
                                               f"{want[0]} {list(want[1])}")
                    if name in u.received:
                        raise ShmProtocolError(f"weight {name!r} arrived twice")
                    u.received.add(name)
            except ShmProtocolError as e:
                raise self._fail(u, 422, f"bucket {index} rejected ({e})") from e
            map_s = time.perf_counter() - t0
            if u.done.is_set():
                raise self._fail(u, 422, f"the reload failed before bucket {index}: {u.error}")
            u.next_index += 1
            u.queue.put((index, mapping))
            del mapping
            try:
                u.wait_consumed(index, self.timeout_s)
            except ShmUpdateError as e:
                raise self._fail(u, e.status, str(e)) from e
            self._last_activity = self._clock()
            return {"status": "loaded", "index": index, "released": u.released, "map_s": map_s}

    def finish(self, version: int, count: int) -> dict[str, Any]:
        with self._lock:
            u = self._current(version, "finish")
            if count != u.next_index:
                raise self._fail(u, 409, f"finish of {count} buckets, but {u.next_index} were loaded")
            missing = sorted(set(u.announced) - u.received)
            if missing:
                raise self._fail(u, 422, f"{len(missing)} announced tensors never arrived, e.g. {missing[:3]}")
            t0 = time.perf_counter()
            u.queue.put(_END)
            if not u.done.wait(self.timeout_s):
                raise self._fail(u, 409, f"the reload of version {version} did not finish within "
                                         f"{self.timeout_s:.0f}s")
            self._update = None
            if u.error is not None:
                raise ShmUpdateError(422, f"the reload of version {version} failed ({type(u.error).__name__}: "
                                          f"{u.error}); the engine refuses to generate until a complete update "
                                          "is committed")
            self._loaded = version
            self._last_activity = self._clock()
            return {"status": "loaded", "weight_version": self.engine.weight_version, "loaded_version": version,
                    "released": u.released, "finish_s": time.perf_counter() - t0, "load_s": u.load_s,
                    # the in-place refit's byte counts (cpu_refit.py), or None: vLLM's checkpoint-format reload
                    "in_place": getattr(self.engine, "last_refit", None)}

    def commit(self, version: int) -> dict[str, Any]:
        with self._lock:
            if self.engine.weight_version == version and self._loaded is None:
                return {"status": "applied", "weight_version": version}  # a retried commit whose answer was lost
            if self._loaded != version:
                have = "none" if self._loaded is None else f"version {self._loaded}"
                raise ShmUpdateError(409, f"commit of version {version}, but the loaded update is {have}: "
                                          "commit follows a successful /weights/shm/finish")
            self.engine.commit_loaded_weights(version)
            self._loaded = None
            return {"status": "applied", "weight_version": version}

    def abort(self, reason: str) -> dict[str, Any]:
        with self._lock:
            u, self._update, self._loaded = self._update, None, None
            if u is not None:
                u.stop(reason)
            self._segment_maps.clear()
            return {"status": "aborted", "weight_version": self.engine.weight_version}


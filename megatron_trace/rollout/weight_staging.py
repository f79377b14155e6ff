"""Server-side staging of a weight push: one push at a time, keyed by the push id the server issued.

A push is `begin` (the server issues a push id for a target version), buckets 0, 1, ... staged in order under
that id, then `commit` (validate the whole update, apply it in one engine reload) or `abort`. Only one push is
open at a time: a second `begin` is refused (409) while the first is active, so two pushers can never stage into
the same update (two pushes of one version used to be staged together and committed as a mix of both). A push
idle for `idle_timeout_s` (its pusher died) may be replaced by the next `begin`.

The NCCL fast path takes the same slot: its announcement (`begin_nccl`, the route's validate_only call) opens a
push of kind "nccl" and reserves the engine for it, and its transfer (`apply_nccl`) closes it. An HTTP push and an
NCCL push therefore refuse each other (409) exactly as two HTTP pushes do. An NCCL transfer in progress never
counts as idle: it is not replaced however long the broadcast takes.

Each bucket is verified when it arrives (checksum, safetensors decoding, names, shapes, dtype, finite values);
any failure discards the push and leaves the old weights serving. The transport only hands the staging decoded
(name, tensor) lists or raw safetensors bytes: an HTTP route, or another transport (shared memory), can use it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from megatron_trace.rollout.types import WeightUpdateError, target_weight_version
from megatron_trace.rollout.weight_buckets import BucketError, decode_bucket

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answer: HTTP status, message, error type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass
class _Push:
    push_id: str
    version: int
    started: float
    last_activity: float
    buckets: list[list[tuple[str, torch.Tensor]]] = field(default_factory=list)  # bucket k at index k
    names: dict[str, int] = field(default_factory=dict)  # tensor name -> index of the bucket holding it
    kind: str = "http"  # "http": buckets over POST /weights; "nccl": announced, then broadcast over NCCL
    transferring: bool = False  # nccl: the broadcast is being received (never idle meanwhile)
    loaded: bool = False  # nccl, commit=False transfer: loaded into the engine, waiting for its commit

    def describe(self) -> str:
        what = "an NCCL weight push" if self.kind == "nccl" else "an HTTP weight push"
        return f"{what} ({self.push_id}, to version {self.version})"

    def idle_s(self, now: float) -> float:
        return 0.0 if self.transferring else now - self.last_activity


class WeightStaging:
    """The one open push and its verified buckets (thread-safe). Staged memory is bounded by the model's size:
    a push stages each tensor once."""

    def __init__(self, engine, idle_timeout_s: float = 300.0, clock=time.monotonic,
                 other_update: Callable[[], str | None] | None = None):
        """other_update: describes another update in progress on the same engine (the shared-memory one of
        colocated servers, shm_loader.py), or None; a begin meanwhile is refused (409)."""
        self.engine = engine
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self.other_update = other_update
        self._lock = threading.Lock()
        self._push: _Push | None = None

    def active(self) -> str | None:
        """A description of the open push if it is active (not idle past idle_timeout_s), else None."""
        push = self._push
        if push is None:
            return None
        idle = push.idle_s(self._clock())
        if idle >= self.idle_timeout_s:
            return None
        return f"{push.describe()}, last active {idle:.0f}s ago"

    def _check_version(self, version: int) -> int:
        serving = self.engine.weight_version
        try:
            target_weight_version(serving, version)
        except WeightUpdateError as e:
            raise ApiError(409, str(e), "conflict") from None
        return serving

    def _open(self, push_id: str, kind: str | None = "http") -> _Push:
        """The open push if it is `push_id` (and of `kind`, unless None); 409 otherwise."""
        push = self._push
        if push is None or push.push_id != push_id:
            what = "none is open" if push is None else f"the open push is {push.push_id}"
            start = "POST /weights/nccl with validate_only" if kind == "nccl" else "POST /weights/begin"
            raise ApiError(409, f"push {push_id!r} is not the open push ({what}; it was committed, aborted, "
                                f"discarded after an error, or replaced after idling): start with {start}",
                           "conflict")
        if kind is not None and push.kind != kind:
            raise ApiError(409, f"push {push_id} is {push.describe()}, not {'an NCCL' if kind == 'nccl' else 'an HTTP'}"
                                " push: its requests go to its own routes", "conflict")
        push.last_activity = self._clock()
        return push

    def _refuse_if_busy(self, now: float) -> None:
        """409 while a push (of either kind) is open and active, or another update (shm) is in progress."""
        push = self._push
        if push is not None:
            idle = push.idle_s(now)
            if idle < self.idle_timeout_s:
                staged = f", {len(push.buckets)} buckets staged" if push.kind == "http" else ""
                state = "receiving its broadcast" if push.transferring else f"last active {idle:.0f}s ago"
                raise ApiError(409, f"another push, {push.describe()}{staged}, is in progress, {state}: one push "
                                    f"at a time (it expires after {self.idle_timeout_s:.0f}s idle)", "conflict")
            logger.warning("%s idle for %.0fs: replaced by a new push", push.describe(), idle)
        other = self.other_update() if self.other_update is not None else None
        if other is not None:
            raise ApiError(409, f"{other} is in progress: one weight update at a time", "conflict")

    def _discard(self, status: int, message: str, kind: str = "invalid_request_error") -> ApiError:
        self._push = None
        return ApiError(status, f"{message}; push discarded, old weights keep serving", kind)

    def begin(self, version: int) -> dict[str, Any]:
        """Open a push to `version`; 409 while another push is open and active."""
        with self._lock:
            serving = self._check_version(version)
            now = self._clock()
            self._refuse_if_busy(now)
            self._push = _Push(uuid.uuid4().hex, version, now, now)
            return {"status": "open", "push_id": self._push.push_id, "version": version, "weight_version": serving}

    def receive(self, push_id: str, index: int, data: bytes, checksum: str) -> dict[str, Any]:
        """Verify and stage bucket `index` of push `push_id` (raw safetensors bytes and their SHA-256)."""
        try:
            tensors = decode_bucket(data, checksum)
        except BucketError as e:
            with self._lock:
                self._open(push_id)
                raise self._discard(422, f"bucket {index} of push {push_id} rejected ({e})",
                                    "weight_update_error") from e
        return self.stage(push_id, index, tensors)

    def stage(self, push_id: str, index: int, tensors: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
        """Verify and stage bucket `index` (decoded tensors) of push `push_id`. Bucket 0 restarts the push's
        staging, bucket k is accepted once 0..k-1 are staged, and a resent bucket replaces itself."""
        with self._lock:
            push = self._open(push_id)
            serving = self._check_version(push.version)
            if index < 0:
                raise ApiError(400, f"bucket index {index}: must be >= 0")
            if index == 0 and push.buckets:
                logger.warning("bucket 0 of push %s again: restarting its staging (%d buckets dropped)",
                               push_id, len(push.buckets))
                push.buckets, push.names = [], {}
            elif index > len(push.buckets):
                raise self._discard(409, f"bucket {index} of push {push_id} arrived after only "
                                    f"{len(push.buckets)} buckets: buckets are sent in order", "conflict")
            try:
                for name, t in tensors:
                    self.engine.check_weight(name, t.shape, t.dtype)
                    holder = push.names.get(name, index)
                    if holder != index:
                        raise BucketError(f"weight {name!r} is already staged in bucket {holder}")
                    self.engine.check_finite(name, t)
            except ValueError as e:
                raise self._discard(422, f"bucket {index} of push {push_id} (version {push.version}) rejected "
                                    f"({e})", "weight_update_error") from e
            if index < len(push.buckets):  # a retry replaces itself
                for name, _ in push.buckets[index]:
                    del push.names[name]
                push.buckets[index] = tensors
            else:
                push.buckets.append(tensors)
            push.names.update((name, index) for name, _ in tensors)
            return {"status": "staged", "push_id": push_id, "weight_version": serving, "received": len(push.buckets)}

    def commit(self, push_id: str, count: int) -> dict[str, Any]:
        """Apply push `push_id` if it holds exactly `count` buckets; all-or-nothing. The push is closed either way."""
        with self._lock:
            push = self._open(push_id)
            self._check_version(push.version)
            if count != len(push.buckets):
                raise self._discard(409, f"commit of {count} buckets, but {len(push.buckets)} are staged in push "
                                    f"{push_id}", "conflict")
            self._push = None
            try:
                self.engine.validate_weights((n, t.shape, t.dtype) for b in push.buckets for n, t in b)
            except ValueError as e:
                raise ApiError(422, f"update to version {push.version} rejected ({e}); old weights keep serving",
                               "weight_update_error") from e
            new = self.engine.update_weights(push.buckets, version=push.version)
            return {"status": "applied", "push_id": push_id, "weight_version": new, "count": count}

    # ---------------------------------------------------------------- NCCL pushes (same slot)
    def begin_nccl(self, metas: list[tuple[str, str, list[int]]], version: int) -> dict[str, Any]:
        """Open an NCCL push: take the slot (409 while any push or shm update is active), then validate the
        announcement and reserve the engine for it (`engine.prepare_nccl_update`: 422 for a bad announcement,
        409 when asleep; the slot is not taken then). Answers the push id the transfer must quote."""
        with self._lock:
            now = self._clock()
            self._refuse_if_busy(now)
            try:
                self.engine.prepare_nccl_update(metas, version)
            except ValueError as e:
                raise ApiError(422, f"update to version {version} rejected ({e})", "weight_update_error") from e
            except RuntimeError as e:  # asleep
                raise ApiError(409, f"update to version {version} refused ({e})", "conflict") from e
            self._push = _Push(uuid.uuid4().hex, version, now, now, kind="nccl")
            return {"status": "valid", "push_id": self._push.push_id, "version": version,
                    "weight_version": self.engine.weight_version}

    def apply_nccl(self, push_id: str | None, metas: list[tuple[str, str, list[int]]], version: int, *,
                   commit: bool = True) -> dict[str, Any]:
        """Receive the broadcast of NCCL push `push_id` into the engine; answers the new version. The push is
        closed either way, except by a successful commit=False transfer: the update is then loaded, not served,
        and its push stays open (no other update may start) until `commit_nccl` (the trainer commits every server
        of the run once all of them loaded it) or an abort. push_id None (a client from before push ids) means the
        open NCCL push.

        The sender is already broadcasting when this is called: a transfer that is not the open NCCL push is
        still received and dropped (`engine.drain_nccl_update`, leaving the open push's reservation alone), then
        refused with 409, so a refused sender never hangs."""
        with self._lock:
            push = self._push
            if push_id is None and push is not None and push.kind == "nccl":
                push_id = push.push_id
            try:
                if push_id is None:
                    raise ApiError(409, "NCCL transfer without a push id while no NCCL push is open ("
                                        f"{'none is open' if push is None else push.describe() + ' is'}): announce "
                                        "it first (POST /weights/nccl with validate_only)", "conflict")
                push = self._open(push_id, kind="nccl")
                if push.version != version:
                    raise ApiError(409, f"push {push_id} was announced for version {push.version}, the transfer "
                                        f"says {version}", "conflict")
            except ApiError as refusal:
                refused = refusal
            else:
                refused = None
                push.transferring = True
        if refused is not None:
            self.engine.drain_nccl_update(metas)
            raise ApiError(refused.status, f"{refused.message}; its broadcast was received and dropped, the old "
                                           "weights keep serving", refused.kind)
        loaded = False
        try:  # outside the lock: the broadcast takes as long as the sender does, other requests get their 409
            new = self.engine.update_weights_from_nccl(metas, version, commit=commit)
            if not commit:
                loaded = True
                return {"status": "loaded", "push_id": push.push_id, "loaded_version": new,
                        "weight_version": self.engine.weight_version}
            return {"status": "applied", "push_id": push.push_id, "weight_version": new}
        except ValueError as e:
            raise ApiError(422, f"update to version {version} rejected ({e})", "weight_update_error") from e
        except RuntimeError as e:
            raise ApiError(409, str(e), "conflict") from e
        finally:
            with self._lock:
                if self._push is push:
                    if loaded:  # open until its commit (or abort); idle from now on
                        push.transferring, push.loaded = False, True
                        push.last_activity = self._clock()
                    else:
                        self._push = None

    def commit_nccl(self, push_id: str | None, version: int) -> dict[str, Any]:
        """Serve the update NCCL push `push_id` loaded (a commit=False transfer) and close the push. push_id None:
        the open NCCL push. A repeated commit of the version now serving answers "applied" (its answer was lost)."""
        with self._lock:
            push = self._push
            if push_id is None and push is not None and push.kind == "nccl":
                push_id = push.push_id
            if self.engine.weight_version == version and (push is None or push.push_id != push_id):
                return {"status": "applied", "push_id": push_id, "weight_version": version}
            if push_id is None:
                raise ApiError(409, f"commit of version {version} while no NCCL push is open", "conflict")
            push = self._open(push_id, kind="nccl")
            if not push.loaded or push.version != version:
                state = f"loaded version {push.version}" if push.loaded else "its transfer has not loaded it"
                raise ApiError(409, f"commit of version {version}, but push {push_id} has {state}", "conflict")
            try:
                new = self.engine.commit_loaded_weights(version)
            except RuntimeError as e:
                raise ApiError(409, str(e), "conflict") from e
            finally:
                self._push = None
            return {"status": "applied", "push_id": push_id, "weight_version": new}

    def check_push_version(self, push_id: str, version: int) -> None:
        """409 unless `push_id` is the open push and targets `version` (a request's optional version header)."""
        with self._lock:
            push = self._open(push_id, kind=None)
            if push.version != version:
                raise ApiError(409, f"push {push_id} targets version {push.version}, the request says {version}",
                               "conflict")

    def abort(self, push_id: str) -> dict[str, Any]:
        """Close push `push_id` without applying it (the pusher failed); idempotent for a push no longer open."""
        with self._lock:
            push = self._push
            if push is not None and push.push_id == push_id and not push.transferring:
                self._push = None
                if push.kind == "nccl":  # a later broadcast of it is received and dropped
                    self.engine.cancel_nccl_update(f"abort of push {push_id}")
                return {"status": "aborted", "push_id": push_id}
            if push is not None and push.push_id == push_id:
                raise ApiError(409, f"push {push_id} is receiving its broadcast: it ends when the sender does",
                               "conflict")
            return {"status": "not_open", "push_id": push_id}

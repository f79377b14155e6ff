"""HTTP client of the generation server (`tools/serve_rollout.py`): the same `GenerationEngine` interface as the
in-process engine, plus pushing weights in checksummed buckets.

Every request has a timeout; transport failures (refused connection, timeout, reset) and 429/502/503/504 answers
are retried with exponential backoff; other 4xx/5xx answers raise `RolloutServerError` at once with the
server's message. At most `concurrency` completions requests are in flight at a time.
"""

from __future__ import annotations

import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

from megatron_trace.rollout.types import Generation, SamplingConfig
from megatron_trace.rollout.weight_buckets import (
    CHECKSUM_HEADER,
    COUNT_HEADER,
    INDEX_HEADER,
    PUSH_HEADER,
    VERSION_HEADER,
    encode_bucket,
)

logger = logging.getLogger(__name__)

_RETRY_STATUS = (429, 502, 503, 504)


@dataclass
class ClientConfig:
    """base_url: e.g. http://127.0.0.1:8100. token_env: environment variable with the bearer token (weight and
    admin routes). timeout_s: per-request timeout (s). retries: extra attempts after the first. backoff_s: first
    retry delay (s), doubled each retry up to max_backoff_s. concurrency: completions requests in flight.
    prompts_per_request: prompts batched into one completions request."""

    base_url: str = "http://127.0.0.1:8100"
    token_env: str = "MEGATRON_TRACE_ROLLOUT_TOKEN"
    timeout_s: float = 600.0
    weight_timeout_s: float = 600.0
    retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    concurrency: int = 8
    prompts_per_request: int = 8

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={self.base_url!r}: expected http://host:port or https://...")
        for name in ("timeout_s", "weight_timeout_s", "backoff_s", "max_backoff_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.retries < 0:
            raise ValueError(f"retries={self.retries} must be >= 0")
        if self.concurrency < 1 or self.prompts_per_request < 1:
            raise ValueError("concurrency and prompts_per_request must be >= 1")


class RolloutServerError(RuntimeError):
    """The server answered with an error (status and its message), or stayed unreachable after all retries."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class RolloutClient:
    """Client of one generation server; thread-safe (one pooled httpx.Client)."""

    def __init__(self, cfg: ClientConfig | None = None, **overrides: Any):
        import httpx

        self.cfg = cfg or ClientConfig(**overrides)
        # on_progress(prompts done, prompts) after each completions request of a `generate` call (progress bars)
        self.on_progress = None
        self._token = os.environ.get(self.cfg.token_env) or None
        # A server listening beyond loopback wants the token on every route: send it whenever there is one.
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        self._http = httpx.Client(
            base_url=self.cfg.base_url.rstrip("/"),
            timeout=httpx.Timeout(self.cfg.timeout_s),
            limits=httpx.Limits(max_connections=self.cfg.concurrency + 2),
            headers=headers,
        )
        self._push_ids: dict[int, str] = {}  # target version -> push id the server issued (begin_weights)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RolloutClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- transport
    def _request(self, method: str, path: str, *, timeout: float | None = None, body: bytes | None = None,
                 retries: int | None = None, **kw) -> dict[str, Any]:
        """retries: None = the client's; 0 for requests that must not run twice (joining a group, receiving a
        broadcast: a second one would wait for peers that never come)."""
        import httpx

        delay = self.cfg.backoff_s
        retries = self.cfg.retries if retries is None else retries
        for attempt in range(retries + 1):
            last = attempt == retries
            if body is not None:
                # Streamed in slices: httpx's sync client sends one large `bytes` body ~10x slower than this.
                kw["content"] = _slices(body)
                kw["headers"] = {**kw.get("headers", {}), "Content-Length": str(len(body))}
            try:
                r = self._http.request(method, path, timeout=timeout or self.cfg.timeout_s, **kw)
            except httpx.TransportError as e:  # connect error, timeout, reset: the request may not have run
                if last:
                    raise RolloutServerError(
                        f"{method} {self.cfg.base_url}{path}: {type(e).__name__} ({e}) after "
                        f"{retries + 1} attempts"
                    ) from e
                logger.warning("%s %s: %s; retry %d in %.1fs", method, path, type(e).__name__, attempt + 1, delay)
            else:
                if r.status_code < 400:
                    return r.json()
                message = _error_message(r)
                if r.status_code not in _RETRY_STATUS or last:
                    raise RolloutServerError(f"{method} {path}: HTTP {r.status_code}: {message}", r.status_code)
                logger.warning("%s %s: HTTP %d (%s); retry %d in %.1fs", method, path, r.status_code, message,
                               attempt + 1, delay)
            time.sleep(delay * (0.5 + random.random() / 2))  # jitter: many ranks must not retry in lockstep
            delay = min(2 * delay, self.cfg.max_backoff_s)
        raise AssertionError("unreachable")

    def _auth(self) -> dict[str, str]:
        if self._token is None:
            raise RolloutServerError(f"no bearer token: set ${self.cfg.token_env} (the server's weight routes need it)")
        return {"Authorization": f"Bearer {self._token}"}

    # ---------------------------------------------------------------- API
    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def version(self) -> int:
        """The weight version the server is serving."""
        return int(self._request("GET", "/version")["weight_version"])

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[Generation]]:
        """For each prompt, `sampling.n` generations, over `/v1/completions` (up to `concurrency` in flight)."""
        prompts = [list(map(int, p)) for p in prompt_token_ids]
        step = self.cfg.prompts_per_request
        chunks = [prompts[i : i + step] for i in range(0, len(prompts), step)]
        if not chunks:
            return []
        parts: list = [None] * len(chunks)
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(chunks))) as pool:
            futures = {pool.submit(self._complete, c, sampling): i for i, c in enumerate(chunks)}
            done = 0
            for fut in as_completed(futures):
                parts[futures[fut]] = fut.result()
                done += len(chunks[futures[fut]])
                if self.on_progress is not None:
                    self.on_progress(done, len(prompts))
        return [gens for part in parts for gens in part]

    def _complete(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Generation]]:
        body = {
            "prompt": prompts, "max_tokens": sampling.max_tokens, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "top_k": sampling.top_k, "n": sampling.n, "seed": sampling.seed,
            "stop_token_ids": list(sampling.stop_token_ids), "logprobs": 0 if sampling.logprobs else None,
        }
        out = self._request("POST", "/v1/completions", json=body)
        version = int(out.get("weight_version", 0))
        result: list[list[Generation]] = [[None] * sampling.n for _ in prompts]  # type: ignore[list-item]
        for c in out["choices"]:
            lp = c.get("logprobs") or {}
            gen = Generation(list(c["token_ids"]), [float(x) for x in lp.get("token_logprobs") or []],
                             c["finish_reason"], weight_version=version)
            result[c["index"] // sampling.n][c["index"] % sampling.n] = gen
        if any(g is None for gens in result for g in gens):
            raise RolloutServerError(f"server returned {len(out['choices'])} choices, expected "
                                     f"{len(prompts) * sampling.n}")
        return result

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int | None = None) -> int:
        """Push a complete update (HF-named full tensors in buckets); returns the server's new weight version.

        Streamed: each bucket is serialized and sent (safetensors bytes with its SHA-256) as the iterable produces
        it, and dropped before the next one is asked for, so a generator such as the weight bridge's
        `export_hf_buckets` keeps its memory bound (one bucket alive here at a time). After the last bucket a
        commit carrying the bucket count makes the server validate and apply the update; it applies nothing
        unless every bucket 0..count-1 arrived and verified. A retried bucket replaces itself.
        version: target version (default: serving version + 1).

        The iterable is always consumed to its end, also when the push fails (then the error is raised after
        draining it): the bridge's generator is collective, and the other trainer ranks are iterating it too.
        Built on the per-bucket steps `begin_weights`, `send_bucket`, `commit_weights` (which `EnginePool` uses to
        push each bucket to several servers).
        """
        it = iter(buckets)
        try:
            target = self.begin_weights(version)
            count = 0
            for bucket in it:
                data, digest = encode_bucket(bucket)
                del bucket  # the serialized bytes are all that is needed from here on
                self.send_bucket(target, count, data, digest)
                del data  # before the next bucket is produced
                count += 1
            if count == 0:
                raise ValueError("update_weights needs at least one bucket")
            return self.commit_weights(target, count)
        except Exception:
            drain(it)
            if "target" in locals():
                self.abort_weights(target)
            raise

    def begin_weights(self, version: int | None = None) -> int:
        """First step of a streamed update: opens a push on the server (which issues its push id, kept here) to
        `version` (default the serving version + 1); returns the target version. Fails here, naming the variable,
        when no bearer token is set, and with 409 while another push to the server is in progress."""
        self._auth()
        target = self.version() + 1 if version is None else int(version)
        out = self._request("POST", "/weights/begin", headers={**self._auth(), VERSION_HEADER: str(target)},
                            timeout=self.cfg.weight_timeout_s)
        self._push_ids[target] = str(out["push_id"])
        return target

    def _push_id(self, version: int) -> str:
        try:
            return self._push_ids[version]
        except KeyError:
            raise RolloutServerError(f"no open push to version {version}: call begin_weights first") from None

    def send_bucket(self, version: int, index: int, data: bytes, digest: str) -> None:
        """Stage bucket `index` (0, 1, ... in order) of the push to `version` on the server; `data, digest` is
        `weight_buckets.encode_bucket(bucket)`. Resending an index replaces it."""
        headers = {**self._auth(), "Content-Type": "application/octet-stream", PUSH_HEADER: self._push_id(version),
                   VERSION_HEADER: str(version), INDEX_HEADER: str(index), CHECKSUM_HEADER: digest}
        self._request("POST", "/weights", body=data, timeout=self.cfg.weight_timeout_s, headers=headers)

    def abort_weights(self, version: int) -> None:
        """Close the push to `version` without applying it (best effort: errors are logged, the server also
        expires idle pushes)."""
        push_id = self._push_ids.pop(version, None)
        if push_id is None:
            return
        try:
            self._request("POST", "/weights/abort", headers={**self._auth(), PUSH_HEADER: push_id})
        except Exception:  # noqa: BLE001 - the push's own error is the one that matters
            logger.exception("aborting weight push %s", push_id)

    def commit_weights(self, version: int, count: int) -> int:
        """Last step: the server applies the push to `version` if it staged exactly buckets 0..count-1 (else it
        discards it and keeps serving the old weights); returns the new serving version."""
        headers = {**self._auth(), PUSH_HEADER: self._push_id(version), VERSION_HEADER: str(version),
                   COUNT_HEADER: str(count)}
        try:
            out = self._request("POST", "/weights/commit", timeout=self.cfg.weight_timeout_s, headers=headers)
            self._push_ids.pop(version, None)
        except RolloutServerError as e:
            # The commit's answer can be lost after the server applied it; its retry then hits 409.
            if e.status == 409 and self.version() == version:
                return int(version)
            raise
        if out.get("status") != "applied":
            raise RolloutServerError(f"server did not apply the update on commit: {out}")
        return int(out["weight_version"])

    # ---------------------------------------------------------------- NCCL fast path (GPU; untested here)
    # One request each; `sync.nccl_push.NcclPusher` runs the protocol over every server of the run.
    def nccl_init(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        """Have the server's vLLM workers join the NCCL weight group as ranks rank_offset.. (blocks until every
        rank joined, the trainer's sender included: call it beside the sender's creation)."""
        body = {"master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
                "world_size": int(world_size)}
        self._request("POST", "/weights/nccl/init", json=body, headers=self._auth(), retries=0,
                      timeout=self.cfg.weight_timeout_s)

    def nccl_announce(self, version: int, tensors: list[list]) -> str | None:
        """Announce an update ([[name, dtype, shape], ...] in send order) to `version`: the server validates it and
        its own state, reserves its engine and opens its one push slot for it; every refusal happens here, before
        any byte is broadcast. Returns the push id the server issued (None from a server before push ids)."""
        out = self._request("POST", "/weights/nccl", headers=self._auth(), timeout=self.cfg.weight_timeout_s,
                            json={"version": int(version), "tensors": tensors, "validate_only": True})
        return str(out["push_id"]) if isinstance(out, dict) and out.get("push_id") else None

    def nccl_receive(self, version: int, tensors: list[list], push_id: str | None, *,
                     commit: bool = True) -> dict[str, Any]:
        """Receive the announced push `push_id` from the broadcast (answers when it is loaded; commit=False: not
        served, and the push kept open, until `nccl_commit`). Never retried: a second receive would wait for a
        broadcast that never comes."""
        body = {"version": int(version), "tensors": tensors, "commit": bool(commit)}
        if push_id is not None:
            body["push_id"] = push_id
        return self._request("POST", "/weights/nccl", headers=self._auth(), timeout=self.cfg.weight_timeout_s,
                             retries=0, json=body)

    def nccl_commit(self, version: int, push_id: str | None) -> int:
        """Serve the update to `version` that `nccl_receive(commit=False)` loaded (and close its push); returns the
        serving version."""
        body = {"version": int(version)}
        if push_id is not None:
            body["push_id"] = push_id
        out = self._request("POST", "/weights/nccl/commit", json=body, headers=self._auth(),
                            timeout=self.cfg.weight_timeout_s)
        return int(out["weight_version"])

    def nccl_abort(self, push_id: str) -> None:
        """Close NCCL push `push_id` without serving it (best effort, errors logged: the update failed elsewhere)."""
        try:
            self._request("POST", "/weights/abort", headers={**self._auth(), PUSH_HEADER: push_id})
        except Exception:  # noqa: BLE001 - the update's own error is the one that matters
            logger.exception("aborting NCCL weight push %s", push_id)

    def nccl_close(self) -> None:
        """The server's workers leave the NCCL weight group."""
        self._request("POST", "/weights/nccl/close", headers=self._auth(), timeout=self.cfg.weight_timeout_s)

    # ---------------------------------------------------------------- node-local shared-memory path
    def shm_begin(self, version: int, tensors: list[list]) -> dict[str, Any]:
        """Announce a shared-memory update ([[name, dtype, shape], ...]); see shm_weights.py."""
        return self._request("POST", "/weights/shm/begin", json={"version": int(version), "tensors": tensors},
                             headers=self._auth(), timeout=self.cfg.weight_timeout_s)

    def shm_load(self, version: int, descriptor: dict[str, Any]) -> dict[str, Any]:
        """Hand one bucket (a `ShmBucketWriter.write` descriptor) to the server; answers once it was taken."""
        return self._request("POST", "/weights/shm", json={"version": int(version), **descriptor},
                             headers=self._auth(), timeout=self.cfg.weight_timeout_s)

    def shm_finish(self, version: int, count: int) -> dict[str, Any]:
        return self._request("POST", "/weights/shm/finish", json={"version": int(version), "count": int(count)},
                             headers=self._auth(), timeout=self.cfg.weight_timeout_s)

    def shm_commit(self, version: int) -> int:
        out = self._request("POST", "/weights/shm/commit", json={"version": int(version)}, headers=self._auth(),
                            timeout=self.cfg.weight_timeout_s)
        return int(out["weight_version"])

    def shm_abort(self, reason: str) -> None:
        self._request("POST", "/weights/shm/abort", json={"reason": reason}, headers=self._auth())

    def sleep(self, level: int = 1) -> None:
        self._request("POST", f"/sleep?level={int(level)}", headers=self._auth())

    def wake_up(self) -> None:
        self._request("POST", "/wake_up", headers=self._auth())


def drain(it: Iterator) -> None:
    """Consume the rest of a failed update's iterable, dropping each bucket (see update_weights)."""
    try:
        for _ in it:
            pass
    except Exception:  # the producer's own failure; the push's error is the one raised
        logger.exception("while draining the buckets of a failed weight update")


def _slices(data: bytes, size: int = 4 << 20) -> Iterator[bytes]:
    view = memoryview(data)
    for i in range(0, len(view), size):
        yield view[i : i + size]


def _error_message(r) -> str:
    try:
        return str(r.json()["error"]["message"])
    except Exception:  # not our JSON error shape (a proxy, a crashed server): show the start of the body
        return r.text[:300]

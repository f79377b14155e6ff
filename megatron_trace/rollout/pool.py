"""Data-parallel rollout engines: one `GenerationEngine` over several generation servers.

A run with many rollout GPUs runs several vLLM generation servers (one per node, or several beside rank 0); the
trainer talks to them through an `EnginePool` exactly as it talks to one server:

- `generate(prompts, sampling)` splits the prompts into N contiguous shares of balanced size (sizes differ by at
  most one), sends share i to engine i (through that engine's own client, which batches and bounds its requests
  in flight), all shares at once, and returns the results in prompt order. Every share is sampled with the
  caller's `sampling.seed` unchanged: vLLM seeds each prompt (and each of its n samples: seed + sample index) on
  its own, independently of the other prompts of the request, so a prompt's samples do not depend on which
  engine drew it or on N. The pool's output for a fixed seed is what one server returns for the same prompts
  (bitwise on CPU, as tests/test_rollout_pool.py checks; on GPU up to batch-size-dependent kernel rounding).
- `update_weights(buckets)` draws each bucket once from the (collective) iterable, serializes it once, sends it
  to every engine at once, and takes the next bucket only when every engine has staged it: one bucket alive,
  whatever N. Then every engine is committed to the same target version (the highest serving version + 1).
  A failed bucket aborts the update everywhere (no engine is committed, all keep their old weights); a failed
  commit names the engines that did and did not apply it. Either way the iterable is drained before raising, so
  the other trainer ranks iterating the same collective generator are not left waiting.
- `on_progress(done, total)`: prompts finished over all engines, as `RolloutClient.on_progress` reports them.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

import torch

from megatron_trace.rollout.client import RolloutClient, RolloutServerError, drain
from megatron_trace.rollout.types import Generation, SamplingConfig
from megatron_trace.rollout.weight_buckets import encode_bucket

logger = logging.getLogger(__name__)

__all__ = ["EnginePool", "EnginePoolError", "split_balanced"]


class EnginePoolError(RolloutServerError):
    """One or more engines of a pool failed. failed: {engine URL: error text}; applied: the URLs that applied a
    weight update despite that (only a failed commit leaves some applied)."""

    def __init__(self, message: str, failed: dict[str, str], applied: Sequence[str] = (), status: int | None = None):
        super().__init__(message, status)
        self.failed = dict(failed)
        self.applied = list(applied)


def split_balanced(n_items: int, n_parts: int) -> list[tuple[int, int]]:
    """[start, end) of n_parts contiguous shares of n_items whose sizes differ by at most one (larger first)."""
    base, extra = divmod(n_items, n_parts)
    bounds, start = [], 0
    for i in range(n_parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _client_of(engine: Any) -> RolloutClient:
    """The HTTP client of an engine: a RolloutClient itself, or a ManagedServer's `.client`."""
    client = engine if isinstance(engine, RolloutClient) else getattr(engine, "client", None)
    if not isinstance(client, RolloutClient):
        raise TypeError(f"EnginePool takes RolloutClient or ManagedServer engines, got {type(engine).__name__}")
    return client


class EnginePool:
    """A `GenerationEngine` over several generation servers (RolloutClient or ManagedServer instances) run in data
    parallel; see the module docstring. Thread-safe for one call at a time (as the trainer uses it)."""

    def __init__(self, engines: Sequence[Any], names: Sequence[str] | None = None):
        if not engines:
            raise ValueError("EnginePool needs at least one engine")
        self.engines = list(engines)
        self.clients = [_client_of(e) for e in self.engines]
        self.urls = [c.cfg.base_url for c in self.clients]
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"EnginePool: the same server is listed twice in {self.urls}")
        # How errors name each engine (default its URL; colocated runs say "node N <URL>").
        self.names = list(names) if names is not None else list(self.urls)
        if len(self.names) != len(self.engines):
            raise ValueError(f"EnginePool: {len(self.names)} names for {len(self.engines)} engines")
        # on_progress(prompts done, prompts) summed over the engines, after each finished request (progress bars)
        self.on_progress: Callable[[int, int], None] | None = None
        self._workers = ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="engine-pool")

    def __len__(self) -> int:
        return len(self.engines)

    def __enter__(self) -> "EnginePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- helpers
    def _on_all(self, fn: Callable[[int], Any], indices: Sequence[int] | None = None) -> tuple[dict, dict]:
        """Run fn(i) for each engine index at once; ({i: result}, {i: exception}) once all have finished."""
        indices = range(len(self.engines)) if indices is None else indices
        futures = {i: self._workers.submit(fn, i) for i in indices}
        results, errors = {}, {}
        for i, fut in futures.items():
            try:
                results[i] = fut.result()
            except Exception as e:  # noqa: BLE001 - reported with the engine's URL by the caller
                errors[i] = e
        return results, errors

    def _describe(self, errors: dict[int, BaseException]) -> dict[str, str]:
        return {self.names[i]: f"{type(e).__name__}: {e}" for i, e in sorted(errors.items())}

    # ---------------------------------------------------------------- API
    def health(self) -> list[dict[str, Any]]:
        """Each engine's /health; raises naming every unreachable engine."""
        results, errors = self._on_all(lambda i: self.clients[i].health())
        if errors:
            failed = self._describe(errors)
            raise EnginePoolError("generation server(s) not healthy: " +
                                  "; ".join(f"{u}: {m}" for u, m in failed.items()), failed)
        return [results[i] for i in range(len(self.engines))]

    def versions(self) -> list[int]:
        """The weight version each engine serves (in engine order)."""
        results, errors = self._on_all(lambda i: self.clients[i].version())
        if errors:
            failed = self._describe(errors)
            raise EnginePoolError("reading the weight version failed on " +
                                  "; ".join(f"{u}: {m}" for u, m in failed.items()), failed)
        return [results[i] for i in range(len(self.engines))]

    def version(self) -> int:
        """The version all engines serve; raises if they differ."""
        versions = self.versions()
        if len(set(versions)) != 1:
            raise EnginePoolError(f"engines serve different weight versions: {dict(zip(self.urls, versions))}", {})
        return versions[0]

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[Generation]]:
        """For each prompt, `sampling.n` generations, in prompt order; share i of the prompts goes to engine i."""
        prompts = [list(map(int, p)) for p in prompt_token_ids]
        if not prompts:
            return []
        shares = {i: (a, b) for i, (a, b) in enumerate(split_balanced(len(prompts), len(self.engines))) if b > a}
        total = len(prompts)
        done = [0] * len(self.engines)
        lock = threading.Lock()

        def report(i: int, n_done: int) -> None:
            with lock:
                if done[i] == n_done:
                    return
                done[i] = n_done
                if self.on_progress is not None:
                    self.on_progress(sum(done), total)

        def run(i: int) -> list[list[Generation]]:
            engine, (a, b) = self.engines[i], shares[i]
            engine.on_progress = lambda n_done, _share, i=i: report(i, n_done)  # a report per finished request
            out = engine.generate(prompts[a:b], sampling)
            report(i, b - a)
            return out

        results, errors = self._on_all(run, list(shares))
        if errors:
            failed = self._describe(errors)
            status = next((e.status for e in errors.values() if isinstance(e, RolloutServerError)), None)
            raise EnginePoolError("generate failed on " + "; ".join(f"{u}: {m}" for u, m in failed.items()),
                                  failed, status=status) from next(iter(errors.values()))
        out: list[list[Generation]] = []
        for i, (a, b) in shares.items():
            if len(results[i]) != b - a:
                raise EnginePoolError(f"{self.names[i]} returned {len(results[i])} results for {b - a} prompts",
                                      {self.names[i]: "wrong number of results"})
            out.extend(results[i])
        return out

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int | None = None) -> int:
        """Push one complete update to every engine; returns the version all of them now serve.

        Each bucket is taken from `buckets` once, serialized once and sent to all engines concurrently; the next
        bucket is taken only after every engine staged this one (one bucket alive). Then all engines are
        committed to the same target: `version`, default the highest serving version + 1 (so engines that drifted
        apart, e.g. a restarted external server, end on the same version again).

        On failure raises `EnginePoolError` naming the failing engine(s) by URL, after draining `buckets` (the
        weight bridge's generator is collective: the other trainer ranks are iterating it too). A failed bucket
        aborts the update on every engine before any commit, so no engine applies it; a failed commit can leave
        the others applied, and the error says which did.
        """
        it = iter(buckets)
        try:
            if version is None:
                target = max(self.versions()) + 1
            else:
                target = int(version)
            for c in self.clients:  # checks the token: fails before the first bucket is drawn
                c.begin_weights(target)
            count = 0
            for bucket in it:
                data, digest = encode_bucket(bucket)
                del bucket
                _, errors = self._on_all(lambda i: self.clients[i].send_bucket(target, count, data, digest))
                del data  # before the next bucket is produced
                if errors:
                    failed = self._describe(errors)
                    raise EnginePoolError(
                        f"weight update to version {target} aborted at bucket {count}: "
                        + "; ".join(f"{u} failed ({m})" for u, m in failed.items())
                        + "; no engine was committed, all keep serving their previous weights", failed)
                count += 1
            if count == 0:
                raise ValueError("update_weights needs at least one bucket")
            results, errors = self._on_all(lambda i: self.clients[i].commit_weights(target, count))
            wrong = {i: v for i, v in results.items() if v != target}
            if errors or wrong:
                failed = self._describe(errors)
                failed.update({self.names[i]: f"serves version {v}, not {target}" for i, v in wrong.items()})
                applied = [self.names[i] for i in sorted(results) if i not in wrong]
                raise EnginePoolError(
                    f"weight update to version {target}: commit failed on "
                    + "; ".join(f"{u} ({m})" for u, m in failed.items())
                    + (f"; applied on {', '.join(applied)}" if applied else "; applied on no engine"),
                    failed, applied)
            return target
        except Exception:
            drain(it)
            if "target" in locals():  # close the pushes begun (a no-op on engines that committed or never began)
                for c in self.clients:
                    if hasattr(c, "abort_weights"):
                        c.abort_weights(target)
            raise

    def sleep(self, level: int = 1) -> None:
        """Put every engine to sleep (see GenerationEngine.sleep); raises naming the engines that failed."""
        self._on_every("sleep", lambda i: self.clients[i].sleep(level))

    def wake_up(self) -> None:
        """Wake every engine up; raises naming the engines that failed."""
        self._on_every("wake_up", lambda i: self.clients[i].wake_up())

    def _on_every(self, what: str, fn: Callable[[int], Any]) -> None:
        _, errors = self._on_all(fn)
        if errors:
            failed = self._describe(errors)
            raise EnginePoolError(f"{what} failed on " + "; ".join(f"{u}: {m}" for u, m in failed.items()), failed)

    def close(self) -> None:
        """Close every engine (stops managed servers); idempotent. Errors are logged, not raised, so one engine
        failing to stop does not leave the others running."""
        for engine, url in zip(self.engines, self.urls):
            try:
                engine.close()
            except Exception:  # noqa: BLE001
                logger.exception("closing the rollout engine at %s", url)
        self._workers.shutdown(wait=False)

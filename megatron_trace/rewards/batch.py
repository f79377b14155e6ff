"""Batch scoring in worker processes with a per-item time limit.

A verifier can hang (sympy expanding `9^{9^{9^9}}`) or crash its process. Scoring therefore runs in a small
pool of worker processes that lives as long as the scorer: each item gets `timeout_s` seconds; a worker that
overruns is killed and replaced, a worker that dies is replaced, and the item scores 0 and is counted. A step
never stalls on one response. Workers are started with `spawn` (not fork): the trainer process holds torch
threads and possibly CUDA state, which must not be forked.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Callable, Sequence

from megatron_trace.rewards import RewardFn, get_reward_fn

_START_TIMEOUT_S = 120.0  # importing sympy/math-verify on a busy machine can take a while


@dataclass
class BatchScores:
    """Scores of one batch. scores: [N] in {0.0, 1.0}; timeouts / errors: items cut off / that raised or crashed
    (each scored 0.0); error_messages: the first few error texts, for the log."""

    scores: list[float]
    timeouts: int = 0
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)


def _worker_main(conn: Connection, reward: str | RewardFn) -> None:
    """Worker loop: receive (index, response, gold), reply (index, "ok", score) or (index, "error", message)."""
    from megatron_trace.parent_death import die_with_parent

    die_with_parent(signal.SIGKILL)  # a worker busy in the verifier would not notice its pipe closing
    fn = get_reward_fn(reward) if isinstance(reward, str) else reward
    try:  # import the verifier now, so that its import time is not charged to the first item's time limit
        import math_verify  # noqa: F401
    except ImportError:
        pass
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        index, response, gold = msg
        try:
            conn.send((index, "ok", float(fn(response, gold))))
        except Exception as e:  # a bad item must not take the worker down
            conn.send((index, "error", f"{type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx, reward: str | RewardFn):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, reward), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.started = time.monotonic()
        self.item: int | None = None
        self.deadline = 0.0

    def stop(self, kill: bool = False) -> None:
        if kill or not self.proc.is_alive():
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                self.proc.kill()
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


class RewardScorer:
    """A reusable pool of reward worker processes.

    reward: a registered name ("math", "choice") or a picklable module-level function (str, str) -> float.
    workers: number of processes. Use as a context manager or call `close()`.
    """

    def __init__(self, reward: str | RewardFn, *, workers: int = 2):
        if isinstance(reward, str):
            get_reward_fn(reward)  # fail now, in the caller, on an unknown name
        elif not callable(reward):
            raise TypeError(f"reward must be a registered name or a function, got {reward!r}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.reward = reward
        self._ctx = mp.get_context("spawn")
        self._workers = [_Worker(self._ctx, reward) for _ in range(workers)]
        self.replaced = 0  # workers killed or lost and started again, over the scorer's life

    def score(self, responses: Sequence[str], golds: Sequence[str], *, timeout_s: float = 5.0) -> BatchScores:
        """Score responses[i] against golds[i]; each item gets at most `timeout_s` seconds of a worker."""
        if self._workers is None:
            raise RuntimeError("RewardScorer is closed")
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        out = BatchScores(scores=[0.0] * len(responses))
        todo = list(range(len(responses)))[::-1]
        done = 0
        while done < len(responses):
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.item is None and todo:
                    i = todo.pop()
                    w.item, w.deadline = i, now + timeout_s
                    w.conn.send((i, responses[i], golds[i]))
            waiting = [w for w in self._workers if not w.ready or w.item is not None]
            deadlines = [w.deadline for w in waiting if w.item is not None]
            deadlines += [w.started + _START_TIMEOUT_S for w in waiting if not w.ready]
            ready_conns = wait([w.conn for w in waiting], timeout=max(0.0, min(deadlines) - now))
            now = time.monotonic()
            for w in list(waiting):
                if w.conn in ready_conns:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is None:  # the process died
                        if w.item is None:
                            raise RuntimeError(f"reward worker failed to start (exit code {w.proc.exitcode})")
                        self._record_error(out, w.item, f"worker process died (exit code {w.proc.exitcode})")
                        done += 1
                        self._replace(w)
                    elif msg[0] == "ready":
                        w.ready = True
                    else:
                        index, status, value = msg
                        if status == "ok":
                            out.scores[index] = value
                        else:
                            self._record_error(out, index, value)
                        w.item = None
                        done += 1
                elif w.item is not None and now >= w.deadline:
                    out.timeouts += 1  # score stays 0.0
                    done += 1
                    self._replace(w)
                elif not w.ready and now >= w.started + _START_TIMEOUT_S:
                    raise RuntimeError(f"reward worker did not start within {_START_TIMEOUT_S:.0f} s")
        return out

    @staticmethod
    def _record_error(out: BatchScores, index: int, message: str) -> None:
        out.errors += 1
        if len(out.error_messages) < 8:
            out.error_messages.append(f"item {index}: {message}")

    def _replace(self, w: _Worker) -> None:
        w.stop(kill=True)
        self._workers[self._workers.index(w)] = _Worker(self._ctx, self.reward)
        self.replaced += 1

    def close(self) -> None:
        if self._workers is None:
            return
        for w in self._workers:
            w.stop()
        self._workers = None

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


_SCORERS: dict[tuple, RewardScorer] = {}


def score_batch(
    responses: Sequence[str],
    golds: Sequence[str],
    reward: str | Callable[[str, str], float],
    *,
    timeout_s: float = 5.0,
    workers: int = 2,
) -> BatchScores:
    """Score a batch with the registered `reward`, reusing one process pool per (reward, workers).

    A hanging item is cut off after `timeout_s` and a crashing one is caught; both score 0.0 and are counted in
    the result. Pools are closed at interpreter exit (or hold your own `RewardScorer`).
    """
    key = (reward, workers)
    scorer = _SCORERS.get(key)
    if scorer is None:
        scorer = _SCORERS[key] = RewardScorer(reward, workers=workers)
    return scorer.score(responses, golds, timeout_s=timeout_s)


@atexit.register
def _close_scorers() -> None:
    for scorer in _SCORERS.values():
        scorer.close()
    _SCORERS.clear()

"""The generation server: one vLLM engine served over HTTP for disaggregated rollouts.

Routes (JSON errors everywhere: `{"error": {"message", "type", "code"}}`):
- `POST /v1/completions`: OpenAI-compatible completions with token ids in and out. `prompt` is a list of token
  ids or a list of such lists; the response's choices carry `token_ids` and `logprobs.token_logprobs` (the raw,
  temperature-1 log-probs of the sampled tokens) and the body carries `weight_version`. Choice index
  `i * n + j` is response j of prompt i, as in OpenAI's API. vLLM extensions accepted: `top_k`,
  `stop_token_ids`. The body is validated by a pydantic schema (server_schema.py: bounds that are server
  settings, ids within the vocabulary, unknown keys refused: 400 naming the field). At most `max_queue` requests
  are admitted at once (503 + Retry-After beyond); each has a deadline (504 past it), and one whose client
  disconnected is aborted in the engine.
- `POST /weights/begin` (bearer token): opens a weight push to the version in header `X-Weight-Version`; answers
  its `push_id`. One push at a time: another open, active push gets 409 (weight_staging.py).
- `POST /weights` (bearer token): one bucket of the push in header `X-Push-Id`, safetensors bytes, index and
  SHA-256 in headers (weight_buckets.py). Buckets are sent in order: bucket k is accepted once 0..k-1 are staged,
  and a retried bucket replaces itself. Each is verified (checksum, decoding, names, shapes, dtype, finite) and
  staged.
- `POST /weights/commit` (bearer token): the last request of a push, with no body: headers push id and bucket
  count. When exactly buckets 0..count-1 are staged, the whole update is validated and applied in one engine
  reload. All-or-nothing: a bad bucket, a gap, a count that does not match, or a commit that never comes leaves
  the old weights serving. `POST /weights/abort` (bearer token) closes a push without applying it.
- `POST /weights/nccl/init`, `POST /weights/nccl`, `/weights/nccl/commit`, `/weights/nccl/close` (bearer token;
  GPU only, untested here): the fast path, where trainer rank 0 broadcasts the announced tensors over an NCCL
  group joined by the vLLM workers (nccl_weights.py). Under the same one-push slot as the HTTP push: the
  announcement (validate_only) opens a push and answers its push_id, the transfer quotes it; an NCCL push while an
  HTTP or shm update is in progress (or the reverse) gets 409. With `commit: false` the transfer loads the update
  and keeps the push open; it is served only after `/weights/nccl/commit` (the trainer commits every server once
  all of them received it).
- `POST /weights/shm/begin`, `/weights/shm`, `/weights/shm/finish`, `/weights/shm/commit`, `/weights/shm/abort`
  (bearer token; JSON): the node-local update of colocated servers, each bucket read from a /dev/shm segment the
  trainer wrote (no copy over a socket); protocol and atomicity in shm_weights.py. Separate from the HTTP push
  above, but one update at a time across both: an shm update while an HTTP push is open (or the reverse) gets 409.
- `POST /sleep`, `POST /wake_up` (bearer token): free / re-allocate GPU memory (colocated use; on CPU accepted,
  free nothing, and say so in the log).
- `GET /health` (503 "unhealthy" when a running generate made no engine progress within `stall_timeout_s`: the
  watchdog), `GET /version`.

Binds 127.0.0.1 unless told otherwise; beyond loopback every route needs the token (as vLLM's `--api-key`).
The token is read from an environment variable (never the command line, which other users can read in the
process table); without it the weight and admin routes are disabled. No /docs or /openapi.json.
SIGTERM ends the process within `timeout_graceful_shutdown + engine close` seconds, even with the engine busy;
with `--parent-pid` it also ends when that process dies (a trainer killed with SIGKILL leaves no server behind).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import threading
import time
import uuid
from dataclasses import fields
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from megatron_trace.parent_death import pid_alive
from megatron_trace.rollout.config import EngineConfig
from megatron_trace.rollout.engine import GenerationCancelled
from megatron_trace.rollout.server_schema import RequestError, ServerLimits, parse_completion_request
from megatron_trace.rollout.shm_loader import ShmUpdateError, ShmWeightLoader
from megatron_trace.rollout.weight_buckets import (
    CHECKSUM_HEADER,
    COUNT_HEADER,
    INDEX_HEADER,
    PUSH_HEADER,
    VERSION_HEADER,
)
from megatron_trace.rollout.weight_staging import ApiError, WeightStaging

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_ENV = "MEGATRON_TRACE_ROLLOUT_TOKEN"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# Seconds SIGTERM may take beyond uvicorn's graceful shutdown before the process exits hard.
_HARD_EXIT_AFTER_S = 15.0

__all__ = ["ApiError", "ServerLimits", "WeightStaging", "build_app", "main"]


def build_app(engine, *, model_name: str, token: str | None, limits: ServerLimits | None = None, tokenizer=None,
              token_on_every_route: bool = False):
    """The FastAPI app serving `engine` (a VLLMEngine). token=None disables the weight and admin routes;
    token_on_every_route (set when listening beyond loopback) makes every route, generation included, need it."""
    limits = limits or ServerLimits()
    if token_on_every_route and token is None:
        raise ValueError("token_on_every_route needs a token")
    staging = WeightStaging(engine, idle_timeout_s=limits.push_idle_timeout_s)
    app = FastAPI(title="megatron-trace generation server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.staging = staging
    admitted = 0  # completions requests running or waiting for the engine (event-loop thread only)

    def error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                            headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return error(e.status, e.message, e.kind, {"Retry-After": "1"} if e.status == 503 else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        return error(400, f"invalid request: {e.errors()}", "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(_request, e: Exception):
        logger.exception("request failed")
        return error(500, f"{type(e).__name__}: {e}", "internal_error")

    def authorize(request: Request) -> None:
        if token is None:
            raise ApiError(403, f"weight and admin routes are disabled: start the server with the token in "
                                f"${DEFAULT_TOKEN_ENV} (or the variable named by --token-env)", "forbidden")
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise ApiError(401, "missing or wrong bearer token (header `Authorization: Bearer <token>`)",
                           "authentication_error")

    if token_on_every_route:
        @app.middleware("http")
        async def _token_everywhere(request: Request, call_next):
            try:
                authorize(request)
            except ApiError as e:
                return error(e.status, e.message, e.kind)
            return await call_next(request)

    async def read_body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        try:
            too_big = declared is not None and int(declared) > limit
        except ValueError:
            raise ApiError(400, f"header Content-Length: expected an integer, got {declared!r}") from None
        if too_big:
            raise ApiError(413, f"body of {declared} bytes exceeds the limit of {limit} bytes", "too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"body exceeds the limit of {limit} bytes", "too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def header_int(request: Request, name: str) -> int:
        v = request.headers.get(name)
        try:
            return int(v)
        except (TypeError, ValueError):
            raise ApiError(400, f"header {name}: expected an integer, got {v!r}") from None

    def header_push_id(request: Request) -> str:
        v = request.headers.get(PUSH_HEADER)
        if not v:
            raise ApiError(400, f"header {PUSH_HEADER}: required (the push_id that POST /weights/begin answered)")
        if VERSION_HEADER in request.headers:  # optional on buckets and commits; when sent it must agree
            staging.check_push_version(v, header_int(request, VERSION_HEADER))
        return v

    @app.get("/health")
    async def health():
        stalled = engine.stalled_s() if hasattr(engine, "stalled_s") else 0.0
        if stalled > limits.stall_timeout_s:
            return JSONResponse({"status": "unhealthy", "weight_version": engine.weight_version,
                                 "reason": f"the engine made no progress for {stalled:.0f}s (limit "
                                           f"{limits.stall_timeout_s:.0f}s)"}, status_code=503)
        return {"status": "ok", "weight_version": engine.weight_version}

    @app.get("/version")
    async def version():
        return {"weight_version": engine.weight_version, "model": model_name}

    async def until_disconnected(request: Request, cancel: threading.Event) -> None:
        """Set `cancel` when the client goes away (polled: the engine thread checks the event between steps)."""
        while not cancel.is_set():
            if await request.is_disconnected():
                logger.warning("client of a completions request disconnected: cancelling its generation")
                cancel.set()
                return
            await asyncio.sleep(0.25)

    @app.post("/v1/completions")
    async def completions(request: Request):
        nonlocal admitted
        if admitted >= limits.max_queue:
            raise ApiError(503, f"server busy: {admitted} completions requests admitted (limit max_queue="
                                f"{limits.max_queue}); retry later", "overloaded")
        admitted += 1
        try:
            return await _complete(request)
        finally:
            admitted -= 1

    async def _complete(request: Request):
        deadline = time.monotonic() + limits.request_timeout_s
        raw = await read_body(request, limits.max_request_bytes)
        try:
            req = parse_completion_request(raw, limits, getattr(engine, "vocab_size", None))
        except RequestError as e:
            raise ApiError(400, str(e)) from e
        prompts, sampling, want_logprobs = req.prompt, req.sampling(), req.logprobs is not None
        cancel = threading.Event()
        watcher = asyncio.create_task(until_disconnected(request, cancel))
        try:
            outs = await run_in_threadpool(engine.generate, prompts, sampling, cancel=cancel, deadline=deadline)
        except GenerationCancelled as e:
            if e.timed_out:
                raise ApiError(504, f"request deadline of {limits.request_timeout_s:.0f}s exceeded ({e}); its "
                                    "generation was aborted", "timeout") from e
            raise ApiError(503, str(e), "cancelled") from e
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        except RuntimeError as e:  # asleep, or weights inconsistent after a failed update: retrying won't help
            raise ApiError(409, str(e), "conflict") from e
        finally:
            cancel.set()
            watcher.cancel()
        choices, n_out = [], 0
        for i, gens in enumerate(outs):
            for j, g in enumerate(gens):
                n_out += len(g.token_ids)
                text = tokenizer.decode(g.token_ids) if tokenizer is not None else ""
                choice: dict[str, Any] = {"index": i * sampling.n + j, "text": text, "token_ids": g.token_ids,
                                          "finish_reason": g.finish_reason, "logprobs": None}
                if want_logprobs:
                    toks = tokenizer.convert_ids_to_tokens(g.token_ids) if tokenizer is not None else None
                    choice["logprobs"] = {
                        "tokens": [t if t is not None else f"<id:{k}>" for t, k in zip(toks, g.token_ids)]
                        if toks is not None else [f"<id:{k}>" for k in g.token_ids],
                        "token_logprobs": g.logprobs, "top_logprobs": None,
                    }
                choices.append(choice)
        n_in = sum(len(p) for p in prompts)
        version = outs[0][0].weight_version if outs and outs[0] else engine.weight_version
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": req.model or model_name, "choices": choices, "weight_version": version,
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
        }

    @app.post("/weights/begin")
    async def weights_begin(request: Request):
        authorize(request)
        version = header_int(request, VERSION_HEADER)
        return await run_in_threadpool(staging.begin, version)

    @app.post("/weights")
    async def weights(request: Request):
        authorize(request)
        if COUNT_HEADER in request.headers:
            raise ApiError(400, f"header {COUNT_HEADER}: goes on POST /weights/commit after the last bucket, not "
                           "on a bucket (a client from before streamed updates?)")
        push_id = header_push_id(request)
        index = header_int(request, INDEX_HEADER)
        checksum = request.headers.get(CHECKSUM_HEADER)
        if not checksum:
            raise ApiError(400, f"header {CHECKSUM_HEADER}: required (hex SHA-256 of the body)")
        t0 = time.perf_counter()
        data = await read_body(request, limits.max_bucket_bytes)
        t1 = time.perf_counter()
        out = await run_in_threadpool(staging.receive, push_id, index, data, checksum)
        logger.info("push %s bucket %d: %.1f MB, read %.2fs, verify+stage %.2fs", push_id, index,
                    len(data) / 1e6, t1 - t0, time.perf_counter() - t1)
        return out

    @app.post("/weights/commit")
    async def weights_commit(request: Request):
        authorize(request)
        push_id = header_push_id(request)
        count = header_int(request, COUNT_HEADER)
        t0 = time.perf_counter()
        out = await run_in_threadpool(staging.commit, push_id, count)
        logger.info("push %s: %d buckets validated and applied in %.2fs (version %d)", push_id, count,
                    time.perf_counter() - t0, out["weight_version"])
        return out

    @app.post("/weights/abort")
    async def weights_abort(request: Request):
        authorize(request)
        return await run_in_threadpool(staging.abort, header_push_id(request))

    async def read_json(request: Request) -> dict[str, Any]:
        import json

        raw = await read_body(request, limits.max_request_bytes)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"body is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from e
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        return body

    @app.post("/weights/nccl/init")
    async def nccl_init(request: Request):
        """Join the trainer's NCCL weight group (GPU only; blocks until the trainer's sender joins)."""
        authorize(request)
        body = await read_json(request)
        try:
            args = (str(body["master_address"]), int(body["master_port"]), int(body.get("rank_offset", 1)),
                    int(body["world_size"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ApiError(400, f"expected master_address, master_port, world_size (and rank_offset): {e}") from e
        try:
            await run_in_threadpool(engine.init_weight_group, *args)
        except RuntimeError as e:
            raise ApiError(400, str(e)) from e
        return {"status": "joined"}

    @app.post("/weights/nccl")
    async def nccl_update(request: Request):
        """An update broadcast over the NCCL weight group, in two calls under the one-push slot (weight_staging.py).
        Body {version, tensors: [[name, dtype, shape], ...]} in send order. First with validate_only=true: checks
        the announcement and the engine's state, reserves the engine and opens the push (409 while another push,
        HTTP, NCCL or shm, is in progress), answering its push_id; every refusal happens while nothing is
        broadcast, so a refused update never leaves the sender hanging. Then without it, quoting push_id (in the
        body or header X-Push-Id; a client from before push ids may leave it out): receives the broadcast and
        answers when the update is applied; a transfer that is not the open push is received, dropped and
        refused (409)."""
        authorize(request)
        body = await read_json(request)
        try:
            metas = [(str(n), str(d), [int(x) for x in shape]) for n, d, shape in body["tensors"]]
            version = int(body["version"])
        except (KeyError, TypeError, ValueError) as e:
            raise ApiError(400, f"expected version and tensors [[name, dtype, shape], ...]: {e}") from e
        if body.get("validate_only"):  # accept (validate + reserve the engine + open the push) before any byte moves
            return await run_in_threadpool(staging.begin_nccl, metas, version)
        push_id = body.get("push_id") or request.headers.get(PUSH_HEADER) or None
        if push_id is not None and not isinstance(push_id, str):
            push_id = str(push_id)
        commit = body.get("commit", True)
        if not isinstance(commit, bool):
            raise ApiError(400, f"commit: expected true or false, got {commit!r}")
        return await run_in_threadpool(staging.apply_nccl, push_id, metas, version, commit=commit)

    @app.post("/weights/nccl/commit")
    async def nccl_commit(request: Request):
        """Serve the update an NCCL transfer with commit=false loaded: body {version, push_id} (push_id optional:
        the open NCCL push)."""
        authorize(request)
        body = await read_json(request)
        version = body.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ApiError(400, f"version: expected an integer, got {version!r}")
        push_id = body.get("push_id") or request.headers.get(PUSH_HEADER) or None
        return await run_in_threadpool(staging.commit_nccl, None if push_id is None else str(push_id), version)

    @app.post("/weights/nccl/close")
    async def nccl_close(request: Request):
        """Leave the trainer's NCCL weight group (the trainer is closing)."""
        authorize(request)
        await run_in_threadpool(engine.close_weight_group)
        return {"status": "closed"}

    # ------------------------------------------------ node-local updates over /dev/shm (protocol: shm_weights.py)
    # Separate from the HTTP push's staging, but one update at a time across both (409 while the other is active).
    shm = ShmWeightLoader(engine, limits.max_bucket_bytes, idle_timeout_s=limits.push_idle_timeout_s,
                          other_update=staging.active)
    staging.other_update = shm.active

    async def shm_call(fn, *args):
        try:
            return await run_in_threadpool(fn, *args)
        except ShmUpdateError as e:
            kind = {409: "conflict", 422: "weight_update_error"}.get(e.status, "invalid_request_error")
            raise ApiError(e.status, str(e), kind) from e

    def body_int(body: dict[str, Any], key: str) -> int:
        v = body.get(key)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ApiError(400, f"{key}: expected an integer, got {v!r}")
        return v

    @app.post("/weights/shm/begin")
    async def shm_begin(request: Request):
        authorize(request)
        body = await read_json(request)
        tensors = body.get("tensors")
        if not isinstance(tensors, list) or not tensors:
            raise ApiError(400, "tensors: expected a non-empty list of [name, dtype, shape]")
        return await shm_call(shm.begin, body_int(body, "version"), tensors)

    @app.post("/weights/shm")
    async def shm_bucket(request: Request):
        authorize(request)
        body = await read_json(request)
        t0 = time.perf_counter()
        out = await shm_call(shm.load, body_int(body, "version"), body)
        logger.info("weights v%s shm bucket %s: %.1f MB from %s, mapped %.3fs, taken by the engine in %.3fs",
                    body.get("version"), body.get("index"), int(body.get("nbytes", 0)) / 1e6, body.get("segment"),
                    out["map_s"], time.perf_counter() - t0)
        return out

    @app.post("/weights/shm/finish")
    async def shm_finish(request: Request):
        authorize(request)
        body = await read_json(request)
        out = await shm_call(shm.finish, body_int(body, "version"), body_int(body, "count"))
        logger.info("weights v%d: %d shm buckets loaded (engine %.2fs, last layers %.2fs); awaiting commit",
                    out["loaded_version"], body["count"], out["load_s"], out["finish_s"])
        return out

    @app.post("/weights/shm/commit")
    async def shm_commit(request: Request):
        authorize(request)
        body = await read_json(request)
        out = await shm_call(shm.commit, body_int(body, "version"))
        logger.info("weights v%d committed: serving", out["weight_version"])
        return out

    @app.post("/weights/shm/abort")
    async def shm_abort(request: Request):
        authorize(request)
        body = await read_json(request)
        reason = str(body.get("reason") or "aborted by the trainer")
        logger.warning("shm weight update aborted: %s", reason)
        return await shm_call(shm.abort, reason)

    @app.post("/sleep")
    async def sleep(request: Request, level: int = 1):
        authorize(request)
        try:
            await run_in_threadpool(engine.sleep, level)
        except (RuntimeError, ValueError) as e:
            raise ApiError(400, str(e)) from e
        return {"status": "asleep", "level": level}

    @app.post("/wake_up")
    async def wake_up(request: Request):
        authorize(request)
        try:
            await run_in_threadpool(engine.wake_up)
        except (RuntimeError, ValueError) as e:
            raise ApiError(400, str(e)) from e
        return {"status": "awake", "weight_version": engine.weight_version}

    return app


def main(argv: list[str] | None = None) -> None:
    """Command line of `tools/serve_rollout.py`: build the engine, then serve it until SIGTERM/SIGINT."""
    p = argparse.ArgumentParser(description="Serve a vLLM generation engine over HTTP (megatron-trace rollouts).")
    p.add_argument("--model", required=True, help="HF model folder (config.json, safetensors, tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    e = EngineConfig  # the engine's settings and their defaults are defined once, there
    p.add_argument("--max-model-len", type=int, default=e.max_model_len)
    p.add_argument("--gpu-memory-utilization", type=float, default=e.gpu_memory_utilization)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=e.kv_cache_memory_bytes,
                   help="KV cache bytes (default: 64 MiB on CPU; on GPU vLLM sizes it from --gpu-memory-utilization)")
    p.add_argument("--tensor-parallel-size", type=int, default=e.tensor_parallel_size)
    p.add_argument("--seed", type=int, default=e.seed)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--enable-sleep-mode", action="store_true",
                   help="allow /sleep and /wake_up (vLLM sleep mode on GPU; on CPU accepted no-ops, logged)")
    p.add_argument("--token-env", default=DEFAULT_TOKEN_ENV,
                   help="environment variable holding the bearer token of the weight/admin routes")
    for f in fields(ServerLimits):  # --max-request-bytes, --max-queue, --request-timeout-s, ... (ServerLimits)
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--parent-pid", type=int, default=None,
                   help="exit when this process is gone (the trainer that started the server)")
    args = p.parse_args(argv)
    try:
        limits = ServerLimits(**{f.name: getattr(args, f.name) for f in fields(ServerLimits)})
    except ValueError as e:
        p.error(str(e))
    import torch

    if not torch.cuda.is_available():
        from megatron_trace.rollout.cpu_refit import keep_freed_memory

        # Before any thread allocates: weight refits then re-pack into pages already faulted in (cpu_refit.py).
        if not keep_freed_memory():
            logger.info("not glibc: weight refits allocate fresh pages for every re-packed layer")

    import uvicorn

    from megatron_trace.data.tokenizer import load_tokenizer
    from megatron_trace.rollout.engine import VLLMEngine

    token = os.environ.get(args.token_env) or None
    if token is None:
        logger.warning("$%s is not set: weight and admin routes are disabled", args.token_env)
    beyond_loopback = args.host not in LOOPBACK_HOSTS
    if beyond_loopback and token is None:
        p.error(f"binding {args.host} (not loopback) needs a token in ${args.token_env}")
    from megatron_trace.rollout.platform import engine_platform_settings

    try:
        plat = engine_platform_settings(dtype=args.dtype, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                                        enable_sleep_mode=args.enable_sleep_mode)
    except ValueError as e:
        p.error(str(e))
    engine = VLLMEngine(EngineConfig(
        model_dir=args.model, dtype=plat.dtype, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_memory_bytes=plat.kv_cache_memory_bytes,
        tensor_parallel_size=args.tensor_parallel_size, seed=args.seed,
        enable_prefix_caching=not args.no_prefix_caching, enable_sleep_mode=plat.enable_sleep_mode,
    ))
    app = build_app(engine, model_name=os.path.basename(os.path.normpath(args.model)), token=token,
                    limits=limits, tokenizer=load_tokenizer(args.model), token_on_every_route=beyond_loopback)
    server = _BoundedShutdownServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                                   timeout_graceful_shutdown=5), engine)
    if args.parent_pid is not None:
        _watch_parent(args.parent_pid, server)
    try:
        server.run()
    finally:
        engine.stop()
        _close_within(engine, _HARD_EXIT_AFTER_S)


class _BoundedShutdownServer:
    """uvicorn's server, whose shutdown (SIGTERM/SIGINT or `request_exit`) also stops the engine's running and
    waiting generate calls, and exits the process hard if it is still alive `_HARD_EXIT_AFTER_S` later (a
    wedged engine once kept a SIGTERMed server alive for good)."""

    def __init__(self, config, engine):
        import uvicorn

        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                outer.request_exit(f"signal {sig}")
                super().handle_exit(sig, frame)

        self.engine = engine
        self.server = _Server(config)
        self._exiting = False

    def request_exit(self, why: str) -> None:
        if self._exiting:
            return
        self._exiting = True
        logger.warning("shutting down (%s)", why)
        self.engine.stop()
        limit = self.server.config.timeout_graceful_shutdown + _HARD_EXIT_AFTER_S
        timer = threading.Timer(limit, lambda: (logger.error("shutdown took over %.0fs: exiting hard", limit),
                                                os._exit(1)))
        timer.daemon = True
        timer.start()
        self.server.should_exit = True

    def run(self) -> None:
        self.server.run()


def _watch_parent(pid: int, server: _BoundedShutdownServer, interval_s: float = 1.0) -> None:
    """Shut the server down when process `pid` is gone or is no longer this process's parent (it died and this
    process was reparented). Complements PR_SET_PDEATHSIG, which the launcher sets but which fires on the death
    of the parent *thread* and not across every exec/setuid path."""

    def alive() -> bool:
        return os.getppid() == pid and pid_alive(pid)

    def loop() -> None:
        while alive():
            time.sleep(interval_s)
        server.request_exit(f"parent process {pid} is gone")

    threading.Thread(target=loop, name="parent-watchdog", daemon=True).start()


def _close_within(engine, timeout_s: float) -> None:
    """engine.close() in a helper thread; give up after `timeout_s` (the process then exits without it)."""
    t = threading.Thread(target=engine.close, name="engine-close", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        logger.error("the engine did not close within %.0fs: exiting without it", timeout_s)
        os._exit(1)

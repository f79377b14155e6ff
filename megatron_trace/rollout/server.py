"""The generation server: one vLLM engine served over HTTP for disaggregated rollouts.

Routes (JSON errors everywhere: `{"error": {"message", "type", "code"}}`):
- `POST /v1/completions`: OpenAI-compatible completions with token ids in and out. `prompt` is a list of token
  ids or a list of such lists; the response's choices carry `token_ids` and `logprobs.token_logprobs` (the raw,
  temperature-1 log-probs of the sampled tokens) and the body carries `weight_version`. Choice index
  `i * n + j` is response j of prompt i, as in OpenAI's API. vLLM extensions accepted: `top_k`,
  `stop_token_ids`.
- `POST /weights` (bearer token): one bucket of a weight update, safetensors bytes, headers from
  `weight_buckets` (target version, bucket index, SHA-256). Buckets are sent in order, as the trainer produces
  them: bucket 0 starts the update (discarding anything staged before), bucket k is accepted once 0..k-1 are
  staged, and a retried bucket replaces itself. Each is verified (checksum, decoding, names, shapes) and staged.
- `POST /weights/commit` (bearer token): the last request of an update, with no body: headers target version and
  bucket count. When exactly buckets 0..count-1 are staged, the whole update is validated and applied in one
  engine reload. All-or-nothing: a bad bucket, a gap, a count that does not match, or a commit that never comes
  leaves the old weights serving (a bad bucket or a bad commit also discards the staged update).
- `POST /weights/nccl/init`, `POST /weights/nccl` (bearer token; GPU only, untested here): the fast path, where
  trainer rank 0 broadcasts the announced tensors over an NCCL group joined by the vLLM workers (nccl_weights.py).
- `POST /sleep`, `POST /wake_up` (bearer token): free / re-allocate GPU memory (colocated use).
- `GET /health`, `GET /version`.

Binds 127.0.0.1 unless told otherwise. The token is read from an environment variable (never the command line,
which other users can read in the process table); without it the weight and admin routes are disabled.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from megatron_trace.rollout.config import EngineConfig
from megatron_trace.rollout.types import SamplingConfig, WeightUpdateError, target_weight_version
from megatron_trace.rollout.weight_buckets import (
    CHECKSUM_HEADER,
    COUNT_HEADER,
    INDEX_HEADER,
    VERSION_HEADER,
    BucketError,
    decode_bucket,
)

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_ENV = "MEGATRON_TRACE_ROLLOUT_TOKEN"


@dataclass
class ServerLimits:
    """Request size limits (bytes, prompts)."""

    max_request_bytes: int = 16 * 1024 * 1024  # JSON bodies (completions)
    max_bucket_bytes: int = 4 * 1024 * 1024 * 1024  # one weight bucket
    max_prompts: int = 4096  # prompts per completions request


@dataclass
class _StagedUpdate:
    version: int
    buckets: list[list] = field(default_factory=list)  # bucket k at index k
    names: dict[str, int] = field(default_factory=dict)  # tensor name -> index of the bucket holding it


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class WeightStaging:
    """The buckets of one in-flight update, streamed in order and applied to the engine together on commit
    (thread-safe). Holds at most one update: a well-formed update stages each tensor once, so staged memory is
    bounded by the model's size."""

    def __init__(self, engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._staged: _StagedUpdate | None = None

    def _check_version(self, version: int) -> int:
        serving = self.engine.weight_version
        try:
            target_weight_version(serving, version)
        except WeightUpdateError as e:
            raise ApiError(409, str(e), "conflict") from None
        return serving

    def _discard(self, status: int, message: str, kind: str = "invalid_request_error") -> ApiError:
        self._staged = None
        return ApiError(status, f"{message}; update discarded, old weights keep serving", kind)

    def receive(self, version: int, index: int, data: bytes, checksum: str) -> dict[str, Any]:
        """Verify and stage bucket `index` of the update to `version`."""
        with self._lock:
            serving = self._check_version(version)
            if index < 0:
                raise ApiError(400, f"bucket index {index}: must be >= 0")
            staged = self._staged
            if index == 0:  # bucket 0 starts an update: drop whatever a previous (failed, abandoned) push left
                if staged is not None:
                    logger.warning("bucket 0 of an update to version %d: discarding the staged update to version "
                                   "%d (%d buckets)", version, staged.version, len(staged.buckets))
                staged = self._staged = _StagedUpdate(version)
            elif staged is None or staged.version != version:
                what = "none" if staged is None else f"the update to version {staged.version}"
                raise ApiError(409, f"bucket {index} of an update to version {version}, but the staged update is "
                               f"{what}: an update starts with bucket 0", "conflict")
            elif index > len(staged.buckets):
                raise self._discard(409, f"bucket {index} of the update to version {version} arrived after only "
                                    f"{len(staged.buckets)} buckets: buckets are sent in order", "conflict")
            try:
                tensors = decode_bucket(data, checksum)
                for name, t in tensors:
                    self.engine.check_weight(name, t.shape, t.dtype)
                    holder = staged.names.get(name, index)
                    if holder != index:
                        raise BucketError(f"weight {name!r} is already staged in bucket {holder}")
            except (BucketError, ValueError) as e:
                raise self._discard(422, f"bucket {index} of the update to version {version} rejected ({e})",
                                    "weight_update_error") from e
            if index < len(staged.buckets):  # a retry replaces itself
                for name, _ in staged.buckets[index]:
                    del staged.names[name]
                staged.buckets[index] = tensors
            else:
                staged.buckets.append(tensors)
            staged.names.update((name, index) for name, _ in tensors)
            return {"status": "staged", "weight_version": serving, "received": len(staged.buckets)}

    def commit(self, version: int, count: int) -> dict[str, Any]:
        """Apply the staged update to `version` if it holds exactly `count` buckets; all-or-nothing."""
        with self._lock:
            self._check_version(version)
            staged = self._staged
            if staged is None or staged.version != version:
                what = "none" if staged is None else f"the update to version {staged.version}"
                raise ApiError(409, f"commit of an update to version {version}, but the staged update is {what}",
                               "conflict")
            if count != len(staged.buckets):
                raise self._discard(409, f"commit of {count} buckets, but {len(staged.buckets)} are staged for "
                                    f"version {version}", "conflict")
            self._staged = None
            buckets = staged.buckets
            try:
                self.engine.validate_weights((n, t.shape, t.dtype) for b in buckets for n, t in b)
            except ValueError as e:
                raise ApiError(422, f"update to version {version} rejected ({e}); old weights keep serving",
                               "weight_update_error") from e
            new = self.engine.update_weights(buckets, version=version)
            return {"status": "applied", "weight_version": new, "count": count}


def _sampling_from_request(body: dict[str, Any], limits: ServerLimits) -> tuple[list[list[int]], SamplingConfig, bool]:
    def bad(msg: str) -> ApiError:
        return ApiError(400, msg)

    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
        raise bad("prompt: this server takes token ids (a list of ints or a list of such lists), not text")
    if not isinstance(prompt, list) or not prompt:
        raise bad("prompt: required, a non-empty list of token ids or a list of such lists")
    prompts = [prompt] if isinstance(prompt[0], int) else prompt
    if len(prompts) > limits.max_prompts:
        raise bad(f"prompt: {len(prompts)} prompts exceed the limit of {limits.max_prompts} per request")
    for i, p in enumerate(prompts):
        if not isinstance(p, list) or not p or not all(isinstance(t, int) and t >= 0 for t in p):
            raise bad(f"prompt[{i}]: expected a non-empty list of non-negative token ids")
    for key in ("stream", "echo"):
        if body.get(key):
            raise bad(f"{key}=true is not supported by this server")
    if body.get("stop"):
        raise bad("stop: string stops are not supported; use stop_token_ids")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not isinstance(logprobs, int) or not 0 <= logprobs <= 1):
        raise bad("logprobs: only the sampled token's log-prob is returned; use 0 or 1 (or omit)")

    def num(key, kind, default):
        v = body.get(key, default)
        if v is None:
            return default
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise bad(f"{key}: expected {kind.__name__}, got {v!r}")
        return v

    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids):
        raise bad("stop_token_ids: expected a list of ints")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise bad(f"seed: expected int, got {seed!r}")
    sampling = SamplingConfig(
        temperature=num("temperature", float, 1.0), top_p=num("top_p", float, 1.0), top_k=num("top_k", int, -1),
        max_tokens=num("max_tokens", int, 16), stop_token_ids=stop_ids, n=num("n", int, 1), seed=seed,
        logprobs=logprobs is not None,
    )
    return prompts, sampling, logprobs is not None


def build_app(engine, *, model_name: str, token: str | None, limits: ServerLimits | None = None, tokenizer=None):
    """The FastAPI app serving `engine` (a VLLMEngine). token=None disables the weight and admin routes."""
    limits = limits or ServerLimits()
    staging = WeightStaging(engine)
    app = FastAPI(title="megatron-trace generation server")

    def error(status: int, message: str, kind: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return error(e.status, e.message, e.kind)

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

    async def read_body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and int(declared) > limit:
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

    @app.get("/health")
    async def health():
        return {"status": "ok", "weight_version": engine.weight_version}

    @app.get("/version")
    async def version():
        return {"weight_version": engine.weight_version, "model": model_name}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        prompts, sampling, want_logprobs = _sampling_from_request(body, limits)
        try:
            outs = await run_in_threadpool(engine.generate, prompts, sampling)
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        except RuntimeError as e:  # asleep, or weights inconsistent after a failed update: retrying won't help
            raise ApiError(409, str(e), "conflict") from e
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
            "model": body.get("model") or model_name, "choices": choices, "weight_version": version,
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
        }

    @app.post("/weights")
    async def weights(request: Request):
        authorize(request)
        if COUNT_HEADER in request.headers:
            raise ApiError(400, f"header {COUNT_HEADER}: goes on POST /weights/commit after the last bucket, not "
                           "on a bucket (a client from before streamed updates?)")
        version = header_int(request, VERSION_HEADER)
        index = header_int(request, INDEX_HEADER)
        checksum = request.headers.get(CHECKSUM_HEADER)
        if not checksum:
            raise ApiError(400, f"header {CHECKSUM_HEADER}: required (hex SHA-256 of the body)")
        t0 = time.perf_counter()
        data = await read_body(request, limits.max_bucket_bytes)
        t1 = time.perf_counter()
        out = await run_in_threadpool(staging.receive, version, index, data, checksum)
        logger.info("weights v%d bucket %d: %.1f MB, read %.2fs, verify+stage %.2fs", version, index,
                    len(data) / 1e6, t1 - t0, time.perf_counter() - t1)
        return out

    @app.post("/weights/commit")
    async def weights_commit(request: Request):
        authorize(request)
        version = header_int(request, VERSION_HEADER)
        count = header_int(request, COUNT_HEADER)
        t0 = time.perf_counter()
        out = await run_in_threadpool(staging.commit, version, count)
        logger.info("weights v%d: %d buckets validated and applied in %.2fs", version, count,
                    time.perf_counter() - t0)
        return out

    async def read_json(request: Request) -> dict[str, Any]:
        import json

        raw = await read_body(request, limits.max_request_bytes)
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"body is not valid JSON: {e}") from e
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
        """Receive an update broadcast over the NCCL weight group: body {version, tensors: [[name, dtype,
        shape], ...]} in send order; answers when the update is applied. With validate_only=true, checks the
        announcement and the engine's state and reserves the engine for it (the client does this first: every
        refusal happens while nothing is broadcast, so a refused update never leaves the sender hanging)."""
        authorize(request)
        body = await read_json(request)
        try:
            metas = [(str(n), str(d), [int(x) for x in shape]) for n, d, shape in body["tensors"]]
            version = int(body["version"])
        except (KeyError, TypeError, ValueError) as e:
            raise ApiError(400, f"expected version and tensors [[name, dtype, shape], ...]: {e}") from e
        if body.get("validate_only"):  # accept (validate + reserve the engine) before any byte moves
            try:
                await run_in_threadpool(engine.prepare_nccl_update, metas, version)
            except ValueError as e:
                raise ApiError(422, f"update to version {version} rejected ({e})", "weight_update_error") from e
            except RuntimeError as e:  # asleep
                raise ApiError(409, f"update to version {version} refused ({e})", "conflict") from e
            return {"status": "valid", "weight_version": engine.weight_version}
        try:
            new = await run_in_threadpool(engine.update_weights_from_nccl, metas, version)
        except ValueError as e:
            raise ApiError(422, f"update to version {version} rejected ({e})", "weight_update_error") from e
        except RuntimeError as e:
            raise ApiError(409, str(e), "conflict") from e
        return {"status": "applied", "weight_version": new}

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
    p.add_argument("--enable-sleep-mode", action="store_true", help="allow /sleep and /wake_up (GPU only)")
    p.add_argument("--token-env", default=DEFAULT_TOKEN_ENV,
                   help="environment variable holding the bearer token of the weight/admin routes")
    p.add_argument("--max-request-bytes", type=int, default=ServerLimits.max_request_bytes)
    p.add_argument("--max-bucket-bytes", type=int, default=ServerLimits.max_bucket_bytes)
    args = p.parse_args(argv)

    import uvicorn

    from megatron_trace.data.tokenizer import load_tokenizer
    from megatron_trace.rollout.engine import VLLMEngine

    token = os.environ.get(args.token_env) or None
    if token is None:
        logger.warning("$%s is not set: weight and admin routes are disabled", args.token_env)
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
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
    limits = ServerLimits(max_request_bytes=args.max_request_bytes, max_bucket_bytes=args.max_bucket_bytes)
    app = build_app(engine, model_name=os.path.basename(os.path.normpath(args.model)), token=token,
                    limits=limits, tokenizer=load_tokenizer(args.model))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        engine.close()

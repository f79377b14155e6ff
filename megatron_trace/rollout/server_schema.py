"""What the generation server accepts: its limits (server settings) and the completions request schema.

The schema is a pydantic model validated with the limits and the model's vocabulary size as context
(`parse_completion_request`), so every bound is checked by pydantic before the engine sees the request, and every
refusal names the field. Unknown keys are refused (a misspelt `max_token` would otherwise silently use the
default); JSON `true` is not an integer, NaN/inf are not numbers, nesting deeper than pydantic's JSON parser allows
is a 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from megatron_trace.rollout.engine import MAX_SEED
from megatron_trace.rollout.types import SamplingConfig


@dataclass
class ServerLimits:
    """Limits of the generation server (its settings; `serve_rollout.py` flags of the same names).

    max_request_bytes: JSON body size (bytes). max_bucket_bytes: one weight bucket (bytes). max_prompts: prompts
    per completions request. max_n: samples per prompt. max_sequences: prompts * n per request (what one request
    may make the engine generate). max_queue: completions requests admitted at once (running or waiting for the
    engine); more get 503 with Retry-After. request_timeout_s: per-request deadline (s); a request past it is
    aborted in the engine and answered 504. stall_timeout_s: /health answers 503 when a running generate has had
    no engine step return for this long (s). push_idle_timeout_s: an open weight push with no request for this
    long (s) may be replaced by a new `POST /weights/begin` (a pusher that died must not block updates forever).
    """

    max_request_bytes: int = 16 * 1024 * 1024
    max_bucket_bytes: int = 4 * 1024 * 1024 * 1024
    max_prompts: int = 4096
    max_n: int = 256
    max_sequences: int = 16384
    max_queue: int = 64
    request_timeout_s: float = 900.0
    stall_timeout_s: float = 300.0
    push_idle_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_bucket_bytes", "max_prompts", "max_n", "max_sequences", "max_queue"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        for name in ("request_timeout_s", "stall_timeout_s", "push_idle_timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ValueError(f"{name}={v!r} must be a positive finite number of seconds")


class CompletionRequest(BaseModel):
    """`POST /v1/completions` body (OpenAI's fields this server supports, plus vLLM's top_k and stop_token_ids)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Any  # a list of token ids or a list of such lists (checked below, with the limits)
    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = -1
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, lt=MAX_SEED)
    stop_token_ids: list[int] = Field(default_factory=list)
    logprobs: int | None = Field(None, ge=0, le=1)
    stream: bool = False
    echo: bool = False
    stop: list[str] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any, info: ValidationInfo) -> list[list[int]]:
        if isinstance(v, str) or (isinstance(v, list) and v and isinstance(v[0], str)):
            raise ValueError("this server takes token ids (a list of ints or a list of such lists), not text")
        if not isinstance(v, list) or not v:
            raise ValueError("required, a non-empty list of token ids or a list of such lists")
        prompts = [v] if _is_id(v[0]) else v
        limits, vocab = _context(info)
        if len(prompts) > limits.max_prompts:
            raise ValueError(f"{len(prompts)} prompts exceed the limit of {limits.max_prompts} per request")
        for i, p in enumerate(prompts):
            if not isinstance(p, list) or not p or not all(_is_id(t) and t >= 0 for t in p):
                raise ValueError(f"prompt[{i}]: expected a non-empty list of non-negative token ids")
            if vocab is not None:
                bad = next((t for t in p if t >= vocab), None)
                if bad is not None:
                    raise ValueError(f"prompt[{i}]: token id {bad} is outside the vocabulary [0, {vocab})")
        return prompts

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v: list[int], info: ValidationInfo) -> list[int]:
        _, vocab = _context(info)
        bad = next((t for t in v if t < 0 or (vocab is not None and t >= vocab)), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("use -1 (off) or a positive integer")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int, info: ValidationInfo) -> int:
        limits, _ = _context(info)
        if v > limits.max_n:
            raise ValueError(f"n={v} exceeds the server's limit of {limits.max_n} samples per prompt")
        return v

    @field_validator("stream", "echo")
    @classmethod
    def _unsupported(cls, v: bool, info: ValidationInfo) -> bool:
        if v:
            raise ValueError(f"{info.field_name}=true is not supported by this server")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str] | None) -> None:
        if v:
            raise ValueError("string stops are not supported; use stop_token_ids")
        return None

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_tokens=self.max_tokens, stop_token_ids=list(self.stop_token_ids), n=self.n,
                              seed=self.seed, logprobs=self.logprobs is not None)


def _is_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _context(info: ValidationInfo) -> tuple[ServerLimits, int | None]:
    ctx = info.context or {}
    return ctx.get("limits") or ServerLimits(), ctx.get("vocab_size")


class RequestError(ValueError):
    """A request refused by the schema; the message names every offending field."""


def parse_completion_request(raw: bytes, limits: ServerLimits, vocab_size: int | None) -> CompletionRequest:
    """Validate a completions body (raw JSON bytes); raises RequestError naming the fields."""
    try:
        req = CompletionRequest.model_validate_json(raw, context={"limits": limits, "vocab_size": vocab_size})
    except ValidationError as e:
        raise RequestError(format_errors(e)) from None
    n_seq = len(req.prompt) * req.n
    if n_seq > limits.max_sequences:
        raise RequestError(f"prompt, n: {len(req.prompt)} prompts x n={req.n} = {n_seq} sequences exceed the "
                           f"server's limit of {limits.max_sequences} per request")
    return req


def format_errors(e: ValidationError) -> str:
    """`field: message; ...` of a pydantic error (the field path joined with dots, `body` for the whole body)."""
    parts = []
    for err in e.errors(include_url=False, include_input=False):
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)

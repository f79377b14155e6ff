"""Annotator client for any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, OpenAI, ...).

Requests run on a thread pool of `max_concurrency` (the concurrency limit), share one `httpx.Client`, and are
retried with exponential backoff on connection errors, timeouts, HTTP 429/5xx and unreadable bodies. After
the last retry the item comes back failed; `complete_batch` never raises for one bad call. `check_reachable()`
is the start-up check: it raises `AnnotatorUnreachable` naming the URL.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Sequence

import httpx

from megatron_trace.annotate.pipeline import ChatAnnotator, Completion
from megatron_trace.config_base import ConfigError


class AnnotatorUnreachable(RuntimeError):
    """The annotator endpoint cannot be reached or rejects our credentials; the message names the URL."""


@dataclass
class AnnotatorClientConfig:
    """Where the external annotator lives and how hard to try."""

    base_url: str = "http://127.0.0.1:8000/v1"  # up to and including /v1
    model: str = ""  # the served model name (required to send requests)
    api_key_env: str | None = None  # NAME of the env var holding the API key (never the key); None = no auth
    timeout_s: float = 120.0  # per request
    max_retries: int = 3  # retries after the first attempt
    backoff_s: float = 1.0  # wait before the first retry; doubles each retry
    max_backoff_s: float = 30.0
    max_concurrency: int = 8  # requests in flight at once
    temperature: float = 0.0
    max_tokens: int = 1024
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into each request (e.g. chat_template_kwargs)

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url: must start with http:// or https://, got {self.base_url!r}")
        for name in ("timeout_s", "backoff_s", "max_backoff_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries: must be >= 0, got {self.max_retries}")
        if self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency: must be >= 1, got {self.max_concurrency}")


class _Retryable(Exception):
    """A failure worth another attempt (network, timeout, 408/429/5xx, unreadable body)."""


class _Fatal(Exception):
    """A failure that retrying cannot fix (4xx other than 408/429)."""


class OpenAIAnnotator(ChatAnnotator):
    """Sends annotator chats to `{base_url}/chat/completions`; see the module docstring for the failure policy."""

    def __init__(self, cfg: AnnotatorClientConfig):
        if not cfg.model:
            raise ConfigError("model: the annotator's model name is required")
        self.cfg = cfg
        self.on_progress = None  # see complete_batch
        headers = {"Content-Type": "application/json"}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ConfigError(f"api_key_env: environment variable {cfg.api_key_env!r} is not set or empty")
            headers["Authorization"] = f"Bearer {key}"
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
        self._http = httpx.Client(headers=headers, timeout=cfg.timeout_s, limits=limits)
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="annotator")

    def check_reachable(self) -> None:
        """Raise AnnotatorUnreachable (naming the URL) unless the server answers `GET {base_url}/models`."""
        url = self.cfg.base_url.rstrip("/") + "/models"
        try:
            r = self._http.get(url, timeout=min(self.cfg.timeout_s, 10.0))
        except httpx.HTTPError as e:
            raise AnnotatorUnreachable(f"annotator at {url} is unreachable: {type(e).__name__}: {e}") from None
        if r.status_code in (401, 403):
            fix = f"check the key in ${self.cfg.api_key_env}" if self.cfg.api_key_env else "set annotator.api_key_env"
            raise AnnotatorUnreachable(f"annotator at {url} rejected the request (HTTP {r.status_code}); {fix}")
        if r.status_code >= 500:
            raise AnnotatorUnreachable(f"annotator at {url} answered HTTP {r.status_code}")

    def complete_batch(self, messages: Sequence[list[dict[str, str]]]) -> list[Completion]:
        """One Completion per chat, in order; at most `max_concurrency` requests in flight. `on_progress(done, n)`,
        when set, is called as each finishes (progress bars)."""
        futures = {self._pool.submit(self.complete, m): i for i, m in enumerate(messages)}
        out: list = [None] * len(messages)
        for done, fut in enumerate(as_completed(futures), 1):
            out[futures[fut]] = fut.result()
            if self.on_progress is not None:
                self.on_progress(done, len(messages))
        return out

    def complete(self, messages: list[dict[str, str]]) -> Completion:
        body = {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                "max_tokens": self.cfg.max_tokens, **self.cfg.extra_body}
        last_error = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                time.sleep(min(self.cfg.backoff_s * 2 ** (attempt - 1), self.cfg.max_backoff_s))
            try:
                return Completion(self._post(body))
            except _Retryable as e:
                last_error = str(e)
            except _Fatal as e:
                return Completion(None, str(e))
        return Completion(None, f"{last_error} (gave up after {self.cfg.max_retries + 1} attempts)")

    def _post(self, body: dict) -> str:
        try:
            r = self._http.post(self.url, json=body)
        except httpx.TimeoutException:
            raise _Retryable(f"timed out after {self.cfg.timeout_s} s at {self.url}") from None
        except httpx.HTTPError as e:
            raise _Retryable(f"cannot reach {self.url}: {type(e).__name__}: {e}") from None
        if r.status_code == 429 or r.status_code >= 500 or r.status_code == 408:
            raise _Retryable(f"HTTP {r.status_code} from {self.url}: {r.text[:200]}")
        if r.status_code >= 400:
            raise _Fatal(f"HTTP {r.status_code} from {self.url}: {r.text[:200]}")
        try:
            content = r.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable(f"malformed response body from {self.url}: {r.text[:200]!r}") from None
        if not isinstance(content, str):
            raise _Retryable(f"malformed response body from {self.url}: message content is {type(content).__name__}")
        return content

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    def __enter__(self) -> "OpenAIAnnotator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

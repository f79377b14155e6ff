"""Hardening of the generation server against hostile or careless requests (issue: seed >= 2^64 wedged the engine,
unbounded requests starved it, two pushes were mixed, NaN weights were applied, bf16 was cast silently, 500s
instead of 400s, /docs public).

Most cases run the real FastAPI app (`build_app`) in-process over a stand-in engine whose generate honours the
cancel event and deadline like VLLMEngine's, and whose weight checks are the real `WeightValidator`: the HTTP
contract is what is tested, fast. The engine-level wedge (a request vLLM half-adds before raising) is
reproduced on the real in-process vLLM engine in test_harden_engine.py; the kill -9 / SIGTERM cases on a real
server process there too.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from megatron_trace.rollout.client import ClientConfig, RolloutClient, RolloutServerError
from megatron_trace.rollout.engine import GenerationCancelled, WeightValidator
from megatron_trace.rollout.server import build_app
from megatron_trace.rollout.server_schema import ServerLimits
from megatron_trace.rollout.types import Generation
from megatron_trace.rollout.weight_buckets import (
    CHECKSUM_HEADER, COUNT_HEADER, INDEX_HEADER, PUSH_HEADER, VERSION_HEADER, encode_bucket,
)

TOKEN = "harden-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
VOCAB = 100
SHAPES = {"a.weight": (4, 3), "b.weight": (5,)}


class FakeEngine:
    """Generates `[prompt[0]] * max_tokens` (after `delay_s`, checking cancel/deadline every 10 ms like
    VLLMEngine between steps); weights are a dict, checked by the real WeightValidator (fp32 serving)."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.weight_version = 0
        self.vocab_size = VOCAB
        self.weights = {n: torch.zeros(s) for n, s in SHAPES.items()}
        self.validator = WeightValidator(SHAPES, tied=False, dtype=torch.float32)
        self.calls, self.cancelled, self.stall = [], [], 0.0
        self._lock = threading.Lock()

    def generate(self, prompts, sampling, *, cancel=None, deadline=None):
        with self._lock:
            self.calls.append((prompts, sampling))
            end = time.monotonic() + self.delay_s
            while time.monotonic() < end:
                if cancel is not None and cancel.is_set():
                    self.cancelled.append("cancel")
                    raise GenerationCancelled("cancelled by the caller (generating)")
                if deadline is not None and time.monotonic() > deadline:
                    self.cancelled.append("deadline")
                    raise GenerationCancelled("deadline exceeded (generating)", timed_out=True)
                time.sleep(0.01)
            return [[Generation([p[0]] * sampling.max_tokens, [-1.0] * sampling.max_tokens, "length",
                                self.weight_version) for _ in range(sampling.n)] for p in prompts]

    def stalled_s(self):
        return self.stall

    def check_weight(self, name, shape, dtype):
        return self.validator.check(name, shape, dtype)

    def check_finite(self, name, t):
        self.validator.check_finite(name, t)

    def validate_weights(self, triples):
        seen = set()
        for n, s, d in triples:
            self.validator.check(n, s, d)
            seen.add(n)
        self.validator.check_complete(seen)

    def update_weights(self, buckets, version):
        for b in buckets:
            for n, t in b:
                self.weights[n] = t.clone()
        self.weight_version = version
        return version


def model(value: float) -> list[list[tuple[str, torch.Tensor]]]:
    """A complete update, every element `value`, in two buckets."""
    return [[("a.weight", torch.full(SHAPES["a.weight"], value))], [("b.weight", torch.full(SHAPES["b.weight"], value))]]


def app_client(engine=None, **kw):
    limits = kw.pop("limits", ServerLimits())
    engine = engine or FakeEngine()
    app = build_app(engine, model_name="fake", token=TOKEN, limits=limits, **kw)
    return engine, TestClient(app, raise_server_exceptions=False)


def post(c, body, **kw):
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return c.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}, **kw)


def message(r) -> str:
    return r.json()["error"]["message"]


# ------------------------------------------------------------------------------------------------ request schema


@pytest.mark.parametrize("seed", [2**64, 2**63, 10**30, -1])
def test_a_seed_outside_the_signed_64_bit_range_is_a_400_naming_seed_and_the_server_keeps_serving(seed):
    engine, c = app_client()
    r = post(c, {"prompt": [1, 2], "max_tokens": 2, "seed": seed})
    assert r.status_code == 400 and message(r).startswith("seed:"), r.text
    assert engine.calls == []  # refused before the engine saw it
    ok = post(c, {"prompt": [1, 2], "max_tokens": 2, "seed": 2**63 - 1})
    assert ok.status_code == 200 and ok.json()["choices"][0]["token_ids"] == [1, 1]


BAD_BODIES = [
    # (body, field named in the message, what the request did before)
    ({"prompt": [1], "n": 16385}, "n:", "500"),
    ({"prompt": [1], "n": 257}, "n:", "accepted: 257 samples"),
    ({"prompt": [[1]] * 100, "n": 200}, "sequences exceed", "accepted: 20,000 sequences"),
    ({"prompt": [[1]] * 4097}, "prompt:", "400 (kept)"),
    ({"prompt": [1, VOCAB]}, "outside the vocabulary", "500"),
    ({"prompt": [1], "stop_token_ids": [VOCAB + 5]}, "stop_token_ids:", "500"),
    ({"prompt": [1], "stop_token_ids": [-1]}, "stop_token_ids:", "500"),
    ({"prompt": [1, True]}, "prompt:", "accepted as token 1"),
    ({"prompt": [1], "max_tokens": True}, "max_tokens:", "accepted as 1"),
    ({"prompt": [1], "max_token": 5}, "max_token:", "ignored"),
    ({"prompt": [1], "temperature": -1}, "temperature:", "400 (kept)"),
    ({"prompt": [1], "top_p": 0}, "top_p:", "400 (kept)"),
    ({"prompt": [1], "top_k": 0}, "top_k:", "400 (kept)"),
    ({"prompt": [1], "max_tokens": 0}, "max_tokens:", "400 (kept)"),
    ({"prompt": [1], "logprobs": 5}, "logprobs:", "400 (kept)"),
    ({"prompt": [1], "stream": True}, "stream:", "400 (kept)"),
    ({"prompt": "text"}, "token ids", "400 (kept)"),
    ({"prompt": [[1, 2], []]}, "prompt[1]", "400 (kept)"),
]


@pytest.mark.parametrize("body,needle,before", BAD_BODIES, ids=[str(i) for i in range(len(BAD_BODIES))])
def test_bad_completion_requests_get_a_400_naming_the_field(body, needle, before):
    engine, c = app_client()
    r = post(c, body)
    assert r.status_code == 400 and needle in message(r), (before, r.text)
    assert engine.calls == []


@pytest.mark.parametrize("raw,needle", [
    ('{"prompt": [1], "temperature": NaN}', "temperature:"),
    ('{"prompt": [1], "temperature": Infinity}', "temperature:"),
    ('{"prompt": [1], "temperature": 1e400}', "temperature:"),
    ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "recursion"),
    ("[1, 2]", "body"),
    ("{", "body"),
])
def test_non_finite_numbers_and_100k_deep_json_are_400_not_500(raw, needle):
    _, c = app_client(limits=ServerLimits(max_request_bytes=1 << 20))
    r = post(c, raw)
    assert r.status_code == 400 and needle in message(r), r.text


def test_limits_are_server_settings():
    _, c = app_client(limits=ServerLimits(max_n=4, max_prompts=2, max_sequences=6))
    assert post(c, {"prompt": [1], "n": 4}).status_code == 200
    assert "n=5 exceeds" in message(post(c, {"prompt": [1], "n": 5}))
    assert "3 prompts exceed the limit of 2" in message(post(c, {"prompt": [[1], [2], [3]]}))
    assert "= 8 sequences exceed the server's limit of 6" in message(post(c, {"prompt": [[1], [2]], "n": 4}))
    with pytest.raises(ValueError, match="max_queue"):
        ServerLimits(max_queue=0)
    with pytest.raises(ValueError, match="request_timeout_s"):
        ServerLimits(request_timeout_s=float("inf"))


# ------------------------------------------------------------------------------------------------ starvation


def test_a_full_queue_answers_503_with_retry_after_and_admits_again_once_drained():
    engine = FakeEngine(delay_s=1.5)
    _, c = app_client(engine, limits=ServerLimits(max_queue=1))
    first = {}
    t = threading.Thread(target=lambda: first.setdefault("r", post(c, {"prompt": [3], "max_tokens": 1})))
    t.start()
    deadline = time.monotonic() + 5
    while not engine.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    r = post(c, {"prompt": [4], "max_tokens": 1})
    assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "max_queue=1" in message(r)
    t.join()
    assert first["r"].status_code == 200
    assert post(c, {"prompt": [4], "max_tokens": 1}).status_code == 200


def test_a_request_past_its_deadline_is_aborted_in_the_engine_and_answered_504():
    engine = FakeEngine(delay_s=30)
    _, c = app_client(engine, limits=ServerLimits(request_timeout_s=0.5))
    t0 = time.monotonic()
    r = post(c, {"prompt": [3], "max_tokens": 1})
    assert r.status_code == 504 and "deadline" in message(r)
    assert time.monotonic() - t0 < 5 and engine.cancelled == ["deadline"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """build_app over a fake engine served by uvicorn in a thread (real sockets: disconnects, concurrency)."""

    def __init__(self, engine, **kw):
        import uvicorn

        self.engine = engine
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = build_app(engine, model_name="fake", token=TOKEN, **kw)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


def test_a_client_that_gives_up_cancels_its_generation():
    engine = FakeEngine(delay_s=60)
    live = LiveServer(engine)
    try:
        t0 = time.monotonic()
        with pytest.raises(httpx.TimeoutException):
            httpx.post(live.url + "/v1/completions", json={"prompt": [3], "max_tokens": 1}, timeout=1.0)
        while not engine.cancelled and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert engine.cancelled == ["cancel"] and time.monotonic() - t0 < 10  # was: engine busy for 157 s
    finally:
        live.close()


# ------------------------------------------------------------------------------------------------ auth, docs, health


def test_beyond_loopback_every_route_needs_the_token_and_docs_are_never_public():
    _, c = app_client(token_on_every_route=True)
    for method, path in (("get", "/health"), ("get", "/version"), ("post", "/v1/completions"),
                         ("post", "/weights/begin")):
        r = getattr(c, method)(path)
        assert r.status_code == 401 and "bearer token" in message(r), (path, r.text)
    assert c.get("/health", headers=AUTH).status_code == 200
    r = c.post("/v1/completions", json={"prompt": [1], "max_tokens": 1}, headers=AUTH)
    assert r.status_code == 200
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert c.get(path, headers=AUTH).status_code == 404
    _, loopback = app_client()
    assert loopback.get("/openapi.json").status_code == 404 and loopback.get("/health").status_code == 200


def test_the_client_sends_the_token_on_generation_too(monkeypatch):
    monkeypatch.setenv("HARDEN_TOKEN", TOKEN)
    live = LiveServer(FakeEngine(), token_on_every_route=True)
    try:
        from megatron_trace.rollout.types import SamplingConfig

        with RolloutClient(ClientConfig(base_url=live.url, token_env="HARDEN_TOKEN", timeout_s=10)) as cl:
            assert cl.generate([[7]], SamplingConfig(max_tokens=2))[0][0].token_ids == [7, 7]
            assert cl.health()["status"] == "ok"
    finally:
        live.close()


def test_health_reports_unhealthy_when_the_engine_makes_no_progress():
    engine, c = app_client(limits=ServerLimits(stall_timeout_s=10))
    assert c.get("/health").json()["status"] == "ok"
    engine.stall = 11.0
    r = c.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "unhealthy" and "no progress for 11s" in r.json()["reason"]


# ------------------------------------------------------------------------------------------------ weight pushes


def begin(c, version):
    return c.post("/weights/begin", headers={**AUTH, VERSION_HEADER: str(version)})


def bucket(c, push_id, index, tensors):
    data, digest = encode_bucket(tensors)
    return c.post("/weights", content=data, headers={**AUTH, PUSH_HEADER: push_id, INDEX_HEADER: str(index),
                                                      CHECKSUM_HEADER: digest})


def commit(c, push_id, count):
    return c.post("/weights/commit", headers={**AUTH, PUSH_HEADER: push_id, COUNT_HEADER: str(count)})


def test_a_second_push_is_refused_while_one_is_open_so_an_interleave_cannot_mix_two_models():
    engine, c = app_client()
    a = begin(c, 1)
    assert a.status_code == 200
    pa = a.json()["push_id"]
    b = begin(c, 1)  # a second pusher of the same version: was staged into the same update
    assert b.status_code == 409 and "one push at a time" in message(b)
    ma, mb = model(1.0), model(2.0)
    # the deterministic interleave that used to commit a model equal to neither: A0, B0, A1, B1, commit
    assert bucket(c, pa, 0, ma[0]).status_code == 200
    forged = bucket(c, "not-" + pa, 0, mb[0])
    assert forged.status_code == 409 and "not the open push" in message(forged)
    assert bucket(c, pa, 1, ma[1]).status_code == 200
    assert bucket(c, "not-" + pa, 1, mb[1]).status_code == 409
    r = commit(c, pa, 2)
    assert r.json() == {"status": "applied", "push_id": pa, "weight_version": 1, "count": 2}
    assert all(torch.equal(engine.weights[n], t) for b in ma for n, t in b)  # exactly model A
    # the slot is free again: the second pusher now begins (and a version not above the serving one is refused)
    assert begin(c, 1).status_code == 409 and "must exceed" in message(begin(c, 1))
    assert begin(c, 2).status_code == 200


def test_two_concurrent_update_weights_calls_never_serve_a_mix(monkeypatch):
    monkeypatch.setenv("HARDEN_TOKEN", TOKEN)
    engine = FakeEngine()
    live = LiveServer(engine)
    results = {}

    def slow(value):  # buckets produced slowly, so the two pushes overlap
        for b in model(value):
            time.sleep(0.3)
            yield b

    def pusher(value):
        with RolloutClient(ClientConfig(base_url=live.url, token_env="HARDEN_TOKEN", timeout_s=10, retries=0)) as cl:
            try:
                results[value] = cl.update_weights(slow(value), version=1)
            except RolloutServerError as e:
                results[value] = e
    try:
        threads = [threading.Thread(target=pusher, args=(v,)) for v in (1.0, 2.0)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        for t in threads:
            t.join()
        ok = [v for v, r in results.items() if r == 1]
        failed = [r for r in results.values() if isinstance(r, RolloutServerError)]
        assert len(ok) == 1 and len(failed) == 1 and failed[0].status == 409  # was: both "succeeded"
        served = {n: t.unique().tolist() for n, t in engine.weights.items()}
        assert served == {n: [ok[0]] for n in SHAPES}  # one model, entirely
    finally:
        live.close()


def test_an_abandoned_push_expires_after_its_idle_timeout():
    engine, c = app_client(limits=ServerLimits(push_idle_timeout_s=0.3))
    pa = begin(c, 1).json()["push_id"]
    assert bucket(c, pa, 0, model(1.0)[0]).status_code == 200
    assert begin(c, 1).status_code == 409
    time.sleep(0.4)
    pb = begin(c, 1).json()["push_id"]  # the dead pusher's push is replaced
    assert bucket(c, pa, 1, model(1.0)[1]).status_code == 409
    for i, b in enumerate(model(3.0)):
        assert bucket(c, pb, i, b).status_code == 200
    assert commit(c, pb, 2).json()["weight_version"] == 1
    assert engine.weights["a.weight"].unique().tolist() == [3.0]


def test_an_aborted_push_frees_the_slot():
    _, c = app_client()
    pa = begin(c, 1).json()["push_id"]
    r = c.post("/weights/abort", headers={**AUTH, PUSH_HEADER: pa})
    assert r.json() == {"status": "aborted", "push_id": pa}
    assert begin(c, 1).status_code == 200


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor_and_the_old_weights_keep_serving(bad):
    engine, c = app_client()
    m = model(1.0)
    m[1][0][1][2] = bad
    pid = begin(c, 1).json()["push_id"]
    assert bucket(c, pid, 0, m[0]).status_code == 200
    r = bucket(c, pid, 1, m[1])
    assert r.status_code == 422 and "'b.weight' holds 1 non-finite values" in message(r), r.text
    assert commit(c, pid, 2).status_code == 409  # the push was discarded: nothing to commit
    assert engine.weight_version == 0 and engine.weights["b.weight"].eq(0).all()
    assert post(c, {"prompt": [5], "max_tokens": 1}).status_code == 200  # was: 500 on every generate


def test_a_dtype_other_than_the_serving_one_is_refused_not_cast_silently():
    engine, c = app_client()
    pid = begin(c, 1).json()["push_id"]
    r = bucket(c, pid, 0, [("a.weight", torch.ones(4, 3, dtype=torch.bfloat16))])
    assert r.status_code == 422 and "dtype torch.bfloat16, the engine serves torch.float32" in message(r)
    pid = begin(c, 1).json()["push_id"]
    r = bucket(c, pid, 0, [("a.weight", torch.ones(4, 3, dtype=torch.int32))])
    assert r.status_code == 422 and "floating-point" in message(r)
    assert engine.weight_version == 0


def test_weight_requests_without_or_with_a_mismatched_push_header_are_400_or_409():
    _, c = app_client()
    data, digest = encode_bucket(model(1.0)[0])
    r = c.post("/weights", content=data, headers={**AUTH, INDEX_HEADER: "0", CHECKSUM_HEADER: digest})
    assert r.status_code == 400 and PUSH_HEADER in message(r)
    pid = begin(c, 1).json()["push_id"]
    r = c.post("/weights", content=data, headers={**AUTH, PUSH_HEADER: pid, VERSION_HEADER: "7",
                                                   INDEX_HEADER: "0", CHECKSUM_HEADER: digest})
    assert r.status_code == 409 and "targets version 1, the request says 7" in message(r)

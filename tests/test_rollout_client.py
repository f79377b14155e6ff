"""RolloutClient's transport behaviour against misbehaving peers on 127.0.0.1: a server that never answers, one
that stalls once, one that fails transiently, one that is slow (to observe the concurrency limit).
No vLLM needed; the real server is exercised in test_server.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_trace.rollout.client import ClientConfig, RolloutClient, RolloutServerError
from megatron_trace.rollout.types import SamplingConfig


class SilentServer:
    """Accepts TCP connections and never answers: a stalled server."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.accepted = 0
        self.conns = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _run(self):
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            self.conns.append(conn)

    def close(self):
        self._stop = True
        self.thread.join()
        for c in self.conns:
            c.close()
        self.sock.close()


class ScriptedServer:
    """An HTTP server whose handler is a function (method, path, body, n-th request) -> (status, JSON, delay s)."""

    def __init__(self, script):
        self.requests = []
        self.headers = []
        self.in_flight = 0
        self.max_in_flight = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with lock:
                    outer.requests.append((self.command, self.path))
                    outer.headers.append(dict(self.headers))
                    k = len(outer.requests)
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                status, payload, delay = script(self.command, self.path, body, k)
                time.sleep(delay)
                with lock:
                    outer.in_flight -= 1
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout) and closed the socket
                    pass

            do_GET = do_POST = _serve

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def fast_client(url, **kw):
    return RolloutClient(ClientConfig(base_url=url, timeout_s=0.3, backoff_s=0.02, **kw))


def test_a_stalled_server_times_out_each_attempt_and_fails_after_the_retries():
    srv = SilentServer()
    try:
        with fast_client(srv.url, retries=2) as c:
            t0 = time.monotonic()
            with pytest.raises(RolloutServerError, match="after 3 attempts"):
                c.health()
            elapsed = time.monotonic() - t0
        assert srv.accepted == 3
        assert 0.9 <= elapsed < 5.0  # three 0.3 s timeouts plus short backoffs, not a hang
    finally:
        srv.close()


def test_a_request_that_stalls_once_succeeds_on_retry():
    srv = ScriptedServer(lambda m, p, b, k: (200, {"weight_version": 5}, 1.0 if k == 1 else 0.0))
    try:
        with fast_client(srv.url, retries=2) as c:
            assert c.version() == 5
        assert srv.requests == [("GET", "/version")] * 2
    finally:
        srv.close()


def test_transient_503_is_retried_but_a_400_is_not():
    def script(method, path, body, k):
        if path == "/version":
            return (503, {"error": {"message": "warming up"}}, 0) if k == 1 else (200, {"weight_version": 2}, 0)
        return 400, {"error": {"message": "prompt: required"}}, 0

    srv = ScriptedServer(script)
    try:
        with fast_client(srv.url, retries=3) as c:
            assert c.version() == 2
            with pytest.raises(RolloutServerError, match="HTTP 400: prompt: required") as e:
                c.generate([[1, 2]], SamplingConfig(max_tokens=2))
            assert e.value.status == 400
        assert [p for _, p in srv.requests] == ["/version", "/version", "/v1/completions"]
    finally:
        srv.close()


def test_concurrency_limit_bounds_requests_in_flight_and_results_keep_prompt_order():
    def script(method, path, body, k):
        req = json.loads(body)
        choices = [{"index": i * req["n"] + j, "token_ids": p[::-1] + [j], "finish_reason": "length",
                    "logprobs": {"token_logprobs": [-1.0] * (len(p) + 1)}}
                   for i, p in enumerate(req["prompt"]) for j in range(req["n"])]
        return 200, {"choices": choices, "weight_version": 3}, 0.15

    srv = ScriptedServer(script)
    prompts = [[i, i + 1] for i in range(6)]
    try:
        c = RolloutClient(ClientConfig(base_url=srv.url, concurrency=2, prompts_per_request=1, timeout_s=10))
        seen = []
        c.on_progress = lambda done, total: seen.append((done, total))
        out = c.generate(prompts, SamplingConfig(n=2, max_tokens=3))
        c.close()
        assert srv.max_in_flight == 2 and len(srv.requests) == 6
        assert seen == [(k, 6) for k in range(1, 7)]  # one report per finished request, counted in prompts
        assert [[g.token_ids for g in gens] for gens in out] == [[p[::-1] + [0], p[::-1] + [1]] for p in prompts]
        assert all(g.weight_version == 3 and len(g.logprobs) == 3 for gens in out for g in gens)
    finally:
        srv.close()


def test_pushing_weights_without_a_token_names_the_variable(monkeypatch):
    import torch

    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    srv = ScriptedServer(lambda m, p, b, k: (200, {"weight_version": 0}, 0))
    try:
        with RolloutClient(ClientConfig(base_url=srv.url, token_env="NO_SUCH_TOKEN_VAR")) as c:
            with pytest.raises(RolloutServerError, match=r"\$NO_SUCH_TOKEN_VAR"):
                c.update_weights([[("w", torch.zeros(2))]])
    finally:
        srv.close()


class WeightServer:
    """The weight routes of a scripted server: version 4 serving, buckets staged, the commit applies version 5.
    `fail` maps a request number (1-based, /version calls included) to an error status."""

    def __init__(self, fail=None, on_request=None):
        self.version, self.fail, self.on_request = 4, fail or {}, on_request or (lambda path: None)
        self.srv = ScriptedServer(self.script)

    def script(self, method, path, body, k):
        self.on_request(path)
        if path == "/version":
            return 200, {"weight_version": self.version}, 0
        if k in self.fail:
            return self.fail[k], {"error": {"message": "scripted failure"}}, 0
        if path == "/weights/begin":
            return 200, {"status": "open", "push_id": "p-1", "version": 5}, 0
        if path == "/weights/abort":
            return 200, {"status": "aborted", "push_id": "p-1"}, 0
        if path == "/weights/commit":
            self.version = 5
            return 200, {"status": "applied", "weight_version": 5}, 0
        return 200, {"status": "staged", "weight_version": self.version, "received": 1}, 0

    def weight_requests(self):
        return [(p, h) for (_, p), h in zip(self.srv.requests, self.srv.headers) if p.startswith("/weights")]


def tracked_buckets(n: int, refs: list, dead_before: list):
    """n one-tensor buckets; `refs` gets a weakref to each bucket's tensor, and `dead_before[i]` records whether
    every earlier bucket's tensor was already freed when bucket i was drawn (the one-bucket-alive check)."""
    import gc
    import weakref

    import torch

    for i in range(n):
        gc.collect()
        dead_before.append(all(r() is None for r in refs))
        t = torch.full((1000,), float(i))
        refs.append(weakref.ref(t))
        yield [(f"w{i}", t)]
        del t  # the generator itself keeps no reference once resumed


def test_weights_stream_one_bucket_at_a_time_from_a_generator_then_a_commit_carries_the_count(monkeypatch):
    monkeypatch.setenv("TRACE_TEST_TOKEN", "t0k")
    n = 4
    produced = []  # how many buckets the generator had produced when each weight request arrived
    dead_before, refs = [], []

    ws = WeightServer(on_request=lambda path: produced.append(len(refs)) if path.startswith("/weights") else None)
    try:
        with RolloutClient(ClientConfig(base_url=ws.srv.url, token_env="TRACE_TEST_TOKEN", timeout_s=10)) as c:
            assert c.update_weights(tracked_buckets(n, refs, dead_before)) == 5
        reqs = ws.weight_requests()
        assert [p for p, _ in reqs] == ["/weights/begin"] + ["/weights"] * n + ["/weights/commit"]
        assert reqs[0][1]["X-Weight-Version"] == "5"
        reqs = reqs[1:]
        assert produced == [0, 1, 2, 3, 4, 4]  # bucket i was sent before bucket i + 1 was asked for
        assert dead_before == [True] * n  # and the client kept nothing of it: one bucket alive at a time
        for i, (_, h) in enumerate(reqs[:n]):
            assert h["X-Bucket-Index"] == str(i) and h["X-Weight-Version"] == "5" and "X-Bucket-Count" not in h
            assert h["Authorization"] == "Bearer t0k" and len(h["X-Bucket-Sha256"]) == 64
            assert h["X-Push-Id"] == "p-1"
        h = reqs[-1][1]
        assert h["X-Bucket-Count"] == str(n) and h["X-Weight-Version"] == "5" and "X-Bucket-Index" not in h
        assert h["X-Push-Id"] == "p-1"
    finally:
        ws.srv.close()


def test_a_lost_commit_answer_whose_retry_gets_409_returns_the_applied_version(monkeypatch):
    import torch

    monkeypatch.setenv("TRACE_TEST_TOKEN", "t0k")

    def script(method, path, body, k):
        if path == "/version":
            return 200, {"weight_version": state["version"]}, 0
        if path == "/weights/commit":
            state["commits"] += 1
            state["version"] = 5  # applied; the first answer arrives after the client's timeout
            if state["commits"] == 1:
                return 200, {"status": "applied", "weight_version": 5}, 1.0
            return 409, {"error": {"message": "target version 5 must exceed the serving version 5"}}, 0
        if path == "/weights/begin":
            return 200, {"status": "open", "push_id": "p-1", "version": 5}, 0
        return 200, {"status": "staged"}, 0

    state = {"version": 4, "commits": 0}
    srv = ScriptedServer(script)
    try:
        with fast_client(srv.url, retries=2, token_env="TRACE_TEST_TOKEN", weight_timeout_s=0.3) as c:
            assert c.update_weights([[("w", torch.zeros(2))], [("v", torch.zeros(3))]]) == 5
        assert state["commits"] == 2
    finally:
        srv.close()


def test_a_failed_bucket_stops_the_push_but_the_generator_is_drained_and_nothing_is_committed(monkeypatch):
    import torch

    monkeypatch.setenv("TRACE_TEST_TOKEN", "t0k")
    produced = []

    def buckets():  # stands in for the bridge's collective generator, which every rank must run to its end
        for i in range(5):
            produced.append(i)
            yield [(f"w{i}", torch.zeros(3))]

    ws = WeightServer(fail={4: 422})  # request 1 = /version, 2 = /weights/begin, 3 = bucket 0, 4 = bucket 1
    try:
        with RolloutClient(ClientConfig(base_url=ws.srv.url, token_env="TRACE_TEST_TOKEN", timeout_s=10)) as c:
            with pytest.raises(RolloutServerError, match="HTTP 422: scripted failure"):
                c.update_weights(buckets())
        assert produced == [0, 1, 2, 3, 4]
        assert [p for p, _ in ws.weight_requests()] == ["/weights/begin"] + ["/weights"] * 2 + ["/weights/abort"]
        assert ws.version == 4
    finally:
        ws.srv.close()


def test_an_empty_update_is_refused_without_a_commit(monkeypatch):
    monkeypatch.setenv("TRACE_TEST_TOKEN", "t0k")
    ws = WeightServer()
    try:
        with RolloutClient(ClientConfig(base_url=ws.srv.url, token_env="TRACE_TEST_TOKEN", timeout_s=10)) as c:
            with pytest.raises(ValueError, match="at least one bucket"):
                c.update_weights(iter([]))
        assert [p for p, _ in ws.weight_requests()] == ["/weights/begin", "/weights/abort"]  # no commit
    finally:
        ws.srv.close()


def test_bad_client_config_names_the_field():
    with pytest.raises(ValueError, match="base_url"):
        ClientConfig(base_url="127.0.0.1:8100")
    with pytest.raises(ValueError, match="retries"):
        ClientConfig(retries=-1)

"""The OpenAI-compatible annotator client against a real HTTP server on 127.0.0.1 (no mock of the client)."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_trace.annotate import AnnotationRequest, annotate_batch, annotation_metrics
from megatron_trace.annotate.client import AnnotatorClientConfig, AnnotatorUnreachable, OpenAIAnnotator
from megatron_trace.config_base import ConfigError

REPLY = '{"spans": [{"segments": "2", "label": "adds the tens"}]}'


class Server:
    """Chat-completions server whose behaviour is chosen by the request's model name."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body, ctype="application/json"):
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, json.dumps({"data": [{"id": "ok"}]}))
                elif self.path == "/locked/v1/models":
                    self._send(401, '{"error": "bad key"}')
                else:
                    self._send(404, "{}")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                model = body["model"]
                with outer.lock:
                    n = outer.calls[model] = outer.calls.get(model, 0) + 1
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    outer.auth.append(self.headers.get("Authorization"))
                try:
                    if model == "slow":
                        time.sleep(1.0)
                    if model == "concurrent":
                        time.sleep(0.15)
                    if model == "always500" or (model == "flaky" and n <= 2):
                        return self._send(503, '{"error": "overloaded"}')
                    if model == "malformed":
                        return self._send(200, "<html>not json</html>", "text/html")
                    if model == "badrequest":
                        return self._send(400, '{"error": "context too long"}')
                    user = body["messages"][-1]["content"]
                    content = REPLY if "[2]" in user else "{}"
                    self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}))
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def client(server, model, **kw):
    kw.setdefault("backoff_s", 0.01)
    return OpenAIAnnotator(AnnotatorClientConfig(base_url=server.url, model=model, **kw))


def chat(text="[1] a\n[2] b"):
    return [{"role": "user", "content": text}]


def test_success_returns_the_message_content(server):
    with client(server, "ok") as c:
        c.check_reachable()  # does not raise
        out = c.complete_batch([chat(), chat("[1] only")])
    assert [o.text for o in out] == [REPLY, "{}"] and all(o.error is None for o in out)


def test_5xx_is_retried_with_backoff_then_succeeds(server):
    with client(server, "flaky", max_retries=3) as c:
        out = c.complete(chat())
    assert out.text == REPLY and server.calls["flaky"] == 3


def test_persistent_5xx_fails_the_item_after_the_retries(server):
    with client(server, "always500", max_retries=2) as c:
        out = c.complete(chat())
    assert out.text is None and "HTTP 503" in out.error and "3 attempts" in out.error
    assert server.calls["always500"] == 3


def test_timeout_fails_the_item_and_names_it(server):
    t0 = time.monotonic()
    with client(server, "slow", timeout_s=0.2, max_retries=1) as c:
        out = c.complete(chat())
    assert out.text is None and "timed out" in out.error
    assert time.monotonic() - t0 < 5.0


def test_malformed_body_fails_the_item_after_retries(server):
    with client(server, "malformed", max_retries=1) as c:
        out = c.complete(chat())
    assert out.text is None and "malformed response body" in out.error and server.calls["malformed"] == 2


def test_4xx_is_not_retried(server):
    with client(server, "badrequest", max_retries=3) as c:
        out = c.complete(chat())
    assert out.text is None and "HTTP 400" in out.error and server.calls["badrequest"] == 1


def test_concurrency_is_limited(server):
    seen = []
    with client(server, "concurrent", max_concurrency=2) as c:
        c.on_progress = lambda done, total: seen.append((done, total))
        out = c.complete_batch([chat()] * 6)
    assert all(o.text == REPLY for o in out)
    assert server.max_in_flight == 2
    assert seen == [(k, 6) for k in range(1, 7)]  # progress: one report per finished request


def test_api_key_is_read_from_the_named_env_var(server, monkeypatch):
    monkeypatch.setenv("TRACE_TEST_KEY", "sekret")
    with client(server, "ok", api_key_env="TRACE_TEST_KEY") as c:
        c.complete(chat())
    assert server.auth[-1] == "Bearer sekret"
    monkeypatch.delenv("TRACE_TEST_KEY")
    with pytest.raises(ConfigError, match="TRACE_TEST_KEY"):
        client(server, "ok", api_key_env="TRACE_TEST_KEY")


def test_unreachable_annotator_is_detected_at_start_up_naming_the_url(server):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    dead = OpenAIAnnotator(AnnotatorClientConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1,
                                                 backoff_s=0.01))
    with pytest.raises(AnnotatorUnreachable, match=f"127.0.0.1:{port}/v1/models is unreachable"):
        dead.check_reachable()
    # during training the same failure marks items failed instead of raising
    out = annotate_batch(dead, [AnnotationRequest("p", "s", "a. b.", True)])
    assert out[0].failed and "cannot reach" in out[0].errors[0]
    assert annotation_metrics(out)["annotate/failed"] == 1.0
    dead.close()
    locked = OpenAIAnnotator(AnnotatorClientConfig(base_url=server.url.replace("/v1", "/locked/v1"), model="m"))
    with pytest.raises(AnnotatorUnreachable, match="rejected the request \\(HTTP 401\\)"):
        locked.check_reachable()
    locked.close()


def test_annotate_batch_end_to_end_over_http(server):
    text = "We add 23 and 58.\nThe tens give 70 and the ones give 11.\nSo \\boxed{81}."
    reqs = [AnnotationRequest("What is 23 + 58?", "23 + 58 = 81", text, True),
            AnnotationRequest("What is 1 + 1?", "2", "", False)]
    with client(server, "ok") as c:
        out = annotate_batch(c, reqs)
    assert out[0].char_spans == [(text.index("The tens"), text.index("11.") + 3)]
    assert out[0].labels == ["adds the tens"] and not out[0].failed
    assert out[1].char_spans == [] and "empty response" in out[1].errors[0]
    assert server.calls["ok"] == 1  # the empty response was not sent


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="model"):
        OpenAIAnnotator(AnnotatorClientConfig(base_url="http://x/v1", model=""))
    with pytest.raises(ConfigError, match="base_url"):
        AnnotatorClientConfig(base_url="x/v1", model="m")

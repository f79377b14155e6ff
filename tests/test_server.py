"""The generation server as a real process on 127.0.0.1 (real vLLM, CPU, fp32), driven through RolloutClient and
raw HTTP; transformers' Qwen3 is the reference. One server process serves the whole module.
"""

from __future__ import annotations

import gc
import weakref

import httpx
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

from safetensors.torch import load_file  # noqa: E402
from tiny_hf_model import hf_greedy, hf_logprobs, make_tiny_qwen3_dir  # noqa: E402

from megatron_trace.rollout.client import ClientConfig, RolloutClient  # noqa: E402
from megatron_trace.rollout.launch import ManagedServer  # noqa: E402
from megatron_trace.rollout.types import SamplingConfig  # noqa: E402
from megatron_trace.rollout.weight_buckets import (  # noqa: E402
    CHECKSUM_HEADER, COUNT_HEADER, INDEX_HEADER, PUSH_HEADER, VERSION_HEADER, encode_bucket,
)

TOKEN = "test-token-5f1c"
TOKEN_ENV = "TRACE_TEST_ROLLOUT_TOKEN"
PROMPTS = [[9707, 11, 1879, 0, 3555], [151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")  # untied: the in-process tests cover tied embeddings
    return {k: make_tiny_qwen3_dir(str(root / k), seed=s, tied=False) for k, s in (("a", 11), ("b", 12))}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv(TOKEN_ENV, TOKEN)  # ManagedServer sets it too; this undoes it after the module
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ManagedServer(models["a"], log_path=str(log), token_env=TOKEN_ENV, token=TOKEN, max_model_len=256,
                       kv_cache_memory_bytes=64 << 20, extra_args=["--max-request-bytes", str(1 << 20)],
                       extra_env={"OMP_NUM_THREADS": "1"}, start_timeout_s=180, die_with_parent=True) as managed:
        yield managed.url


@pytest.fixture(scope="module")
def client(server, monkeypatch_module):
    monkeypatch_module.setenv(TOKEN_ENV, TOKEN)
    with RolloutClient(ClientConfig(base_url=server, token_env=TOKEN_ENV, timeout_s=60, retries=1)) as c:
        yield c


def buckets_of(model_dir, size=4):
    items = sorted(load_file(f"{model_dir}/model.safetensors").items())
    return [items[i : i + size] for i in range(0, len(items), size)]


def assert_serves(client, hf_model, n_new=8):
    out = client.generate(PROMPTS, SamplingConfig(temperature=0.0, max_tokens=n_new))
    for prompt, gens in zip(PROMPTS, out):
        g = gens[0]
        assert g.token_ids == hf_greedy(hf_model, prompt, n_new)
        torch.testing.assert_close(torch.tensor(g.logprobs, dtype=torch.float64),
                                   hf_logprobs(hf_model, prompt, g.token_ids), atol=1e-4, rtol=0)
    return out


def begin(server, version):
    """Open a push to `version` over raw HTTP; its push id."""
    r = httpx.post(server + "/weights/begin", headers={VERSION_HEADER: str(version), "Authorization": f"Bearer {TOKEN}"},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["push_id"]


def push(server, push_id, index, data, digest, token=TOKEN):
    """One bucket of push `push_id` over raw HTTP."""
    headers = {PUSH_HEADER: push_id, INDEX_HEADER: str(index), CHECKSUM_HEADER: digest}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(server + "/weights", content=data, headers=headers, timeout=60)


def commit(server, push_id, count):
    """The last request of a push over raw HTTP: apply buckets 0..count-1."""
    headers = {PUSH_HEADER: push_id, COUNT_HEADER: str(count), "Authorization": f"Bearer {TOKEN}"}
    return httpx.post(server + "/weights/commit", headers=headers, timeout=60)


def test_generate_then_push_weights_over_http_then_generate_the_new_model(client, models, hf):
    client.update_weights(buckets_of(models["a"]))  # whatever ran before, serve model a
    v = client.version()
    assert_serves(client, hf["a"])
    assert client.update_weights(buckets_of(models["b"], size=3)) == v + 1 == client.version()
    out = assert_serves(client, hf["b"])
    assert all(g.weight_version == v + 1 for gens in out for g in gens)


def test_completions_are_openai_shaped_with_n_samples_per_prompt(server, models):
    from megatron_trace.data.tokenizer import load_tokenizer

    body = {"prompt": PROMPTS, "max_tokens": 5, "n": 3, "temperature": 1.0, "seed": 7, "logprobs": 0}
    r = httpx.post(server + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and len(out["choices"]) == 6
    assert sorted(c["index"] for c in out["choices"]) == list(range(6))
    tok = load_tokenizer(models["a"])
    for c in out["choices"]:
        assert len(c["token_ids"]) == len(c["logprobs"]["token_logprobs"]) == 5
        assert c["text"] == tok.decode(c["token_ids"])
    assert out["usage"]["completion_tokens"] == 30


def test_weight_route_needs_the_bearer_token(server, models, client):
    v = client.version()
    data, digest = encode_bucket(buckets_of(models["b"])[0])
    for token in (None, "wrong-token"):
        r = push(server, "any", 0, data, digest, token=token)
        assert r.status_code == 401 and "bearer token" in r.json()["error"]["message"]
        r = httpx.post(server + "/weights/begin", headers={VERSION_HEADER: str(v + 1)}, timeout=10)
        assert r.status_code == 401
    r = httpx.post(server + "/weights/commit", headers={PUSH_HEADER: "any", COUNT_HEADER: "1"}, timeout=10)
    assert r.status_code == 401
    r = httpx.post(server + "/sleep", timeout=10)
    assert r.status_code == 401
    assert client.version() == v


def test_a_corrupted_bucket_is_rejected_and_old_weights_keep_serving(server, client, models, hf):
    client.update_weights(buckets_of(models["a"]))
    v = client.version()
    encoded = [encode_bucket(b) for b in buckets_of(models["b"])]
    n = len(encoded)
    pid = begin(server, v + 1)
    assert push(server, pid, 0, *encoded[0]).json()["status"] == "staged"
    data, digest = encoded[1]
    corrupted = data[:-1] + bytes([data[-1] ^ 0xFF])  # one flipped byte in the tensor data
    r = push(server, pid, 1, corrupted, digest)
    assert r.status_code == 422 and "checksum mismatch" in r.json()["error"]["message"]
    # the update was discarded: later buckets and the commit find nothing to continue
    r = push(server, pid, 2, *encoded[2])
    assert r.status_code == 409 and "start with POST /weights/begin" in r.json()["error"]["message"]
    r = commit(server, pid, n)
    assert r.status_code == 409 and "none is open" in r.json()["error"]["message"]
    # a well-formed bucket with a tensor the model does not have is rejected as well
    bad = encode_bucket([("model.layers.7.mlp.up_proj.weight", torch.zeros(256, 128))])
    r = push(server, begin(server, v + 1), 0, *bad)
    assert r.status_code == 422 and "unknown weight" in r.json()["error"]["message"]
    assert client.version() == v
    assert_serves(client, hf["a"])
    # a stale target version is refused
    r = httpx.post(server + "/weights/begin", headers={VERSION_HEADER: str(v), "Authorization": f"Bearer {TOKEN}"},
                   timeout=60)
    assert r.status_code == 409 and "must exceed" in r.json()["error"]["message"]


def test_an_update_is_applied_only_by_a_commit_of_exactly_its_buckets(server, client, models, hf):
    client.update_weights(buckets_of(models["a"]))
    v = client.version()
    encoded = [encode_bucket(b) for b in buckets_of(models["b"])]
    n = len(encoded)
    pid = begin(server, v + 1)
    for i, e in enumerate(encoded):  # every bucket arrives, the commit never does: nothing changes
        assert push(server, pid, i, *e).json() == {"status": "staged", "push_id": pid, "weight_version": v,
                                                   "received": i + 1}
    assert client.version() == v
    assert_serves(client, hf["a"])
    r = commit(server, pid, n + 1)  # a count that does not match what arrived discards the update
    assert r.status_code == 409 and f"{n} are staged" in r.json()["error"]["message"]
    assert commit(server, pid, n).status_code == 409
    # a gap (bucket 2 right after bucket 0) discards it too
    pid = begin(server, v + 1)
    assert push(server, pid, 0, *encoded[0]).status_code == 200
    r = push(server, pid, 2, *encoded[2])
    assert r.status_code == 409 and "in order" in r.json()["error"]["message"]
    assert push(server, pid, 1, *encoded[1]).status_code == 409
    # a request of the old protocol (the count on every bucket) is refused, naming the change
    r = httpx.post(server + "/weights", content=encoded[0][0], timeout=60,
                   headers={VERSION_HEADER: str(v + 1), INDEX_HEADER: "0", COUNT_HEADER: str(n),
                            CHECKSUM_HEADER: encoded[0][1], "Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 400 and "/weights/commit" in r.json()["error"]["message"]
    assert client.version() == v
    # an abandoned push (no commit) blocks other pushers (409) until it is aborted or idles out
    pid = begin(server, v + 1)
    for i in range(n - 1):
        assert push(server, pid, i, *encoded[i]).status_code == 200
    r = httpx.post(server + "/weights/begin", headers={VERSION_HEADER: str(v + 1), "Authorization": f"Bearer {TOKEN}"},
                   timeout=60)
    assert r.status_code == 409 and "one push at a time" in r.json()["error"]["message"]
    # within a push bucket 0 starts afresh
    assert push(server, pid, 0, *encoded[0]).json()["received"] == 1
    for i in range(1, n):  # with a retried bucket, which replaces itself
        assert push(server, pid, i, *encoded[i]).status_code == 200
    assert push(server, pid, 1, *encoded[1]).json()["received"] == n
    assert commit(server, pid, n).json() == {"status": "applied", "push_id": pid, "weight_version": v + 1,
                                             "count": n}
    assert client.version() == v + 1
    assert_serves(client, hf["b"])


def test_the_client_streams_a_generator_one_bucket_at_a_time(server, client, models, hf):
    client.update_weights(buckets_of(models["a"]))
    v = client.version()
    source = buckets_of(models["b"], size=3)
    refs = []  # weak references to the tensors of every bucket produced so far
    log = []  # (request path, buckets produced when it was sent, buckets produced before still alive)

    def produce():
        for bucket in source:
            yield [(name, t.clone()) for name, t in bucket]  # fresh tensors, referenced only by the client

    def tracked():
        for b in produce():
            refs.append([weakref.ref(t) for _, t in b])
            yield b
            del b

    send = client._request

    def recording(method, path, **kw):
        if path.startswith("/weights"):
            gc.collect()
            log.append((path, len(refs), sum(any(r() is not None for r in rs) for rs in refs[:-1])))
        return send(method, path, **kw)

    client._request = recording
    try:
        assert client.update_weights(tracked()) == v + 1
    finally:
        del client._request
    n = len(source)
    assert [p for p, _, _ in log] == ["/weights/begin"] + ["/weights"] * n + ["/weights/commit"]
    assert [k for _, k, _ in log] == [0] + list(range(1, n + 1)) + [n]  # bucket i went before bucket i + 1 was made
    assert all(alive == 0 for _, _, alive in log)  # and nothing of earlier buckets was kept alive
    assert_serves(client, hf["b"])


def test_bad_requests_get_clear_json_errors(server):
    cases = [
        ({"prompt": "hello"}, 400, "token ids"),
        ({"prompt": [[1, 2], []]}, 400, "prompt[1]"),
        ({"prompt": [1] * 250, "max_tokens": 16}, 400, "max_model_len"),
        ({"prompt": [1, 2], "logprobs": 5}, 400, "logprobs"),
        ({"prompt": [1, 2], "temperature": "hot"}, 400, "temperature"),
    ]
    for body, status, needle in cases:
        r = httpx.post(server + "/v1/completions", json=body, timeout=30)
        assert r.status_code == status and needle in r.json()["error"]["message"], (body, r.text)
    r = httpx.post(server + "/v1/completions", content=b"[" + b"1," * (1 << 20) + b"1]", timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_nccl_update_announcement_is_validated_before_any_broadcast(server, models, client):
    # The GPU fast path itself cannot run on CPU; its HTTP half (auth, announcement check) can.
    metas = [[n, str(t.dtype).removeprefix("torch."), list(t.shape)] for b in buckets_of(models["b"]) for n, t in b]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    v = client.version()
    wrong = [m if i else [m[0], m[1], [m[2][0] + 1] + m[2][1:]] for i, m in enumerate(metas)]
    r = httpx.post(server + "/weights/nccl", headers=auth, timeout=30,
                   json={"version": v + 1, "tensors": wrong, "validate_only": True})
    assert r.status_code == 422 and "shape" in r.json()["error"]["message"]
    ok = httpx.post(server + "/weights/nccl", headers=auth, timeout=30,
                    json={"version": v + 1, "tensors": metas, "validate_only": True})
    assert ok.status_code == 200 and ok.json()["status"] == "valid" and ok.json()["push_id"]
    # the announcement holds the one-push slot until its transfer (or an abort): a second pusher gets 409
    r = httpx.post(server + "/weights/begin", headers={**auth, "X-Weight-Version": str(v + 1)}, timeout=30)
    assert r.status_code == 409 and "NCCL weight push" in r.json()["error"]["message"]
    r = httpx.post(server + "/weights/abort", headers={**auth, "X-Push-Id": ok.json()["push_id"]}, timeout=30)
    assert r.json()["status"] == "aborted"
    r = httpx.post(server + "/weights/nccl", timeout=30, json={"version": v + 1, "tensors": metas})
    assert r.status_code == 401
    r = httpx.post(server + "/weights/nccl/init", headers=auth, timeout=30,
                   json={"master_address": "127.0.0.1", "master_port": 29999, "world_size": 2})
    assert r.status_code == 400 and "CUDA" in r.json()["error"]["message"]
    assert client.version() == v

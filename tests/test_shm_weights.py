"""Node-local weight updates over /dev/shm: the segment format on its own, then the whole protocol against a real
generation server (vLLM, CPU, fp32) with transformers' Qwen3 as the reference. One server serves the module."""

from __future__ import annotations

import os

import httpx
import pytest
import torch

pytestmark = pytest.mark.slow

from megatron_trace.rollout.shm_weights import (
    SHM_DIR, BucketMapping, SegmentMaps, ShmBucketWriter, ShmProtocolError, bucket_layout,
)


def test_a_bucket_written_by_the_trainer_maps_bitwise_on_the_server_side():
    g = torch.Generator().manual_seed(0)
    bucket = [("a", torch.randn(3, 5, generator=g)), ("b", torch.randn(7, generator=g).to(torch.bfloat16)),
              ("c", torch.randn(2, 2, 2, generator=g).to(torch.float16))]
    writer = ShmBucketWriter()
    try:
        desc = writer.write(0, bucket)
        slots, nbytes = bucket_layout(bucket)
        assert desc["tensors"] == slots and desc["nbytes"] == nbytes
        assert [s[3] % 64 for s in slots] == [0, 0, 0]  # aligned offsets
        mapped = BucketMapping(desc, max_bytes=1 << 20).tensors
        for (n, t), (m, u) in zip(bucket, mapped):
            assert n == m and u.dtype == t.dtype and u.shape == t.shape
            assert torch.equal(u.view(torch.uint8), t.view(torch.uint8))  # bitwise
        # one copy on the server side is the load itself: the mapped tensors are views, not copies
        assert not mapped[0][1].is_set_to(bucket[0][1])
        path = os.path.join(SHM_DIR, desc["segment"])
        assert os.path.exists(path)
        # a segment that still holds an unreleased bucket is not reused; a released one is
        assert writer.write(1, bucket[:1])["segment"] != desc["segment"]
        writer.release([0])
        assert writer.write(2, bucket[:1])["segment"] == desc["segment"]
        assert writer.max_segments == 2
    finally:
        writer.close()
    assert not os.path.exists(path)  # close removes the segments


def test_kept_segment_mappings_are_reused_checked_and_still_say_when_a_bucket_is_released():
    import gc
    import weakref

    g = torch.Generator().manual_seed(1)
    writer, maps = ShmBucketWriter(), SegmentMaps(capacity=2)
    try:
        def mapped(index, bucket):
            m = BucketMapping(writer.write(index, bucket), max_bytes=1 << 24, maps=maps)
            writer.release([index])
            for (n, t), (k, u) in zip(bucket, m.tensors):
                assert n == k and torch.equal(u, t)  # the values written now, never the ones mapped before
            return m

        def mm(m):  # the mmap under a bucket's array
            return m.base.base.obj

        first = mapped(0, [("a", torch.randn(64, generator=g))])
        released = []
        weakref.finalize(first.base, released.append, 0)
        second = mapped(1, [("a", torch.randn(64, generator=g))])  # the same segment, its new content
        assert second.name == first.name and mm(second) is mm(first)  # one mapping, kept
        assert second.base is not first.base
        del first
        gc.collect()
        assert released == [0]  # the bucket's own array is collected although the mapping is kept
        grown = mapped(2, [("a", torch.randn(1 << 16, generator=g))])  # the segment grew: mapped again
        assert grown.name == second.name and mm(grown) is not mm(second)
        # a different file under the same name (another inode) is mapped again, not read through the old mapping
        path = os.path.join(SHM_DIR, grown.name)
        os.unlink(path)
        fresh = torch.arange(1 << 16, dtype=torch.float32)
        with open(path, "wb") as f:
            f.write(fresh.numpy().tobytes())
        desc = {"segment": grown.name, "nbytes": fresh.numel() * 4, "tensors": [["a", "float32", [1 << 16], 0]]}
        again = BucketMapping(desc, max_bytes=1 << 24, maps=maps)
        assert mm(again) is not mm(grown) and torch.equal(again.tensors[0][1], fresh)
        # at most `capacity` kept: two more segments push the oldest out
        writer.write(3, [("a", torch.ones(4))])  # holds its segment: the next bucket gets a new one
        other = BucketMapping(writer.write(4, [("b", torch.ones(4))]), max_bytes=1 << 24, maps=maps)
        third = BucketMapping(writer.write(5, [("c", torch.ones(4))]), max_bytes=1 << 24, maps=maps)
        assert len({grown.name, other.name, third.name}) == 3
        assert list(maps._maps) == [other.name, third.name]
        maps.clear()
        assert not maps._maps and torch.equal(third.tensors[0][1], torch.ones(4))  # views outlive the cache
    finally:
        writer.close()


@pytest.mark.parametrize("change, needle", [
    (lambda d: d.update(segment="../etc/passwd"), "expected a /dev/shm name"),
    (lambda d: d.update(segment="mtrace-w-1-ab-0"), "cannot open"),
    (lambda d: d.update(nbytes=1 << 30), "server's bucket limit"),
    (lambda d: d["tensors"][1].__setitem__(3, 8), "overlap"),
    (lambda d: d["tensors"][0].__setitem__(1, "int64"), "dtype"),
    (lambda d: d["tensors"][1].__setitem__(2, [10 ** 6]), "segment's end"),
])
def test_bad_descriptors_are_refused_naming_the_cause(change, needle):
    writer = ShmBucketWriter()
    try:
        desc = writer.write(0, [("a", torch.ones(4)), ("b", torch.ones(8))])
        change(desc)
        with pytest.raises(ShmProtocolError, match=needle):
            BucketMapping(desc, max_bytes=1 << 20)
    finally:
        writer.close()


# ------------------------------------------------------------------------------------------ against a real server

TOKEN = "shm-test-token-91"
TOKEN_ENV = "TRACE_TEST_SHM_TOKEN"
PROMPTS = [[9707, 11, 1879, 0, 3555], [151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    pytest.importorskip("vllm")
    from tiny_hf_model import make_tiny_qwen3_dir

    root = tmp_path_factory.mktemp("shm_models")
    return {k: make_tiny_qwen3_dir(str(root / k), seed=s, tied=t) for k, s, t in
            (("a", 31, True), ("b", 32, True))}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory, monkeypatch_module):
    from megatron_trace.rollout.launch import ManagedServer

    monkeypatch_module.setenv(TOKEN_ENV, TOKEN)
    log = tmp_path_factory.mktemp("shm_server") / "server.log"
    with ManagedServer(models["a"], log_path=str(log), token_env=TOKEN_ENV, token=TOKEN, max_model_len=256,
                       kv_cache_memory_bytes=64 << 20, extra_args=["--enable-sleep-mode"],
                       extra_env={"OMP_NUM_THREADS": "1"}, start_timeout_s=300, die_with_parent=True) as managed:
        yield managed


@pytest.fixture(scope="module")
def client(server):
    from megatron_trace.rollout.client import ClientConfig, RolloutClient

    with RolloutClient(ClientConfig(base_url=server.url, token_env=TOKEN_ENV, timeout_s=120, retries=0)) as c:
        yield c


@pytest.fixture(scope="module")
def hf(models):
    from transformers import Qwen3ForCausalLM

    return {k: Qwen3ForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for k, d in models.items()}


def bridge_order_buckets(model_dir, hf_config, size):
    """The checkpoint's tensors in the weight bridge's order (q, k, v adjacent), `size` per bucket."""
    from safetensors.torch import load_file

    from megatron_trace.checkpoint.hf_mapping import Qwen3Dims, hf_param_shapes

    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    order = [n for n in hf_param_shapes(Qwen3Dims.from_hf_config(hf_config)) if n in tensors]
    items = [(n, tensors[n]) for n in order]
    return [items[i:i + size] for i in range(0, len(items), size)]


def hf_config_of(model_dir):
    import json

    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


def assert_serves(client, hf_model, version, n_new=6):
    from tiny_hf_model import hf_greedy, hf_logprobs

    from megatron_trace.rollout.types import SamplingConfig

    out = client.generate(PROMPTS, SamplingConfig(temperature=0.0, max_tokens=n_new))
    for prompt, gens in zip(PROMPTS, out):
        g = gens[0]
        assert g.token_ids == hf_greedy(hf_model, prompt, n_new) and g.weight_version == version
        torch.testing.assert_close(torch.tensor(g.logprobs, dtype=torch.float64),
                                   hf_logprobs(hf_model, prompt, g.token_ids), atol=1e-4, rtol=0)


def push(client, model_dir, version, size=3):
    from megatron_trace.sync.shm_push import ShmPusher, announce_model

    cfg = hf_config_of(model_dir)
    pusher = ShmPusher([client])
    try:
        count = pusher.load(bridge_order_buckets(model_dir, cfg, size), version, announce_model(cfg, torch.float32))
        return pusher, count
    except BaseException:
        pusher.close()
        raise


def test_an_update_through_shared_memory_is_served_only_after_the_commit(client, models, hf):
    from megatron_trace.sync.shm_push import announce_model, commit_all

    v = client.version()
    pusher, count = push(client, models["b"], v + 1, size=6)
    try:
        assert count == 4
        # loaded, not committed: the server keeps its version and refuses to generate rather than serve a
        # version it was not told to
        assert client.version() == v
        r = httpx.post(client.cfg.base_url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 409 and "not committed" in r.json()["error"]["message"]
        assert commit_all([client], v + 1) == v + 1 == client.version()
        assert_serves(client, hf["b"], v + 1)
        # <= 2 segments alive on the trainer side: vLLM let go of each bucket by the time the next-but-one came
        # (it keeps a tensor for a few more, e.g. q until v and its weight-group look-ahead, so this holds for
        # buckets of more than a few tensors, as the bridge's are)
        assert pusher.writer.max_segments == 2
        assert set(pusher.stats) >= {"export", "handoff", "load", "finish"}
        # the CPU engine took the in-place path (cpu_refit.py): every linear packed once from the new bytes, the
        # embedding and norms copied into the live weights, nothing through vLLM's checkpoint-format reload
        (refit,) = pusher.refit
        assert refit is not None and refit["packed_bytes"] > 0 and refit["copied_bytes"] > 0, refit
        assert refit["reuses_freed_memory"] is True  # the CPU server keeps freed pages for its re-packing
        # and back to model a (a second update reuses the segments)
        pusher.load(bridge_order_buckets(models["a"], hf_config_of(models["a"]), 5), v + 2,
                    announce_model(hf_config_of(models["a"]), torch.float32))
        commit_all([client], v + 2)
        assert_serves(client, hf["a"], v + 2)
    finally:
        pusher.close()


def _auth():
    return {"Authorization": f"Bearer {TOKEN}"}


def test_a_bad_announcement_changes_nothing_and_a_bad_bucket_stops_serving_until_a_full_update(client, models, hf):
    from megatron_trace.sync.shm_push import ShmPusher, ShmPushError, announce_model, commit_all

    url = client.cfg.base_url
    v = client.version()
    cfg = hf_config_of(models["b"])
    tensors = announce_model(cfg, torch.float32)
    wrong = [tensors[0][:2] + [[tensors[0][2][0] + 1] + tensors[0][2][1:]]] + tensors[1:]
    r = httpx.post(url + "/weights/shm/begin", json={"version": v + 1, "tensors": wrong}, headers=_auth(), timeout=60)
    assert r.status_code == 422 and "shape" in r.json()["error"]["message"]
    r = httpx.post(url + "/weights/shm/begin", json={"version": v, "tensors": tensors}, headers=_auth(), timeout=60)
    assert r.status_code == 409 and "must exceed" in r.json()["error"]["message"]
    r = httpx.post(url + "/weights/shm/begin", json={"version": v + 1, "tensors": tensors}, timeout=60)
    assert r.status_code == 401
    assert client.version() == v
    assert_serves(client, hf["a"], v)  # nothing was loaded

    # a bucket whose tensor does not match the announcement is refused, naming it; the update is aborted
    buckets = bridge_order_buckets(models["b"], cfg, 4)
    buckets[2] = [(n, t.to(torch.float16)) if i == 0 else (n, t) for i, (n, t) in enumerate(buckets[2])]
    pusher = ShmPusher([client])
    try:
        drawn = []

        def tracked():
            for b in buckets:
                drawn.append(1)
                yield b

        with pytest.raises(ShmPushError, match=r"bucket 2 .*float16.*announced as float32") as err:
            pusher.load(tracked(), v + 1, tensors)
        assert err.value.url == url and len(drawn) == len(buckets)  # named, and the iterable was drained
        assert client.version() == v
        r = httpx.post(url + "/weights/shm/commit", json={"version": v + 1}, headers=_auth(), timeout=60)
        assert r.status_code == 409
        # buckets 0-1 reached vLLM: the engine refuses to generate (never a mix of two models) ...
        r = httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2}, timeout=60)
        assert r.status_code == 409 and "failed" in r.json()["error"]["message"]
        # ... until a complete update is committed
        pusher.load(bridge_order_buckets(models["b"], cfg, 4), v + 1, tensors)
        commit_all([client], v + 1)
        assert_serves(client, hf["b"], v + 1)
    finally:
        pusher.close()


def test_sleep_and_wake_up_are_accepted_on_cpu_cost_nothing_and_say_so(server, client, models, hf):
    v = client.version()
    r = httpx.post(server.url + "/sleep?level=2", headers=_auth(), timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "asleep"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2}, timeout=60)
    assert r.status_code == 409 and "asleep" in r.json()["error"]["message"]
    assert httpx.post(server.url + "/wake_up", headers=_auth(), timeout=60).status_code == 200
    assert client.version() == v
    with open(server.log_path) as f:
        log = f.read()
    assert "CPU engine, no accelerator memory to free (costs nothing)" in log
    assert "CPU engine, nothing to re-allocate (costs nothing)" in log

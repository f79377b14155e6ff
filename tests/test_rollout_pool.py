"""EnginePool: several generation servers in data parallel behind one GenerationEngine.

Protocol-level tests run against scripted HTTP servers on 127.0.0.1 (no vLLM): how prompts are split and
reassembled, progress, the one-bucket-alive weight push to every server, failures named by URL with the
collective bucket generator drained, start_engine over external URLs, config validation. The last tests start
two real generation servers (vLLM CPU build, tiny Qwen3) through start_engine with rollout.num_servers=2 and
check that the pool samples exactly what one server samples, and that a pushed update reaches both.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from test_rollout_client import ScriptedServer, tracked_buckets
from tiny_hf_model import hf_greedy, hf_logprobs, load_hf_model

from megatron_trace.config import ConfigError, load_config
from megatron_trace.distributed.setup import free_ports
from megatron_trace.rollout import launch
from megatron_trace.rollout.client import ClientConfig, RolloutClient, RolloutServerError
from megatron_trace.rollout.pool import EnginePool, EnginePoolError, split_balanced
from megatron_trace.rollout.types import SamplingConfig
from megatron_trace.rollout.weight_buckets import COUNT_HEADER, INDEX_HEADER, VERSION_HEADER

EXAMPLE = "examples/configs/tiny_cpu.yaml"
TOKEN_ENV = "TRACE_TEST_POOL_TOKEN"


def _closed_port() -> int:
    return free_ports(1)[0]  # closed again on return: nothing listens there


def completion_server(tag: int):
    """Answers completions with token_ids = [tag] + the prompt reversed + [sample index]; records the bodies."""
    bodies = []

    def script(method, path, body, k):
        if path != "/v1/completions":
            return 200, {"status": "ok"}, 0
        req = json.loads(body)
        bodies.append(req)
        choices = [{"index": i * req["n"] + j, "token_ids": [tag] + p[::-1] + [j], "finish_reason": "length",
                    "logprobs": {"token_logprobs": [-0.5] * (len(p) + 2)}}
                   for i, p in enumerate(req["prompt"]) for j in range(req["n"])]
        return 200, {"choices": choices, "weight_version": 3}, 0.02

    srv = ScriptedServer(script)
    srv.bodies = bodies
    return srv


class PoolWeightServer:
    """The weight routes of a scripted server: serving `version`; a commit applies the target version it names.
    fail: {("bucket", index) | ("commit", None): HTTP status} answered instead of success. on_weights(server,
    path, headers) is called as each weight request arrives."""

    def __init__(self, version=4, fail=None, on_weights=None):
        self.version, self.fail, self.on_weights = version, fail or {}, on_weights or (lambda *a: None)
        self.srv = ScriptedServer(self.script)
        self.url = self.srv.url

    def script(self, method, path, body, k):
        if path == "/version":
            return 200, {"weight_version": self.version}, 0
        if path in ("/health",):
            return 200, {"status": "ok"}, 0
        headers = self.srv.headers[k - 1]
        self.on_weights(self, path, headers)
        if path == "/weights/begin":
            return 200, {"status": "open", "push_id": f"push-{k}", "version": int(headers[VERSION_HEADER])}, 0
        if path == "/weights/abort":
            return 200, {"status": "aborted"}, 0
        if path == "/weights":
            if ("bucket", int(headers[INDEX_HEADER])) in self.fail:
                return self.fail[("bucket", int(headers[INDEX_HEADER]))], {"error": {"message": "bad bucket"}}, 0
            return 200, {"status": "staged"}, 0
        if path == "/weights/commit":
            if ("commit", None) in self.fail:
                return self.fail[("commit", None)], {"error": {"message": "commit refused"}}, 0
            self.version = int(headers[VERSION_HEADER])
            return 200, {"status": "applied", "weight_version": self.version, "count": int(headers[COUNT_HEADER])}, 0
        return 404, {"error": {"message": path}}, 0

    def weight_paths(self):
        return [p for _, p in self.srv.requests if p.startswith("/weights")]

    def close(self):
        self.srv.close()


def pool_of(*urls, **cfg):
    return EnginePool([RolloutClient(ClientConfig(base_url=u, token_env=TOKEN_ENV, timeout_s=10, backoff_s=0.02,
                                                  **cfg)) for u in urls])


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "t0k")


def test_split_is_contiguous_and_balanced():
    assert split_balanced(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert split_balanced(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert split_balanced(0, 2) == [(0, 0), (0, 0)]
    for n in range(12):
        sizes = [b - a for a, b in split_balanced(n, 4)]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1


# ---------------------------------------------------------------------------------------------- generate


def test_generate_splits_prompts_over_the_servers_keeps_prompt_order_and_the_seed():
    servers = [completion_server(tag) for tag in (100, 200)]
    prompts = [[i, i + 1, i + 2] for i in range(5)]
    try:
        with pool_of(*(s.url for s in servers), prompts_per_request=1, concurrency=1) as pool:
            out = pool.generate(prompts, SamplingConfig(n=2, max_tokens=4, seed=77))
        # share 0 = prompts 0..2 on the first server, share 1 = prompts 3..4 on the second, one request each
        assert [b["prompt"] for b in servers[0].bodies] == [[p] for p in prompts[:3]]
        assert [b["prompt"] for b in servers[1].bodies] == [[p] for p in prompts[3:]]
        assert all(b["seed"] == 77 and b["n"] == 2 for s in servers for b in s.bodies)
        tags = [100] * 3 + [200] * 2
        assert [[g.token_ids for g in gens] for gens in out] == \
            [[[t] + p[::-1] + [0], [t] + p[::-1] + [1]] for t, p in zip(tags, prompts)]
    finally:
        for s in servers:
            s.close()


def test_fewer_prompts_than_servers_leaves_the_rest_idle_and_no_prompts_sends_nothing():
    servers = [completion_server(tag) for tag in (1, 2, 3)]
    try:
        with pool_of(*(s.url for s in servers)) as pool:
            out = pool.generate([[5, 6], [7]], SamplingConfig(max_tokens=2))
            assert [gens[0].token_ids for gens in out] == [[1, 6, 5, 0], [2, 7, 0]]
            assert pool.generate([], SamplingConfig()) == []
        assert [len(s.bodies) for s in servers] == [1, 1, 0]
    finally:
        for s in servers:
            s.close()


def test_progress_sums_the_prompts_finished_on_every_server():
    servers = [completion_server(tag) for tag in (1, 2)]
    try:
        with pool_of(*(s.url for s in servers), prompts_per_request=1, concurrency=2) as pool:
            seen = []
            pool.on_progress = lambda done, total: seen.append((done, total))
            pool.generate([[i + 1] for i in range(7)], SamplingConfig(max_tokens=2))
        assert [d for d, _ in seen] == list(range(1, 8))  # one report per finished request, over both servers
        assert {t for _, t in seen} == {7}
    finally:
        for s in servers:
            s.close()


def test_a_failing_server_is_named_by_url_in_the_generate_error():
    good = completion_server(1)
    bad = ScriptedServer(lambda m, p, b, k: (400, {"error": {"message": "prompt too long"}}, 0))
    try:
        with pool_of(good.url, bad.url) as pool:
            with pytest.raises(EnginePoolError, match=rf"{bad.url}.*HTTP 400: prompt too long") as e:
                pool.generate([[1], [2]], SamplingConfig(max_tokens=2))
        assert list(e.value.failed) == [bad.url] and e.value.status == 400
    finally:
        good.close()
        bad.close()


# ---------------------------------------------------------------------------------------------- weights


def test_each_bucket_reaches_every_server_before_the_next_is_drawn_one_bucket_alive(token):
    n = 4
    refs = []  # weakrefs to the tensors of each bucket produced
    dead_before = []  # for each bucket produced: were all earlier buckets' tensors already freed?
    arrivals = []  # (server index, path, bucket index, buckets produced so far)

    def on_weights(server, path, headers):
        arrivals.append((servers.index(server), path, headers.get(INDEX_HEADER), len(refs)))

    servers = [PoolWeightServer(version=v, on_weights=on_weights) for v in (4, 6, 5)]
    try:
        with pool_of(*(s.url for s in servers)) as pool:
            assert pool.update_weights(tracked_buckets(n, refs, dead_before)) == 7  # the highest serving version + 1, for all of them
            assert pool.versions() == [7, 7, 7] and pool.version() == 7
        for i in range(n):  # bucket i arrived at all three servers while exactly i + 1 buckets had been produced
            got = sorted((s, produced) for s, path, idx, produced in arrivals if path == "/weights" and idx == str(i))
            assert got == [(0, i + 1), (1, i + 1), (2, i + 1)]
        commits = [(s, produced) for s, path, _, produced in arrivals if path == "/weights/commit"]
        assert sorted(commits) == [(0, n), (1, n), (2, n)]
        assert dead_before == [True] * n  # the pool kept nothing of a bucket once all servers had it
        for s in servers:
            assert s.weight_paths() == ["/weights/begin"] + ["/weights"] * n + ["/weights/commit"]
    finally:
        for s in servers:
            s.close()


def test_a_failed_bucket_aborts_everywhere_names_the_server_and_drains_the_generator(token):
    produced = []

    def buckets():  # stands in for the bridge's collective generator, which every rank runs to its end
        for i in range(5):
            produced.append(i)
            yield [(f"w{i}", torch.zeros(3))]

    good, bad = PoolWeightServer(), PoolWeightServer(fail={("bucket", 1): 422})
    try:
        with pool_of(good.url, bad.url) as pool:
            with pytest.raises(EnginePoolError, match=rf"aborted at bucket 1: {bad.url} failed .*HTTP 422: bad "
                                                      r"bucket.*no engine was committed") as e:
                pool.update_weights(buckets())
        assert list(e.value.failed) == [bad.url] and e.value.applied == []
        assert produced == [0, 1, 2, 3, 4]
        # no commit anywhere, and the pushes begun are closed
        assert good.weight_paths() == bad.weight_paths() == ["/weights/begin"] + ["/weights"] * 2 + ["/weights/abort"]
        assert good.version == bad.version == 4
    finally:
        good.close()
        bad.close()


def test_a_failed_commit_names_the_server_and_the_ones_that_applied(token):
    good, bad = PoolWeightServer(), PoolWeightServer(fail={("commit", None): 500})
    try:
        with pool_of(good.url, bad.url, retries=0) as pool:
            with pytest.raises(EnginePoolError, match=rf"commit failed on {bad.url} .*HTTP 500: commit refused.*"
                                                      rf"applied on {good.url}") as e:
                pool.update_weights([[("w", torch.zeros(2))], [("v", torch.zeros(2))]])
        assert list(e.value.failed) == [bad.url] and e.value.applied == [good.url]
        assert good.version == 5 and bad.version == 4
    finally:
        good.close()
        bad.close()


def test_an_unreachable_server_is_named_and_the_generator_still_drained(token):
    produced = []

    def buckets():
        for i in range(3):
            produced.append(i)
            yield [(f"w{i}", torch.zeros(2))]

    good = PoolWeightServer()
    dead = f"http://127.0.0.1:{_closed_port()}"
    try:
        with pool_of(good.url, dead, retries=0) as pool:
            with pytest.raises(EnginePoolError, match=dead):
                pool.update_weights(buckets())
        assert produced == [0, 1, 2] and good.weight_paths() == []
    finally:
        good.close()


def test_no_token_fails_before_any_bucket_is_sent(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    a, b = PoolWeightServer(), PoolWeightServer()
    try:
        with pool_of(a.url, b.url) as pool:
            with pytest.raises(RolloutServerError, match=rf"\${TOKEN_ENV}"):
                pool.update_weights([[("w", torch.zeros(2))]])
        assert a.weight_paths() == b.weight_paths() == []
    finally:
        a.close()
        b.close()


def test_an_empty_update_is_refused_without_a_commit(token):
    a, b = PoolWeightServer(), PoolWeightServer()
    try:
        with pool_of(a.url, b.url) as pool:
            with pytest.raises(ValueError, match="at least one bucket"):
                pool.update_weights(iter([]))
        assert a.weight_paths() == b.weight_paths() == ["/weights/begin", "/weights/abort"]  # no commit
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------------------------- start_engine, config


def _no_export(_dir):
    raise AssertionError("external servers need no exported model")


def test_start_engine_uses_the_listed_external_servers(token):
    a, b = PoolWeightServer(), PoolWeightServer()
    try:
        cfg = load_config(EXAMPLE, [f"rollout.server_urls=[{a.url},{b.url}]", f"rollout.server_token_env={TOKEN_ENV}"])
        engine = launch.start_engine(cfg, _no_export)
        assert isinstance(engine, EnginePool) and engine.urls == [a.url, b.url]
        engine.close()
        assert launch.start_engine(cfg, _no_export, driver=False) is None
        for key in ("server_urls", "server_url"):  # one server: a plain client, whichever field names it
            cfg = load_config(EXAMPLE, [f"rollout.{key}={[a.url] if key == 'server_urls' else a.url}"])
            engine = launch.start_engine(cfg, _no_export)
            assert isinstance(engine, RolloutClient) and engine.cfg.base_url == a.url
            engine.close()
        dead = f"http://127.0.0.1:{_closed_port()}"
        cfg = load_config(EXAMPLE, [f"rollout.server_urls=[{a.url},{dead}]"])
        with pytest.raises(EnginePoolError, match=dead):
            launch.start_engine(cfg, _no_export)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("overrides, field", [
    (["rollout.server_url=http://a:1", "rollout.server_urls=[http://b:2]"], r"rollout\.server_urls: .*server_url"),
    (["rollout.num_servers=0"], r"rollout\.num_servers"),
    (["rollout.server_urls=[http://a:1,a:2]"], r"rollout\.server_urls\[1\]"),
    (["rollout.server_urls=[http://a:1,http://a:1]"], r"rollout\.server_urls: .*twice"),
    (["rollout.server_urls=[http://a:1,http://b:2]", "rollout.num_servers=2"], r"rollout\.num_servers"),
    (["rollout.server_url=http://a:1", "rollout.server_gpus=['0']"], r"rollout\.server_gpus"),
    (["rollout.num_servers=2", "rollout.server_gpus=['0']"], r"rollout\.server_gpus"),
    (["rollout.num_servers=2", "rollout.server_gpus=[0,1]"], r"rollout\.server_gpus\[0\]"),
    (["rollout.num_servers=2", "rollout.engine=inprocess"], r"rollout\.num_servers"),
    (["rollout.server_url=localhost:8100"], r"rollout\.server_url:"),
])
def test_bad_pool_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(EXAMPLE, overrides)


def test_good_pool_configs_load():
    cfg = load_config(EXAMPLE, ["rollout.server_urls=[http://n5:8100,http://n6:8100]"]).rollout
    assert cfg.external_urls == ["http://n5:8100", "http://n6:8100"] and cfg.num_servers == 1
    assert load_config(EXAMPLE, ["rollout.server_url=http://n5:8100"]).rollout.external_urls == ["http://n5:8100"]
    cfg = load_config(EXAMPLE, ["rollout.num_servers=2", "rollout.server_gpus=['6','7']"]).rollout
    assert cfg.external_urls == [] and cfg.server_gpus == ["6", "7"]


# ---------------------------------------------------------------------------------------------- real servers

PROMPTS = [[9707, 11, 1879, 0, 3555], [151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30], [40, 1079, 264],
           [785, 4226, 374, 220, 19], [3838, 220, 18, 9, 19, 30, 220]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    pytest.importorskip("vllm")
    from tiny_hf_model import make_tiny_qwen3_dir

    root = tmp_path_factory.mktemp("pool_models")
    return {k: make_tiny_qwen3_dir(str(root / k), seed=s, tied=False) for k, s in (("a", 21), ("b", 22))}


@pytest.fixture(scope="module")
def real_pool(models, tmp_path_factory, monkeypatch_module):
    """Two real generation servers of model a, started by start_engine (rollout.num_servers=2)."""
    monkeypatch_module.setenv(TOKEN_ENV, "pool-test-token")

    class TestServer(launch.ManagedServer):  # one thread each on this small machine; gone if pytest is killed
        def __init__(self, *args, extra_env=None, **kw):
            super().__init__(*args, extra_env={**(extra_env or {}), "OMP_NUM_THREADS": "1"}, die_with_parent=True,
                             **kw)

    monkeypatch_module.setattr(launch, "ManagedServer", TestServer)
    out = tmp_path_factory.mktemp("pool_run")
    cfg = load_config(EXAMPLE, [f"logging.output_dir={out}", "rollout.num_servers=2", "rollout.max_model_len=256",
                                f"rollout.server_token_env={TOKEN_ENV}", "rollout.server_start_timeout_s=300"])
    pool = launch.start_engine(cfg, lambda d: shutil.copytree(models["a"], d))
    try:
        yield pool, out
    finally:
        pool.close()


@pytest.mark.slow
def test_two_real_servers_sample_exactly_what_one_server_samples(real_pool):
    pool, out_dir = real_pool
    assert isinstance(pool, EnginePool) and len(pool) == 2 and len(set(pool.urls)) == 2
    assert all(os.path.isfile(out_dir / f"rollout_server.{i}.log") for i in range(2))
    shares = []  # (server, prompts) as the pool hands them out
    for i, engine in enumerate(pool.engines):
        real = engine.generate
        engine.generate = lambda prompts, sampling, i=i, real=real: (shares.append((i, prompts)),
                                                                      real(prompts, sampling))[1]
    sampling = SamplingConfig(temperature=1.0, n=2, max_tokens=8, seed=1234)
    got = pool.generate(PROMPTS, sampling)
    assert sorted(shares) == [(0, PROMPTS[:3]), (1, PROMPTS[3:])]
    for engine in pool.engines:  # each server alone, on all the prompts, with the same seed
        alone = engine.client.generate(PROMPTS, sampling)
        for gens, ref in zip(got, alone):
            assert [g.token_ids for g in gens] == [r.token_ids for r in ref]
            for g, r in zip(gens, ref):
                torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(r.logprobs), atol=1e-5, rtol=0)
    assert len({tuple(g.token_ids) for gens in got for g in gens}) > 1  # really sampled, not a constant
    again = pool.generate(PROMPTS, sampling)
    assert [[g.token_ids for g in gens] for gens in again] == [[g.token_ids for g in gens] for gens in got]


@pytest.mark.slow
def test_a_pushed_update_reaches_both_real_servers(real_pool, models):
    from safetensors.torch import load_file

    pool, _ = real_pool
    before = pool.version()
    items = sorted(load_file(f"{models['b']}/model.safetensors").items())
    version = pool.update_weights(items[i : i + 3] for i in range(0, len(items), 3))
    assert version == before + 1 and pool.versions() == [version, version]
    hf_b = load_hf_model(models["b"])
    greedy = SamplingConfig(temperature=0.0, max_tokens=6)
    for engine in pool.engines:  # each server on its own now serves model b
        for prompt, gens in zip(PROMPTS[:2], engine.client.generate(PROMPTS[:2], greedy)):
            assert gens[0].token_ids == hf_greedy(hf_b, prompt, 6) and gens[0].weight_version == version
            torch.testing.assert_close(torch.tensor(gens[0].logprobs, dtype=torch.float64),
                                       hf_logprobs(hf_b, prompt, gens[0].token_ids), atol=1e-4, rtol=0)
    out = pool.generate(PROMPTS, greedy)  # and so does the pool, on both shares
    assert [gens[0].token_ids for gens in out] == [hf_greedy(hf_b, p, 6) for p in PROMPTS]

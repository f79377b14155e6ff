"""Hardening on the real vLLM engine (CPU, tiny Qwen3): the seed >= 2^64 wedge, cancellation that leaves nothing
running, non-finite weights refused, and a generation server that dies with its trainer (kill -9) even while
busy. One in-process engine serves the module; one server process is started for the kill -9 case.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

from fastapi.testclient import TestClient  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_hf_model import make_tiny_qwen3_dir  # noqa: E402

from megatron_trace.rollout import engine as engine_mod  # noqa: E402
from megatron_trace.rollout.engine import (  # noqa: E402
    EngineConfig, GenerationCancelled, VLLMEngine, WeightUpdateError,
)
from megatron_trace.rollout.server import build_app  # noqa: E402
from megatron_trace.rollout.types import SamplingConfig  # noqa: E402
from megatron_trace.rollout.weight_buckets import (  # noqa: E402
    CHECKSUM_HEADER, COUNT_HEADER, INDEX_HEADER, PUSH_HEADER, VERSION_HEADER, encode_bucket,
)
from proc_tree import children_of  # noqa: E402

GREEDY = SamplingConfig(temperature=0.0, max_tokens=6)
PROMPT = [9707, 11, 1879, 0, 3555]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen3_dir(str(tmp_path_factory.mktemp("m") / "a"), seed=21, tied=False)


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = VLLMEngine(EngineConfig(model_dir, max_model_len=256))
    yield eng
    eng.close()


def weights(model_dir):
    items = sorted(load_file(f"{model_dir}/model.safetensors").items())
    return [items[i : i + 4] for i in range(0, len(items), 4)]


def test_a_request_vllm_half_adds_before_raising_does_not_wedge_the_engine(engine, model_dir, monkeypatch):
    ref = engine.generate([PROMPT], GREEDY)[0][0].token_ids
    # The schema refuses seed >= 2^63 now; the engine must survive such a request anyway (vLLM registers it in
    # its output processor, then fails to seed the generator: before, every later generate spun forever).
    real = engine_mod._sampling_params
    monkeypatch.setattr(engine_mod, "_sampling_params", lambda s: _with_seed(real(SamplingConfig(max_tokens=4)),
                                                                             2**64))
    with pytest.raises(Exception, match="long"):  # vLLM's "Overflow when unpacking long long"
        engine.generate([PROMPT], SamplingConfig(max_tokens=4))
    monkeypatch.setattr(engine_mod, "_sampling_params", real)
    assert not engine._llm.llm_engine.has_unfinished_requests()
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("out", engine.generate([PROMPT], GREEDY)))
    t.start()
    t.join(120)
    assert not t.is_alive() and done["out"][0][0].token_ids == ref
    v = engine.weight_version
    assert engine.update_weights(weights(model_dir)) == v + 1  # the commit that used to hang
    with pytest.raises(ValueError, match=r"seed=18446744073709551616 must be in \[0, 2\^63\)"):
        engine.generate([PROMPT], SamplingConfig(max_tokens=4, seed=2**64))


def _with_seed(params, seed):
    params.seed = seed
    return params


def test_over_http_the_seed_and_out_of_vocabulary_ids_are_400s_and_the_server_keeps_serving(engine, model_dir):
    c = TestClient(build_app(engine, model_name="m", token="t"), raise_server_exceptions=False)
    for body, needle in (({"prompt": PROMPT, "seed": 2**64}, "seed:"),
                         ({"prompt": [engine.vocab_size]}, "outside the vocabulary"),
                         ({"prompt": PROMPT, "stop_token_ids": [10**9]}, "stop_token_ids:")):
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0.0})
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == engine.generate([PROMPT], GREEDY)[0][0].token_ids
    auth = {"Authorization": "Bearer t"}
    v = engine.weight_version
    pid = c.post("/weights/begin", headers={**auth, VERSION_HEADER: str(v + 1)}).json()["push_id"]
    for i, b in enumerate(weights(model_dir)):
        data, digest = encode_bucket(b)
        r = c.post("/weights", content=data, headers={**auth, PUSH_HEADER: pid, INDEX_HEADER: str(i),
                                                       CHECKSUM_HEADER: digest})
        assert r.status_code == 200, r.text
    r = c.post("/weights/commit", headers={**auth, PUSH_HEADER: pid, COUNT_HEADER: str(i + 1)})
    assert r.status_code == 200 and r.json()["weight_version"] == v + 1


def test_a_cancelled_generation_is_aborted_in_vllm_and_the_next_call_runs_at_once(engine):
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(GenerationCancelled, match="cancelled by the caller"):
        engine.generate([PROMPT] * 16, SamplingConfig(max_tokens=240, n=2), cancel=cancel)
    assert time.monotonic() - t0 < 30 and not engine._llm.llm_engine.has_unfinished_requests()
    with pytest.raises(GenerationCancelled, match="deadline") as e:
        engine.generate([PROMPT] * 16, SamplingConfig(max_tokens=240, n=2), deadline=time.monotonic() + 1.0)
    assert e.value.timed_out and not engine._llm.llm_engine.has_unfinished_requests()
    assert engine.stalled_s() == 0.0  # idle: the watchdog does not fire
    t0 = time.monotonic()
    assert len(engine.generate([PROMPT], GREEDY)[0][0].token_ids) == 6
    assert time.monotonic() - t0 < 30


def test_non_finite_weights_are_refused_and_the_old_weights_keep_serving(engine, model_dir):
    before = engine.generate([PROMPT], GREEDY)[0][0].token_ids
    v = engine.weight_version
    bad = weights(model_dir)
    name, t = bad[1][0]
    bad[1][0] = (name, t.clone().fill_(float("nan")))
    with pytest.raises(WeightUpdateError, match=f"{name}.*non-finite"):
        engine.update_weights(bad)
    assert engine.weight_version == v and engine.generate([PROMPT], GREEDY)[0][0].token_ids == before
    half = [[(n, t.to(torch.bfloat16)) for n, t in b] for b in weights(model_dir)]
    with pytest.raises(WeightUpdateError, match="dtype torch.bfloat16, the engine serves torch.float32"):
        engine.update_weights(half)


def test_streamed_updates_of_an_untied_model_are_copied_in_place_and_served(engine, model_dir, tmp_path_factory):
    """The in-place refit (rollout/cpu_refit.py) of an untied model: the head's own weight is copied while its
    kernel is re-packed from the new tensor on a second thread; the linear layers re-packed from the stream. To
    model b, then back to a (the second refit re-packs where the first's kernels were)."""
    from tiny_hf_model import hf_greedy, hf_logprobs
    from transformers import Qwen3ForCausalLM

    other = make_tiny_qwen3_dir(str(tmp_path_factory.mktemp("m") / "b"), seed=22, tied=False)
    for d in (other, model_dir):
        v = engine.weight_version
        engine.load_weights_stream(iter(sorted(load_file(f"{d}/model.safetensors").items())), v + 1)
        refit = engine.last_refit
        assert refit is not None and refit["packed_bytes"] > 0 and refit["copied_bytes"] > 0, refit
        assert engine.commit_loaded_weights(v + 1) == v + 1
        hf = Qwen3ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        out = engine.generate([PROMPT], GREEDY)[0][0]
        assert out.token_ids == hf_greedy(hf, PROMPT, GREEDY.max_tokens)
        torch.testing.assert_close(torch.tensor(out.logprobs, dtype=torch.float64),
                                   hf_logprobs(hf, PROMPT, out.token_ids), atol=1e-4, rtol=0)


def test_a_busy_server_dies_with_its_trainer_killed_by_sigkill(model_dir, tmp_path):
    """The trainer's launcher (ManagedServer with its defaults) in a parent process; SIGKILL the parent while the
    server generates a long request: the server is gone within the bounded shutdown (before: it ran on, reparented
    to init, and a busy one ignored SIGTERM). The parent also holds the checkpoint writer's results queue, as a
    trainer does after its first save: no child of the killed parent survives, the queue's manager included."""
    info = tmp_path / "info"
    parent = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from megatron_trace.rollout.launch import ManagedServer
        s = ManagedServer({model_dir!r}, log_path={str(tmp_path / 'server.log')!r}, max_model_len=256,
                          token="k", extra_env={{"OMP_NUM_THREADS": "1"}}, start_timeout_s=240)
        from megatron_trace.train.checkpointing import _install_write_results_queue
        _install_write_results_queue()
        open({str(info)!r}, "w").write(f"{{s.url}} {{s.proc.pid}}")
        time.sleep(3600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], env={**os.environ, "PYTHONPATH": os.getcwd()})
    server_pid = None
    try:
        deadline = time.monotonic() + 300
        while not info.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
        assert info.exists(), (tmp_path / "server.log").read_text()[-3000:]
        url, pid = info.read_text().split()
        server_pid = int(pid)
        busy = threading.Thread(target=lambda: _quietly(lambda: httpx.post(
            url + "/v1/completions", json={"prompt": [[1, 2, 3]] * 16, "n": 2, "max_tokens": 240}, timeout=120)))
        busy.start()
        time.sleep(3)
        children = children_of(proc.pid)
        assert server_pid in children and len(children) >= 2, children  # the server and the results manager
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t0 = time.monotonic()
        while any(_alive(c) for c in children) and time.monotonic() - t0 < 60:
            time.sleep(0.5)
        assert not _alive(server_pid), "the server outlived its killed parent"
        assert not [c for c in children if _alive(c)], "a child outlived its killed parent"
        busy.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        if server_pid is not None and _alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)
        for c in locals().get("children", []):
            if _alive(c):
                os.kill(c, signal.SIGKILL)


def _quietly(fn):
    try:
        fn()
    except httpx.HTTPError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_ends_a_busy_server_within_the_bounded_shutdown(model_dir, tmp_path):
    """SIGTERM while a long generation runs: the process (and its process group: vLLM's engine core) is gone
    within uvicorn's graceful shutdown + the hard-exit bound (before: a busy server ignored SIGTERM for good)."""
    from megatron_trace.rollout.launch import ManagedServer
    from megatron_trace.rollout.server import _HARD_EXIT_AFTER_S

    graceful_s = 5  # uvicorn's timeout_graceful_shutdown in server.main
    with ManagedServer(model_dir, log_path=str(tmp_path / "server.log"), max_model_len=256, token="k",
                       extra_env={"OMP_NUM_THREADS": "1"}, start_timeout_s=300) as s:
        busy = threading.Thread(target=lambda: _quietly(lambda: httpx.post(
            s.url + "/v1/completions", json={"prompt": [[1, 2, 3]] * 16, "n": 2, "max_tokens": 240}, timeout=120)))
        busy.start()
        time.sleep(3)
        t0 = time.monotonic()
        os.kill(s.proc.pid, signal.SIGTERM)
        try:
            s.proc.wait(timeout=graceful_s + _HARD_EXIT_AFTER_S + 20)
        except subprocess.TimeoutExpired:
            pytest.fail("the server did not end within its bounded shutdown after SIGTERM")
        took = time.monotonic() - t0
        deadline = time.monotonic() + 30
        while _group_alive(s.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _group_alive(s.proc.pid), "a process of the server's group outlived it"
        busy.join(30)
    assert took < graceful_s + _HARD_EXIT_AFTER_S + 20


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return any(_alive(int(p)) for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == pgid)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None

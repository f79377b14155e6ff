"""The NCCL weight path's protocol, on CPU: every refusal happens before the first byte moves, a receiver that
fails part-way still drains what the sender sends, buckets are streamed, the worker reloads through vLLM's
supported path; and the engine's own state around sleep.

NCCL itself cannot run here: the "wire" is a list that the sender's broadcasts append to and the receiver's
broadcasts pop from (a broadcast left unmatched on either side is what would hang a GPU run: every test checks
the wire ends empty, with as many receives as sends). The engine is a `VLLMEngine` whose vLLM is a recorder.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from megatron_trace.rollout.engine import VLLMEngine, WeightUpdateError, WeightValidator
from megatron_trace.rollout.nccl_weights import (
    TensorMeta, WeightReceiverExtension, WeightStreamAborted, receive_announced, send_announced,
)

SHAPES = {"a.weight": (2, 3), "b.weight": (4,), "c.weight": (3, 2)}


def _buckets(scale: float = 1.0):
    ts = {n: torch.arange(torch.Size(s).numel(), dtype=torch.float32).reshape(s) * scale for n, s in SHAPES.items()}
    return [[("a.weight", ts["a.weight"])], [("b.weight", ts["b.weight"]), ("c.weight", ts["c.weight"])]]


def _metas() -> list[TensorMeta]:
    return [TensorMeta(n, "float32", s) for n, s in SHAPES.items()]


def _wire_metas():
    return [[m.name, m.dtype, list(m.shape)] for m in _metas()]


class Wire:
    """A loop-back broadcast: the sender appends, the receiver pops in order."""

    def __init__(self):
        self.items: list[torch.Tensor] = []
        self.sent = self.received = 0

    def send(self, t: torch.Tensor) -> None:
        self.items.append(t.clone())
        self.sent += 1

    def recv(self, buf: torch.Tensor) -> None:
        assert self.items, "a receive with nothing sent: the receiver would block"
        got = self.items.pop(0)
        assert got.shape == buf.shape and got.dtype == buf.dtype, (got.shape, buf.shape)
        buf.copy_(got)
        self.received += 1

    def balanced(self) -> bool:
        return not self.items and self.sent == self.received


# ------------------------------------------------------------------------------------------- sender / receiver

def test_a_complete_update_arrives_in_order_with_a_good_status():
    wire, got = Wire(), []
    send_announced(_buckets(), _metas(), wire.send, "cpu")
    receive_announced(_wire_metas(), wire.recv, "cpu", lambda it: got.extend((n, t.clone()) for n, t in it))
    assert [n for n, _ in got] == list(SHAPES)
    assert all(torch.equal(t, ref) for (_, t), (_, ref) in zip(got, [x for b in _buckets() for x in b]))
    assert wire.balanced() and wire.sent == len(SHAPES) + 1  # + the status word


def test_buckets_are_streamed_one_at_a_time():
    """The sender asks for bucket k+1 only after bucket k went on the wire (the old client listed them all)."""
    wire, produced = Wire(), []

    def gen():
        for i, b in enumerate(_buckets()):
            produced.append((i, wire.sent))
            yield b

    send_announced(gen(), _metas(), wire.send, "cpu")
    assert produced == [(0, 0), (1, 1)]


@pytest.mark.parametrize("fail_after", [0, 1, 2])
def test_a_reload_that_raises_part_way_still_receives_everything(fail_after):
    wire = Wire()
    send_announced(_buckets(), _metas(), wire.send, "cpu")

    def reload(it):
        for i, _ in enumerate(it):
            if i + 1 > fail_after:
                raise RuntimeError("vLLM failed in the middle of a layer")
        raise RuntimeError("vLLM failed at the end")

    with pytest.raises(RuntimeError, match="vLLM failed"):
        receive_announced(_wire_metas(), wire.recv, "cpu", reload)
    assert wire.balanced()


def test_a_reload_that_stops_reading_early_drains_and_is_refused():
    wire = Wire()
    send_announced(_buckets(), _metas(), wire.send, "cpu")
    with pytest.raises(RuntimeError, match="read 1 of 3"):
        receive_announced(_wire_metas(), wire.recv, "cpu", lambda it: next(it))
    assert wire.balanced()


def test_a_drain_receives_and_drops_everything():
    wire = Wire()
    send_announced(_buckets(), _metas(), wire.send, "cpu")
    receive_announced(_wire_metas(), wire.recv, "cpu", None)
    assert wire.balanced()


@pytest.mark.parametrize("defect", ["shape", "missing", "extra", "raises"])
def test_a_sender_that_fails_part_way_pads_the_stream_and_the_receiver_refuses(defect):
    buckets = _buckets()
    if defect == "shape":
        buckets[1][0] = ("b.weight", torch.zeros(5))
    elif defect == "missing":
        buckets = buckets[:1]
    elif defect == "extra":
        buckets.append([("d.weight", torch.zeros(1))])

    def gen():
        yield buckets[0]
        if defect == "raises":
            raise OSError("the bridge's export failed")
        yield from buckets[1:]

    wire, got = Wire(), []
    with pytest.raises((ValueError, OSError)):
        send_announced(gen(), _metas(), wire.send, "cpu")
    if defect == "extra":  # every announced tensor went out; the status says the stream was wrong
        assert wire.sent == len(SHAPES) + 1
    with pytest.raises(WeightStreamAborted):
        receive_announced(_wire_metas(), wire.recv, "cpu", lambda it: got.extend(it))
    assert wire.balanced()


def test_the_worker_reloads_through_its_supported_path_and_drains_on_failure():
    """`Worker.reload_weights` (inside vLLM's config context), not `model_runner.reload_weights` directly."""
    wire = Wire()

    class FakeWorker(WeightReceiverExtension):
        device = torch.device("cpu")
        rank = 0

        def __init__(self, fail: bool):
            self._weight_group = SimpleNamespace(broadcast=lambda buf, src, stream: wire.recv(buf))
            self.model_runner = SimpleNamespace(reload_weights=mock.Mock(side_effect=AssertionError(
                "model_runner.reload_weights called outside set_current_vllm_config")))
            self.fail, self.loaded = fail, []

        def reload_weights(self, weights_iterator, is_checkpoint_format):
            assert is_checkpoint_format
            for name, _ in weights_iterator:
                self.loaded.append(name)
                if self.fail:
                    raise RuntimeError("bad weights")

    with mock.patch("torch.cuda.current_stream"), mock.patch("torch.cuda.synchronize"):
        ok = FakeWorker(fail=False)
        send_announced(_buckets(), _metas(), wire.send, "cpu")
        ok.receive_weights_nccl(_wire_metas())
        assert ok.loaded == list(SHAPES) and wire.balanced()

        bad = FakeWorker(fail=True)
        send_announced(_buckets(), _metas(), wire.send, "cpu")
        with pytest.raises(RuntimeError, match="bad weights"):
            bad.receive_weights_nccl(_wire_metas())
        assert wire.balanced()

        send_announced(_buckets(), _metas(), wire.send, "cpu")
        FakeWorker(fail=False).drain_weights_nccl(_wire_metas())
        assert wire.balanced()


# ------------------------------------------------------------------------------------------- recording engine

class RecordingLLM:
    """vllm.LLM stand-in: records collective_rpc / sleep / wake_up; a reload consumes the weight iterator."""

    def __init__(self):
        self.calls: list[str] = []

    def collective_rpc(self, method, args=(), kwargs=None):
        name = method if isinstance(method, str) else method.__name__
        self.calls.append(name)
        if name == "reload_weights":
            list(kwargs["weights_iterator"])
        return [None]

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self):
        self.calls.append("wake_up")

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append("generate")
        return []


ON_GPU = mock.patch("torch.cuda.is_available", new=lambda: True)


def recording_engine(cls=VLLMEngine, llm=None, validator=None) -> VLLMEngine:
    """A `cls` engine (VLLMEngine or a subclass) in its just-started state around a stand-in LLM: what
    VLLMEngine.__init__ sets, without starting vLLM."""
    engine = cls.__new__(cls)
    engine.cfg = SimpleNamespace(enable_sleep_mode=True, max_model_len=64)
    engine.tied = False
    engine._validator = validator if validator is not None else WeightValidator(SHAPES, tied=False)
    engine._llm = llm if llm is not None else RecordingLLM()
    engine._lock = threading.RLock()
    engine._version = 0
    engine._sleeping = False
    engine._inconsistent = None
    engine._weights_discarded = False
    engine._nccl_pending = None
    engine._loaded_version = None
    engine.on_progress = None
    return engine


REFUSED = {
    "unknown name": (lambda m: m + [["z.weight", "float32", [1]]], 1, WeightUpdateError, "unknown weight"),
    "wrong shape": (lambda m: [m[0], [m[1][0], "float32", [5]], m[2]], 1, WeightUpdateError, "shape"),
    "bad dtype": (lambda m: [[m[0][0], "int64", m[0][2]]] + m[1:], 1, WeightUpdateError, "dtype"),
    "missing tensor": (lambda m: m[:2], 1, WeightUpdateError, "missing 1 tensors"),
    "duplicate": (lambda m: m + m[:1], 1, WeightUpdateError, "twice"),
    "stale version": (lambda m: m, 0, WeightUpdateError, "must exceed"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_every_refusal_happens_at_the_announcement(case):
    engine = recording_engine()
    edit, version, error, needle = REFUSED[case]
    with pytest.raises(error, match=needle):
        engine.prepare_nccl_update(edit(_wire_metas()), version)
    assert engine._llm.calls == [] and engine._nccl_pending is None


@ON_GPU  # vLLM's own sleep mode is a GPU path (on CPU sleep/wake are accepted no-ops)
def test_an_asleep_engine_refuses_at_the_announcement():
    engine = recording_engine()
    engine.sleep(1)
    with pytest.raises(RuntimeError, match="asleep"):
        engine.prepare_nccl_update(_wire_metas(), 1)
    assert engine._llm.calls == ["sleep1"] and engine._nccl_pending is None


def test_a_prepared_update_is_received_through_the_reload_and_bumps_the_version():
    engine = recording_engine()
    engine._inconsistent = "an earlier failure"  # a complete update is the repair: accepted
    assert engine.prepare_nccl_update(_wire_metas(), None) == 1
    assert engine.update_weights_from_nccl(_wire_metas(), None) == 1
    assert engine._llm.calls == ["receive_weights_nccl", "reset_prefix_cache"]
    assert engine.weight_version == 1 and engine._inconsistent is None and engine._nccl_pending is None


@pytest.mark.parametrize("between", ["nothing", "sleep", "http update", "other announcement"])
@ON_GPU  # vLLM's own sleep mode is a GPU path (on CPU sleep/wake are accepted no-ops)
def test_a_broadcast_without_its_announcement_is_drained_then_refused(between):
    """The sender is already broadcasting: refusing without receiving would hang it."""
    engine = recording_engine()
    metas = _wire_metas()
    if between != "nothing":
        engine.prepare_nccl_update(metas, 1)
    if between == "sleep":
        engine.sleep(1)
        engine.wake_up()
    elif between == "http update":
        engine.update_weights(_buckets())
    elif between == "other announcement":
        engine.prepare_nccl_update(metas, 5)
    engine._llm.calls.clear()
    with pytest.raises(RuntimeError, match="not prepared"):
        engine.update_weights_from_nccl(metas, 1 if between != "http update" else 2)
    assert engine._llm.calls == ["drain_weights_nccl"]


@ON_GPU  # vLLM's own sleep mode is a GPU path (on CPU sleep/wake are accepted no-ops)
def test_after_a_level_2_sleep_generate_refuses_until_weights_are_reloaded():
    from megatron_trace.rollout.types import SamplingConfig

    engine = recording_engine()
    engine.sleep(1)
    engine.wake_up()
    assert engine.generate([], SamplingConfig()) == []  # level 1 keeps the weights
    engine.sleep(2)
    engine.wake_up()
    with pytest.raises(RuntimeError, match="level-2 sleep"):
        engine.generate([], SamplingConfig())
    with pytest.raises(WeightUpdateError):  # a failed update does not clear it
        engine.update_weights([_buckets()[0]])
    with pytest.raises(RuntimeError, match="level-2 sleep|failed part-way"):
        engine.generate([], SamplingConfig())
    engine.update_weights(_buckets())
    assert engine.generate([], SamplingConfig()) == []
    engine.sleep(2)
    engine.wake_up()
    engine.prepare_nccl_update(_wire_metas(), None)
    engine.update_weights_from_nccl(_wire_metas(), None)  # the NCCL path counts as the reload too
    assert engine.generate([], SamplingConfig()) == []


@ON_GPU  # vLLM's own sleep mode is a GPU path (on CPU sleep/wake are accepted no-ops)
def test_sleep_and_wake_up_are_idempotent():
    engine = recording_engine()
    engine.wake_up()
    engine.sleep(1)
    engine.sleep(2)  # already asleep: vLLM is not asked twice
    engine.wake_up()
    assert engine._llm.calls == ["sleep1", "wake_up", "reset_prefix_cache"]


# ------------------------------------------------------------------------------------------- HTTP + client

@pytest.fixture
def app_client():
    from fastapi.testclient import TestClient

    from megatron_trace.rollout.server import build_app

    engine = recording_engine()
    with TestClient(build_app(engine, model_name="m", token="t")) as http:
        yield engine, http


def test_the_server_maps_refusals_before_any_broadcast(app_client):
    engine, http = app_client
    auth = {"Authorization": "Bearer t"}
    bad = REFUSED["wrong shape"][0](_wire_metas())
    r = http.post("/weights/nccl", headers=auth, json={"version": 1, "tensors": bad, "validate_only": True})
    assert r.status_code == 422 and "shape" in r.json()["error"]["message"]
    engine.sleep(1)
    r = http.post("/weights/nccl", headers=auth, json={"version": 1, "tensors": _wire_metas(), "validate_only": True})
    assert r.status_code == 409 and "asleep" in r.json()["error"]["message"]
    engine.wake_up()
    r = http.post("/weights/nccl", headers=auth, json={"version": 1, "tensors": _wire_metas(), "validate_only": True})
    assert r.status_code == 200 and engine._nccl_pending is not None
    assert "receive_weights_nccl" not in engine._llm.calls and "drain_weights_nccl" not in engine._llm.calls


def _pusher(responses):
    """An NcclPusher over one RolloutClient whose requests are answered from `responses`, keyed by (path,
    validate_only); the sender is set as if the group were formed."""
    from megatron_trace.rollout.client import RolloutClient
    from megatron_trace.sync.nccl_push import NcclPusher

    with mock.patch.dict("os.environ", {"MEGATRON_TRACE_ROLLOUT_TOKEN": "t"}):
        client = RolloutClient(base_url="http://127.0.0.1:9")
    calls, bodies = [], []

    def request(method, path, **kw):
        key = (path, (kw.get("json") or {}).get("validate_only", False))
        calls.append(key)
        bodies.append(kw.get("json"))
        out = responses.get(key)
        if isinstance(out, Exception):
            raise out
        return out

    client._request = request
    client.version = lambda: 0
    pusher = NcclPusher([client], workers_per_server=1, master_address="127.0.0.1", master_port=1)
    pusher.bodies = bodies
    return pusher, calls


def test_the_pusher_broadcasts_nothing_when_the_announcement_is_refused():
    from megatron_trace.rollout.client import RolloutServerError
    from megatron_trace.sync.nccl_push import WeightSyncError

    pusher, calls = _pusher({("/weights/nccl", True): RolloutServerError("HTTP 409: asleep", 409)})
    pusher.sender = mock.Mock()
    with pytest.raises(WeightSyncError, match="asleep.*nothing was broadcast"):
        pusher.announce(_metas())
    assert pusher.sender.send.call_count == 0 and calls == [("/weights/nccl", True)]


def test_the_pusher_streams_after_the_announcement_was_accepted_then_commits():
    pusher, calls = _pusher({("/weights/nccl", True): {"status": "valid", "push_id": "p-123"},
                             ("/weights/nccl", False): {"status": "loaded", "loaded_version": 1},
                             ("/weights/nccl/commit", False): {"status": "applied", "weight_version": 1}})
    wire = Wire()
    pusher.sender = SimpleNamespace(send=lambda it, metas: send_announced(it, metas, wire.send, "cpu"))
    target = pusher.announce(_metas())
    assert pusher.push(iter(_buckets()), target, _metas()) == 1
    assert calls == [("/weights/nccl", True), ("/weights/nccl", False), ("/weights/nccl/commit", False)]
    # the transfer and the commit quote the push id the announcement answered (the server's one-push slot)
    assert "push_id" not in pusher.bodies[0]
    assert pusher.bodies[1]["push_id"] == pusher.bodies[2]["push_id"] == "p-123"
    assert pusher.bodies[1]["commit"] is False
    assert wire.sent == len(SHAPES) + 1
    assert int(wire.items[-1]) == 1  # the status word says complete


def test_a_sender_failure_drains_the_export_and_commits_nothing():
    from megatron_trace.sync.nccl_push import WeightSyncError

    pusher, calls = _pusher({("/weights/nccl", False): RuntimeError("HTTP 409: the sender failed part-way")})
    wire, drained = Wire(), []

    def gen():
        for b in _buckets():
            yield b
            drained.append(len(b))
        raise OSError("the bridge's export failed")

    pusher.sender = SimpleNamespace(send=lambda it, metas: send_announced(it, metas, wire.send, "cpu"))
    with pytest.raises(WeightSyncError, match="export failed.*http://127.0.0.1:9.*no server was committed"):
        pusher.push(gen(), 1, _metas())
    assert drained == [1, 2] and ("/weights/nccl/commit", False) not in calls
    assert int(wire.items[-1]) == 0  # the receivers were told the stream is incomplete


def test_an_uncommitted_nccl_update_is_not_served_until_committed():
    from megatron_trace.rollout.types import SamplingConfig

    engine = recording_engine()
    engine.prepare_nccl_update(_wire_metas(), 1)
    assert engine.update_weights_from_nccl(_wire_metas(), 1, commit=False) == 1
    assert engine.weight_version == 0
    with pytest.raises(RuntimeError, match="loaded but not committed"):
        engine.generate([], SamplingConfig())
    assert engine.commit_loaded_weights(1) == 1 and engine.weight_version == 1
    assert engine.generate([], SamplingConfig()) == []


def test_the_server_routes_an_uncommitted_update_and_its_commit(app_client):
    engine, http = app_client
    auth = {"Authorization": "Bearer t"}
    with mock.patch.object(engine._llm, "collective_rpc", return_value=[None]):
        r = http.post("/weights/nccl", headers=auth, json={"version": 1, "tensors": _wire_metas(), "validate_only": True})
        assert r.status_code == 200
        push_id = r.json()["push_id"]
        r = http.post("/weights/nccl", headers=auth, json={"version": 1, "tensors": _wire_metas(), "commit": False,
                                                           "push_id": push_id})
        assert r.status_code == 200 and r.json()["status"] == "loaded" and r.json()["loaded_version"] == 1
        assert engine.weight_version == 0
        # the loaded, uncommitted push keeps the one-push slot: no other update may start before its commit
        r = http.post("/weights/nccl", headers=auth, json={"version": 2, "tensors": _wire_metas(), "validate_only": True})
        assert r.status_code == 409 and push_id in r.json()["error"]["message"]
        r = http.post("/weights/nccl/commit", headers=auth, json={"version": 2})
        assert r.status_code == 409 and engine.weight_version == 0
        for _ in range(2):  # the second is a retried commit whose answer was lost
            r = http.post("/weights/nccl/commit", headers=auth, json={"version": 1})
            assert r.status_code == 200 and r.json()["weight_version"] == 1
        r = http.post("/weights/nccl/close", headers=auth)
        assert r.status_code == 200
        engine._llm.collective_rpc.assert_called_with("close_weight_update_group")


# ------------------------------------------------------------------- the one-push slot (HTTP, NCCL, shm alike)

AUTH = {"Authorization": "Bearer t"}


def _announce(http, version=1, metas=None):
    return http.post("/weights/nccl", headers=AUTH,
                     json={"version": version, "tensors": metas or _wire_metas(), "validate_only": True})


def _transfer(http, version=1, push_id=None, metas=None):
    body = {"version": version, "tensors": metas or _wire_metas()}
    if push_id is not None:
        body["push_id"] = push_id
    return http.post("/weights/nccl", headers=AUTH, json=body)


def _http_push(http, version=1, buckets=None):
    """An HTTP push to `version`, fully staged but not committed; answers its push id."""
    from megatron_trace.rollout.weight_buckets import CHECKSUM_HEADER, INDEX_HEADER, PUSH_HEADER, \
        VERSION_HEADER, encode_bucket

    r = http.post("/weights/begin", headers={**AUTH, VERSION_HEADER: str(version)})
    assert r.status_code == 200, r.text
    push_id = r.json()["push_id"]
    for i, bucket in enumerate(buckets or _buckets()):
        data, digest = encode_bucket(bucket)
        r = http.post("/weights", headers={**AUTH, PUSH_HEADER: push_id, INDEX_HEADER: str(i),
                                           CHECKSUM_HEADER: digest}, content=data)
        assert r.status_code == 200, r.text
    return push_id


def _commit(http, push_id, count=2):
    from megatron_trace.rollout.weight_buckets import COUNT_HEADER, PUSH_HEADER

    return http.post("/weights/commit", headers={**AUTH, PUSH_HEADER: push_id, COUNT_HEADER: str(count)})


def test_an_nccl_push_while_an_http_push_is_staged_gets_409_and_leaves_both_intact(app_client):
    engine, http = app_client
    push_id = _http_push(http)
    r = _announce(http)  # before: accepted, reserving the engine beside the staged HTTP push
    assert r.status_code == 409 and f"HTTP weight push ({push_id}" in r.json()["error"]["message"]
    assert engine._nccl_pending is None and engine._llm.calls == []
    # a transfer nobody announced (a sender already broadcasting) is received and dropped, then refused
    r = _transfer(http)
    assert r.status_code == 409 and "received and dropped" in r.json()["error"]["message"]
    assert engine._llm.calls == ["drain_weights_nccl"] and engine.weight_version == 0
    r = _commit(http, push_id)  # the HTTP push was never disturbed
    assert r.status_code == 200 and r.json()["weight_version"] == 1


def test_an_http_push_or_a_second_nccl_push_while_an_nccl_push_is_open_gets_409(app_client):
    engine, http = app_client
    r = _announce(http)
    assert r.status_code == 200 and r.json()["status"] == "valid"
    nccl_id = r.json()["push_id"]
    pending = engine._nccl_pending
    from megatron_trace.rollout.weight_buckets import VERSION_HEADER

    r = http.post("/weights/begin", headers={**AUTH, VERSION_HEADER: "1"})  # before: staged beside it
    assert r.status_code == 409 and f"NCCL weight push ({nccl_id}, to version 1)" in r.json()["error"]["message"]
    r = _announce(http, version=2)  # before: silently replaced the first pusher's reservation
    assert r.status_code == 409 and engine._nccl_pending == pending
    r = _commit(http, nccl_id)  # an NCCL push's id is no key to the HTTP routes
    assert r.status_code == 409 and "not an HTTP push" in r.json()["error"]["message"]
    r = _transfer(http, push_id="someone-else")  # the wrong id: drained and refused, the open push kept
    assert r.status_code == 409 and "received and dropped" in r.json()["error"]["message"]
    assert engine._nccl_pending == pending and engine.weight_version == 0
    r = _transfer(http, push_id=nccl_id)
    assert r.status_code == 200 and r.json() == {"status": "applied", "push_id": nccl_id, "weight_version": 1}
    assert engine._llm.calls == ["drain_weights_nccl", "receive_weights_nccl", "reset_prefix_cache"]
    assert _http_push(http, version=2)  # the slot is free again


def test_a_transfer_without_a_push_id_from_an_older_client_is_the_open_nccl_push(app_client):
    engine, http = app_client
    assert _announce(http).status_code == 200
    r = _transfer(http)
    assert r.status_code == 200 and r.json()["weight_version"] == 1
    assert _announce(http, version=2).status_code == 200  # closed by the transfer


def test_an_aborted_nccl_push_frees_the_slot_and_its_late_broadcast_is_dropped(app_client):
    from megatron_trace.rollout.weight_buckets import PUSH_HEADER

    engine, http = app_client
    nccl_id = _announce(http).json()["push_id"]
    r = http.post("/weights/abort", headers={**AUTH, PUSH_HEADER: nccl_id})
    assert r.json()["status"] == "aborted" and engine._nccl_pending is None
    r = _transfer(http, push_id=nccl_id)
    assert r.status_code == 409 and "received and dropped" in r.json()["error"]["message"]
    assert engine.weight_version == 0
    assert _commit(http, _http_push(http)).json()["weight_version"] == 1


def test_nccl_and_shm_updates_refuse_each_other():
    from megatron_trace.rollout.shm_loader import ShmUpdateError, ShmWeightLoader
    from megatron_trace.rollout.weight_staging import ApiError, WeightStaging

    now = [0.0]
    engine = recording_engine()
    staging = WeightStaging(engine, idle_timeout_s=60, clock=lambda: now[0])
    shm = ShmWeightLoader(engine, 1 << 20, idle_timeout_s=60, other_update=staging.active, clock=lambda: now[0])
    staging.other_update = shm.active
    push_id = staging.begin_nccl(_wire_metas(), 1)["push_id"]
    with pytest.raises(ShmUpdateError) as e:
        shm.begin(1, _wire_metas())
    assert e.value.status == 409 and f"NCCL weight push ({push_id}" in str(e.value)
    now[0] += 61  # the announced push's sender never came: the slot may be taken over
    shm.begin(1, _wire_metas())
    with pytest.raises(ApiError) as e:
        staging.begin_nccl(_wire_metas(), 1)
    assert e.value.status == 409 and "shared-memory update to version 1" in e.value.message
    shm.abort("test")


def test_a_transfer_in_progress_is_never_idle_and_never_replaced():
    """The broadcast is received outside the staging's lock; meanwhile (however long it takes) every other
    push is refused, and the slot is free the moment it ends."""
    from megatron_trace.rollout.weight_staging import ApiError, WeightStaging

    now = [0.0]
    engine = recording_engine()
    staging = WeightStaging(engine, idle_timeout_s=60, clock=lambda: now[0])
    push_id = staging.begin_nccl(_wire_metas(), 1)["push_id"]
    entered, release = threading.Event(), threading.Event()
    receive = engine.update_weights_from_nccl

    def slow_receive(metas, version, commit=True):
        entered.set()
        assert release.wait(30)
        return receive(metas, version, commit=commit)

    engine.update_weights_from_nccl = slow_receive
    result = {}
    t = threading.Thread(target=lambda: result.update(staging.apply_nccl(push_id, _wire_metas(), 1)))
    t.start()
    assert entered.wait(30)
    now[0] += 3600
    for attempt in (lambda: staging.begin(1), lambda: staging.begin_nccl(_wire_metas(), 1),
                    lambda: staging.abort(push_id)):
        with pytest.raises(ApiError) as e:
            attempt()
        assert e.value.status == 409 and "receiving its broadcast" in e.value.message
    assert staging.active() is not None
    release.set()
    t.join(30)
    assert result["weight_version"] == 1 and staging.active() is None
    assert staging.begin(2)["status"] == "open"

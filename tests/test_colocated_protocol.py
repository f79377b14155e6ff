"""The GPU-only paths of colocated generation, checked for their call protocol on CPU with recording stand-ins
(no GPU here: CUDA IPC and vLLM sleep mode cannot run): CUDA IPC bucket handles, the engine's sleep/wake calls,
and the driver's wake -> export -> node-local load -> commit cycle."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from megatron_trace.rollout.cuda_ipc import IpcBucketMapping, IpcBucketWriter
from megatron_trace.rollout.shm_weights import ShmProtocolError


class FakeIpc:
    """Stands in for reduce_tensor / rebuild_cuda_tensor: a handle is a key into this process's registry, with
    the device index at position 6 as in PyTorch's rebuild arguments."""

    def __init__(self):
        self.registry, self.reduced, self.rebuilt = {}, [], []

    def reduce(self, t):
        key = len(self.registry)
        self.registry[key] = t
        self.reduced.append(t)
        return "rebuild_cuda_tensor", ("cls", key, "storage", 0, "handle", 0, 3, "ref", "offset")

    def rebuild(self, *args):
        self.rebuilt.append(args)
        return self.registry[args[1]].view(self.registry[args[1]].shape)


def test_cuda_ipc_handles_are_made_per_tensor_found_by_gpu_uuid_and_rebuilt_on_the_servers_device():
    ipc = FakeIpc()
    bucket = [("a", torch.randn(4, 3)), ("b", torch.randn(5).to(torch.bfloat16))]
    writer = IpcBucketWriter(reduce=ipc.reduce, uuid=lambda i: "GPU-aaaa", require_cuda=False)
    desc = writer.write(0, bucket)
    assert json.loads(json.dumps(desc)) == desc  # travels as JSON
    assert desc["tensors"] == [["a", "float32", [4, 3]], ["b", "bfloat16", [5]]]
    assert len(ipc.reduced) == 2 and writer.max_held == 1
    mapped = IpcBucketMapping(desc, device_index=1, rebuild=ipc.rebuild, uuid=lambda i: "GPU-aaaa").tensors
    assert [args[6] for args in ipc.rebuilt] == [1, 1]  # the server's own index of the same GPU
    for (n, t), (m, u) in zip(bucket, mapped):
        assert n == m and torch.equal(t, u) and u.data_ptr() == t.data_ptr()  # no copy: the trainer's memory
    # the trainer keeps each bucket alive until the servers released it
    writer.write(1, bucket[:1])
    assert writer.max_held == 2
    writer.release([0, 1])
    assert writer._held == {}
    # a server on another GPU cannot use the handles, and says so
    with pytest.raises(ShmProtocolError, match="no IPC handle for this server's GPU GPU-bbbb"):
        IpcBucketMapping(desc, device_index=0, rebuild=ipc.rebuild, uuid=lambda i: "GPU-bbbb")
    with pytest.raises(ShmProtocolError, match="CUDA IPC hands over GPU tensors"):
        IpcBucketWriter(reduce=ipc.reduce, uuid=lambda i: "x").write(0, bucket)


class RecordingLLM:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *a, **k: self.calls.append((name, a, k))


def test_engine_sleep_and_wake_use_vllms_sleep_mode_on_gpu(tmp_path, monkeypatch):
    from megatron_trace.rollout.engine import EngineConfig, VLLMEngine

    (tmp_path / "config.json").write_text("{}")
    engine = VLLMEngine.__new__(VLLMEngine)  # the vLLM-facing calls only: a recording LLM, CUDA "available"
    engine.cfg = EngineConfig(str(tmp_path), enable_sleep_mode=True)
    engine._llm, engine._lock, engine._sleeping, engine._inconsistent = RecordingLLM(), threading.RLock(), False, None
    engine._nccl_pending, engine._weights_discarded = None, False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    engine.sleep(2)
    assert engine._llm.calls == [("sleep", (), {"level": 2})]
    with pytest.raises(RuntimeError, match="asleep"):
        engine._check_serving()
    engine.wake_up()
    assert [c[0] for c in engine._llm.calls] == ["sleep", "wake_up", "reset_prefix_cache"]
    # level 2 discarded the weights: awake but refusing until a complete update (the shm/IPC one included) ...
    with pytest.raises(RuntimeError, match="discarded by a level-2 sleep"):
        engine._check_serving()
    engine._loaded_version = 1
    engine.commit_loaded_weights(1)
    engine._check_serving()
    # ... a level-1 sleep keeps them (offloaded): serving again right after wake_up
    engine.sleep(1)
    engine.wake_up()
    assert engine._llm.calls[-3][2] == {"level": 1}
    engine._check_serving()
    with pytest.raises(ValueError, match="level"):
        engine.sleep(3)


class FakeClient:
    def __init__(self, url, log):
        self.cfg = type("C", (), {"base_url": url})()
        self.log = log

    def shm_commit(self, version):
        self.log.append(("commit", self.cfg.base_url, version))
        return version


class FakePool:
    def __init__(self, log):
        self.log, self.names = log, ["node 0 http://s0"]
        self.clients = [FakeClient("http://s0", log)]

    def sleep(self, level):
        self.log.append(("sleep", level))

    def wake_up(self):
        self.log.append(("wake_up",))

    def close(self):
        pass


class FakePusher:
    node = 0

    def __init__(self, log, fail=False):
        self.log, self.fail = log, fail

    def load(self, buckets, version, tensors, written=False):
        for b in buckets:
            self.log.append(("load", b, version))
        if self.fail:
            raise RuntimeError("http://s0 died")

    def abort(self, reason):
        self.log.append(("abort",))

    def close(self):
        pass


def _driver_cycle(rank, world_size):
    from types import SimpleNamespace

    from megatron_trace.rollout.colocated import ColocatedError, ColocatedServers

    log = []
    cfg = SimpleNamespace(rollout=SimpleNamespace(sleep_level=2))
    servers = ColocatedServers(cfg=cfg, leaders=[0], urls=[["http://s0"]], pool=FakePool(log),
                               pusher=FakePusher(log))
    servers.sleep()  # before training
    servers.sleep()  # idempotent
    version = servers.sync(lambda dsts: (log.append(("export", dsts)), iter(["bucket0", "bucket1"]))[1], [])
    servers.wake_up()  # already awake after the sync
    ok = list(log)
    log.clear()
    servers.sleep()
    servers.pusher = FakePusher(log, fail=True)
    try:
        servers.sync(lambda dsts: iter(["bucket0"]), [])
        failed = None
    except ColocatedError as e:
        failed = str(e)
    return ok, version, list(log), failed, servers.version


def test_the_driver_wakes_before_the_update_loads_each_node_then_commits_all_and_a_failure_commits_nothing():
    from dist_harness import run_distributed

    ok, version, log, failed, final = run_distributed(_driver_cycle, 1, timeout=300)[0]
    assert version == 1
    assert ok == [("sleep", 2), ("wake_up",), ("export", [0]), ("load", "bucket0", 1), ("load", "bucket1", 1),
                  ("commit", "http://s0", 1)]
    assert log == [("sleep", 2), ("wake_up",), ("load", "bucket0", 2), ("abort",)]  # no commit
    assert "node 0" in failed and "http://s0 died" in failed and "no server serves the new version" in failed
    assert final == 1


class StreamEngine:
    """The engine side ShmWeightLoader and WeightStaging drive: accepts any announcement, drains the stream."""

    weight_version = 0

    def validate_announcement(self, metas, version):
        return version

    def load_weights_stream(self, tensors, version):
        for _ in tensors:
            pass


def test_one_weight_update_at_a_time_across_the_shm_routes_and_the_http_push():
    """/weights/shm/* and /weights/begin are separate protocols on one engine: while either update is active,
    the other (and a second shm update) is refused with 409, as the HTTP push refuses a second push; an update
    idle past the timeout may be replaced; a retried begin (its answer lost) is answered again."""
    from megatron_trace.rollout.shm_loader import ShmUpdateError, ShmWeightLoader
    from megatron_trace.rollout.weight_staging import ApiError, WeightStaging

    now = [0.0]
    engine = StreamEngine()
    staging = WeightStaging(engine, idle_timeout_s=60, clock=lambda: now[0])
    shm = ShmWeightLoader(engine, 1 << 20, idle_timeout_s=60, other_update=staging.active, clock=lambda: now[0])
    staging.other_update = shm.active
    tensors = [["w", "float32", [2, 2]]]

    shm.begin(1, tensors)
    assert shm.begin(1, tensors)["status"] == "begun"  # the same begin retried: not a second update
    with pytest.raises(ShmUpdateError) as e:
        shm.begin(2, tensors)
    assert e.value.status == 409 and "shared-memory update to version 1" in str(e.value)
    with pytest.raises(ApiError) as e:
        staging.begin(1)
    assert e.value.status == 409 and "shared-memory update to version 1" in e.value.message
    shm.abort("test")  # frees the engine for the HTTP push
    push_id = staging.begin(1)["push_id"]
    with pytest.raises(ShmUpdateError) as e:
        shm.begin(1, tensors)
    assert e.value.status == 409 and f"HTTP weight push ({push_id}" in str(e.value)
    now[0] += 61  # the push went idle: the shm update may start (and, idle in turn, be replaced)
    shm.begin(1, tensors)
    now[0] += 61
    shm.begin(2, tensors)
    shm.abort("done")

"""The trainer's NCCL weight sync (`rollout.weight_sync`), on CPU.

(a) The config field: `auto` resolves per platform and placement (the GPU case checked here by making
    `torch.cuda.is_available()` answer True, as tests/test_engine_platform.py does), and what cannot work is
    refused when the config is loaded, naming the field and the reason.
(b) The real Trainer (TP=2 on two gloo ranks) drives two generation servers through the NCCL protocol: the group
    is formed once (world size 1 + 2 servers x 1 worker), each update is announced to every server, broadcast
    once, loaded by every server and committed on every server only after all loaded it; close() has every
    server leave the group and rank 0 destroy its end. The servers are the real HTTP app (`server.build_app`)
    around a `VLLMEngine` whose vLLM is a recorder dispatching to the real worker extension
    (`WeightReceiverExtension`); the clients are the real `RolloutClient`s over Starlette's in-process transport.
    NCCL itself is a stand-in: rank 0's broadcasts are queued to every receiving rank, and each receive takes
    from its queue (a receive with nothing sent fails after a timeout instead of hanging).
(c) A refusal at the announcement, and a server whose reload fails part-way: nothing is committed anywhere, every
    server keeps the previous version, and every trainer rank raises naming the failing server; the next update
    repairs both.
"""

from __future__ import annotations

import os
import queue
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from dist_harness import run_distributed
from test_nccl_weights import recording_engine
from megatron_trace.config import ConfigError, load_config

GPU = mock.patch("torch.cuda.is_available", return_value=True)
CPU = mock.patch("torch.cuda.is_available", return_value=False)


def _rollout(*overrides):
    return load_config(None, ["logging.output_dir=/tmp/trainer_nccl_sync", *overrides]).rollout


# ------------------------------------------------------------------------------------------------ (a) config

AUTO = [  # overrides, resolved on CPU, resolved on GPU
    ([], "http", "http"),  # one server beside rank 0, on rank 0's GPU: NCCL cannot hold both
    (["rollout.num_servers=2", 'rollout.server_gpus=["1","2"]'], "http", "nccl"),
    (["rollout.num_servers=2", 'rollout.server_gpus=["0","1"]'], "http", "http"),  # one shares rank 0's GPU
    (['rollout.server_gpus=["4,5"]', "rollout.tensor_parallel_size=2"], "http", "nccl"),
    (["rollout.placement=colocated"], "shm", "shm"),
    (["rollout.placement=separate", "rollout.server_url=http://gen:8100"], "http", "http"),
    (["rollout.server_urls=[http://a:1, http://b:2]"], "http", "http"),
    (["rollout.engine=inprocess"], "inprocess", "inprocess"),
]


@pytest.mark.parametrize("overrides,cpu,gpu", AUTO)
def test_auto_resolves_per_platform_and_placement(overrides, cpu, gpu, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with CPU:
        assert _rollout(*overrides).weight_transport == cpu
    with GPU:
        assert _rollout(*overrides).weight_transport == gpu


def test_auto_compares_server_gpus_with_rank_0s_physical_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4,5,6")  # rank 0 runs on physical GPU 3
    with GPU:
        assert _rollout('rollout.server_gpus=["0"]').weight_transport == "nccl"
        assert _rollout('rollout.server_gpus=["2,3"]').weight_transport == "http"


REFUSED = [  # overrides, platform, what the message must say
    (["rollout.weight_sync=nccl", "rollout.num_servers=2", 'rollout.server_gpus=["1","2"]'], CPU,
     r"rollout\.weight_sync: nccl needs CUDA GPUs and NCCL.*torch\.cuda\.is_available\(\) is False"),
    (["rollout.weight_sync=nccl", "rollout.placement=separate", "rollout.server_url=http://g:1"], CPU,
     r"rollout\.weight_sync: nccl needs CUDA"),
    (["rollout.weight_sync=nccl"], GPU, r"rollout\.weight_sync: nccl: without rollout\.server_gpus the servers run "
                                        r"on rank 0's GPU.*two ranks on one GPU"),
    (["rollout.weight_sync=nccl", 'rollout.server_gpus=["0,1"]'], GPU, r"server_gpus \['0,1'\] include rank 0's GPU 0"),
    (["rollout.weight_sync=nccl", "rollout.placement=colocated"], GPU,
     r"rollout\.weight_sync: nccl with placement colocated: .*two ranks on one GPU"),
    (["rollout.weight_sync=http", "rollout.placement=colocated"], CPU, r"rollout\.weight_sync: http with placement"),
    (["rollout.weight_sync=shm"], CPU, r"rollout\.weight_sync: shm is the node-local path of placement colocated"),
    (["rollout.weight_sync=nccl", "rollout.engine=inprocess"], GPU, r"rollout\.weight_sync: nccl .*engine inprocess"),
    (["rollout.weight_sync=tcp"], CPU, r"rollout\.weight_sync: 'tcp' is not one of"),
]


@pytest.mark.parametrize("overrides,platform,needle", REFUSED)
def test_what_cannot_work_is_refused_at_load_naming_the_field(overrides, platform, needle, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with platform, pytest.raises(ConfigError, match=needle):
        _rollout(*overrides)


def test_explicit_choices_that_work_are_kept(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with GPU:
        assert _rollout("rollout.weight_sync=nccl", "rollout.placement=separate",
                        "rollout.server_url=http://g:1").weight_transport == "nccl"
        assert _rollout("rollout.weight_sync=http", 'rollout.server_gpus=["1"]').weight_transport == "http"
    with CPU:
        assert _rollout("rollout.weight_sync=shm", "rollout.placement=colocated").weight_transport == "shm"


def test_the_shipped_configs_still_load_on_both_platforms():
    import glob

    for path in sorted(glob.glob("examples/configs/*.yaml")):
        for platform in (CPU, GPU):
            with platform:
                assert load_config(path).rollout.weight_transport in ("http", "shm", "nccl"), path


# ------------------------------------------------------------------------------------------------ (b), (c)

class Wire:
    """Stand-in NCCL group: rank 0's broadcasts go to a queue per receiving rank."""

    def __init__(self):
        self.queues: dict[int, queue.Queue] = {}
        self.sent = 0
        self.joined: list[tuple[int, int]] = []  # (rank, world size) of each receiver that joined

    def join(self, rank: int, world_size: int) -> None:
        self.queues[rank] = queue.Queue()
        self.joined.append((rank, world_size))

    def send(self, t: torch.Tensor) -> None:
        for q in self.queues.values():
            q.put(t.detach().clone())
        self.sent += 1

    def recv(self, rank: int, buf: torch.Tensor) -> None:
        try:
            got = self.queues[rank].get(timeout=60)
        except queue.Empty:
            raise AssertionError(f"rank {rank}: a receive with nothing sent (NCCL would hang here)") from None
        assert got.shape == buf.shape and got.dtype == buf.dtype, (rank, got.shape, buf.shape)
        buf.copy_(got)

    def balanced(self) -> bool:
        return all(q.empty() for q in self.queues.values())


def _server(index: int, wire: Wire, log: list, shapes: dict):
    """One generation server: the real app around a VLLMEngine whose vLLM dispatches to the real worker
    extension (one worker); every engine step is appended to the shared `log` as (server, step)."""
    from megatron_trace.rollout.engine import VLLMEngine, WeightValidator
    from megatron_trace.rollout.nccl_weights import WeightReceiverExtension

    class Worker(WeightReceiverExtension):
        device = torch.device("cpu")
        rank = 0  # its rank among the engine's workers
        fail_after: int | None = None  # reload raises after this many tensors (None: never)

        def __init__(self):
            self.loaded: dict[str, torch.Tensor] = {}

        def init_weight_update_group(self, master_address, master_port, rank_offset, world_size):
            # What the real method does, minus CUDA: join as rank rank_offset + worker rank.
            rank = rank_offset + self.rank
            wire.join(rank, world_size)
            self._weight_group = SimpleNamespace(broadcast=lambda buf, src, stream: wire.recv(rank, buf))

        def reload_weights(self, weights_iterator, is_checkpoint_format):
            assert is_checkpoint_format
            self.loaded = {}
            for i, (name, t) in enumerate(weights_iterator):
                if self.fail_after is not None and i >= self.fail_after:
                    raise RuntimeError(f"injected: vLLM failed at tensor {i}")
                self.loaded[name] = t.clone()

    worker = Worker()

    class LLM:
        def collective_rpc(self, method, args=(), kwargs=None):
            if isinstance(method, str):
                log.append((index, "worker." + method))
                return [getattr(worker, method)(*args, **(kwargs or {}))]
            return [None]

        def reset_prefix_cache(self):
            pass

        def sleep(self, level):
            pass

        def wake_up(self):
            pass

    class Engine(VLLMEngine):  # records each protocol step, then runs the real one
        def init_weight_group(self, *a):
            log.append((index, "init_weight_group"))
            return super().init_weight_group(*a)

        def prepare_nccl_update(self, metas, version):
            log.append((index, f"announce v{version}"))
            return super().prepare_nccl_update(metas, version)

        def update_weights_from_nccl(self, metas, version=None, *, commit=True):
            out = super().update_weights_from_nccl(metas, version, commit=commit)
            log.append((index, f"loaded v{version} commit={commit}"))
            return out

        def commit_loaded_weights(self, version):
            out = super().commit_loaded_weights(version)
            log.append((index, f"commit v{version}"))
            return out

        def close_weight_group(self):
            log.append((index, "close_weight_group"))
            return super().close_weight_group()

    engine = recording_engine(Engine, LLM(), WeightValidator(shapes, tied=False, dtype=torch.float32))
    return engine, worker


def _nccl_sync(rank, world_size, hf_dir, workdir):
    from fastapi.testclient import TestClient

    from megatron_trace.rollout import nccl_weights
    from megatron_trace.rollout.client import RolloutClient
    from megatron_trace.rollout.pool import EnginePool
    from megatron_trace.rollout.server import build_app
    from megatron_trace.sync.nccl_push import WeightSyncError
    from megatron_trace.train.trainer import Trainer

    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    with mock.patch("torch.cuda.is_available", return_value=True):  # the config as a GPU machine loads it
        cfg = load_config(None, [f"model.hf_config={hf_dir}", f"model.load={hf_dir}", "parallel.tp=2",
                                 "data.path=megatron_trace/data/assets/arith_test.jsonl", "checkpoint.resume=none",
                                 "annotate.annotator=reference_match",
                                 "rollout.num_servers=2", 'rollout.server_gpus=["1","2"]',
                                 "rollout.weight_sync=nccl", "rollout.weight_bucket_mb=0.05",
                                 f"logging.output_dir={workdir}/run", "logging.tensorboard=false"])
    assert cfg.rollout.weight_transport == "nccl"
    trainer = Trainer(cfg, start_rollout=False)
    out = {"errors": []}
    wire, log, senders = Wire(), [], []

    class Sender:  # stand-in for NcclWeightSender (rank 0 of the group)
        def __init__(self, master_address, master_port, world_size, device):
            self.args = (master_address, world_size, str(device))
            self.closed = False
            senders.append(self)

        def send(self, buckets, metas):
            nccl_weights.send_announced(buckets, metas, wire.send, "cpu")

        def close(self):
            self.closed = True

    servers, engines, workers = [], [], []
    if rank == 0:
        from megatron_trace.checkpoint.hf_mapping import Qwen3Dims, hf_param_shapes

        shapes = {n: tuple(s) for n, s in hf_param_shapes(Qwen3Dims.from_hf_config(trainer.hf_config)).items()}
        os.environ["MEGATRON_TRACE_ROLLOUT_TOKEN"] = "t"
        clients = []
        for i in range(2):
            engine, worker = _server(i, wire, log, shapes)
            http = TestClient(build_app(engine, model_name="m", token="t"))
            http.__enter__()
            servers.append(http)
            client = RolloutClient(base_url=f"http://server-{i}:8100", retries=0)
            client._http.close()
            client._http = http
            clients.append(client)
            engines.append(engine)
            workers.append(worker)
        trainer.engine = EnginePool(clients)

    def sync(expect_error: str | None = None):
        try:
            trainer.sync_weights()
        except WeightSyncError as e:
            assert expect_error is not None, f"unexpected: {e}"
            out["errors"].append(str(e))
            return
        assert expect_error is None, "the sync should have failed"

    no_cuda_stream = mock.patch("torch.cuda.current_stream", return_value=None)
    no_cuda_sync = mock.patch("torch.cuda.synchronize")
    with mock.patch.object(nccl_weights, "NcclWeightSender", Sender), no_cuda_stream, no_cuda_sync:
        if rank == 0:
            trainer._build_weight_sync(trainer.engine)  # what _build_rollout does on the driver
        sync()
        sync()
        if rank == 0:
            # numpy: torch tensors in the result queue would need this process alive
            out["received"] = {n: t.numpy().copy() for n, t in workers[0].loaded.items()}
            out["after_two"] = [e.weight_version for e in engines]
            out["sent_after_two"] = wire.sent
            engines[1].sleep(1)  # refused at the announcement: nothing may be broadcast
        sync(expect_error="asleep")
        if rank == 0:
            out["sent_after_refusal"] = wire.sent
            out["after_refusal"] = [e.weight_version for e in engines]
            engines[1].wake_up()
            workers[1].fail_after = 3  # server 1's reload fails part-way
        sync(expect_error="injected")
        if rank == 0:
            out["after_failure"] = [e.weight_version for e in engines]
            out["refuse_after_failure"] = [e._inconsistent is not None for e in engines]
            out["log_at_failure"] = list(log)
            workers[1].fail_after = None
        sync()  # a complete update repairs every server
        if rank == 0:
            out["after_repair"] = [e.weight_version for e in engines]
            out["refuse_after_repair"] = [e._inconsistent is not None for e in engines]
            out["balanced"] = wire.balanced()
            out["joined"] = sorted(wire.joined)
            out["sender"] = senders[0].args if senders else None
            out["senders"] = len(senders)
        trainer.close()
    if rank == 0:
        out["sender_closed"] = senders[0].closed
        out["log"] = list(log)
        for http in servers:
            http.__exit__(None, None, None)
    return out


@pytest.fixture(scope="module")
def nccl_run(tmp_path_factory):
    from tiny_hf_model import make_tiny_qwen3_dir

    workdir = tmp_path_factory.mktemp("trainer_nccl")
    hf_dir = make_tiny_qwen3_dir(str(workdir / "hf"), seed=0, tied=False, vocab_size=1000, hidden=64,
                                 intermediate=128, layers=2, max_positions=512, tokenizer="truncated")
    return hf_dir, run_distributed(_nccl_sync, 2, hf_dir, str(workdir), init_gloo=False, timeout=400)


def _steps(log, server):
    return [step for s, step in log if s == server]


def test_the_group_is_formed_once_and_left_at_close(nccl_run):
    _, (r0, _) = nccl_run
    assert r0["senders"] == 1 and r0["sender"] == ("127.0.0.1", 3, "cpu")  # 1 + 2 servers x 1 worker
    assert r0["joined"] == [(1, 3), (2, 3)]
    for server in (0, 1):
        steps = _steps(r0["log"], server)
        assert steps[:2] == ["init_weight_group", "worker.init_weight_update_group"]
        assert steps.count("init_weight_group") == 1
        assert steps[-2:] == ["close_weight_group", "worker.close_weight_update_group"]
    assert r0["sender_closed"]


def test_each_update_is_announced_broadcast_once_loaded_everywhere_then_committed(nccl_run):
    hf_dir, (r0, _) = nccl_run
    assert r0["after_two"] == [2, 2]
    for server in (0, 1):
        steps = [s for s in _steps(r0["log"], server) if "init" not in s and "close" not in s]
        assert steps[:8] == ["announce v1", "worker.receive_weights_nccl", "loaded v1 commit=False", "commit v1",
                             "announce v2", "worker.receive_weights_nccl", "loaded v2 commit=False", "commit v2"]
    # No server is committed before every server has loaded the update.
    for v in (1, 2):
        order = [step for _, step in r0["log"]]
        loads = [i for i, s in enumerate(order) if s == f"loaded v{v} commit=False"]
        commits = [i for i, s in enumerate(order) if s == f"commit v{v}"]
        assert len(loads) == len(commits) == 2 and max(loads) < min(commits)
    # One broadcast per tensor plus the status word, for both servers at once (not once per server).
    n_tensors = len(r0["received"])
    assert r0["sent_after_two"] == 2 * (n_tensors + 1)
    # What arrived is the model the trainer loaded: the HF checkpoint, tensor for tensor.
    import glob

    from safetensors.torch import load_file

    ref = {}
    for f in glob.glob(os.path.join(hf_dir, "*.safetensors")):
        ref.update(load_file(f))
    assert sorted(r0["received"]) == sorted(ref)
    for name, t in ref.items():
        assert torch.equal(torch.from_numpy(r0["received"][name]), t.float()), name


def test_a_refusal_at_the_announcement_broadcasts_nothing_and_every_rank_raises(nccl_run):
    _, (r0, r1) = nccl_run
    assert r0["sent_after_refusal"] == r0["sent_after_two"]
    assert r0["after_refusal"] == [2, 2]
    for out in (r0, r1):
        msg = out["errors"][0]
        assert "http://server-1:8100" in msg and "asleep" in msg and "nothing was broadcast" in msg


def test_a_failure_mid_update_commits_nothing_and_names_the_server(nccl_run):
    _, (r0, r1) = nccl_run
    assert r0["after_failure"] == [2, 2]  # the previous version everywhere
    # server 0 holds v3 loaded but uncommitted, server 1 a mix: both refuse to generate until a complete update
    assert r0["refuse_after_failure"] == [True, True]
    for out in (r0, r1):
        msg = out["errors"][1]
        assert r0["errors"][1] == msg  # the same message on every rank
        assert "http://server-1:8100" in msg and "injected: vLLM failed at tensor 3" in msg
        assert "http://server-0:8100" not in msg.split("receiving failed on")[1]
        assert "no server was committed" in msg
    assert all("commit v3" not in step for _, step in r0["log_at_failure"])
    assert r0["after_repair"] == [3, 3] and r0["refuse_after_repair"] == [False, False]
    assert r0["balanced"]  # every broadcast was received by every server, the failing one included

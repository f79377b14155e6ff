"""Every collective the trainer, the loss and the weight bridge issue has its tensors where NCCL needs them.

On GPU the default group is NCCL, which takes CUDA tensors only; bookkeeping tensors built on the CPU (metric
sums, the stage-leader table, receive buffers) must be placed on the current CUDA device for the call. This
machine has no GPU, so the check runs a TRACE update and a weight export at TP=2 x PP=2 over gloo while
pretending the backend is NCCL: `collectives.comm_device` answers `cuda:0`, the one placement function tags
the copy it makes as "on cuda:0" (the tensor itself stays on the CPU, for gloo), and torch.distributed's
collectives are wrapped to check every call issued from megatron_trace code: it must come from
`megatron_trace/distributed/collectives.py` (nothing bypasses the helper), and every tensor it passes must be on
the NCCL device (tagged). megatron-core's own collectives (on parameters, gradients and activations, which live
on the GPU there) and torch's internal ones are not checked.

Unit checks of the helper itself: which device each backend needs, and that a moved tensor's result is copied
back into the caller's tensor.
"""

from __future__ import annotations

import os
import sys
from unittest import mock

import pytest
import torch

from dist_harness import run_distributed

WRAPPED = ("all_reduce", "broadcast", "gather", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
           "reduce", "scatter", "send", "recv", "isend", "irecv", "all_to_all_single", "broadcast_object_list",
           "all_gather_object", "gather_object", "barrier")
FAKE_NCCL_DEVICE = torch.device("cuda", 0)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def install_nccl_device_guard():
    """Pretend the backend is NCCL and record every collective megatron_trace issues; returns the record."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from megatron_trace.distributed import collectives

    helper = os.path.abspath(collectives.__file__)
    package = os.path.dirname(os.path.dirname(helper))  # .../megatron_trace
    record = {"violations": [], "calls": {}}

    def placed_copy(t, device):
        u = t.clone()
        u._fake_device = device  # what NCCL would see: a tensor on `device`
        return u

    collectives.comm_device = lambda group=None: FAKE_NCCL_DEVICE
    collectives._move = placed_copy

    def wrap(name, fn):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1)
            path = os.path.abspath(caller.f_code.co_filename)
            where = f"{os.path.relpath(path, os.path.dirname(package))}:{caller.f_lineno}"
            if path == helper:
                outer = sys._getframe(2)
                key = f"{name} via {os.path.basename(outer.f_code.co_filename)}:{outer.f_code.co_name}"
                record["calls"][key] = record["calls"].get(key, 0) + 1
                for t in _tensors(list(args) + list(kwargs.values())):
                    device = getattr(t, "_fake_device", t.device)
                    if device != FAKE_NCCL_DEVICE:
                        record["violations"].append(f"{key}: a tensor on {device}, NCCL needs {FAKE_NCCL_DEVICE}")
            elif path.startswith(package + os.sep):
                record["violations"].append(f"{name} called directly from {where}, not through the helper")
            return fn(*args, **kwargs)

        return wrapper

    for name in WRAPPED:
        original = getattr(c10d, name)
        w = wrap(name, original)
        setattr(c10d, name, w)
        if getattr(dist, name, None) is original:
            setattr(dist, name, w)
    return record


def _update_and_export(rank, world_size, hf_dir, workdir):
    from test_trainer_step import KL_CLIP, KL_WEIGHT, W0, _samples

    from megatron_trace.config import load_config
    from megatron_trace.sync.hf_export import save_hf_folder
    from megatron_trace.train.trainer import Trainer

    cfg = load_config(None, [f"model.hf_config={hf_dir}", f"model.load={hf_dir}", "parallel.tp=2", "parallel.pp=2",
                             "data.path=megatron_trace/data/assets/arith_test.jsonl",
                             "annotate.annotator=reference_match", f"loss.w0={W0}", f"loss.kl_clip={KL_CLIP}",
                             "optim.micro_batch_size=2", "checkpoint.resume=none",
                             f"logging.output_dir={workdir}/run", "logging.tensorboard=false"])
    trainer = Trainer(cfg, start_rollout=False)
    record = install_nccl_device_guard()
    batch = trainer._broadcast(_samples() if rank == 0 else None)
    metrics = trainer.update(batch, KL_WEIGHT)

    class Recorder:  # the driver's engine: takes the streamed buckets
        def __init__(self):
            self.names = []

        def update_weights(self, buckets):
            for b in buckets:
                self.names += [(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in b]

    trainer.engine = Recorder() if rank == 0 else None
    trainer.sync_weights()
    names = list(trainer.engine.names) if rank == 0 else []
    trainer.engine = None
    from megatron_trace.sync.weight_bridge import export_announcement

    announced = [(m.name, m.dtype, m.shape) for m in export_announcement(trainer.hf_config, torch.float32)]
    save_hf_folder(trainer.model[0], trainer.hf_config, f"{workdir}/export")
    trainer.close()
    return {"record": record, "tokens": metrics["tokens"], "names": names, "announced": announced}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    from test_trainer_step import VOCAB
    from tiny_hf_model import make_tiny_qwen3_dir

    workdir = tmp_path_factory.mktemp("collectives")
    # The model of test_trainer_step (its batch's token ids fit this vocabulary and its tokenizer).
    hf_dir = make_tiny_qwen3_dir(str(workdir / "hf"), seed=0, tied=False, vocab_size=VOCAB, hidden=64,
                                 intermediate=128, layers=2, max_positions=512, tokenizer="truncated", init_std=None,
                                 lm_head_scale=20.0)
    return run_distributed(_update_and_export, 4, hf_dir, str(workdir), init_gloo=False, timeout=400)


def test_every_collective_of_an_update_and_an_export_is_placed_for_nccl(guarded):
    for rank, out in enumerate(guarded):
        assert out["record"]["violations"] == [], (rank, out["record"]["violations"][:10])


def test_the_guard_saw_the_collectives_it_is_about(guarded):
    """The check above is not vacuous: each defect site went through the guard on the ranks that issue it."""
    calls = [set(out["record"]["calls"]) for out in guarded]
    everywhere = set.intersection(*calls)
    assert "all_reduce via reductions.py:reduce_metrics" in everywhere  # the step's metric vector (float64)
    assert "all_reduce via weight_bridge.py:_stage_leaders" in everywhere  # the CPU stage-leader table
    assert "broadcast_object_list via trainer.py:_broadcast" in everywhere
    # Loss on the last stage (ranks 2, 3 with TP=2): vocab-parallel reductions.
    assert all("all_reduce via vocab_parallel.py:_all_reduce" in calls[r] for r in (2, 3))
    # Bridge: TP gathers on every stage, the stage-1 leader (rank 2) sends to rank 0, which receives.
    assert all("gather via weight_bridge.py:export_hf_buckets" in c for c in calls)
    assert "send via weight_bridge.py:export_hf_buckets" in calls[2]
    assert "recv via weight_bridge.py:export_hf_buckets" in calls[0]
    assert "barrier via hf_export.py:save_hf_folder" in everywhere
    assert guarded[0]["tokens"] > 0 and "lm_head.weight" in [n for n, _, _ in guarded[0]["names"]]


def test_the_nccl_announcement_is_what_the_bridge_exports_in_its_order(guarded):
    """`export_announcement` (the NCCL path's announcement, computed from the config before any tensor
    exists) lists exactly the tensors a TP=2 x PP=2 export streams, in the same order, dtype and shape."""
    assert guarded[0]["names"] == guarded[0]["announced"]


def test_the_guard_catches_a_direct_collective_on_a_cpu_tensor(tmp_path):
    """A collective issued from megatron_trace without the helper (the defect) is reported, with its site."""
    out = run_distributed(_direct_call, 1, timeout=120)[0]
    assert len(out) == 1 and "all_reduce called directly from" in out[0] and "test_collectives" not in out[0]


def _direct_call(rank, world_size):
    import torch.distributed as dist

    record = install_nccl_device_guard()
    # Compiled as if it were a line of megatron_trace/train/trainer.py: the caller check goes by file name.
    from megatron_trace.train import trainer as trainer_module

    code = compile("dist.all_reduce(torch.zeros(3, dtype=torch.float64))", trainer_module.__file__, "exec")
    exec(code, {"dist": dist, "torch": torch})
    return record["violations"]


# ------------------------------------------------------------------------------------------------- unit checks

@pytest.mark.parametrize("backend, want", [("nccl", torch.device("cuda", 3)), ("gloo", torch.device("cpu")),
                                           ("cpu:gloo,cuda:nccl", None)])
def test_comm_device_is_the_backends_device(backend, want):
    from megatron_trace.distributed import collectives

    with mock.patch("torch.distributed.is_initialized", return_value=True), \
            mock.patch("torch.distributed.get_backend", return_value=backend), \
            mock.patch("torch.cuda.current_device", return_value=3):
        assert collectives.comm_device() == want


def test_without_a_process_group_nothing_is_moved():
    from megatron_trace.distributed import collectives

    with mock.patch("torch.distributed.is_initialized", return_value=False):
        assert collectives.comm_device() is None


def test_a_moved_tensor_is_reduced_on_the_backend_device_and_copied_back():
    """all_reduce / recv / gather on a CPU tensor under NCCL: the call sees the placed copy, the caller's
    tensor gets the result."""
    from megatron_trace.distributed import collectives

    seen = []

    def fake_move(t, device):
        u = t.clone()
        u._fake_device = device
        return u

    def fake_all_reduce(t, op=None, group=None):
        seen.append(getattr(t, "_fake_device", t.device))
        t.mul_(2)

    def fake_recv(t, src=None, group=None):
        seen.append(getattr(t, "_fake_device", t.device))
        t.fill_(7)

    def fake_gather(t, gather_list, dst=None, group=None):
        seen.append(getattr(t, "_fake_device", t.device))
        seen.extend(getattr(g, "_fake_device", g.device) for g in gather_list)
        for i, g in enumerate(gather_list):
            g.fill_(i)

    vec = torch.arange(3, dtype=torch.float64)
    buf = torch.zeros(2)
    shards = [torch.zeros(2), torch.zeros(2)]
    with mock.patch.object(collectives, "comm_device", return_value=FAKE_NCCL_DEVICE), \
            mock.patch.object(collectives, "_move", fake_move), \
            mock.patch("torch.distributed.all_reduce", fake_all_reduce), \
            mock.patch("torch.distributed.recv", fake_recv), mock.patch("torch.distributed.gather", fake_gather):
        assert collectives.all_reduce(vec) is vec
        collectives.recv(buf, src=1)
        collectives.gather(torch.ones(2), shards, dst=0)
    assert seen == [FAKE_NCCL_DEVICE] * 5
    assert vec.tolist() == [0.0, 2.0, 4.0] and buf.tolist() == [7.0, 7.0]
    assert shards[0].tolist() == [0.0, 0.0] and shards[1].tolist() == [1.0, 1.0]


def test_a_tensor_already_on_the_backend_device_is_not_copied():
    from megatron_trace.distributed import collectives

    t = torch.ones(4)
    with mock.patch.object(collectives, "comm_device", return_value=torch.device("cpu")), \
            mock.patch.object(collectives, "_move", side_effect=AssertionError("copied")), \
            mock.patch("torch.distributed.all_reduce") as ar:
        collectives.all_reduce(t)
    assert ar.call_args.args[0] is t

"""Resume: 6 steps straight equal 3 steps, stop, resume, 3 more (metrics and weights); a kill during a
checkpoint write leaves the previous checkpoint loadable. The TRACE run goes through real vLLM (a generation
server started by the trainer), the reference-match annotator, a teacher snapshot and the KL anneal.

The straight run and the first part of the split run are independent processes: they run at the same time (each
is one single-threaded rank, plus its generation server for TRACE, on a 2-core machine). The SFT straight run is
also the trainer checkpoint that the conversion test converts."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dist_harness import run_distributed

DATA = "megatron_trace/data/assets/arith_train.jsonl"
# Timing and environment metrics legitimately differ between runs.
VOLATILE = ("time/", "tokens_per_s")


def _cfg(out_dir: str, steps: int, mode: str, extra=()):
    from megatron_trace.config import load_config

    common = [f"train.steps={steps}", "train.seed=11", "model.hf_config=tiny-bpe4k",
              "model.tokenizer=qwen3-bpe4k", f"data.path={DATA}",
              "checkpoint.save_every=1", "checkpoint.keep_last=2", "checkpoint.resume=auto",
              f"logging.output_dir={out_dir}", "logging.tensorboard=false", "optim.micro_batch_size=4"]
    if mode == "sft":
        return load_config(None, common + ["train.mode=sft", "sft.batch_size=4", "sft.lr=1e-3", *extra])
    return load_config(None, common + [
        "train.mode=trace", "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_response_tokens=12",
        "rollout.max_model_len=256", "reward.workers=1", "annotate.annotator=reference_match",
        "loss.warmup_steps=2", "loss.decay_steps=2", "teacher.refresh_steps=2", "optim.lr=1e-3", *extra])


def _train(rank, world_size, out_dir, steps, mode, kill_in_save_at=None):
    from megatron_trace.sync.weight_bridge import export_hf_buckets
    from megatron_trace.train.trainer import Trainer

    trainer = Trainer(_cfg(out_dir, steps, mode))
    if kill_in_save_at is not None:
        from megatron.core import dist_checkpointing

        real_save = dist_checkpointing.save

        def save_then_die(state, path, *a, **kw):
            real_save(state, path, *a, **kw)
            if trainer.step == kill_in_save_at:
                os._exit(9)  # the process dies with the checkpoint written but not committed

        dist_checkpointing.save = save_then_die
    try:
        trainer.train()
        weights = {}
        for bucket in export_hf_buckets(trainer.model[0], trainer.hf_config, bucket_bytes=64 << 20):
            weights.update({n: _digest(t) for n, t in bucket})
    finally:
        trainer.close()
    return weights


def _digest(t: torch.Tensor) -> str:
    """Bitwise identity of a tensor: dtype, shape and a hash of its bytes."""
    import hashlib

    return f"{t.dtype}{tuple(t.shape)}" + hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _first_runs(root: str, mode: str):
    """The uninterrupted 6-step run (folder, exported weights) and the first 3 steps of the split run (folder),
    started together."""
    straight, split = os.path.join(root, "straight"), os.path.join(root, "split")
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(run_distributed, _train, 1, straight, 6, mode, init_gloo=False, timeout=600)
        b = pool.submit(run_distributed, _train, 1, split, 3, mode, init_gloo=False, timeout=600)
        return straight, a.result()[0], split, b.result()[0]


@pytest.fixture(scope="module")
def first_runs(tmp_path_factory):
    """`first_runs(mode)`: `_first_runs` once per mode and module (the conversion test reuses the SFT one)."""
    done = {}

    def get(mode: str):
        if mode not in done:
            done[mode] = _first_runs(str(tmp_path_factory.mktemp(f"resume_{mode}")), mode)
        return done[mode]

    return get


@pytest.mark.parametrize("mode", ["sft", "trace"])
def test_resumed_run_equals_uninterrupted_run(first_runs, mode):
    straight, w_straight, split, _ = first_runs(mode)
    w_split = run_distributed(_train, 1, split, 6, mode, init_gloo=False, timeout=600)[0]
    a, b = _metrics(straight), _metrics(split)
    assert [r["step"] for r in a] == list(range(6)) and [r["step"] for r in b] == list(range(6))
    assert a == b
    assert w_straight == w_split
    if mode == "trace":
        lambdas = [r["lambda"] for r in a]
        # W = 2 steps at w0, then w0 * max(0, 1 - (k - W + 1) / D) with D = 2: 0.25 at k = 2, 0 from k = W + D - 1
        assert lambdas == [0.5, 0.5, 0.25, 0.0, 0.0, 0.0]
        assert all(r.get("span_tokens", 0) == 0 for r in a[3:]), "no KL channel once lambda is 0"
        assert all("annotate/failed" not in r for r in a[3:]), "no annotation once lambda is 0"


def test_kill_during_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    from megatron_trace.train.checkpointing import latest_checkpoint

    out = str(tmp_path / "run")
    with pytest.raises(RuntimeError):  # the rank died: the harness reports it
        run_distributed(_train, 1, out, 4, "sft", kill_in_save_at=3, init_gloo=False, timeout=300)
    ckpt_root = os.path.join(out, "checkpoints")
    assert latest_checkpoint(ckpt_root) == os.path.join(ckpt_root, "step_000002")
    assert os.path.isdir(os.path.join(ckpt_root, "step_000003.tmp")), "the interrupted write stays uncommitted"
    # Resuming picks step 2 and finishes the run; the half-written checkpoint is cleaned up.
    run_distributed(_train, 1, out, 4, "sft", init_gloo=False, timeout=300)
    assert latest_checkpoint(ckpt_root) == os.path.join(ckpt_root, "step_000004")
    assert not any(e.endswith(".tmp") for e in os.listdir(ckpt_root))
    assert [r["step"] for r in _metrics(out)] == [0, 1, 2, 3]


def test_a_trainer_checkpoint_converts_to_the_same_hf_weights(first_runs, tmp_path):
    from safetensors import safe_open

    from megatron_trace.checkpoint.convert import convert_megatron_to_hf
    from megatron_trace.train.checkpointing import latest_checkpoint

    out, exported, _, _ = first_runs("sft")  # the SFT straight run: its last checkpoint and its final weights
    assert latest_checkpoint(os.path.join(out, "checkpoints")) == os.path.join(out, "checkpoints", "step_000006")
    hf_dir = str(tmp_path / "hf")
    convert_megatron_to_hf(latest_checkpoint(os.path.join(out, "checkpoints")), hf_dir)
    converted = {}
    for fname in os.listdir(hf_dir):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(hf_dir, fname), "pt") as f:
                for n in f.keys():
                    converted[n] = _digest(f.get_tensor(n))
    assert converted == exported

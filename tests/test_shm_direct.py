"""sync/shm_direct.write_buckets at TP=2 (two gloo processes): each rank writing its own shards into the leader's
/dev/shm segments gives, bucket for bucket, exactly what the gathering bridge (export_hf_buckets) yields: the same
names in the same buckets, bit for bit, tied and untied, for bucket sizes that put one tensor, a few, or the whole
model in a bucket; and so again after the weights changed, writing through the segment mappings the first export
kept (the trainer keeps them from one refresh to the next)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_harness import run_distributed

pytestmark = pytest.mark.slow

BASE = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=500, hidden_size=64,
            intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            hidden_act="silu", max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
            attention_bias=False, torch_dtype="float32")
BUCKETS = (1, 60000, 1 << 40)


def _cfg(tied: bool) -> dict:
    return dict(BASE, tie_word_embeddings=tied)


def _reference(cfg, seed=5):
    from megatron_trace.checkpoint.hf_mapping import Qwen3Dims, hf_param_shapes

    g = torch.Generator().manual_seed(seed)
    shapes = hf_param_shapes(Qwen3Dims.from_hf_config(cfg))
    if cfg["tie_word_embeddings"]:
        shapes.pop("lm_head.weight", None)
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def _run(rank, world_size):
    from megatron.core import parallel_state as ps

    from megatron_trace.checkpoint.hf_mapping import load_hf_state_into_model
    from megatron_trace.distributed import destroy_distributed, initialize_distributed
    from megatron_trace.models import build_qwen3_model
    from megatron_trace.rollout.shm_weights import BucketMapping, ShmBucketWriter
    from megatron_trace.sync.shm_direct import write_buckets
    from megatron_trace.sync.weight_bridge import export_hf_buckets

    torch.set_num_threads(1)
    initialize_distributed(tp=2, pp=1, seed=0)
    out = {}
    writer = ShmBucketWriter() if rank == 0 else None
    try:
        for tied in (False, True):
            cfg = _cfg(tied)
            model = build_qwen3_model(cfg)
            mappings: dict = {}  # kept across the exports below, as the trainer keeps it across refreshes
            for size in BUCKETS:
                for seed in (5, 6):  # the second export writes new values through the mappings the first kept
                    load_hf_state_into_model(model, _reference(cfg, seed), cfg)
                    ref = [[(n, t.numpy().copy()) for n, t in b]
                           for b in export_hf_buckets(model, cfg, bucket_bytes=size)]
                    got = []
                    for desc in write_buckets(model, cfg, bucket_bytes=size,
                                              group=ps.get_tensor_model_parallel_group(), leader=0,
                                              acquire=(lambda i, n: writer.acquire(i, n).name) if writer else None,
                                              tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=2,
                                              mappings=mappings):
                        mapping = BucketMapping(desc, 1 << 40)
                        got.append([(n, t.numpy().copy()) for n, t in mapping.tensors])
                        del mapping
                        writer.release([desc["index"]])
                    out[(tied, size, seed)] = (ref, got, writer.max_segments if writer else 0, sorted(mappings),
                                               writer.segment_names if writer else None)
        return out
    finally:
        if writer is not None:
            writer.close()
        destroy_distributed()


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_run, 2, timeout=900)


@pytest.mark.parametrize("seed", [5, 6], ids=["first", "through-kept-mappings"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("size", BUCKETS, ids=["one-tensor", "a-few", "whole"])
def test_ranks_writing_their_own_shards_equal_the_gathered_export(runs, tied, size, seed):
    ref, got, segments, mapped, alive = runs[0][(tied, size, seed)]
    assert [[n for n, _ in b] for b in got] == [[n for n, _ in b] for b in ref]  # same buckets, same order
    for rb, gb in zip(ref, got):
        for (n, r), (_, g) in zip(rb, gb):
            assert np.array_equal(g, r), n
    names = {n for b in got for n, _ in b}
    assert names == set(_reference(_cfg(tied)))
    assert segments <= 2
    assert set(mapped) <= set(alive) and 1 <= len(mapped) <= 2  # the cache keeps only the segments in use
    other = runs[1][(tied, size, seed)]
    assert other[1] == []  # only the leader yields
    assert other[3] == mapped  # the other rank keeps the same segments mapped

"""The weight bridge with several destinations (node-local sync: one per node leader), on 4 local ranks: every
destination yields the whole model, bitwise what the one-destination export yields, fed by its own data-parallel
replica; other ranks yield nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_harness import run_distributed

pytestmark = pytest.mark.slow

CFG = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=512, hidden_size=64,
           intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
           hidden_act="silu", max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
           tie_word_embeddings=False, attention_bias=False, torch_dtype="float32")
# (tp, pp, dsts): two nodes of two processes each, dsts = the node leaders (global ranks 0 and 2)
CASES = [(2, 1, [0, 2]),  # each node holds a whole replica (TP inside the node): nothing crosses nodes
         (1, 2, [0, 2]),  # PP across nodes: rank 2 is replica 0's stage 1, both leaders take replica 0
         (1, 1, [0, 1, 2, 3])]  # every rank a replica and a destination (one process per node)


def _flat(buckets):
    out = {}
    for b in buckets:
        for n, t in b:
            assert n not in out
            out[n] = t.numpy().copy()
    return out


def _runs(rank, world_size):
    import torch.distributed as dist

    from megatron_trace.distributed import destroy_distributed, initialize_distributed
    from megatron_trace.models import build_qwen3_model
    from megatron_trace.sync.weight_bridge import export_hf_buckets

    torch.set_num_threads(1)
    results = []
    for tp, pp, dsts in CASES:
        initialize_distributed(tp=tp, pp=pp, seed=3)
        try:
            model = build_qwen3_model(CFG)
            with torch.no_grad():  # different weights per replica would hide a replica mix-up: make them differ
                from megatron.core import parallel_state as ps

                for p in model.parameters():
                    p.add_(ps.get_data_parallel_rank() * 0.5)
            reference = _flat(export_hf_buckets(model, CFG, bucket_bytes=20000))  # dst 0 from replica 0
            local = list(export_hf_buckets(model, CFG, bucket_bytes=20000, dsts=dsts))
            dist.barrier()
            results.append(dict(dp_rank=ps.get_data_parallel_rank(), reference=reference if rank == 0 else None,
                                local=_flat(local), n_buckets=len(local)))
        finally:
            destroy_distributed()
    return results


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_runs, 4, timeout=900)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"tp{t}pp{p}-dsts{''.join(map(str, d))}"
                                                         for t, p, d in CASES])
def test_each_destination_gets_the_whole_model_from_its_own_replica(runs, case):
    tp, pp, dsts = CASES[case]
    reference = runs[0][case]["reference"]
    assert len(reference) == 2 + 2 * 11 + 1  # embedding, norm, lm_head + 11 tensors per layer
    for rank in range(4):
        got = runs[rank][case]
        if rank not in dsts:
            assert got["n_buckets"] == 0 and got["local"] == {}
            continue
        assert got["n_buckets"] > 1 and set(got["local"]) == set(reference)
        # replica r's weights are replica 0's + 0.5 r: the destination got its own replica, bitwise
        shift = np.float32(0.5 * got["dp_rank"])
        for name, arr in reference.items():
            np.testing.assert_array_equal(got["local"][name], arr + shift, err_msg=f"rank {rank} {name}")

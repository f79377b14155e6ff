"""initialize_distributed / destroy_distributed: layouts at TP=2, PP=2, DP=2 on two processes (one launch),
groups that connect the right ranks, teardown that can be repeated, and errors that name the cause."""

from __future__ import annotations

import os

import pytest
import torch

from dist_harness import run_distributed

from megatron_trace.distributed.setup import free_ports

pytestmark = pytest.mark.slow


def _sum_over(group, value: int) -> int:
    t = torch.tensor([value])
    torch.distributed.all_reduce(t, group=group)
    return int(t.item())


def _layouts(rank: int, world_size: int, port_for_own_group: int) -> dict:
    from megatron_trace.distributed import destroy_distributed, initialize_distributed

    out = {}
    for tp, pp in ((2, 1), (1, 2), (1, 1)):
        layout = initialize_distributed(tp=tp, pp=pp, seed=11)
        # Same sizes again: the current layout comes back, nothing is re-created.
        assert initialize_distributed(tp=tp, pp=pp, seed=11) == layout
        try:
            initialize_distributed(*((1, 1) if (tp, pp) != (1, 1) else (2, 1)))
            out[f"resize_error_{tp}{pp}"] = None
        except RuntimeError as e:
            out[f"resize_error_{tp}{pp}"] = str(e)
        out[(tp, pp)] = dict(
            layout=layout,
            # the sum of world ranks over each group says which ranks it connects
            tp_sum=_sum_over(layout.tp_group(), rank), pp_sum=_sum_over(layout.pp_group(), rank),
            dp_sum=_sum_over(layout.dp_group(), rank), mp_sum=_sum_over(layout.mp_group(), rank),
            # megatron's tracked tensor-parallel RNG stream differs per TP rank, the default one does not
            tp_stream_draw=_draw_in_tp_stream(), default_draw=torch.rand(1).item(),
        )
        destroy_distributed()
        destroy_distributed()  # twice is fine
    from megatron.core import parallel_state as ps

    out["megatron_initialized_after_destroy"] = ps.model_parallel_is_initialized()
    out["default_group_kept"] = torch.distributed.is_initialized()  # the harness created it: not ours to destroy
    try:
        initialize_distributed(tp=4)
        out["divisibility_error"] = None
    except ValueError as e:
        out["divisibility_error"] = str(e)

    # Without a default group, initialize_distributed creates one from torchrun's variables and owns it.
    torch.distributed.destroy_process_group()
    os.environ["MASTER_PORT"] = str(port_for_own_group)
    layout = initialize_distributed(tp=2)
    out["own_group"] = (torch.distributed.get_backend(), layout.tp, _sum_over(layout.tp_group(), rank))
    destroy_distributed()
    out["own_group_destroyed"] = not torch.distributed.is_initialized()
    destroy_distributed()
    return out


def _draw_in_tp_stream() -> float:
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        return torch.rand(1).item()


@pytest.fixture(scope="module")
def results():
    return run_distributed(_layouts, 2, free_ports(1)[0], timeout=300)


def test_tp2_puts_both_ranks_in_one_tensor_parallel_group(results):
    for rank, res in enumerate(results):
        r = res[(2, 1)]
        lay = r["layout"]
        assert (lay.rank, lay.world_size, lay.tp, lay.pp, lay.cp, lay.dp) == (rank, 2, 2, 1, 1, 1)
        assert (lay.tp_rank, lay.pp_rank, lay.dp_rank) == (rank, 0, 0)
        assert lay.is_first_stage and lay.is_last_stage
        assert (r["tp_sum"], r["pp_sum"], r["dp_sum"], r["mp_sum"]) == (1, rank, rank, 1)
    # the tensor-parallel RNG stream differs across TP ranks; the default stream is shared
    assert results[0][(2, 1)]["tp_stream_draw"] != results[1][(2, 1)]["tp_stream_draw"]
    assert results[0][(2, 1)]["default_draw"] == results[1][(2, 1)]["default_draw"]


def test_pp2_makes_rank0_the_first_stage_and_rank1_the_last(results):
    for rank, res in enumerate(results):
        r = res[(1, 2)]
        lay = r["layout"]
        assert (lay.tp, lay.pp, lay.dp, lay.tp_rank, lay.pp_rank, lay.dp_rank) == (1, 2, 1, 0, rank, 0)
        assert (lay.is_first_stage, lay.is_last_stage) == (rank == 0, rank == 1)
        assert (r["tp_sum"], r["pp_sum"], r["dp_sum"], r["mp_sum"]) == (rank, 1, rank, 1)
    # stages are seeded differently (seed + 100 * pp_rank), as in Megatron-LM
    assert results[0][(1, 2)]["default_draw"] != results[1][(1, 2)]["default_draw"]


def test_dp2_replicates_the_model_on_both_ranks(results):
    for rank, res in enumerate(results):
        r = res[(1, 1)]
        lay = r["layout"]
        assert (lay.tp, lay.pp, lay.dp, lay.tp_rank, lay.pp_rank, lay.dp_rank) == (1, 1, 2, 0, 0, rank)
        assert (r["tp_sum"], r["pp_sum"], r["dp_sum"], r["mp_sum"]) == (rank, rank, 1, rank)
    assert results[0][(1, 1)]["tp_stream_draw"] == results[1][(1, 1)]["tp_stream_draw"]


def test_reinitialising_with_other_sizes_asks_for_destroy_first(results):
    for res in results:
        for key in ("resize_error_21", "resize_error_12", "resize_error_11"):
            assert res[key] is not None and "destroy_distributed()" in res[key]


def test_destroy_tears_down_megatron_but_leaves_a_caller_owned_group(results):
    for res in results:
        assert res["megatron_initialized_after_destroy"] is False
        assert res["default_group_kept"] is True


def test_without_a_default_group_it_creates_gloo_from_torchrun_env_and_destroys_it(results):
    for res in results:
        assert res["own_group"] == ("gloo", 2, 1)
        assert res["own_group_destroyed"]


def test_world_size_not_divisible_by_tp_pp_cp_is_a_clear_error(results):
    for res in results:
        assert "world size 2 is not divisible by tp*pp*cp = 4*1*1" in res["divisibility_error"]


def test_divisibility_is_checked_before_any_process_group_is_created(monkeypatch):
    from megatron_trace.distributed import initialize_distributed

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by tp\*pp\*cp = 1\*2\*1"):
        initialize_distributed(pp=2)
    with pytest.raises(ValueError, match="cp must be a positive int"):
        initialize_distributed(cp=0)
    assert not torch.distributed.is_initialized()


def test_an_incomplete_torchrun_environment_is_named(monkeypatch):
    from megatron_trace.distributed import initialize_distributed

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR, MASTER_PORT not set"):
        initialize_distributed()
    assert not torch.distributed.is_initialized()

"""Colocated generation (rollout.placement: colocated): configuration, GPU grouping, and two simulated nodes on
localhost (`torchrun --nnodes 2`, one process each, DP=2), each starting its own real vLLM server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_trace.config import load_config
from megatron_trace.config_base import ConfigError
from megatron_trace.rollout.colocated import server_gpu_groups
from proc_tree import wait_all

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "configs", "tiny_cpu.yaml")


def test_each_server_gets_a_group_of_tensor_parallel_size_local_gpus():
    assert server_gpu_groups(8, 2, None) == ["0,1", "2,3", "4,5", "6,7"]
    assert server_gpu_groups(8, 8, None) == ["0,1,2,3,4,5,6,7"]
    assert server_gpu_groups(4, 1, "4,5,6,7") == ["4", "5", "6", "7"]  # through the trainer's own mask
    with pytest.raises(ValueError, match="does not divide the 8 GPUs"):
        server_gpu_groups(8, 3, None)
    with pytest.raises(ValueError, match="lists 2 GPUs for 4"):
        server_gpu_groups(4, 1, "0,1")


@pytest.mark.parametrize("overrides, needle", [
    (["rollout.placement=separate"], "placement: separate"),
    (["rollout.placement=colocated", "rollout.server_url=http://h:1"], "server_urls: placement colocated"),
    (["rollout.placement=colocated", "rollout.num_servers=2"], "num_servers/server_gpus"),
    (["rollout.placement=colocated", "rollout.engine=inprocess"], "engine: placement colocated"),
    (["rollout.placement=elsewhere"], "placement"),
    (["rollout.sleep_level=3"], "sleep_level"),
    (["rollout.tensor_parallel_size=0"], "tensor_parallel_size"),
])
def test_bad_placements_name_the_field(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(EXAMPLE, overrides)


def test_good_placements_load():
    assert load_config(EXAMPLE, ["rollout.placement=colocated"]).rollout.placement == "colocated"
    cfg = load_config(EXAMPLE, ["rollout.placement=separate", "rollout.server_urls=[http://a:1,http://b:2]"])
    assert cfg.rollout.external_urls == ["http://a:1", "http://b:2"]


def _torchrun_two_nodes(script_args: list[str], out_dir, timeout: int, env=None):
    from megatron_trace.distributed.setup import free_ports

    port = free_ports(1)[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, **(env or {})}
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), *script_args]
        log = open(os.path.join(out_dir, f"node{node}.log"), "w")
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    wait_all(procs, timeout)
    return [p.returncode for p, _ in procs]


def _tail(path, n=40):
    with open(path) as f:
        return "".join(f.readlines()[-n:])


@pytest.mark.slow
def test_two_nodes_each_start_a_server_sample_from_both_update_both_and_name_a_killed_one(tmp_path):
    pytest.importorskip("vllm")
    _torchrun_two_nodes([os.path.join(REPO, "tests", "two_node_trace.py"), str(tmp_path)], tmp_path, timeout=1500)
    results = {}
    for rank in range(2):
        path = tmp_path / f"result.{rank}.json"
        assert path.exists(), _tail(tmp_path / f"node{rank}.log")
        results[rank] = json.loads(path.read_text())
    r0, r1 = results[0], results[1]
    # each node's local rank 0 (global ranks 0 and 1) started one server; every rank learned both URLs
    assert r0["leaders"] == r1["leaders"] == [0, 1]
    assert r0["urls"] == r1["urls"] and len(r0["urls"]) == 2 and all(len(u) == 1 for u in r0["urls"])
    names = [f"node {n} {r0['urls'][n][0]}" for n in range(2)]
    assert (tmp_path / "rollout_server.node0.0.log").exists() and (tmp_path / "rollout_server.node1.0.log").exists()
    # the TRACE step sampled from both servers
    assert set(r0["sampled"]) == set(names) and all(v > 0 for v in r0["sampled"].values())
    # the update reached both, committed together, and each serves exactly the trained weights
    assert r0["version"] == r1["version"] == 1 and r0["versions"] == [1, 1]
    assert set(r0["max_logprob_diff"]) == set(names)
    assert all(d <= 1e-4 for d in r0["max_logprob_diff"].values()), r0["max_logprob_diff"]
    # (and the step did change the weights: the servers no longer serve the initial model)
    assert all(d > 1e-2 for d in r0["max_logprob_change_from_initial"].values()), r0
    assert list(r0["max_logprob_change_from_initial"]) == names
    # node 1's server was killed: the next step stops on every rank, naming node 1 and its URL
    assert r1["killed"] == r0["urls"][1][0]
    for r in (r0, r1):
        assert "second_step" not in r
        assert names[1] in r["second_step_error"], r["second_step_error"]
        assert names[0] not in r["second_step_error"]


@pytest.mark.slow
def test_the_multi_node_launcher_runs_two_nodes_on_localhost_each_with_its_own_server(tmp_path):
    """examples/lib/launch_trace.sh as a user runs it on each node (NNODES=2, NODE_RANK=0/1, one process per
    node), with the tiny CPU recipe run colocated: one TRACE step, a server on each node."""
    pytest.importorskip("vllm")
    from megatron_trace.distributed.setup import free_ports
    from tiny_hf_model import make_tiny_qwen3_dir

    hf_dir = make_tiny_qwen3_dir(str(tmp_path / "hf"), seed=5, tied=True)
    out = tmp_path / "run"
    port = free_ports(1)[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "PY": sys.executable,
           "CONFIG": "examples/configs/tiny_cpu.yaml", "TP": "1", "PP": "1", "HF_DIR": hf_dir,
           "DATA": os.path.join(REPO, "megatron_trace", "data", "assets", "arith_train.jsonl"), "NNODES": "2",
           "GPUS_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OUTPUT_DIR": str(out)}
    overrides = ["train.steps=1", "rollout.placement=colocated", "rollout.advertise_host=127.0.0.1", "rollout.prompts_per_step=2",
                 "rollout.group_size=2", "rollout.max_response_tokens=8", "rollout.max_model_len=256",
                 "optim.micro_batch_size=4", "logging.tensorboard=false", "rollout.server_start_timeout_s=600"]
    procs = []
    for node in range(2):
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append((subprocess.Popen(["bash", "examples/lib/launch_trace.sh", *overrides], cwd=REPO,
                                       env={**env, "NODE_RANK": str(node)}, stdout=log, stderr=subprocess.STDOUT),
                      log))
    wait_all(procs, 1500)
    codes = [p.returncode for p, _ in procs]
    assert codes == [0, 0], _tail(tmp_path / "node0.log") + _tail(tmp_path / "node1.log")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0] and steps[0]["tokens_generated"] > 0
    for node in range(2):  # each node's local rank 0 started and stopped its own server
        log = (out / f"rollout_server.node{node}.0.log").read_text()
        assert "weights v1 committed: serving" in log, log[-2000:]

"""examples/lib/launch_trace.sh on localhost with Slurm faked: `srun` and `scontrol` are small scripts on PATH
that set the variables real Slurm sets, and `$PY` is a stand-in Python that records each torchrun and each
conversion (and converts, fails or is slow on demand) instead of running them.

Checked: relative HF_DIR / DATA / OUTPUT_DIR / MEGATRON_DIR survive the script's cd; plain `sbatch` without srun
starts one launcher per node (NNODES from Slurm); two tasks per node convert once and start one torchrun per
node; the other nodes stop waiting when node 0's conversion fails or when MEGATRON_DIR is not on a filesystem
they share with node 0.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.path.join(ROOT, "examples", "lib", "launch_trace.sh")

FAKE_PY = r"""#!/usr/bin/env bash
# Records what the launcher runs. Conversion: FAKE_CONVERT=ok|fail; FAKE_CONVERT_S seconds of work.
if [[ "$1" == tools/convert_checkpoint.py ]]; then
  echo "convert node=${NODE_RANK_SEEN:-} $*" >> "$FAKE_LOG"
  sleep "${FAKE_CONVERT_S:-0}"
  [[ "${FAKE_CONVERT:-ok}" == fail ]] && { echo "conversion error" >&2; exit 3; }
  while [[ $# -gt 0 ]]; do [[ "$1" == --out-dir ]] && out=$2; shift; done
  mkdir -p "$out.tmp" && mv "$out.tmp" "$out"
  exit 0
fi
if [[ "$1" == -m && "$2" == torch.distributed.run ]]; then
  echo "torchrun cwd=$PWD $*" >> "$FAKE_LOG"
  exit 0
fi
echo "unexpected python call: $*" >&2
exit 9
"""

# srun: NODES x TASKS_PER_NODE copies of the command, in parallel, with the step variables real srun sets.
FAKE_SRUN = r"""#!/usr/bin/env bash
nodes=${SLURM_NNODES:-1}; per=1
while [[ "$1" == -* ]]; do
  case "$1" in
    --nodes=*) nodes=${1#--nodes=} ;;
    --ntasks-per-node=*) per=${1#--ntasks-per-node=} ;;
  esac
  shift
done
echo "srun nodes=$nodes per=$per" >> "$FAKE_LOG"
pids=()
for ((n = 0; n < nodes; n++)); do
  for ((l = 0; l < per; l++)); do
    SLURM_STEP_ID=0 SLURM_STEP_NUM_NODES=$nodes SLURM_STEP_NUM_TASKS=$((nodes * per)) SLURM_NODEID=$n \
      SLURM_LOCALID=$l SLURM_PROCID=$((n * per + l)) SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST NODE_RANK_SEEN=$n \
      "$@" &
    pids+=($!)
  done
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && { echo node-a; echo node-b; exit 0; }
exit 1
"""

RUN_SCRIPT = """CONFIG=examples/configs/qwen3_8b.yaml TP=${TP:-4} PP=${PP:-1}
source "%s"
""" % LIB


def _exe(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def sandbox(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _exe(str(bin_dir / "srun"), FAKE_SRUN)
    _exe(str(bin_dir / "scontrol"), FAKE_SCONTROL)
    py = _exe(str(tmp_path / "fake_python"), FAKE_PY)
    run = _exe(str(tmp_path / "run_trace.sh"), RUN_SCRIPT)
    work = tmp_path / "work"
    (work / "ckpt" / "hf").mkdir(parents=True)
    (work / "data.jsonl").write_text("{}\n")
    log = tmp_path / "calls.log"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in (
        "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "MEGATRON_DIR", "OUTPUT_DIR")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PY=py, FAKE_LOG=str(log), HF_DIR="ckpt/hf", DATA="data.jsonl",
               CONVERT_POLL_S="0.2")

    def launch(extra_env=None, timeout=60, node_rank_seen=None):
        e = dict(env, **(extra_env or {}))
        if node_rank_seen is not None:
            e["NODE_RANK_SEEN"] = str(node_rank_seen)
        t0 = time.monotonic()
        p = subprocess.run(["bash", run], cwd=work, env=e, capture_output=True, text=True, timeout=timeout)
        return p, time.monotonic() - t0

    def calls(kind):
        return [line.split() for line in log.read_text().splitlines() if line.startswith(kind)]

    def arg(call, flag):
        return call[call.index(flag) + 1]

    return dict(launch=launch, calls=calls, arg=arg, work=work)


SLURM_BATCH = dict(SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_JOB_NODELIST="node-[a-b]", SLURM_NODEID="0",
                   SLURM_PROCID="0", SLURM_LOCALID="0")


def test_relative_paths_survive_the_cd(sandbox):
    p, _ = sandbox["launch"](dict(OUTPUT_DIR="out", MEGATRON_DIR="mg/q8"))
    assert p.returncode == 0, p.stderr
    work = str(sandbox["work"])
    (conv,) = sandbox["calls"]("convert")
    assert sandbox["arg"](conv, "--hf-dir") == f"{work}/ckpt/hf"
    assert sandbox["arg"](conv, "--out-dir") == f"{work}/mg/q8"
    (run,) = sandbox["calls"]("torchrun")
    assert run[1] == f"cwd={ROOT}"  # the launcher runs from the repository (CONFIG is relative to it)
    for override in (f"model.hf_config={work}/ckpt/hf", f"data.path={work}/data.jsonl", f"model.load={work}/mg/q8",
                     f"logging.output_dir={work}/out"):
        assert override in run, (override, run)
    assert os.path.isdir(f"{work}/mg/q8")


def test_plain_sbatch_without_srun_starts_one_launcher_per_node(sandbox):
    p, _ = sandbox["launch"](SLURM_BATCH)
    assert p.returncode == 0, p.stderr
    assert sandbox["calls"]("srun") == [["srun", "nodes=2", "per=1"]]
    runs = sandbox["calls"]("torchrun")
    assert sorted(sandbox["arg"](r, "--node-rank") for r in runs) == ["0", "1"]
    assert all(sandbox["arg"](r, "--nnodes") == "2" and sandbox["arg"](r, "--master-addr") == "node-a" for r in runs)
    assert len(sandbox["calls"]("convert")) == 1


def test_two_tasks_per_node_convert_once_and_start_one_torchrun_per_node(sandbox, tmp_path):
    # A slow conversion widens the window in which a second task on node 0 would start its own.
    env = dict(SLURM_BATCH, FAKE_CONVERT_S="1.5")
    srun = os.path.join(str(tmp_path), "bin", "srun")
    p = subprocess.run([srun, "--nodes=2", "--ntasks-per-node=2", "bash", os.path.join(str(tmp_path), "run_trace.sh")],
                       cwd=sandbox["work"], env={**os.environ, **{k: v for k, v in env.items()},
                                                 "PATH": f"{os.path.dirname(srun)}:{os.environ['PATH']}",
                                                 "PY": os.path.join(str(tmp_path), "fake_python"),
                                                 "FAKE_LOG": str(tmp_path / "calls.log"), "HF_DIR": "ckpt/hf",
                                                 "DATA": "data.jsonl", "CONVERT_POLL_S": "0.2"},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert len(sandbox["calls"]("convert")) == 1
    runs = sandbox["calls"]("torchrun")
    assert sorted(sandbox["arg"](r, "--node-rank") for r in runs) == ["0", "1"]
    assert all(sandbox["arg"](r, "--nnodes") == "2" for r in runs)


def test_other_nodes_stop_waiting_when_the_conversion_fails(sandbox):
    p, took = sandbox["launch"](dict(SLURM_BATCH, FAKE_CONVERT="fail", FAKE_CONVERT_S="1"), timeout=60)
    assert p.returncode != 0 and took < 30
    assert "node 0 failed to convert" in p.stderr
    assert sandbox["calls"]("torchrun") == []


def test_a_node_that_cannot_see_node_0s_output_stops_naming_the_shared_filesystem(sandbox):
    """Node 1 alone: node 0 converts elsewhere (another machine's disk), so nothing ever appears here."""
    p, took = sandbox["launch"](dict(NNODES="2", NODE_RANK="1", MASTER_ADDR="node-a", CONVERT_START_S="2"),
                                timeout=60)
    assert p.returncode != 0 and took < 30
    assert "shared by all nodes" in p.stderr
    assert sandbox["calls"]("torchrun") == [] and sandbox["calls"]("convert") == []


def test_a_stale_failure_marker_of_another_run_is_ignored(sandbox):
    work = sandbox["work"]
    (work / "ckpt" / "hf-megatron-tp4-pp1.failed").write_text("old-job:node-a:29500\n")
    p, _ = sandbox["launch"](SLURM_BATCH)
    assert p.returncode == 0, p.stderr
    assert len(sandbox["calls"]("torchrun")) == 2

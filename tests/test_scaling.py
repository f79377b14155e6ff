"""tools/scaling.py on a 2-route x 1-seed tiny grid: the runs really train (2 steps each, real vLLM rollouts in
process), each route's overrides reach the trainer, and `collect` draws the PNGs with one series per route and
metric and a summary whose numbers are the runs' own metrics. Grid parsing, printed commands and the Slurm array
script are checked without running anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_trace.eval.scaling import SERIES, GridError, load_grid, run_command, sbatch_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "scaling.py")


def _grid_yaml(tmp_path, routes="[grpo, trace_fkl]", seeds="[1]", extra="") -> str:
    path = tmp_path / "grid.yaml"
    path.write_text(f"""
base_config: {ROOT}/examples/configs/tiny_cpu.yaml
output_dir: {tmp_path}/out
nproc_per_node: 1
overrides: [train.steps=2, rollout.engine=inprocess, rollout.prompts_per_step=2, rollout.group_size=2,
            rollout.max_response_tokens=16, optim.micro_batch_size=4, logging.tensorboard=false,
            teacher.probe_every=1, teacher.probe_problems=1]
models:
  tiny: {{model.hf_config: tiny-bpe4k, parallel.tp: 1}}
routes: {routes}
seeds: {seeds}
{extra}""")
    return str(path)


def test_grid_expands_models_routes_and_seeds_into_trainer_commands(tmp_path):
    grid = load_grid(_grid_yaml(tmp_path, routes="[grpo, trace_fkl, trace_rkl, trace_fkl_rkl, all_token_opd, "
                                "random_spans]", seeds="[1, 2]", extra="slurm: {partition: gpu, gpus_per_node: 8}"))
    assert len(grid.runs) == 12
    by_name = {r.name: r for r in grid.runs}
    rkl = run_command(grid, by_name["tiny/trace_fkl_rkl/seed2"])
    assert rkl[:3] == [sys.executable, "-m", "torch.distributed.run"]
    tail = rkl[rkl.index("megatron_trace.train") + 1:]
    assert tail[:2] == ["--config", f"{ROOT}/examples/configs/tiny_cpu.yaml"]
    for ov in ("loss.mode=trace", "annotate.spans.fkl=true", "annotate.spans.rkl=true", "train.seed=2",
               f"logging.output_dir={tmp_path}/out/tiny/trace_fkl_rkl/seed2", "parallel.tp=1", "train.steps=2"):
        assert ov in tail
    # trace_rkl: reverse KL on error spans alone (the paper's 1.7B route); all-token OPD never anneals
    assert {"annotate.spans.fkl=false", "annotate.spans.rkl=true"} <= set(by_name["tiny/trace_rkl/seed1"].overrides)
    opd = set(by_name["tiny/all_token_opd/seed1"].overrides)
    assert {"loss.mode=all_token_opd", "loss.kl_schedule=constant"} <= opd
    # every run's overrides are accepted by the trainer's own config loader
    from megatron_trace.config import load_config

    for run in grid.runs:
        load_config(grid.base_config, run.overrides)
    script = sbatch_script(grid)
    assert "#SBATCH --array=0-11" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --gpus-per-node=8" in script and script.count("srun ") == 12
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_bad_grids_are_refused_naming_the_key(tmp_path):
    with pytest.raises(GridError, match="unknown route 'trace_xx'"):
        load_grid(_grid_yaml(tmp_path, routes="[trace_xx]"))
    with pytest.raises(GridError, match="unknown keys"):
        load_grid(_grid_yaml(tmp_path, extra="modles: {}"))


@pytest.mark.slow
def test_tiny_two_route_grid_runs_and_collects_curves_and_summary(tmp_path):
    grid_path = _grid_yaml(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, TOOL, "run", grid_path], capture_output=True, text=True, env=env,
                         timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    col = subprocess.run([sys.executable, TOOL, "collect", grid_path], capture_output=True, text=True, cwd=ROOT)
    assert col.returncode == 0, col.stderr
    out = tmp_path / "out"
    metrics = {route: [json.loads(l) for l in open(out / "tiny" / route / "seed1" / "metrics.jsonl")]
               for route in ("grpo", "trace_fkl")}
    assert [r["step"] for r in metrics["grpo"]] == [0, 1] == [r["step"] for r in metrics["trace_fkl"]]
    # the route's overrides reached the trainer: GRPO never distils (lambda 0), TRACE starts at w0 = 0.5
    assert all(r["lambda"] == 0.0 for r in metrics["grpo"])
    assert all(r["lambda"] == 0.5 for r in metrics["trace_fkl"])

    summary = json.load(open(out / "summary.json"))
    assert summary["missing"] == []
    for fig, keys in SERIES.items():
        png = out / f"tiny_{fig}.png"
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        want = [f"{route}:{k}" if len(keys) > 1 else route for route in ("grpo", "trace_fkl") for k in keys]
        assert summary["plots"][png.name] == want
        assert json.dumps(want).encode() in png.read_bytes()  # the series names are in the PNG's text chunk
    table = summary["models"]["tiny"]
    for route, rows in metrics.items():
        for key in ("reward_mean", "entropy", "response_len", "exposure"):
            assert table[route][key] == pytest.approx(sum(r[key] for r in rows) / len(rows))
    md = (out / "summary.md").read_text()
    assert "| grpo | 1 | 2 |" in md and "| trace_fkl | 1 | 2 |" in md and "![tiny_kl.png](tiny_kl.png)" in md

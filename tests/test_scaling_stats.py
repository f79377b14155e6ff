"""`tools/scaling.py collect`'s statistics on synthetic runs, against values worked by hand: Student-t quantiles
(published table values), per-step curve means with their 95% intervals over seeds, the reward AUC over the steps
every run logged, the paired differences against GRPO (only seeds both arms ran), and per-route entropies that
skip the steps where the route had no token."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from megatron_trace.eval.scaling import GridError, collect, load_grid, sbatch_script
from megatron_trace.eval.stats import curve_auc, mean_ci, paired_difference, t_quantile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2 = 4.302652729911275  # t(0.975, 2 d.o.f.), the 3-seed 95% interval
T1 = 12.706204736174707  # t(0.975, 1 d.o.f.)


def test_t_quantiles_match_the_published_table():
    for df, t in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (29, 2.0452), (1000, 1.9623)):
        assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    assert t_quantile(0.975, 2) == pytest.approx(T2, abs=1e-8)
    assert t_quantile(0.95, 5) == pytest.approx(2.0150, abs=1e-4)
    with pytest.raises(ValueError, match="p=0.3"):
        t_quantile(0.3, 2)


def test_mean_interval_auc_and_paired_difference_by_hand():
    ci = mean_ci([0.2, 0.3, 0.4])  # sd 0.1, se 0.1 / sqrt(3)
    assert (ci.mean, ci.n) == (pytest.approx(0.3), 3)
    assert ci.lo == pytest.approx(0.3 - T2 * 0.1 / math.sqrt(3)) and ci.hi == pytest.approx(0.3 + T2 * 0.1 / math.sqrt(3))
    one = mean_ci([0.7])
    assert one.mean == 0.7 and math.isnan(one.lo) and not one.excludes_zero()
    # trapezoids: (0.2+0.4)/2*1 + (0.4+1.0)/2*3 = 0.3 + 2.1 = 2.4 over a span of 4 steps
    assert curve_auc([0, 1, 4], [0.2, 0.4, 1.0]) == pytest.approx(0.6)
    assert curve_auc([5], [0.3]) == 0.3
    with pytest.raises(ValueError, match="strictly increasing"):
        curve_auc([0, 2, 1], [0.0, 0.0, 0.0])
    d = paired_difference({1: 0.40, 2: 0.40, 3: 0.50, 4: 9.0}, {1: 0.25, 2: 0.25, 3: 0.40})  # seed 4 unpaired
    # differences 0.15, 0.15, 0.10: mean 0.13333, sd 0.028868, se 0.016667
    assert d.n == 3 and d.mean == pytest.approx(0.4 / 3)
    assert d.half_width == pytest.approx(T2 * 0.05 / math.sqrt(3) / math.sqrt(3))
    assert d.excludes_zero()
    with pytest.raises(ValueError, match="no common seed"):
        paired_difference({1: 0.1}, {2: 0.2})


# reward_mean at steps 0, 1, 2 per route and seed; each AUC (trapezoid, span 2) = (r0 + 2 r1 + r2) / 4
REWARDS = {
    "grpo": {1: [0.0, 0.2, 0.6], 2: [0.1, 0.3, 0.3], 3: [0.2, 0.4, 0.6]},             # 0.25, 0.25, 0.40
    "trace_fkl": {1: [0.0, 0.4, 0.8], 2: [0.1, 0.5, 0.5], 3: [0.2, 0.6, 0.6, 0.9]},  # 0.40, 0.40, 0.50 (step 3: 1 run)
    "random_spans": {1: [0.0, 0.2, 0.6], 2: [0.1, 0.5, 0.3]},                          # 0.25, 0.35; seed 3 never ran
}
TEACHER = {1: (0.5, 0.7), 2: (0.6, 0.6), 3: (0.4, 0.8)}  # trace_fkl's probe at steps 0 and 2


def _write_runs(tmp_path):
    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(f"""
base_config: {ROOT}/examples/configs/tiny_cpu.yaml
output_dir: {tmp_path}/out
models: {{tiny: {{}}}}
routes: [grpo, trace_fkl, random_spans]
seeds: [1, 2, 3]
""")
    grid = load_grid(str(grid_path))
    for run in grid.runs:
        rewards = REWARDS[run.route].get(run.seed)
        if rewards is None:
            continue
        os.makedirs(run.output_dir, exist_ok=True)
        with open(os.path.join(run.output_dir, "metrics.jsonl"), "w") as f:
            for step, r in enumerate(rewards):
                row = {"step": step, "reward_mean": r, "pass_rate": r, "entropy": 1.0 + step, "response_len": 20.0,
                       "kl_fkl": 0.0, "kl_rkl": 0.0, "exposure": 0.0, "pg_tokens": 100.0, "entropy_pg": 1.0 + step,
                       "fkl_tokens": 0.0, "entropy_fkl": 0.0, "rkl_tokens": 0.0, "entropy_rkl": 0.0}
                if run.route == "trace_fkl" and step in (0, 2):  # key spans on steps 0 and 2 only
                    row.update(fkl_tokens=5.0, entropy_fkl=0.1 * run.seed + step, kl_fkl=0.01)
                    row.update(teacher_pass_rate=TEACHER[run.seed][step // 2], teacher_probe_student_pass_rate=r)
                f.write(json.dumps(row) + "\n")
    return grid, str(grid_path)


def test_collect_computes_curves_auc_and_paired_differences_on_synthetic_runs(tmp_path):
    grid, grid_path = _write_runs(tmp_path)
    # through the command line, as a user runs it
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "scaling.py"), "collect", grid_path],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary == json.loads(json.dumps(collect(grid)))  # the file is the function's own result
    assert summary["missing"] == ["tiny/random_spans/seed3"]

    auc = summary["auc"]["tiny"]
    assert auc["steps"] == [0, 2]  # step 3 was logged by one run only: not compared
    per_seed = {route: {int(k): v for k, v in e["per_seed"].items()} for route, e in auc["routes"].items()}
    assert per_seed["grpo"] == pytest.approx({1: 0.25, 2: 0.25, 3: 0.40})
    assert per_seed["trace_fkl"] == pytest.approx({1: 0.40, 2: 0.40, 3: 0.50})
    assert per_seed["random_spans"] == pytest.approx({1: 0.25, 2: 0.35})
    # grpo: mean 0.30, sd sqrt(0.015 / 2), se 0.05
    g = auc["routes"]["grpo"]
    assert (g["mean"], g["lo"], g["hi"], g["n"]) == (pytest.approx(0.30), pytest.approx(0.30 - T2 * 0.05),
                                                     pytest.approx(0.30 + T2 * 0.05), 3)
    # trace_fkl - grpo per seed: 0.15, 0.15, 0.10 -> mean 0.13333, se 0.05 / 3; the interval excludes 0
    p = auc["paired"]["trace_fkl"]
    assert p["n"] == 3 and p["mean"] == pytest.approx(0.4 / 3) and p["excludes_zero"] is True
    assert p["lo"] == pytest.approx(0.4 / 3 - T2 * 0.05 / 3) and p["hi"] == pytest.approx(0.4 / 3 + T2 * 0.05 / 3)
    # random_spans - grpo on seeds 1, 2 only: 0.00, 0.10 -> mean 0.05, sd 0.0707, se 0.05, t(0.975, 1)
    p = auc["paired"]["random_spans"]
    assert p["n"] == 2 and p["mean"] == pytest.approx(0.05) and p["excludes_zero"] is False
    assert p["lo"] == pytest.approx(0.05 - T1 * 0.05) and p["hi"] == pytest.approx(0.05 + T1 * 0.05)
    assert "grpo" not in auc["paired"]

    curves = summary["curves"]["tiny"]
    c = curves["grpo"]["reward_mean"]  # step 1: 0.2, 0.3, 0.4
    assert c["steps"] == [0, 1, 2] and c["n"] == [3, 3, 3]
    assert c["mean"][1] == pytest.approx(0.3)
    assert c["lo"][1] == pytest.approx(0.3 - T2 * 0.1 / math.sqrt(3))
    assert c["hi"][1] == pytest.approx(0.3 + T2 * 0.1 / math.sqrt(3))
    # the same mean curve, in the format tools/show_metrics.py --reference reads (what the demo prints beside)
    ref = json.load(open(tmp_path / "out" / "curves" / "tiny_grpo_reward_mean.json"))
    assert ref["key"] == "reward_mean" and ref["values"] == pytest.approx(c["mean"])
    assert ref["label"] == "grpo, mean of 3 seed(s)"
    c = curves["trace_fkl"]["reward_mean"]
    assert c["steps"] == [0, 1, 2, 3] and c["n"][3] == 1 and c["lo"][3] is None and c["mean"][3] == 0.9
    # the probe's points are on its steps only: step 0 (0.5, 0.6, 0.4), step 2 (0.7, 0.6, 0.8)
    t = curves["trace_fkl"]["teacher_pass_rate"]
    assert t["steps"] == [0, 2] and t["mean"] == pytest.approx([0.5, 0.7])
    assert t["hi"][0] == pytest.approx(0.5 + T2 * 0.1 / math.sqrt(3))
    assert "teacher_pass_rate" not in curves["grpo"]
    # entropy on FKL tokens: only steps with FKL tokens (grpo has none: no curve at all)
    e = curves["trace_fkl"]["entropy_fkl"]
    assert e["steps"] == [0, 2] and e["mean"] == pytest.approx([0.2, 2.2])
    assert "entropy_fkl" not in curves["grpo"] and curves["grpo"]["entropy_pg"]["mean"] == pytest.approx([1, 2, 3])

    table = summary["models"]["tiny"]
    assert table["trace_fkl"]["teacher_pass_rate"] == pytest.approx(0.6) and table["grpo"]["teacher_pass_rate"] is None
    assert summary["plots"]["tiny_route_entropy.png"] == ["grpo:entropy_pg", "trace_fkl:entropy_pg",
                                                          "trace_fkl:entropy_fkl", "random_spans:entropy_pg"]
    assert summary["plots"]["tiny_teacher.png"] == ["trace_fkl:teacher_pass_rate",
                                                    "trace_fkl:teacher_probe_student_pass_rate"]
    for png in summary["plots"]:
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| trace_fkl | 3 | 0.4333 [" in md and "| +0.1333 [+0.0616, +0.2050] | yes |" in md
    assert "| random_spans | 2 | 0.3000 [" in md and "| grpo | 3 | 0.3000 [0.0849, 0.5151] | (baseline) |" in md


# Keys the grid's arms use that come with the RL-core fidelity work (issue 14); checked once the trainer has them.
ISSUE14_KEYS = ("loss.kl_schedule", "loss.pg_on_kl_tokens")


def test_the_shipped_tiny_cpu_grid_runs_six_arms_x_three_seeds_from_one_warm_start():
    from megatron_trace.config import load_config

    cwd = os.getcwd()
    os.chdir(ROOT)  # the grid's paths are relative to the repository root
    try:
        grid = load_grid("docs/scaling_grids/tiny_cpu.yaml")
    finally:
        os.chdir(cwd)
    arms = ["grpo", "trace_fkl", "trace_rkl", "trace_fkl_rkl", "all_token_opd", "random_spans"]
    assert [r.name for r in grid.runs] == [f"tiny/{a}/seed{s}" for a in arms for s in (1, 2, 3)]
    warm = grid.warm_start
    assert warm is not None and warm.name == "warm_start" and grid.warm_start_config.endswith("tiny_cpu_sft.yaml")
    load = f"model.load={warm.output_dir}/checkpoints"
    by = {r.name: r for r in grid.runs}
    for run in grid.runs:  # same warm-start, steps and probe for every arm
        assert load in run.overrides and "train.steps=40" in run.overrides and "teacher.probe_every=5" in run.overrides
        assert "loss.kl_clip=null" in run.overrides  # exact KL in every arm (the results page says why)
    assert {"annotate.spans.fkl=false", "annotate.spans.rkl=true"} <= set(by["tiny/trace_rkl/seed1"].overrides)
    assert {"loss.mode=all_token_opd", "loss.kl_schedule=constant"} <= set(by["tiny/all_token_opd/seed2"].overrides)
    assert {"loss.mode=random_spans", "annotate.spans.rkl=true"} <= set(by["tiny/random_spans/seed3"].overrides)
    # every override is accepted by the trainer's config loader (the issue-14 keys once the trainer has them)
    base = load_config(os.path.join(ROOT, grid.base_config))
    pending = {k for k in ISSUE14_KEYS if not hasattr(getattr(base, k.split(".")[0]), k.split(".")[1])}
    load_config(os.path.join(ROOT, grid.warm_start_config), warm.overrides)
    for run in grid.runs:
        cfg = load_config(os.path.join(ROOT, grid.base_config),
                          [o for o in run.overrides if o.split("=", 1)[0] not in pending])
        assert cfg.train.seed == run.seed and cfg.teacher.probe_problems == 8
    with pytest.raises(GridError, match="warm_start"):  # Slurm arrays have no "run this first"
        sbatch_script(grid)

"""tools/show_metrics.py: the demo's printout, and the shipped reference curve printed beside a run."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _show(tmp_path, rows, ref, *args):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [sys.executable, os.path.join(ROOT, "tools", "show_metrics.py"), str(metrics), "--window", "2", *args]
    if ref is not None:
        (tmp_path / "ref.json").write_text(json.dumps(ref))
        argv += ["--reference", str(tmp_path / "ref.json")]
    return subprocess.run(argv, capture_output=True, text=True)


def test_run_printed_beside_the_reference_curve_step_by_step(tmp_path):
    rows = [{"step": s, "reward_mean": v, "lambda": 0.5} for s, v in enumerate([0.10, 0.20, 0.30, 0.40])]
    ref = {"label": "grpo, mean of 3 seed(s)", "source": "docs/results_tiny_cpu.md", "key": "reward_mean",
           "values": [0.10, 0.10, 0.20, 0.20, 0.25]}
    proc = _show(tmp_path, rows, ref)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "reward_mean: this run beside grpo, mean of 3 seed(s) (docs/results_tiny_cpu.md)" in out
    assert "    1      0.2000      0.1000   +0.1000" in out
    assert "    4           -      0.2500" in out  # a step only the reference has: shown, not compared
    # by hand: first 2 steps 0.15 vs 0.10, last 2 of the 4 shared steps 0.35 vs 0.20, all 4: 0.25 vs 0.15
    assert "mean over the first 2 steps: this run 0.1500, grpo, mean of 3 seed(s) 0.1000" in out
    assert "mean over the last 2 steps: this run 0.3500, grpo, mean of 3 seed(s) 0.2000" in out
    assert "mean over 4 steps both cover: this run 0.2500, grpo, mean of 3 seed(s) 0.1500" in out


@pytest.mark.parametrize("ref, message", [
    ([0.1, 0.2], "must be a JSON object"),
    ({"label": "g", "source": "s", "key": "reward_mean"}, "field 'values' must be a list"),
    ({"label": "g", "source": "s", "key": "reward_mean", "values": [0.1, "x"]}, "numbers only"),
    ({"label": "g", "source": "s", "key": "entropy", "values": [0.1]}, "is of 'entropy', not 'reward_mean'"),
])
def test_a_malformed_reference_is_refused_naming_the_cause(tmp_path, ref, message):
    proc = _show(tmp_path, [{"step": 0, "reward_mean": 0.1}], ref)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_no_extra_columns(tmp_path):
    # `--extra` with no names used to crash (max() of a single int)
    proc = _show(tmp_path, [{"step": 0, "reward_mean": 0.1}, {"step": 1, "reward_mean": 0.2}], None, "--extra")
    assert proc.returncode == 0, proc.stderr
    assert "    1  0.2000" in proc.stdout and "#" * 40 in proc.stdout  # the largest value gets the full bar

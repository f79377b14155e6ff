"""Scaling experiments: a grid of trainer runs (model size x route x seed) from one YAML, their torchrun commands
(run here one after another, printed, or written into a Slurm array script), and the collection of their
`metrics.jsonl` into per-route curves (matplotlib PNGs) and a Markdown summary.

Grid YAML:

    base_config: examples/configs/tiny_cpu.yaml   # the trainer config every run starts from
    output_dir: runs/scaling                      # run folders: OUTPUT/<model>/<route>/seed<seed>
    nproc_per_node: 2                             # torchrun processes per node (GPUs per node on a cluster)
    nnodes: 1
    overrides: [train.steps=40]                   # dotted overrides for every run
    models:                                       # name -> overrides of that model size
      tiny: {model.hf_config: tiny, parallel.tp: 2}
    routes: [grpo, trace_fkl, trace_rkl, trace_fkl_rkl, all_token_opd, random_spans]  # ROUTES names or {name: {...}}
    seeds: [1, 2, 3]
    slurm: {partition: gpu, time: "24:00:00", account: null, gpus_per_node: 8, extra: []}

Routes (the paper's comparison): grpo (no distillation), trace_fkl (forward KL on key spans of correct
responses), trace_rkl (reverse KL on error spans of incorrect responses alone: the paper's best 1.7B route),
trace_fkl_rkl (both), all_token_opd (every token distilled with a constant lambda: all-token self-OPD, which never
anneals to GRPO), random_spans (random spans of the annotator's coverage).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ROUTES", "SERIES", "GridError", "Run", "Grid", "load_grid", "run_command", "shell_join",
           "sbatch_script", "run_local", "read_metrics", "collect"]

ROUTES: dict[str, dict[str, Any]] = {
    "grpo": {"loss.mode": "grpo"},
    "trace_fkl": {"loss.mode": "trace", "annotate.spans.fkl": True, "annotate.spans.rkl": False},
    "trace_rkl": {"loss.mode": "trace", "annotate.spans.fkl": False, "annotate.spans.rkl": True},
    "trace_fkl_rkl": {"loss.mode": "trace", "annotate.spans.fkl": True, "annotate.spans.rkl": True},
    "all_token_opd": {"loss.mode": "all_token_opd", "loss.kl_schedule": "constant"},
    "random_spans": {"loss.mode": "random_spans"},
}

# Plotted curves: figure name -> metrics.jsonl keys drawn in it (one line per route, per key).
SERIES: dict[str, list[str]] = {
    "accuracy": ["reward_mean", "pass_rate"],
    "entropy": ["entropy"],
    "response_length": ["response_len"],
    "kl": ["kl_fkl", "kl_rkl"],
    "exposure": ["exposure"],
}


class GridError(ValueError):
    """A grid YAML that cannot be used: the message names the key."""


@dataclass
class Run:
    model: str
    route: str
    seed: int
    output_dir: str
    overrides: list[str]  # dotted k=v, in order (later wins)

    @property
    def name(self) -> str:
        return f"{self.model}/{self.route}/seed{self.seed}"


@dataclass
class Grid:
    base_config: str
    output_dir: str
    runs: list[Run]
    nproc_per_node: int = 1
    nnodes: int = 1
    slurm: dict[str, Any] = field(default_factory=dict)
    python: str = sys.executable


def _override_text(key: str, value: Any) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif value is None:
        value = "null"
    return f"{key}={value}"


def _as_overrides(where: str, spec: Any) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, dict):
        return [_override_text(k, v) for k, v in spec.items()]
    if isinstance(spec, list) and all(isinstance(s, str) and "=" in s for s in spec):
        return list(spec)
    raise GridError(f"{where}: expected a mapping of dotted keys to values or a list of 'key=value' strings")


def load_grid(path: str, *, output_dir: str | None = None) -> Grid:
    """Read a grid YAML into its runs (every model x route x seed). Relative paths are taken from the current
    directory (run from the repository root). output_dir overrides the YAML's."""
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise GridError(f"{path}: expected a mapping at the top level")
    known = {"base_config", "output_dir", "nproc_per_node", "nnodes", "overrides", "models", "routes", "seeds", "slurm"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise GridError(f"{path}: unknown keys {unknown} (valid: {sorted(known)})")
    base = doc.get("base_config")
    if not base or not os.path.isfile(base):
        raise GridError(f"{path}: base_config {base!r} is not a file")
    out = output_dir or doc.get("output_dir") or "runs/scaling"
    common = _as_overrides("overrides", doc.get("overrides"))
    models = doc.get("models") or {"default": {}}
    if not isinstance(models, dict):
        raise GridError(f"{path}: models must map a name to its overrides")
    routes_spec = doc.get("routes") or list(ROUTES)
    routes: dict[str, list[str]] = {}
    for item in routes_spec:
        if isinstance(item, str):
            if item not in ROUTES:
                raise GridError(f"{path}: routes: unknown route {item!r} (known: {', '.join(ROUTES)}; or give "
                                "{name: {overrides}})")
            routes[item] = _as_overrides(f"routes.{item}", ROUTES[item])
        elif isinstance(item, dict) and len(item) == 1:
            (name, spec), = item.items()
            routes[str(name)] = _as_overrides(f"routes.{name}", spec)
        else:
            raise GridError(f"{path}: routes: each entry is a route name or a one-key mapping name -> overrides")
    seeds = doc.get("seeds") or [1234]
    if not all(isinstance(s, int) for s in seeds):
        raise GridError(f"{path}: seeds must be integers, got {seeds}")
    runs = []
    for model, mspec in models.items():
        for route, rover in routes.items():
            for seed in seeds:
                run_dir = os.path.join(out, str(model), route, f"seed{seed}")
                ov = common + _as_overrides(f"models.{model}", mspec) + rover + [
                    f"train.seed={seed}", f"logging.output_dir={run_dir}"]
                runs.append(Run(str(model), route, int(seed), run_dir, ov))
    nproc, nnodes = int(doc.get("nproc_per_node", 1)), int(doc.get("nnodes", 1))
    if nproc < 1 or nnodes < 1:
        raise GridError(f"{path}: nproc_per_node and nnodes must be >= 1")
    return Grid(base, out, runs, nproc, nnodes, dict(doc.get("slurm") or {}))


def run_command(grid: Grid, run: Run, *, master_port: int | None = None, multinode: bool = False) -> list[str]:
    """The torchrun command of one run (argv). multinode: rendezvous from $MASTER_ADDR / $NODE_RANK (Slurm)."""
    cmd = [grid.python, "-m", "torch.distributed.run", "--nproc-per-node", str(grid.nproc_per_node)]
    if multinode:
        cmd += ["--nnodes", str(grid.nnodes), "--node-rank", "$NODE_RANK", "--master-addr", "$MASTER_ADDR",
                "--master-port", str(master_port or 29500)]
    elif master_port:
        cmd += ["--master-port", str(master_port)]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "megatron_trace.train", "--config", grid.base_config, *run.overrides]


def shell_join(argv: list[str]) -> str:
    # $VARS stay expandable in the generated script; everything else is quoted.
    return " ".join(a if a.startswith("$") else shlex.quote(a) for a in argv)


def sbatch_script(grid: Grid) -> str:
    """A Slurm array script: task i runs grid.runs[i] on `nnodes` nodes (one srun task per node, torchrun inside)."""
    s = grid.slurm
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name={s.get('job_name', 'trace-scaling')}",
             f"#SBATCH --nodes={grid.nnodes}", "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --gpus-per-node={s.get('gpus_per_node', grid.nproc_per_node)}",
             f"#SBATCH --time={s.get('time', '24:00:00')}", f"#SBATCH --array=0-{len(grid.runs) - 1}",
             f"#SBATCH --output={os.path.join(grid.output_dir, 'slurm-%A_%a.out')}"]
    for key in ("partition", "account", "qos"):
        if s.get(key):
            lines.append(f"#SBATCH --{key}={s[key]}")
    lines += [f"#SBATCH {x}" for x in s.get("extra", [])]
    lines += ["set -euo pipefail", f"cd {shlex.quote(os.getcwd())}",
              'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              "export CUDA_DEVICE_MAX_CONNECTIONS=1", "case $SLURM_ARRAY_TASK_ID in"]
    for i, run in enumerate(grid.runs):
        cmd = run_command(grid, run, master_port=29500 + i % 1000, multinode=True)
        cmd[0] = s.get("python", "python")  # the cluster's interpreter (this machine's path means nothing there)
        inner = shell_join(cmd).replace("$NODE_RANK", "$SLURM_NODEID").replace("$MASTER_ADDR", '"$MASTER_ADDR"')
        lines.append(f"  {i}) srun --kill-on-bad-exit=1 bash -c {shlex.quote(inner)} ;;  # {run.name}")
    lines += ['  *) echo "no run for task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', "esac", ""]
    return "\n".join(lines)


def run_local(grid: Grid, *, steps_done_ok: bool = True, env: dict | None = None, log=print) -> list[tuple[Run, int]]:
    """Run every run here, one after another; each one's output goes to <run dir>/train.log. A run whose
    metrics.jsonl already reaches the configured last step is skipped when steps_done_ok. Returns (run, rc)."""
    results = []
    for i, run in enumerate(grid.runs):
        os.makedirs(run.output_dir, exist_ok=True)
        if steps_done_ok and _finished(grid, run):
            log(f"[{i + 1}/{len(grid.runs)}] {run.name}: already complete, skipped")
            results.append((run, 0))
            continue
        cmd = run_command(grid, run)
        log(f"[{i + 1}/{len(grid.runs)}] {run.name}: {shell_join(cmd)}")
        with open(os.path.join(run.output_dir, "train.log"), "w") as out:
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        if rc:
            log(f"  failed (exit {rc}); see {os.path.join(run.output_dir, 'train.log')}")
        results.append((run, rc))
    return results


def _finished(grid: Grid, run: Run) -> bool:
    from megatron_trace.config import load_config

    steps = load_config(grid.base_config, run.overrides).train.steps
    rows = read_metrics(os.path.join(run.output_dir, "metrics.jsonl"))
    return bool(rows) and rows[-1].get("step", -1) >= steps - 1


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl (a torn last line, from a run killed mid-write, is dropped)."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    # a resumed run may have rewritten steps: keep the last row of each step, in step order
    by_step = {r["step"]: r for r in rows if "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def _mean_curve(runs_rows: list[list[dict]], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per step: mean, min, max of `key` over the seeds that logged it."""
    steps = sorted({r["step"] for rows in runs_rows for r in rows if key in r})
    mean, lo, hi = [], [], []
    for s in steps:
        vals = [r[key] for rows in runs_rows for r in rows if r["step"] == s and key in r
                and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
        mean.append(sum(vals) / len(vals) if vals else float("nan"))
        lo.append(min(vals) if vals else float("nan"))
        hi.append(max(vals) if vals else float("nan"))
    return steps, mean, lo, hi


def collect(grid: Grid, *, out_dir: str | None = None, last_n: int = 5) -> dict:
    """Read every run's metrics, draw one PNG per (model, figure in SERIES) with one line per route and key (mean
    over seeds, min-max band), and write summary.md and summary.json into out_dir (default grid.output_dir).

    Returns the summary dict: {"plots": {png: [series labels]}, "models": {model: {route: {...final means}}}}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = out_dir or grid.output_dir
    os.makedirs(out_dir, exist_ok=True)
    rows: dict[tuple[str, str], list[list[dict]]] = {}
    for run in grid.runs:
        r = read_metrics(os.path.join(run.output_dir, "metrics.jsonl"))
        if r:
            rows.setdefault((run.model, run.route), []).append(r)
    models = list(dict.fromkeys(run.model for run in grid.runs))
    routes = list(dict.fromkeys(run.route for run in grid.runs))
    summary: dict[str, Any] = {"plots": {}, "models": {}, "missing": sorted(
        run.name for run in grid.runs if not read_metrics(os.path.join(run.output_dir, "metrics.jsonl")))}
    for model in models:
        for fig_name, keys in SERIES.items():
            fig, ax = plt.subplots(figsize=(6.4, 4.0))
            labels = []
            for route in routes:
                seeds_rows = rows.get((model, route))
                if not seeds_rows:
                    continue
                for key in keys:
                    steps, mean, lo, hi = _mean_curve(seeds_rows, key)
                    if not steps:
                        continue
                    label = f"{route}:{key}" if len(keys) > 1 else route
                    line, = ax.plot(steps, mean, label=label, linestyle="-" if key == keys[0] else "--")
                    if len(seeds_rows) > 1:
                        ax.fill_between(steps, lo, hi, alpha=0.15, color=line.get_color())
                    labels.append(label)
            ax.set_xlabel("step")
            ax.set_ylabel(" / ".join(keys))
            ax.set_title(f"{model}: {fig_name}")
            if labels:
                ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            png = os.path.join(out_dir, f"{_safe(model)}_{fig_name}.png")
            fig.tight_layout()
            fig.savefig(png + ".tmp.png", dpi=100, metadata={"Description": json.dumps(labels)})
            plt.close(fig)
            os.replace(png + ".tmp.png", png)
            summary["plots"][os.path.basename(png)] = labels
        table = {}
        for route in routes:
            seeds_rows = rows.get((model, route))
            if not seeds_rows:
                continue
            entry = {"seeds": len(seeds_rows), "steps": min(len(r) for r in seeds_rows)}
            for key in ("reward_mean", "pass_rate", "entropy", "response_len", "kl_fkl", "kl_rkl", "exposure"):
                finals = [sum(x[key] for x in r[-last_n:] if key in x) / max(1, sum(key in x for x in r[-last_n:]))
                          for r in seeds_rows]
                entry[key] = sum(finals) / len(finals)
            table[route] = entry
        summary["models"][model] = table
    _write(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2))
    _write(os.path.join(out_dir, "summary.md"), _summary_markdown(summary, last_n))
    return summary


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _summary_markdown(summary: dict, last_n: int) -> str:
    cols = ["reward_mean", "pass_rate", "entropy", "response_len", "kl_fkl", "kl_rkl", "exposure"]
    lines = ["# Scaling experiments", "",
             f"Values are the mean over seeds of each run's mean over its last {last_n} steps.", ""]
    for model, table in summary["models"].items():
        lines += [f"## {model}", "", "| route | seeds | steps | " + " | ".join(cols) + " |",
                  "|---|---:|---:|" + "---:|" * len(cols)]
        for route, e in table.items():
            lines.append(f"| {route} | {e['seeds']} | {e['steps']} | " + " | ".join(f"{e[c]:.4g}" for c in cols) + " |")
        lines.append("")
        for png, labels in summary["plots"].items():
            if png.startswith(_safe(model) + "_"):
                lines.append(f"![{png}]({png})  ")
        lines.append("")
    if summary["missing"]:
        lines += ["Runs without metrics: " + ", ".join(summary["missing"]), ""]
    return "\n".join(lines)

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
    warm_start: {config: examples/configs/tiny_cpu_sft.yaml, overrides: [parallel.tp=2]}  # optional: one shared
        # warm-start run first (OUTPUT/warm_start), every run then loads its checkpoint (run/print only, not sbatch)

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
from typing import Any, Mapping

from megatron_trace.eval.stats import curve_auc, mean_ci, paired_difference

__all__ = ["ROUTES", "SERIES", "ROUTE_SERIES", "GridError", "Run", "Grid", "load_grid", "run_command",
           "shell_join", "sbatch_script", "run_local", "read_metrics", "curve", "reward_auc_table", "collect"]

ROUTES: dict[str, dict[str, Any]] = {
    "grpo": {"loss.mode": "grpo"},
    "trace_fkl": {"loss.mode": "trace", "annotate.spans.fkl": True, "annotate.spans.rkl": False},
    "trace_rkl": {"loss.mode": "trace", "annotate.spans.fkl": False, "annotate.spans.rkl": True},
    "trace_fkl_rkl": {"loss.mode": "trace", "annotate.spans.fkl": True, "annotate.spans.rkl": True},
    "all_token_opd": {"loss.mode": "all_token_opd", "loss.kl_schedule": "constant"},
    "random_spans": {"loss.mode": "random_spans"},
}

# Plotted curves: figure name -> metrics.jsonl keys drawn in it (one line per route, per key). The teacher probe
# (teacher.probe_every) logs its two keys on probe steps only; their curves have points on those steps.
SERIES: dict[str, list[str]] = {
    "accuracy": ["reward_mean", "pass_rate"],
    "teacher": ["teacher_pass_rate", "teacher_probe_student_pass_rate"],
    "entropy": ["entropy"],
    "response_length": ["response_len"],
    "kl": ["kl_fkl", "kl_rkl"],
    "exposure": ["exposure"],
}
# The student's entropy on each route's tokens: a step where the route has no token has no value (the trainer
# logs 0 there), so these curves only have points on steps whose count key is > 0.
ROUTE_SERIES: dict[str, list[str]] = {"route_entropy": ["entropy_pg", "entropy_fkl", "entropy_rkl"]}
ROUTE_COUNT: dict[str, str] = {"entropy_pg": "pg_tokens", "entropy_fkl": "fkl_tokens", "entropy_rkl": "rkl_tokens"}
# The reward AUC table compares every arm with this one, seed by seed, when the grid has it.
BASELINE_ROUTE = "grpo"
AUC_KEY = "reward_mean"


class GridError(ValueError):
    """A grid YAML that cannot be used: the message names the key."""


@dataclass
class Run:
    model: str
    route: str
    seed: int
    output_dir: str
    overrides: list[str]  # dotted k=v, in order (later wins)
    label: str | None = None  # the name shown instead of model/route/seed (the warm-start)

    @property
    def name(self) -> str:
        return self.label or f"{self.model}/{self.route}/seed{self.seed}"


@dataclass
class Grid:
    base_config: str
    output_dir: str
    runs: list[Run]
    nproc_per_node: int = 1
    nnodes: int = 1
    slurm: dict[str, Any] = field(default_factory=dict)
    python: str = sys.executable
    # The shared warm-start (grid key `warm_start`): run once before every other run, which all load its
    # checkpoint (model.load=<its output_dir>/checkpoints); None without one.
    warm_start: Run | None = None
    warm_start_config: str | None = None


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
    known = {"base_config", "output_dir", "nproc_per_node", "nnodes", "overrides", "models", "routes", "seeds", "slurm",
             "warm_start"}
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
    warm, warm_config = None, None
    if doc.get("warm_start") is not None:
        ws = doc["warm_start"]
        if not isinstance(ws, dict) or not set(ws) <= {"config", "overrides"}:
            raise GridError(f"{path}: warm_start must be a mapping with `config` (a trainer YAML) and optional "
                            "`overrides`")
        warm_config = ws.get("config")
        if not warm_config or not os.path.isfile(warm_config):
            raise GridError(f"{path}: warm_start.config {warm_config!r} is not a file")
        warm_dir = os.path.join(out, "warm_start")
        warm = Run("warm_start", "warm_start", 0, warm_dir,
                   _as_overrides("warm_start.overrides", ws.get("overrides")) + [f"logging.output_dir={warm_dir}"],
                   label="warm_start")
        common = common + [f"model.load={os.path.join(warm_dir, 'checkpoints')}"]
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
    return Grid(base, out, runs, nproc, nnodes, dict(doc.get("slurm") or {}), warm_start=warm,
                warm_start_config=warm_config)


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
    config = grid.warm_start_config if run is grid.warm_start else grid.base_config
    return cmd + ["-m", "megatron_trace.train", "--config", config, *run.overrides]


def shell_join(argv: list[str]) -> str:
    # $VARS stay expandable in the generated script; everything else is quoted.
    return " ".join(a if a.startswith("$") else shlex.quote(a) for a in argv)


def sbatch_script(grid: Grid) -> str:
    """A Slurm array script: task i runs grid.runs[i] on `nnodes` nodes (one srun task per node, torchrun inside)."""
    if grid.warm_start is not None:
        raise GridError("sbatch: this grid has a warm_start; run it first (`scaling.py print` shows its command), "
                        "then drop the warm_start key and add its model.load to overrides")
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
    """Run every run here, one after another (the grid's warm-start first, if any); each one's output goes to
    <run dir>/train.log and its wall-clock seconds are logged. A run whose metrics.jsonl already reaches the
    configured last step is skipped when steps_done_ok. Returns (run, rc); a failed warm-start stops the grid."""
    import time

    results = []
    # seed by seed (every arm's seed 1, then seed 2, ...): a grid stopped early still compares arms at equal seeds
    todo = ([grid.warm_start] if grid.warm_start is not None else []) + sorted(grid.runs, key=lambda r: r.seed)
    t_grid = time.perf_counter()
    for i, run in enumerate(todo):
        os.makedirs(run.output_dir, exist_ok=True)
        if steps_done_ok and _finished(grid, run):
            log(f"[{i + 1}/{len(todo)}] {run.name}: already complete, skipped")
            results.append((run, 0))
            continue
        cmd = run_command(grid, run)
        log(f"[{i + 1}/{len(todo)}] {run.name}: {shell_join(cmd)}")
        t0 = time.perf_counter()
        with open(os.path.join(run.output_dir, "train.log"), "w") as out:
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        log(f"  {'failed (exit ' + str(rc) + ')' if rc else 'done'} in {time.perf_counter() - t0:.0f} s"
            + (f"; see {os.path.join(run.output_dir, 'train.log')}" if rc else ""))
        results.append((run, rc))
        if rc and run is grid.warm_start:
            break
    log(f"grid: {len(results)} run(s) in {time.perf_counter() - t_grid:.0f} s")
    return results


def _finished(grid: Grid, run: Run) -> bool:
    from megatron_trace.config import load_config

    config = grid.warm_start_config if run is grid.warm_start else grid.base_config
    steps = load_config(config, run.overrides).train.steps
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


def _value(row: dict, key: str) -> float | None:
    """row[key] as a finite float, or None when absent, not a number, or (per-route keys) the route was empty."""
    v = row.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return None
    count = ROUTE_COUNT.get(key)
    if count is not None and not row.get(count):
        return None
    return float(v)


def curve(seeds_rows: Mapping[int, list[dict]], key: str, level: float = 0.95) -> dict:
    """Per step, over the seeds that logged `key` there: mean and Student-t interval of the mean (lo/hi None
    with fewer than 2 seeds at that step). Returns {"steps", "mean", "lo", "hi", "n"} (lists, step order)."""
    by_step: dict[int, list[float]] = {}
    for rows in seeds_rows.values():
        for r in rows:
            v = _value(r, key)
            if v is not None:
                by_step.setdefault(int(r["step"]), []).append(v)
    out: dict[str, list] = {"steps": [], "mean": [], "lo": [], "hi": [], "n": []}
    for step in sorted(by_step):
        ci = mean_ci(by_step[step], level)
        out["steps"].append(step)
        out["mean"].append(ci.mean)
        out["lo"].append(_finite_or_none(ci.lo))
        out["hi"].append(_finite_or_none(ci.hi))
        out["n"].append(ci.n)
    return out


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _ci_dict(ci) -> dict:
    return {"mean": ci.mean, "lo": _finite_or_none(ci.lo), "hi": _finite_or_none(ci.hi), "n": ci.n}


def reward_auc_table(runs: Mapping[str, Mapping[int, list[dict]]], *, key: str = AUC_KEY,
                     baseline: str = BASELINE_ROUTE, level: float = 0.95) -> dict:
    """Normalised area under each run's `key` curve (stats.curve_auc: the curve's mean height, trapezoid rule) over
    the steps that every run logged, so arms are compared on the same steps; per route the mean over seeds with its
    t-interval, and per route other than `baseline` the paired difference against it (same seeds).

    runs: route -> seed -> metrics rows. Returns {"key", "steps": [first, last] or None, "baseline",
    "routes": {route: {"per_seed": {seed: auc}, "mean", "lo", "hi", "n"}},
    "paired": {route: {"mean", "lo", "hi", "n", "excludes_zero"}}} (paired is empty without the baseline).
    """
    step_sets = [{int(r["step"]) for r in rows if _value(r, key) is not None}
                 for seeds in runs.values() for rows in seeds.values()]
    common = sorted(set.intersection(*step_sets)) if step_sets else []
    table: dict[str, Any] = {"key": key, "steps": [common[0], common[-1]] if common else None,
                             "baseline": baseline, "routes": {}, "paired": {}}
    if not common:
        return table
    keep = set(common)
    aucs: dict[str, dict[int, float]] = {}
    for route, seeds in runs.items():
        aucs[route] = {}
        for seed, rows in sorted(seeds.items()):
            pts = sorted((int(r["step"]), _value(r, key)) for r in rows if int(r["step"]) in keep)
            aucs[route][seed] = curve_auc([p[0] for p in pts], [p[1] for p in pts])
        table["routes"][route] = {"per_seed": aucs[route], **_ci_dict(mean_ci(list(aucs[route].values()), level))}
    if baseline in aucs:
        for route in aucs:
            if route == baseline or not set(aucs[route]) & set(aucs[baseline]):
                continue
            d = paired_difference(aucs[route], aucs[baseline], level)
            table["paired"][route] = {**_ci_dict(d), "excludes_zero": d.excludes_zero()}
    return table


def _plot(ax, route: str, key: str, c: dict, *, label: str, dashed: bool) -> None:
    line, = ax.plot(c["steps"], c["mean"], label=label, linestyle="--" if dashed else "-",
                    marker="o" if len(c["steps"]) <= 12 else None, markersize=3)
    if any(x is not None for x in c["lo"]):
        nan = float("nan")
        ax.fill_between(c["steps"], [nan if x is None else x for x in c["lo"]],
                        [nan if x is None else x for x in c["hi"]], alpha=0.15, color=line.get_color())


def collect(grid: Grid, *, out_dir: str | None = None, last_n: int = 5, level: float = 0.95) -> dict:
    """Read every run's metrics, draw one PNG per (model, figure in SERIES and ROUTE_SERIES) with one line per route
    and key (mean over seeds, shaded `level` Student-t interval over seeds when there are several), compute the
    reward AUC table (mean and interval over seeds, paired differences against GRPO), and write summary.md and
    summary.json into out_dir (default grid.output_dir).

    Returns the summary dict: {"plots": {png: [series labels]}, "models": {model: {route: {...final means}}},
    "curves": {model: {route: {key: curve()}}}, "auc": {model: reward_auc_table()}, "missing": [run names]}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = out_dir or grid.output_dir
    os.makedirs(out_dir, exist_ok=True)
    rows: dict[tuple[str, str], dict[int, list[dict]]] = {}
    missing = []
    for run in grid.runs:
        r = read_metrics(os.path.join(run.output_dir, "metrics.jsonl"))
        if r:
            rows.setdefault((run.model, run.route), {})[run.seed] = r
        else:
            missing.append(run.name)
    models = list(dict.fromkeys(run.model for run in grid.runs))
    routes = list(dict.fromkeys(run.route for run in grid.runs))
    summary: dict[str, Any] = {"plots": {}, "models": {}, "curves": {}, "auc": {}, "level": level,
                               "missing": sorted(missing)}
    for model in models:
        curves: dict[str, dict[str, dict]] = {}
        for fig_name, keys in {**SERIES, **ROUTE_SERIES}.items():
            fig, ax = plt.subplots(figsize=(6.4, 4.0))
            labels = []
            for route in routes:
                seeds_rows = rows.get((model, route))
                if not seeds_rows:
                    continue
                for key in keys:
                    c = curve(seeds_rows, key, level)
                    if not c["steps"]:
                        continue
                    curves.setdefault(route, {})[key] = c
                    label = f"{route}:{key}" if len(keys) > 1 else route
                    _plot(ax, route, key, c, label=label, dashed=key != keys[0])
                    labels.append(label)
            ax.set_xlabel("step")
            ax.set_ylabel(" / ".join(keys))
            ax.set_title(f"{model}: {fig_name} (mean over seeds, {level:.0%} interval)")
            if labels:
                ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            png = os.path.join(out_dir, f"{_safe(model)}_{fig_name}.png")
            fig.tight_layout()
            fig.savefig(png + ".tmp.png", dpi=100, metadata={"Description": json.dumps(labels)})
            plt.close(fig)
            os.replace(png + ".tmp.png", png)
            summary["plots"][os.path.basename(png)] = labels
        summary["curves"][model] = curves
        # each arm's mean reward curve in tools/show_metrics.py's --reference format (the demo prints its run
        # beside the shipped GRPO curve)
        for route, by_key in curves.items():
            c = by_key.get(AUC_KEY)
            if c and c["steps"] == list(range(len(c["steps"]))):
                os.makedirs(os.path.join(out_dir, "curves"), exist_ok=True)
                _write(os.path.join(out_dir, "curves", f"{_safe(model)}_{_safe(route)}_{AUC_KEY}.json"),
                       json.dumps({"label": f"{route}, mean of {max(c['n'])} seed(s)",
                                   "source": f"tools/scaling.py collect -> {os.path.join(out_dir, 'summary.json')}",
                                   "key": AUC_KEY, "values": c["mean"]}) + "\n")
        table = {}
        for route in routes:
            seeds_rows = rows.get((model, route))
            if not seeds_rows:
                continue
            runs_rows = list(seeds_rows.values())
            entry = {"seeds": len(runs_rows), "steps": min(len(r) for r in runs_rows)}
            for key in ("reward_mean", "pass_rate", "entropy", "response_len", "kl_fkl", "kl_rkl", "exposure"):
                finals = [sum(x[key] for x in r[-last_n:] if key in x) / max(1, sum(key in x for x in r[-last_n:]))
                          for r in runs_rows]
                entry[key] = sum(finals) / len(finals)
            # the probe runs on a few steps only: the mean over all of them, then over seeds
            for key in ("teacher_pass_rate", "teacher_probe_student_pass_rate"):
                per_run = [[v for v in (_value(x, key) for x in r) if v is not None] for r in runs_rows]
                per_run = [sum(v) / len(v) for v in per_run if v]
                entry[key] = sum(per_run) / len(per_run) if per_run else None
            table[route] = entry
        summary["models"][model] = table
        summary["auc"][model] = reward_auc_table(
            {route: rows[(model, route)] for route in routes if (model, route) in rows}, level=level)
    _write(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2))
    _write(os.path.join(out_dir, "summary.md"), _summary_markdown(summary, last_n))
    return summary


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _fmt(x, spec: str = ".4g") -> str:
    return "n/a" if x is None else format(x, spec)


def _interval(e: dict, sign: str = "+") -> str:
    f = sign + ".4f"
    if e["lo"] is None:
        return f"{e['mean']:{f}} (n={e['n']}, no interval)"
    return f"{e['mean']:{f}} [{e['lo']:{f}}, {e['hi']:{f}}]"


def _summary_markdown(summary: dict, last_n: int) -> str:
    cols = ["reward_mean", "pass_rate", "entropy", "response_len", "kl_fkl", "kl_rkl", "exposure"]
    level = summary.get("level", 0.95)
    lines = ["# Scaling experiments", "",
             f"Values are the mean over seeds of each run's mean over its last {last_n} steps.", ""]
    for model, table in summary["models"].items():
        lines += [f"## {model}", "", "| route | seeds | steps | " + " | ".join(cols) + " |",
                  "|---|---:|---:|" + "---:|" * len(cols)]
        for route, e in table.items():
            lines.append(f"| {route} | {e['seeds']} | {e['steps']} | " + " | ".join(f"{e[c]:.4g}" for c in cols) + " |")
        lines.append("")
        auc = summary["auc"].get(model)
        if auc and auc["routes"]:
            first, last = auc["steps"]
            lines += [f"Reward AUC: the mean height of each run's `{auc['key']}` curve over steps {first}-{last} "
                      f"(trapezoid rule), mean over seeds with its {level:.0%} Student-t interval; paired: the mean "
                      f"over seeds of (route - {auc['baseline']}) at the same seed, with its interval.", "",
                      f"| route | seeds | reward AUC | paired difference vs {auc['baseline']} | interval excludes 0 |",
                      "|---|---:|---|---|---|"]
            for route, e in auc["routes"].items():
                p = auc["paired"].get(route)
                diff = _interval(p) if p else "(baseline)" if route == auc["baseline"] else "n/a"
                ex = ("yes" if p["excludes_zero"] else "no") if p else ""
                lines.append(f"| {route} | {e['n']} | {_interval(e, '')} | {diff} | {ex} |")
            lines.append("")
        if any(e.get("teacher_pass_rate") is not None for e in table.values()):
            lines += ["Teacher probe (mean over probe steps, then seeds): the policy sampled from the privileged "
                      "prompt vs. the student's own samples of the same problems.", "",
                      "| route | teacher_pass_rate | student pass rate (same problems) |", "|---|---:|---:|"]
            for route, e in table.items():
                lines.append(f"| {route} | {_fmt(e.get('teacher_pass_rate'))} | "
                             f"{_fmt(e.get('teacher_probe_student_pass_rate'))} |")
            lines.append("")
        for png, labels in summary["plots"].items():
            if png.startswith(_safe(model) + "_"):
                lines.append(f"![{png}]({png})  ")
        lines.append("")
    if summary["missing"]:
        lines += ["Runs without metrics: " + ", ".join(summary["missing"]), ""]
    return "\n".join(lines)

#!/usr/bin/env python
"""Scaling experiments: a grid of TRACE / baseline runs (model size x route x seed) from one YAML.

    python tools/scaling.py print   docs/scaling_grids/tiny_cpu.yaml     # the torchrun command of every run
    python tools/scaling.py run     docs/scaling_grids/tiny_cpu.yaml     # run them here, one after another
    python tools/scaling.py sbatch  docs/scaling_grids/qwen3.yaml --script runs/scaling/grid.sbatch
    python tools/scaling.py collect docs/scaling_grids/tiny_cpu.yaml     # PNG curves (mean, 95% interval over
                                                                         # seeds) + reward AUC table with paired
                                                                         # differences against GRPO: summary.md

The grid format is documented in megatron_trace/eval/scaling.py and docs/scaling.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["print", "run", "sbatch", "collect"])
    p.add_argument("grid", help="grid YAML")
    p.add_argument("--output-dir", help="override the grid's output_dir")
    p.add_argument("--script", help="sbatch: where to write the array script (default OUTPUT/grid.sbatch)")
    p.add_argument("--submit", action="store_true", help="sbatch: also submit it with sbatch")
    p.add_argument("--rerun", action="store_true", help="run: also rerun runs that already finished")
    p.add_argument("--last-n", type=int, default=5, help="collect: steps averaged for the summary table")
    args = p.parse_args(argv)

    from megatron_trace.eval.scaling import (GridError, collect, load_grid, run_command, run_local, sbatch_script,
                                             shell_join)

    try:
        grid = load_grid(args.grid, output_dir=args.output_dir)
    except (GridError, OSError) as e:
        print(f"scaling: error: {e}", file=sys.stderr)
        return 2
    if args.command == "print":
        for run in ([grid.warm_start] if grid.warm_start is not None else []) + grid.runs:
            print(f"# {run.name}\n{shell_join(run_command(grid, run, multinode=grid.nnodes > 1))}")
        return 0
    if args.command == "run":
        results = run_local(grid, steps_done_ok=not args.rerun)
        failed = [r.name for r, rc in results if rc]
        if failed:
            print(f"scaling: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
            return 1
        return 0
    if args.command == "sbatch":
        script = args.script or os.path.join(grid.output_dir, "grid.sbatch")
        os.makedirs(os.path.dirname(os.path.abspath(script)), exist_ok=True)
        try:
            text = sbatch_script(grid)
        except GridError as e:
            print(f"scaling: error: {e}", file=sys.stderr)
            return 2
        with open(script + ".tmp", "w") as f:
            f.write(text)
        os.replace(script + ".tmp", script)
        print(f"wrote {script} ({len(grid.runs)} array tasks)")
        if args.submit:
            import subprocess

            return subprocess.call(["sbatch", script])
        return 0
    summary = collect(grid, last_n=args.last_n)
    print(f"wrote {len(summary['plots'])} plots and summary.md into {grid.output_dir}")
    if summary["missing"]:
        print(f"runs without metrics: {', '.join(summary['missing'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

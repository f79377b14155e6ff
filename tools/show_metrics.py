#!/usr/bin/env python
"""Print a run's metrics.jsonl as a text chart: one row per step with a bar for the chosen metric, then the
mean of the first and last steps; with --reference, a shipped curve (e.g. GRPO's mean over seeds from
docs/results_tiny_cpu.md) is printed beside it, step by step, labelled with where it comes from.

    python tools/show_metrics.py runs/tiny_cpu/metrics.jsonl --key reward_mean
    python tools/show_metrics.py runs/tiny_cpu/metrics.jsonl --reference docs/results_tiny_cpu/grpo_reward.json

A reference file is JSON: {"label": str, "source": str, "key": str, "values": [one float per step, from step 0]}.
"""

from __future__ import annotations

import argparse
import json
import sys


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def chart(rows: list[dict], key: str, *, width: int = 40, extra: tuple[str, ...] = ()) -> str:
    values = [r.get(key) for r in rows]
    known = [v for v in values if isinstance(v, (int, float))]
    if not known:
        raise SystemExit(f"no {key!r} in the metrics")
    top = max(max(known), 1e-12)
    w = max([12, *(len(e) + 1 for e in extra)])  # a column per extra metric, wide enough for its name
    lines = [f"{'step':>5}  {key:<12} " + "".join(f"{e:>{w}}" for e in extra)]
    for r, v in zip(rows, values):
        bar = "#" * int(round(width * (v or 0.0) / top))
        tail = "".join(f"{r.get(e, float('nan')):>{w}.4f}" for e in extra)
        lines.append(f"{r['step']:>5}  {(v if v is not None else float('nan')):<12.4f} {tail}  {bar}")
    return "\n".join(lines)


def first_last(rows: list[dict], key: str, k: int) -> tuple[float, float]:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    k = max(1, min(k, len(vals) // 2))
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


def load_reference(path: str) -> dict:
    """A shipped reference curve; a malformed file is an error naming it and the field."""
    with open(path) as f:
        ref = json.load(f)
    if not isinstance(ref, dict):
        raise SystemExit(f"{path}: a reference curve must be a JSON object, got {type(ref).__name__}")
    for field, kind in (("label", str), ("source", str), ("key", str), ("values", list)):
        if not isinstance(ref.get(field), kind):
            raise SystemExit(f"{path}: field {field!r} must be a {kind.__name__}")
    if not all(isinstance(v, (int, float)) for v in ref["values"]):
        raise SystemExit(f"{path}: field 'values' must hold numbers only")
    return ref


def side_by_side(rows: list[dict], key: str, ref: dict, *, window: int) -> str:
    """This run's `key` beside the reference curve, step by step, then the means over the first and last
    `window` steps and over every step both cover (the reward AUC per step of the results page)."""
    if ref["key"] != key:
        raise SystemExit(f"reference curve is of {ref['key']!r}, not {key!r}")
    mine = {r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float))}
    theirs = dict(enumerate(ref["values"]))
    lines = [f"{key}: this run beside {ref['label']} ({ref['source']})",
             f"{'step':>5}  {'this run':>10}  {'reference':>10}  {'diff':>8}"]
    for step in sorted(set(mine) | set(theirs)):
        a, b = mine.get(step), theirs.get(step)
        diff = f"{a - b:>+8.4f}" if a is not None and b is not None else f"{'':>8}"
        fa = f"{a:>10.4f}" if a is not None else f"{'-':>10}"
        fb = f"{b:>10.4f}" if b is not None else f"{'-':>10}"
        lines.append(f"{step:>5}  {fa}  {fb}  {diff}")
    both = sorted(set(mine) & set(theirs))
    if both:
        k = max(1, min(window, len(both) // 2))
        mean = lambda vals: sum(vals) / len(vals)
        for name, steps in ((f"the first {k} steps", both[:k]), (f"the last {k} steps", both[-k:]),
                            (f"{len(both)} steps both cover", both)):
            lines.append(f"mean over {name}: this run {mean([mine[s] for s in steps]):.4f}, "
                         f"{ref['label']} {mean([theirs[s] for s in steps]):.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", help="a metrics.jsonl written by the trainer")
    p.add_argument("--key", default="reward_mean")
    p.add_argument("--extra", nargs="*", default=["lambda", "kl_fkl", "entropy", "response_len"])
    p.add_argument("--window", type=int, default=5, help="steps averaged at the start and the end")
    p.add_argument("--reference", help="a shipped reference curve (JSON) printed beside this run's, step by step")
    args = p.parse_args(argv)
    rows = load(args.metrics)
    ref = load_reference(args.reference) if args.reference else None
    print(chart(rows, args.key, extra=tuple(args.extra)))
    first, last = first_last(rows, args.key, args.window)
    print(f"\n{args.key}: mean of the first {args.window} steps {first:.3f} -> last {args.window} steps {last:.3f}")
    if ref is not None:
        print("\n" + side_by_side(rows, args.key, ref, window=args.window))
    return 0


if __name__ == "__main__":
    sys.exit(main())

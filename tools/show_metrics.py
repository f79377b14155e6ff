#!/usr/bin/env python
"""Print a run's metrics.jsonl as a text chart: one row per step with a bar for the chosen metric, then the
mean of the first and last steps.

    python tools/show_metrics.py runs/tiny_cpu/metrics.jsonl --key reward_mean
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
    w = max(12, *(len(e) + 1 for e in extra))  # a column per extra metric, wide enough for its name
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", help="a metrics.jsonl written by the trainer")
    p.add_argument("--key", default="reward_mean")
    p.add_argument("--extra", nargs="*", default=["lambda", "kl_fkl", "entropy", "response_len"])
    p.add_argument("--window", type=int, default=5, help="steps averaged at the start and the end")
    args = p.parse_args(argv)
    rows = load(args.metrics)
    print(chart(rows, args.key, extra=tuple(args.extra)))
    first, last = first_last(rows, args.key, args.window)
    print(f"\n{args.key}: mean of the first {args.window} steps {first:.3f} -> last {args.window} steps {last:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

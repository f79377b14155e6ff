#!/usr/bin/env python
"""Write the shipped arithmetic datasets: megatron_trace/data/assets/arith_{train,test}.jsonl.

    python tools/make_arith_data.py                       # the shipped files (seed 1234, 2000 + 100)
    python tools/make_arith_data.py --out-dir /tmp/x --train 500 --test 50 --seed 7
"""

from __future__ import annotations

import argparse

from megatron_trace.data.arith import assets_dir, make_splits, write_jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(assets_dir()))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=100)
    args = ap.parse_args()
    splits = make_splits(args.seed, {"train": args.train, "test": args.test})
    for split, records in splits.items():
        path = f"{args.out_dir}/arith_{split}.jsonl"
        write_jsonl(records, path)
        print(f"wrote {len(records)} problems to {path}")


if __name__ == "__main__":
    main()

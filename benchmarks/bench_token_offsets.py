#!/usr/bin/env python
"""Token -> character offsets of sampled responses: byte-level mapping vs naive prefix decoding.

`annotate.spans.token_char_offsets` reads each sampled token's bytes once (O(L)); the naive method decodes every
prefix of the response (O(L^2)). Both give the same offsets on these texts (checked here; they
differ only on tokens that split a multi-byte character). Prints the median of several runs.

    python benchmarks/bench_token_offsets.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from megatron_trace.annotate.spans import offsets_by_prefix_decode, token_char_offsets
from megatron_trace.data.tokenizer import load_tokenizer

SENTENCES = [
    "Let x be the number of apples.", "Then 3x + 4 = 19, so x = 5.", "We compute $\\frac{1}{2} + 0.25 = 0.75$.",
    "Check: 3(5) + 4 = 19.", "α + β = γ.", "中文的推理步骤。", "Wait, 23 + 58 = 81.", "So the answer is \\boxed{5}.",
]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    args = ap.parse_args()
    tok = load_tokenizer()
    rng = random.Random(0)
    print(f"{'tokens':>7} {'byte-level ms':>14} {'prefix-decode ms':>17} {'speed-up':>9}")
    for length in args.lengths:
        text = ""
        while len(tok.encode(text)) < length:
            text += rng.choice(SENTENCES) + rng.choice([" ", "\n"])
        ids = tok.encode(text)[:length]
        ours = token_char_offsets(tok, ids)
        naive_repeats = max(1, args.repeats if length <= 1024 else 3)
        assert ours == offsets_by_prefix_decode(tok, ids), "the two methods disagree"
        t_ours = median_time(lambda: token_char_offsets(tok, ids), args.repeats)
        t_naive = median_time(lambda: offsets_by_prefix_decode(tok, ids), naive_repeats)
        print(f"{length:>7} {t_ours * 1e3:>14.2f} {t_naive * 1e3:>17.1f} {t_naive / t_ours:>8.0f}x")


if __name__ == "__main__":
    main()

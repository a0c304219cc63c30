#!/usr/bin/env python3
"""flashjit against FlashAttention-3 point by point: joins bench_forward.py's JSON (flashjit, FA2, cuDNN,
FlexAttention, one run) with fa3_bench's table lines (FA3 on the same GPU, another process) and prints
TFLOP/s and ratios. Runs anywhere (no torch, no GPU): on the files a device call brought back.

    python3 docs/experiments/fa3_bench/compare.py FA3_TXT BENCH_FORWARD_JSON [BENCH_FORWARD_JSON ...]
"""
from __future__ import annotations

import json
import sys


def fa3_points(path: str) -> dict:
    """{(dtype, d, causal, S, B, H, HK): TFLOP/s} of fa3_bench's timed lines
    ("dtype d causal S B H HK ms TFLOP/s  # ..."; lines starting with '#', check-only or failed lines skipped)."""
    found = {}
    for line in open(path):
        words = line.split("#")[0].split()
        if len(words) != 9 or words[0] not in ("bf16", "fp16"):
            continue
        try:
            key = (words[0], *map(int, words[1:7]))
            found[key] = float(words[8])
        except ValueError:  # "ok ok" / "FAIL FAIL": not timed
            continue
    return found


def flashjit_points(paths: list[str]) -> dict:
    """{(dtype, d, causal, S, B, H, HK): row} of bench_forward.json rows (its default choice: the first
    row of a point; --configs runs list several)."""
    found = {}
    for path in paths:
        for row in json.load(open(path))["rows"]:
            key = (row["dtype"], row["d_head"], int(row["causal"]), row["seqlen"], row["batch"], row["heads"],
                   row.get("heads_k", row["heads"]))
            found.setdefault(key, row)
    return found


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    fa3, ours = fa3_points(argv[0]), flashjit_points(argv[1:])
    print(f"{'point':<34} {'flashjit':>8} {'FA3':>7} {'cuDNN':>7} {'Flex':>7} {'x FA3':>6} {'x cuDNN':>7} {'FA3 x cuDNN':>11}")
    for key in sorted(set(fa3) | set(ours)):
        dtype, d, causal, s, b, h, hk = key
        row, theirs = ours.get(key, {}), fa3.get(key)
        mine, cudnn, flex = row.get("tflops"), row.get("cudnn_tflops"), row.get("flex_tflops")

        def ratio(a, c):
            return f"{a / c:.3f}" if a and c else "-"

        def num(x):
            return f"{x:.1f}" if x else "-"
        point = f"{dtype} d{d} {'causal' if causal else 'full':<6} S={s:<5} B={b:<2} H={h}/{hk}"
        print(f"{point:<34} {num(mine):>8} {num(theirs):>7} {num(cudnn):>7} {num(flex):>7} {ratio(mine, theirs):>6} "
              f"{ratio(mine, cudnn):>7} {ratio(theirs, cudnn):>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""An A/B of variants read off benchmark JSON: each point's flashjit figure per variant, the mean over the
passes that timed it, and each variant's change against the first. docs/experiments/run-next.sh's `passes`
times every variant in two processes (the order reversed in the second), each pass's JSON in
OUT/<script>-<variant>-<pass>/<script>.json; the perf log reports the means and changes this prints.

Forward rows (scripts/bench_forward.py) give `tflops`; backward rows (scripts/bench_backward.py) the
backward's `flashjit_bwd_tflops`; a varlen batch's rows (scripts/bench_varlen.py) the forward's `flashjit`
(its point: S=varlen, B = the batch's sequences). With --plain (a backward JSON timed without dropout), each dropout point
also shows each variant's dropout cost: its backward's extra time over the plain point (as targets.py).

    python3 scripts/ab_means.py OUT --script bench_backward --variants main mw mwdq --plain OUT/nodrop/bench_backward.json
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from targets import extra_time, plain_points, point, point_key  # noqa: E402  (same folder)


def figure(row: dict) -> float | None:
    """The row's flashjit TFLOP/s: the backward's, or the forward's."""
    return row.get("flashjit_bwd_tflops", row.get("tflops")) or None


def rows_of(doc: dict) -> list[dict]:
    """A JSON's rows as forward and backward rows: bench_varlen's name one dtype for the file and their
    batch by its sequences, so they take those fields and the forward's figure as `tflops`."""
    if "lengths" not in doc:
        return doc["rows"]
    return [{**row, "dtype": doc["dtype"], "seqlen": "varlen", "batch": row["sequences"], "heads": None,
             "tflops": row["flashjit"]} for row in doc["rows"]]


def timings(out: str, script: str, variant: str) -> tuple[dict[tuple, list[float]], dict[tuple, dict]]:
    """(point key -> the variant's figures, one a pass that timed it; point key -> a row of it)."""
    found: dict[tuple, list[float]] = {}
    rows: dict[tuple, dict] = {}
    for path in sorted(glob.glob(os.path.join(out, f"{script}-{variant}-*", f"{script}.json"))):
        with open(path) as f:
            for row in rows_of(json.load(f)):
                key, value = point_key(row), figure(row)
                rows[key] = row
                if value:
                    found.setdefault(key, []).append(value)
    return found, rows


def table(out: str, script: str, variants: list[str], plain: str | None = None) -> list[str]:
    """One line a point timed by the first variant: each variant's mean (and its passes), its change
    against the first, and with `plain` its dropout cost."""
    read = {v: timings(out, script, v) for v in variants}  # each pass's JSON once
    runs = {v: found for v, (found, _) in read.items()}
    rows = read[variants[0]][1]
    base_rows = {}
    if plain:
        with open(plain) as f:
            base_rows = plain_points(json.load(f)["rows"])
    lines = []
    for key in sorted(rows, key=lambda k: tuple(str(x) for x in k)):
        first = statistics.mean(runs[variants[0]][key]) if key in runs[variants[0]] else None
        base = figure(base_rows[key[:-1]]) if key[:-1] in base_rows else None
        cells = []
        for v in variants:
            got = runs[v].get(key)
            if not got:
                cells.append(f"{v} not timed")
                continue
            mean = statistics.mean(got)
            cell = f"{v} {mean:.1f} ({' / '.join(f'{x:.1f}' for x in got)})"
            if v != variants[0] and first:
                cell += f" {mean / first - 1:+.1%}"
            if base:
                cell += f" cost {extra_time(base, mean):+.1%}"
            cells.append(cell)
        lines.append(f"{point(rows[key])}: " + "; ".join(cells))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the folder holding <script>-<variant>-<pass>/<script>.json")
    parser.add_argument("--script", required=True, help="bench_forward or bench_backward")
    parser.add_argument("--variants", nargs="+", required=True, help="the first is the baseline")
    parser.add_argument("--plain", help="a bench_backward JSON without dropout: each variant's dropout cost")
    args = parser.parse_args(argv)
    lines = table(args.out, args.script, args.variants, args.plain)
    print("\n".join(lines) if lines else f"no {args.script} JSON of {args.variants[0]} under {args.out}")
    return 0 if lines else 1


if __name__ == "__main__":
    raise SystemExit(main())

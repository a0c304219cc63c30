"""Issues 14 and 15's targets read off benchmark JSON: each target met or not, and the points short of it,
worst first, so that a closing note states them from the numbers rather than by eye.

Forward (issue 14; scripts/bench_forward.py's rows): at least 1.0x cuDNN at every point, and 1.1x at S >= 4k
for d128 and d256; ahead of FlexAttention everywhere; d128 non-causal at S >= 4k at or above 650 TFLOP/s.
Backward (issue 15; scripts/bench_backward.py's rows, the backward's TFLOP/s): at least 1.0x cuDNN and 1.2x
FlashAttention-2 at every point; dropout (p > 0) costing under 10% of the same point's time without it.
A point a file lacks a figure for (FlexAttention not run, say) is listed as not timed, never as met. Several
files (a table split over calls) merge; a point timed twice keeps its last row.

    python3 scripts/targets.py --forward OUT/bench_forward.json ... --backward OUT/bench_backward.json ...
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Callable


def _times(v: float) -> str:
    return f"{v:.3g}x"


@dataclass(frozen=True)
class Target:
    name: str
    applies: Callable[[dict], bool]        # which rows the target speaks of
    value: Callable[[dict], float | None]  # the row's figure (None: not timed)
    bound: float                           # met where value >= bound (at_most: value < bound)
    show: Callable[[float], str] = _times
    at_most: bool = False

    def met_by(self, value: float) -> bool:
        return value < self.bound if self.at_most else value >= self.bound


def point(row: dict) -> str:
    heads = f"{row['heads']}/{row['heads_k']}" if "heads_k" in row else str(row["heads"])
    drop = f" p={row['dropout_p']:g}" if row.get("dropout_p") else ""
    return (f"{row['dtype']} d{row['d_head']} {'causal' if row['causal'] else 'non-causal'} S={row['seqlen']} "
            f"B={row['batch']} H={heads}{drop}")


def _ratio(num: str, den: str) -> Callable[[dict], float | None]:
    return lambda row: row[num] / row[den] if row.get(num) and row.get(den) else None


FORWARD = [
    Target("forward >= 1.0x cuDNN at every point", lambda r: True, _ratio("tflops", "cudnn_tflops"), 1.0),
    Target("forward >= 1.1x cuDNN at S >= 4k, d128 and d256", lambda r: r["seqlen"] >= 4096 and r["d_head"] in (128, 256),
           _ratio("tflops", "cudnn_tflops"), 1.1),
    Target("forward ahead of FlexAttention everywhere", lambda r: True, _ratio("tflops", "flex_tflops"), 1.0),
    Target("d128 non-causal forward at S >= 4k >= 650 TFLOP/s",
           lambda r: r["d_head"] == 128 and not r["causal"] and r["seqlen"] >= 4096, lambda r: r.get("tflops"), 650.0,
           lambda v: f"{v:.3g} TFLOP/s"),
]
BACKWARD = [
    Target("backward >= 1.0x cuDNN at every point", lambda r: not r.get("dropout_p"),
           _ratio("flashjit_bwd_tflops", "cudnn_bwd_tflops"), 1.0),
    Target("backward >= 1.2x FlashAttention-2 at every point", lambda r: not r.get("dropout_p"),
           _ratio("flashjit_bwd_tflops", "fa2_bwd_tflops"), 1.2),
]


def point_key(row: dict) -> tuple:
    """A point's identity in a table: its shape and dropout (the last field), not its figures."""
    return (row["dtype"], row["d_head"], row["causal"], row["seqlen"], row["batch"], row["heads"], row.get("heads_k"),
            row.get("dropout_p") or 0.0)


def merged(paths: list[str]) -> list[dict]:
    rows = {}
    for path in paths:
        with open(path) as f:
            for row in json.load(f)["rows"]:
                rows[point_key(row)] = row
    return list(rows.values())


def plain_points(rows: list[dict]) -> dict[tuple, dict]:
    """The rows without dropout, by their point's shape (point_key without the dropout field)."""
    return {point_key(r)[:-1]: r for r in rows if not r.get("dropout_p")}


def extra_time(plain_tflops: float | None, tflops: float | None) -> float | None:
    """The extra time of a point timed at `tflops` over the same point at `plain_tflops` (time goes as
    1 / TFLOP/s at a fixed point); None without both figures."""
    return plain_tflops / tflops - 1 if plain_tflops and tflops else None


def dropout_costs(rows: list[dict]) -> list[tuple[dict, float | None]]:
    """(row with dropout, its backward's extra time over the same point without dropout, None if that was
    not timed)."""
    plain = plain_points(rows)
    return [(row, extra_time(plain.get(point_key(row)[:-1], {}).get("flashjit_bwd_tflops"),
                             row.get("flashjit_bwd_tflops")))
            for row in rows if row.get("dropout_p")]


def report(target: Target, rows: list[dict]) -> tuple[bool, list[str]]:
    """(met, lines): met only where every row it applies to has a figure on the right side of the bound; the
    points that miss it listed worst first, then those not timed."""
    timed = [(target.value(r), r) for r in rows if target.applies(r)]
    short = sorted(((v, r) for v, r in timed if v is not None and not target.met_by(v)),
                   key=lambda vr: -vr[0] if target.at_most else vr[0])
    missing = [r for v, r in timed if v is None]
    met = bool(timed) and not short and not missing
    values = [v for v, _ in timed if v is not None]
    span = f", {target.show(min(values))} to {target.show(max(values))}" if values else ""
    lines = [f"{'met' if met else 'NOT MET'}: {target.name} ({len(timed)} points{span})"]
    lines += [f"    short: {point(r)}: {target.show(v)}" for v, r in short]
    lines += [f"    not timed: {point(r)}" for r in missing]
    return met, lines


def dropout_report(rows: list[dict], limit: float = 0.10) -> tuple[bool, list[str]]:
    """report() of dropout's cost (dropout_costs) against `limit`."""
    costs = {id(row): cost for row, cost in dropout_costs(rows)}
    return report(Target(f"backward dropout costs under {limit:.0%}", lambda r: bool(r.get("dropout_p")),
                         lambda r: costs[id(r)], limit, lambda v: f"+{v:.1%}", at_most=True), rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forward", nargs="*", default=[], help="bench_forward.json files")
    parser.add_argument("--backward", nargs="*", default=[], help="bench_backward.json files")
    args = parser.parse_args(argv)
    if not args.forward and not args.backward:
        parser.error("give --forward and/or --backward JSON files")
    results = []
    if args.forward:
        rows = merged(args.forward)
        results += [report(t, rows) for t in FORWARD]
    if args.backward:
        rows = merged(args.backward)
        results += [report(t, rows) for t in BACKWARD] + [dropout_report(rows)]
    for _, lines in results:
        print("\n".join(lines))
    return 0 if all(met for met, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

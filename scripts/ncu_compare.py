"""Two kernels' ncu source tables side by side: what each issues per key block, and where each waits.

profile_ncu.py writes source.csv, ncu's per-SASS-instruction table (execution counts and stall samples).
This reads two of them (flashjit's forward and FlashAttention-3's at one point, say) and prints:
- the warp instructions each issued in all, and per key block (a block: 16 HGMMA instructions a warp,
  QK^T's and PV's eight k-steps each at d128; --hgmma-per-block for other shapes), by opcode;
- the instructions executed far more often than the kernel's loop body (more than --spin times the
  busiest HGMMA's count): a waiting warp spinning on try_wait shows up here and nowhere else;
- each kernel's top instructions by stall samples, with the offset from the kernel's start, so that
  they can be found in `cuobjdump --dump-sass` of the same cubin.

    python scripts/ncu_compare.py prof-fj/source.csv prof-fa3/source.csv --names flashjit,fa3
"""
from __future__ import annotations

import argparse
import collections
from dataclasses import dataclass

from profile_ncu import number, source_table  # same folder
import sass_steps  # same folder


@dataclass
class Instruction:
    offset: int  # bytes from the kernel's first instruction
    text: str
    executed: int  # warp-level executions
    samples: int  # stall samples (all)


def load(path: str) -> list[Instruction]:
    """source.csv's instructions (profile_ncu.source_table's rows)."""
    with open(path) as f:
        table = source_table(f.read())
    if table is None:
        raise SystemExit(f"{path}: no per-instruction table (no row names a Source column)")
    header, rows = table
    names = {name: i for i, name in enumerate(header)}
    body = [row for row in rows if len(row) == len(header)]

    def count(row, column):
        return int(number(row[names[column]])) if column in names else 0
    base = int(body[0][names["Address"]], 16)
    return [Instruction(int(row[names["Address"]], 16) - base, row[names["Source"]].strip(),
                        count(row, "Instructions Executed"), count(row, "Warp Stall Sampling (All Samples)"))
            for row in body]


def opcode(text: str) -> str:
    """The SASS opcode without modifiers or predicate: `@!P0 BRA 0x..` -> BRA, `HGMMA.64x128x16.F32` -> HGMMA."""
    return sass_steps.opcode(text).split(".")[0] if text.split() else "?"


def blocks(code: list[Instruction], hgmma_per_block: int) -> float:
    return sum(i.executed for i in code if opcode(i.text) == "HGMMA") / hgmma_per_block or 1.0


def mix(code: list[Instruction], hgmma_per_block: int) -> dict[str, float]:
    """Warp instructions per key block, by opcode."""
    per = blocks(code, hgmma_per_block)
    counts = collections.Counter()
    for i in code:
        counts[opcode(i.text)] += i.executed
    return {op: n / per for op, n in counts.items()}


def spins(code: list[Instruction], factor: float) -> list[Instruction]:
    """Instructions executed more than `factor` times as often as the busiest HGMMA (the loop body's count)."""
    body = max((i.executed for i in code if opcode(i.text) == "HGMMA"), default=0)
    return [i for i in code if body and i.executed > factor * body]


def report(paths: list[str], names: list[str], hgmma_per_block: int, spin: float, top: int) -> str:
    codes = [load(p) for p in paths]
    lines = ["instructions issued: " + ", ".join(
        f"{n} {sum(i.executed for i in c) / 1e6:.1f} M ({sum(i.executed for i in c) / blocks(c, hgmma_per_block):.0f}"
        " a key block and warp)" for n, c in zip(names, codes))]
    mixes = [mix(c, hgmma_per_block) for c in codes]
    ops = sorted(set().union(*mixes), key=lambda op: -max(m.get(op, 0.0) for m in mixes))
    lines += ["", "per key block and warp: " + "  ".join(f"{n:>9}" for n in names)]
    lines += [f"{op:>22} " + "  ".join(f"{m.get(op, 0.0):9.1f}" for m in mixes)
              for op in ops if max(m.get(op, 0.0) for m in mixes) >= 0.5]
    for n, c in zip(names, codes):
        total = sum(i.executed for i in c) or 1
        hot = spins(c, spin)
        lines += ["", f"{n}: instructions run more than {spin:g}x the loop body's count"
                  + ("" if hot else ": none")]
        lines += [f"  {i.offset:#7x} {i.executed:>11} ({100 * i.executed / total:4.1f}% of all)  {i.text[:70]}"
                  for i in hot]
    for n, c in zip(names, codes):
        samples = sum(i.samples for i in c) or 1
        lines += ["", f"{n}: top {top} by stall samples ({samples} in all)"]
        lines += [f"  {i.offset:#7x} {100 * i.samples / samples:5.1f}%  x{i.executed:<9} {i.text[:70]}"
                  for i in sorted(c, key=lambda i: -i.samples)[:top]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="source.csv files written by profile_ncu.py")
    parser.add_argument("--names", help="comma-separated labels (default: the paths)")
    parser.add_argument("--hgmma-per-block", type=int, default=16,
                        help="HGMMA instructions a warp issues per key block (d128, 128-key blocks: 16)")
    parser.add_argument("--spin", type=float, default=4.0, help="the factor over the loop body's count")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    names = args.names.split(",") if args.names else args.sources
    if len(names) != len(args.sources):
        parser.error(f"--names gives {len(names)} labels for {len(args.sources)} sources")
    print(report(args.sources, names, args.hgmma_per_block, args.spin, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

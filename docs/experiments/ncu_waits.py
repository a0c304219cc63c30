"""Where a profiled kernel's warps wait on mbarriers: from profile_ncu.py's source.csv, each
SYNCS.PHASECHK try_wait with its executions, the stall samples on it and on its retry branch (the spin's
cost), and how often the retry path ran; then the kernel's elapsed and SM-active cycles (details.txt).
A barrier whose retry path runs far more often than its wait is one the waiting side reaches before the
other side arrives: for the producer, a stage not yet free; for a consumer, data not yet landed.

    python docs/experiments/ncu_waits.py OUT_DIR [OUT_DIR ...]   (each a profile_ncu.py --out folder)
"""
import csv
import re
import sys
from pathlib import Path


def waits(folder: Path) -> None:
    rows = list(csv.reader(open(folder / "source.csv")))
    head = next(i for i, r in enumerate(rows) if "Source" in r)
    names, body = rows[head], rows[head + 1:]
    ex, smp = names.index("Instructions Executed"), names.index("Warp Stall Sampling (All Samples)")
    total = sum(int(r[smp] or 0) for r in body) or 1
    addr = {r[0]: i for i, r in enumerate(body)}
    print(f"== {folder}: {len(body)} instructions, {total} stall samples")
    details = (folder / "details.txt").read_text() if (folder / "details.txt").exists() else ""
    for key in ("Elapsed Cycles", "SM Active Cycles", "Duration"):
        m = re.search(rf"{key}\s+\S+\s+([\d,.]+)", details)
        if m:
            print(f"   {key}: {m.group(1)}")
    for i, r in enumerate(body):
        if "SYNCS.PHASECHK" not in r[1] or not int(r[ex] or 0):
            continue
        branch = body[i + 1] if i + 1 < len(body) and "BRA" in body[i + 1][1] else None
        retry = None
        if branch is not None:  # the retry path: the branch's target, another try_wait on the same barrier
            m = re.search(r"BRA\s+(0x[0-9a-f]+)", branch[1])
            target = addr.get(m.group(1)) if m else None
            if target is not None:
                retry = next((body[j] for j in range(target, min(target + 4, len(body))) if "SYNCS" in body[j][1]), None)
        spin = int(branch[smp] or 0) if branch is not None else 0
        print(f"   [{i:5d}] exec {int(r[ex]):8d}  samples {int(r[smp] or 0) + spin:5d} "
              f"({100 * (int(r[smp] or 0) + spin) / total:4.1f}%)  retries {int(retry[ex]) if retry else 0:8d}  "
              f"{r[1].strip()[:70]}")


for arg in sys.argv[1:]:
    waits(Path(arg))

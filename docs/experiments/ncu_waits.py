"""Where a profiled kernel's warps wait on mbarriers: from profile_ncu.py's source.csv, each
SYNCS.PHASECHK try_wait with its executions, the stall samples on it, on its retry branch and on its retry
loop (the spin's whole cost), and how often the retry loop ran; then the kernel's elapsed and SM-active
cycles (details.txt). A barrier whose retry loop runs far more often than its wait is one the waiting side
reaches before the other side arrives: for the producer, a stage not yet free; for a consumer, data not yet
landed.

    python docs/experiments/ncu_waits.py OUT_DIR [OUT_DIR ...]   (each a profile_ncu.py --out folder)
"""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from profile_ncu import number, source_table  # noqa: E402

TARGET = re.compile(r"BRA\s+(?:\S+\s+)?(0x[0-9a-fA-F]+)")


def waits(folder: Path) -> None:
    names, body = source_table((folder / "source.csv").read_text())
    col = {name: names.index(name) for name in ("Address", "Source", "Instructions Executed",
                                                  "Warp Stall Sampling (All Samples)")}
    text = [r[col["Source"]] for r in body]
    executed = [int(number(r[col["Instructions Executed"]])) for r in body]
    samples = [int(number(r[col["Warp Stall Sampling (All Samples)"]])) for r in body]
    address = [int(r[col["Address"]], 16) for r in body]
    at = {a: i for i, a in enumerate(address)}
    total = sum(samples) or 1
    print(f"== {folder}: {len(body)} instructions, {total} stall samples")
    details = (folder / "details.txt").read_text() if (folder / "details.txt").exists() else ""
    for key in ("Elapsed Cycles", "SM Active Cycles", "Duration"):
        m = re.search(rf"{key}\s+\S+\s+([\d,.]+)", details)
        if m:
            print(f"   {key}: {m.group(1)}")
    # A wait: a try_wait whose next instruction branches (on failure) to a retry loop elsewhere, that loop a
    # try_wait on the same barrier and its branch back. Retry loops are counted into their wait, not listed.
    retry_loops = set()
    waits_found = []
    for i, t in enumerate(text):
        if "SYNCS.PHASECHK" not in t or not executed[i]:
            continue
        m = TARGET.search(text[i + 1]) if i + 1 < len(body) and "BRA" in text[i + 1] else None
        j = at.get(int(m.group(1), 16)) if m else None
        loop = range(j, min(j + 4, len(body))) if j is not None and j > i + 1 else range(0)
        loop = [k for k in loop if "SYNCS" in text[k] or "BRA" in text[k]]
        retry_loops.update(loop)
        waits_found.append((i, loop))
    for i, loop in waits_found:
        if i in retry_loops:
            continue
        spent = samples[i] + (samples[i + 1] if loop else 0) + sum(samples[k] for k in loop)
        retries = next((executed[k] for k in loop if "SYNCS" in text[k]), 0)
        print(f"   {address[i]:#x}: exec {executed[i]:8d}  samples {spent:5d} ({100 * spent / total:4.1f}%)  "
              f"retries {retries:8d}  {' '.join(text[i].split())[:70]}")


for arg in sys.argv[1:]:
    waits(Path(arg))

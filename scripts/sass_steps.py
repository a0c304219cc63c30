#!/usr/bin/env python3
"""The Hopper forward's key-loop steps in SASS, counted, no GPU needed: for each kernel name, the
instructions a consumer warp issues in each compiled step (from a warpgroup's ping-pong token sync
through its QK^T and PV wgmmas to the step's branch), the run of O-rescale multiplies a branch skips
(lazy_rescale), how many of the step's exponentials ptxas placed above the PV's wait (they run under the
PV; the rest wait for it), and with --ops the opcode counts of one step. docs/perf-log.md's step counts are made so.

    python3 scripts/sass_steps.py fwd_sm90_bf16_d128_m128_n128_st2_ov1_pp1_ps1_causal0
    python3 scripts/sass_steps.py --ops 1 NAME [NAME ...]   # also the opcodes of each kernel's step 1

Steps are found in the SASS, not in the source: a step starts at `BAR.SYNC.DEFER_BLOCKING Rn, 0x100` (a
warpgroup taking the token) and holds a PV wgmma (an HGMMA reading B N-major: `.tnspB`) and two waits
(`WARPGROUP.DEPBAR`); it ends at the first unconditional or backward branch after its last wait. Kernels
without ping-pong have no such sync and list no steps. Needs nvcc, cuobjdump and the nvdisasm it runs (the
CUDA toolkit's, or pip's nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm with their bin on PATH); the kernels
are built as scripts/ptxas_notes.py builds them, and its notes (C75xx) and spills are printed too.
"""
from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*(?:/\*.*)?$")
_TOKEN = re.compile(r"BAR\.SYNC\.DEFER_BLOCKING R\d+, 0x100")
_BRANCH = re.compile(r"\bBRA (?:\S+, )?(0x[0-9a-f]+)")
_PREDICATED_BRANCH = re.compile(r"^@!?U?P\d BRA")


@dataclass
class Step:
    address: int
    qk_n: int  # the QK^T wgmma's N: the keys this compilation covers (half blocks: block_n / 2)
    instructions: list[str] = field(repr=False)
    skippable: int  # multiplies a branch right after the last wait jumps over (lazy rescaling)

    @property
    def common(self) -> int:
        """Instructions issued when the skippable run is skipped."""
        return len(self.instructions) - self.skippable

    @property
    def exps_above_pv_wait(self) -> tuple[int, int]:
        """(exponentials between the step's first wait, the QK^T's, and its last, the PV's; all of the
        step's): those above the PV's wait run under the PV, the rest after it (docs/perf-log.md, 2026-12-05)."""
        waits = [i for i, t in enumerate(self.instructions) if t.startswith("WARPGROUP.DEPBAR")]
        exps = [i for i, t in enumerate(self.instructions) if opcode(t).startswith("MUFU.EX2")]
        return sum(waits[0] < i < waits[-1] for i in exps), len(exps)


def opcode(text: str) -> str:
    words = text.split()
    return words[1] if words[0].startswith("@") else words[0]


def parse(sass: str) -> list[tuple[int, str]]:
    """(address, instruction) of each SASS line of cuobjdump --dump-sass output."""
    return [(int(m[1], 16), m[2]) for m in map(_LINE.match, sass.splitlines()) if m]


def steps(code: list[tuple[int, str]]) -> list[Step]:
    starts = [i for i, (_, text) in enumerate(code) if _TOKEN.match(text)]
    found = []
    for start, stop in zip(starts, starts[1:] + [len(code)]):
        body = code[start:stop]
        waits = [i for i, (_, text) in enumerate(body) if text.startswith("WARPGROUP.DEPBAR")]
        if len(waits) < 2 or not any(t.startswith("HGMMA") and ".tnspB" in t for _, t in body):
            continue
        end = len(body) - 1
        for i in range(waits[-1], len(body)):
            m = _BRANCH.search(body[i][1])
            if m and (not body[i][1].startswith("@") or int(m[1], 16) < body[i][0]):
                end = i
                break
        texts = [t for _, t in body[:end + 1]]
        skippable = 0
        for i in range(waits[-1], len(texts)):
            if _PREDICATED_BRANCH.match(texts[i]):
                run = next((j for j in range(i + 1, len(texts)) if not texts[j].startswith("FMUL")), len(texts)) - i - 1
                skippable = max(skippable, run if run >= 16 else 0)  # O's rescale: a multiply an O element
        qk = next(t for t in texts if t.startswith("HGMMA"))
        found.append(Step(body[0][0], int(re.search(r"\.64x(\d+)x16", qk)[1]), texts, skippable))
    return found


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found is None:
        from flashjit import toolchain

        beside = Path(toolchain.find_toolkit().nvcc).parent / "cuobjdump"
        found = str(beside) if beside.is_file() else None
    if found is None:
        sys.exit("sass_steps.py: cuobjdump not found (the CUDA toolkit's bin, or `pip install nvidia-cuda-cuobjdump "
                 "nvidia-cuda-nvdisasm` and their bin on PATH)")
    return found


def kernel_sass(name: str, scratch: Path) -> tuple[str, list[str], int]:
    """(SASS, ptxas's performance-loss notes, spill-store bytes) of one kernel, built as ptxas_notes.py builds it."""
    from flashjit import codegen, toolchain
    from flashjit.configs import config_from_name
    from ptxas_notes import compile_one, cubin_flags  # same folder

    toolkit = toolchain.find_toolkit()
    _, notes, spill, _ = compile_one(config_from_name(name), cubin_flags(toolkit), str(toolkit.nvcc),
                                     str(codegen.kernels_dir()), scratch)
    dump = subprocess.run([cuobjdump(), "--dump-sass", str(scratch / f"{name}.cubin")], capture_output=True, text=True)
    if dump.returncode != 0:  # e.g. nvdisasm, which it runs, not on PATH
        sys.exit(f"{name}: cuobjdump failed: {dump.stderr.strip()[-500:]}")
    return dump.stdout, notes, spill


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", help="fwd_sm90 kernel names")
    parser.add_argument("--ops", type=int, help="also print the opcode counts of this step (0: the first)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flashjit-sass-") as scratch:
        for name in args.names:
            sass, notes, spill = kernel_sass(name, Path(scratch))
            found = steps(parse(sass))
            print(f"{name}: " + ("  ".join(f"N={s.qk_n}: {s.common}" + (f" (+{s.skippable} skipped)" if s.skippable else "")
                                           + " [ex2 %d of %d above the PV's wait]" % s.exps_above_pv_wait
                                           for s in found) or "no ping-pong steps found"))
            if notes or spill:  # a count from serialized wgmmas or a spilling kernel says little on its own
                print(f"    ptxas: {'; '.join(notes) or 'no note'}; {spill} bytes spilled")
            if args.ops is not None and args.ops < len(found):
                counts = collections.Counter(opcode(t) for t in found[args.ops].instructions)
                print("    " + ", ".join(f"{op} {n}" for op, n in counts.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

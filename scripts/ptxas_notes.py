#!/usr/bin/env python3
"""ptxas over every Hopper kernel the dispatcher can pick, no GPU needed: which ones get a "Potential
Performance Loss" note (C75xx: wgmma products serialized, which costs 10-40% and shows nowhere else) or
spill. Run it after a change to kernels/fwd_sm90.cuh, kernels/bwd_sm90.cuh or the dispatcher's rules;
CI checks the build set and, of this list, the two-CTA kernels at d64 (tests/test_jit_cache.py): not the
half-block kernels off the build set, the kernels with lazy rescaling alone, nor the two-CTA ones below d64.

The kernels: flashjit.dispatch's choice for every head dim from 8 to 256 in steps of 8 (and d_v 64 at
d96/d128), causal or not, short and long rows, each score feature alone and window + dropout, plus the
one-CTA-per-tile twin with_tile_walk takes for varlen batches and long causal rows, forward and backward;
bf16 (fp16 compiles to the same registers). Each is rendered and compiled to a cubin by nvcc with the
JIT's flags (about 2 s a kernel a core).

    python3 scripts/ptxas_notes.py --jobs 2              # every kernel; exit 1 if any has a note
    python3 scripts/ptxas_notes.py --filter _hb --list   # names only
"""
from __future__ import annotations

import argparse
import concurrent.futures
import re
import subprocess
import sys
import tempfile
from pathlib import Path

FEATURES = ({}, dict(local=True), dict(dropout=True), dict(softcap=True), dict(alibi=True), dict(sink=True),
            dict(local=True, dropout=True))
SEQLENS = (512, 1024, 2048, 8192)
_SPILL = re.compile(r"(\d+) bytes spill stores")
# The C++ front end's warnings ("...fwd_sm90.cuh(1256): warning #177-D: variable ... never referenced") and ptxas's:
# the JIT keeps nvcc's log only when a build fails, so a template's warning shows nowhere else.
_WARNING = re.compile(r"(?:warning #\d+-D|ptxas warning ?): .*")


def kernels() -> list:
    """The distinct sm_90a kernels of dispatch's choices above, in a stable order."""
    from flashjit import dispatch
    from flashjit import FwdSm90Config

    found = {}
    for d_head in range(8, 257, 8):
        for d_v in (0, 64) if d_head in (96, 128) else (0,):
            for causal in (False, True):
                for feature in FEATURES:
                    if "sink" in feature and d_v:
                        continue
                    for seqlen in SEQLENS:
                        cfg = dispatch.default_config("bf16", d_head, causal, seqlen, arch="sm_90a", d_v=d_v, **feature)
                        if isinstance(cfg, FwdSm90Config):
                            found.setdefault(cfg.name, cfg)
                            found.setdefault(cfg.one_cta_per_tile().name, cfg.one_cta_per_tile())
                    if "sink" in feature:
                        continue  # the backward has no sinks argument here: the forward's sink kernels only
                    try:
                        bwd = dispatch.default_bwd_config("bf16", d_head, causal, wgmma=True, d_v=d_v, **feature)
                    except ValueError:
                        continue
                    if bwd.family.arch == "sm_90a":
                        found.setdefault(bwd.name, bwd)
    return list(found.values())


def cubin_flags(toolkit) -> list[str]:
    """The JIT's nvcc flags for an sm_90a cubin."""
    from flashjit import jit

    flags = jit.build_flags("sm_90a", toolkit)
    return flags + ([] if "-cubin" in flags else ["-cubin"])  # (a toolkit before the split build: cubin all the same)


def ptx_flags(toolkit) -> list[str]:
    """The JIT's nvcc flags, stopped at sm_90a PTX: the C++ front end and cicc, no ptxas."""
    return [f for f in cubin_flags(toolkit) if not f.startswith("-gencode") and f != "-cubin"] + \
        ["-arch=compute_90a", "-ptx"]


def _nvcc(config, flags: list[str], nvcc: str, include: str, scratch: Path, suffix: str) -> str:
    """nvcc's log of one kernel's TU, its output left at scratch/<name><suffix>."""
    from flashjit import codegen

    source = scratch / f"{config.name}.cu"
    source.write_text(codegen.render(config))
    run = subprocess.run([nvcc, *flags, "-I", include, "-o", str(source.with_suffix(suffix)), str(source)],
                         capture_output=True, text=True)
    log = run.stdout + run.stderr
    if run.returncode != 0:
        raise RuntimeError(f"{config.name}: nvcc failed\n{log[-2000:]}")
    return log


def warnings_in(log: str) -> list[str]:
    """The distinct compiler warnings in an nvcc log."""
    return sorted(set(_WARNING.findall(log)))


def compile_one(config, flags: list[str], nvcc: str, include: str,
                scratch: Path) -> tuple[str, list[str], int, list[str]]:
    """(name, ptxas's notes, spill-store bytes, compiler warnings) of one kernel's cubin, left at
    scratch/<name>.cubin."""
    from flashjit import jit

    log = _nvcc(config, [*flags, "-Xptxas=-v"], nvcc, include, scratch, ".cubin")
    return config.name, jit.perf_losses(log), max((int(n) for n in _SPILL.findall(log)), default=0), warnings_in(log)


def _each(configs: list, jobs: int, work) -> list:
    """work(config, nvcc, include, scratch) for every config, `jobs` at once, in order; the first failure raises."""
    from flashjit import codegen, toolchain

    nvcc = str(toolchain.find_toolkit().nvcc)
    with tempfile.TemporaryDirectory(prefix="flashjit-ptxas-") as scratch, \
            concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(work, c, nvcc, str(codegen.kernels_dir()), Path(scratch)) for c in configs]
        return [f.result() for f in futures]


def check(configs: list, jobs: int) -> dict[str, tuple[list[str], int, list[str]]]:
    """{name: (ptxas's notes, spill-store bytes, compiler warnings)} of each config's cubin, `jobs` nvcc
    processes at once."""
    from flashjit import toolchain

    flags = cubin_flags(toolchain.find_toolkit())
    found = _each(configs, jobs, lambda config, *where: compile_one(config, flags, *where))
    return {name: (notes, spill, warned) for name, notes, spill, warned in found}


def ptx(configs: list, jobs: int) -> dict[str, list[str]]:
    """{name: compiler warnings} of each config compiled to sm_90a PTX (raises on the first that fails). Where
    a twin's cubin is already checked (bf16 for fp16: the same registers, so the same notes), this proves the
    rest of the template compiles for about half a cubin's time."""
    from flashjit import toolchain

    flags = ptx_flags(toolchain.find_toolkit())

    def one(config, *where) -> tuple[str, list[str]]:
        return config.name, warnings_in(_nvcc(config, flags, *where, ".ptx"))

    return dict(_each(configs, jobs, one))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="nvcc processes at once")
    parser.add_argument("--filter", action="append", default=[], help="keep names containing this (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the kernel names and exit")
    args = parser.parse_args()
    chosen = [c for c in kernels() if not args.filter or any(f in c.name for f in args.filter)]
    if args.list:
        print("\n".join(c.name for c in chosen))
        return 0
    found = check(chosen, args.jobs)
    for name, (notes, spill, warned) in found.items():
        if notes or spill or warned:
            print(f"{name}: {'; '.join(notes) or 'no note'}; {spill} bytes spilled" +
                  "".join(f"\n  {w}" for w in warned))
    noted = sum(bool(notes) for notes, _, _ in found.values())
    spilled = sum(spill > 0 for _, spill, _ in found.values())
    warning = sum(bool(warned) for _, _, warned in found.values())
    print(f"{len(chosen)} kernels: {noted} with ptxas performance-loss notes, {spilled} spilling, {warning} with "
          "compiler warnings", file=sys.stderr)
    return 1 if noted or warning else 0


if __name__ == "__main__":
    sys.exit(main())

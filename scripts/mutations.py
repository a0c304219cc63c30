#!/usr/bin/env python3
"""Mutation check: proves the GPU tests can fail. Each entry of MUTATIONS is a deliberate breakage
(file, exact old text, new text, the pytest selection that must catch it). They are applied one at a
time, in place: the file is edited, the selection runs, and the file is restored in a `finally`
block and verified byte for byte (the check stops if a restore ever fails). A breakage the selection
does not fail is reported as "passed (BAD)"; a breakage marked `race` that the tests miss is then
given to compute-sanitizer's racecheck (scripts/sanitize.py's parser), since a race may not show in
a few runs.

    python3 scripts/mutations.py                 # all, one pytest process per selection
    python3 scripts/mutations.py -n 16           # pytest-xdist workers per selection
    python3 scripts/mutations.py --only keep_bit --only dk_unwritten
    python3 scripts/mutations.py --list

Kernel sources are hashed into the cache key, so a mutated kernel compiles fresh (about 2 s per
kernel); the cache is <out>/flashjit-cache (default out: mutations-out), shared by all mutations.
First the unmutated selections run: if they fail, nothing else does (exit 2). The exit status is 1
if any breakage went undetected or could not be applied (its old text must occur exactly once).
Without a GPU it says so in one line and exits 0, touching no file.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sanitize  # noqa: E402  (same folder: GPU check, sanitizer lookup and report parsing)

ROOT = sanitize.ROOT
BWD = "tests/test_backward_gpu.py"
FWD = "tests/test_forward_gpu.py"


def _odd(shape: str) -> str:
    return f"{BWD}::test_odd_shape_backward[{shape}]"


ODD_SM80 = [_odd("(1, 33, 17, 2, 2, 96, True, 'atomic')"), _odd("(1, 40, 71, 2, 1, 256, True, 'atomic')"),
            _odd("(2, 17, 33, 3, 1, 64, True, 'deterministic')"), _odd("(1, 29, 90, 2, 2, 64, False, 'features')")]
ODD_WGMMA = [_odd("(1, 70, 45, 2, 1, 128, False, 'wgmma')"), _odd("(1, 45, 130, 2, 2, 64, True, 'wgmma')")]
FWD_MASK = [f"{FWD}::test_dropout_mask_is_philox_keep_mask_bit_for_bit[(2, 77, 256, 3, 3, 256)-default-{p}]"
            for p in ("0.17", "0.7519")]
BWD_MASK = [f"{BWD}::test_backward_dropout_mask_is_philox_keep_mask_bit_for_bit[{case}-0.17]"
            for case in ("300-256-256-True-None", "150-100-64-False-bwd_fp16_d64_w8_m128_s1_r16_det0_causal0_dropout")]
XT_EQUAL = [f"tests/test_forward_sm90.py::test_cross_tile_equals_persistent_bit_for_bit[{case}]"
            for case in ("False-window0-128-128", "True-window1-64-192", "False-window2-128-128")]
EMPTY_DQ = [f"{BWD}::test_deterministic_dq_of_rows_that_see_no_key",
            _odd("(1, 300, 20, 2, 1, 128, True, 'deterministic')"),
            _odd("(1, 300, 20, 2, 1, 64, True, 'deterministic')")]


@dataclass
class Mutation:
    name: str
    path: str          # relative to the repository root
    old: str           # must occur exactly once in the file
    new: str
    selection: list
    why: str
    needs_sm90a: bool = False
    race: list = field(default_factory=list)  # selection for racecheck if the tests pass


MUTATIONS = [
    Mutation("dk_scale_dropped_sm80", "kernels/bwd_sm80.cuh",
             "(sQ2, dk, r0, lane, p.softmax_scale * C::dropout_scale(p), part * C::kNtDW);",
             "(sQ2, dk, r0, lane, C::dropout_scale(p), part * C::kNtDW);", ODD_SM80,
             "the softmax scale dropped from the dK store (sm_80 kernel)"),
    Mutation("dk_scale_dropped_sm90", "kernels/bwd_sm90.cuh",
             "(sm.q, dk, r0, lane, p.softmax_scale * C::dropout_scale(p));",
             "(sm.q, dk, r0, lane, C::dropout_scale(p));", ODD_WGMMA,
             "the softmax scale dropped from the dK store (wgmma kernel)", needs_sm90a=True),
    Mutation("dk_unwritten", "kernels/bwd_sm80.cuh",
             "  store_rows<C, C::kBlockN>(p.dk, b, h_k, seq.k_start + key0, sQ2, keys, tid);\n", "", ODD_SM80,
             "dK never stored (the poisoned output stays NaN)"),
    Mutation("keep_bit", "kernels/common/dropout.cuh",
             "threshold4(uint32_t(m.dropout_threshold) * 0x01010101u)",
             "threshold4((uint32_t(m.dropout_threshold) + 1u) * 0x01010101u)", FWD_MASK + BWD_MASK,
             "keep iff byte > threshold instead of >= (flips the bytes equal to the threshold)"),
    Mutation("default_stream", "flashjit/interface.py",
             "    return getter(device_index) if getter else torch.cuda.current_stream(device_index).cuda_stream\n",
             "    return 0\n",
             [f"{FWD}::test_forward_runs_on_the_current_stream", f"{BWD}::test_backward_runs_on_the_current_stream"],
             "every kernel launched on the legacy default stream instead of torch's current stream"),
    Mutation("default_stream_backward", "flashjit/interface.py",
             "    _run(kernel, params, device_index)\n    if plan_key is not None and chosen and all(a is b for a, b in "
             "zip(given, (q, k, v, out, dout, lse))):\n",
             "    kernel(params, 0)\n    if plan_key is not None and chosen and all(a is b for a, b in "
             "zip(given, (q, k, v, out, dout, lse))):\n",
             [f"{BWD}::test_backward_runs_on_the_current_stream"],
             "the backward launched on the legacy default stream"),
    Mutation("dropout_scale_rounded", "flashjit/interface.py",
             "threshold, 1.0 / (1.0 - dropout_p),", "threshold, 256.0 / (256 - threshold),", FWD_MASK,
             "kept entries scaled by 256 / (256 - threshold) instead of flash-attn's 1 / (1 - p)"),
    Mutation("zero_length_dk", "flashjit/interface.py",
             "        dk.zero_(), dv.zero_()\n", "        pass\n",
             ["tests/test_parity.py::test_zero_length_sequences"],
             "Sq = 0: dK/dV left as allocated instead of exact zeros"),
    Mutation("cross_tile_o_carried", "kernels/fwd_sm90.cuh",
             "        zero(o);\n        m[0][0] = m1[0][0]",
             "        if constexpr (!kChained) zero(o);\n        m[0][0] = m1[0][0]",
             XT_EQUAL, "cross-tile: a tile's O starts from the previous tile's instead of zero", needs_sm90a=True),
    Mutation("cross_tile_q_reused_early", "kernels/fwd_sm90.cuh",
             "    tma_store_wait_read();\n    sm.q_ring->release(qs);\n", "    sm.q_ring->release(qs);\n", XT_EQUAL,
             "cross-tile: the store warp releases the Q stage before its TMA store of O staged there has read it",
             needs_sm90a=True, race=XT_EQUAL[:1]),
    Mutation("cross_tile_o_stored_early", "kernels/fwd_sm90.cuh",
             "      mbarrier_wait(sm.o_ready(qs.stage, g), qs.phase);\n", "", XT_EQUAL,
             "cross-tile: the store warp stores O without waiting until the consumer warpgroup has staged it",
             needs_sm90a=True, race=XT_EQUAL[:1]),
    Mutation("dq_barrier", "kernels/bwd_sm80.cuh",
             "  __syncthreads();\n  store_acc<C::kD, C::kSwizzle, C::kBf16>(sQ, dq, r0, lane,",
             "  group_sync<C>(g);\n  store_acc<C::kD, C::kSwizzle, C::kBf16>(sQ, dq, r0, lane,", EMPTY_DQ,
             "the deterministic dQ kernel's CTA barrier before reusing sQ weakened to the group's",
             race=EMPTY_DQ[1:]),
]


# One of pytest -q's progress lines: a mark a test ("F" failed, "E" error), then maybe "[ 42%]".
PROGRESS = re.compile(r"^([.FEsxX]+)\s*(?:\[\s*\d+%\])?$")


def pytest_run(selection: list, env: dict, workers: str | None, log: Path, timeout: float):
    """(exit status, 'failed, then timeout' or 'timeout', summary line) of one pytest run; its output goes to
    `log`."""
    extra = ["-x"] + (["-n", workers] if workers else [])
    rc = sanitize.run_logged(sanitize.pytest_command(selection, extra), env, log, timeout)
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    if rc == "timeout":  # no summary line: what -q's progress lines recorded before the kill
        marks = "".join(m.group(1) for m in map(PROGRESS.match, lines) if m)
        failed = marks.count("F") + marks.count("E")
        return ("failed, then timeout" if failed else rc), f"timed out after {marks.count('.')} passed, {failed} failed"
    return rc, (lines[-1] if lines else "")


def apply(mutation: Mutation) -> tuple[Path, bytes]:
    path = ROOT / mutation.path
    original = path.read_bytes()
    text = original.decode()
    count = text.count(mutation.old)
    if count != 1:
        raise LookupError(f"its old text occurs {count} times in {mutation.path} (must be exactly once)")
    path.write_bytes(text.replace(mutation.old, mutation.new).encode())
    return path, original


def restore(path: Path, original: bytes) -> None:
    path.write_bytes(original)
    if path.read_bytes() != original:
        raise SystemExit(f"mutations: FAILED TO RESTORE {path}: fix it by hand (git diff {path})")


def judge(rc, summary: str) -> str:
    """pytest's verdict on a mutation: 1 = some test failed (caught); 0 = passed; else a problem.
    Under pytest-xdist, -x ends the run with exit status 2 (xdist's Interrupted) after the first
    failure: caught too, when the summary line counts failures."""
    if rc == 1 or (rc == 2 and " failed" in summary):
        return "failed (caught)"
    if rc == "failed, then timeout":  # a hung kernel after a failed test: caught
        return "failed, then hung (caught)"
    if rc == "timeout":  # none failed before the kill: it may be the machine
        return "timed out, none failed (BAD)"
    if rc == 0:
        return "passed (BAD)" if " passed" in summary else "all skipped (BAD)"
    return {2: "interrupted", 3: "pytest internal error", 4: "usage error",
            5: "no tests collected"}.get(rc, f"error ({rc})") + " (BAD)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", dest="workers", help="pytest-xdist workers per selection (e.g. 16)")
    parser.add_argument("--only", action="append", help="run only this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--out", default="mutations-out", help="logs and the kernel cache (default mutations-out)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:24s} {m.path:28s} {m.why}")
        return 0
    if args.only and len(chosen) != len(set(args.only)):
        print(f"mutations: unknown name in {args.only}; --list shows them")
        return 2
    if not sanitize.gpu_available():
        print("mutations: no CUDA GPU is visible on this machine; nothing was run")
        return 0
    import torch  # noqa: E402 (after the GPU check)

    sys.path.insert(0, str(ROOT))
    from flashjit import jit

    sm90a = jit.arch_for(torch.cuda.current_device()) == "sm_90a"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = sanitize.sanitizer_env(out)
    env.pop("PYTORCH_NO_CUDA_MEMORY_CACHING")

    baseline = sorted({t for m in chosen for t in m.selection})
    rc, summary = pytest_run(baseline, env, args.workers, out / "baseline.log", args.timeout)
    print(f"baseline (no mutation): {summary}")
    if rc != 0:
        print(f"mutations: the unmutated selections fail (exit {rc}, {out / 'baseline.log'}); fix that first")
        return 2

    sanitizer = sanitize.find_sanitizer()
    rows = []
    for m in chosen:
        started = time.time()
        if m.needs_sm90a and not sm90a:
            rows.append((m, "skipped (needs sm_90a)", 0.0))
            continue
        try:
            path, original = apply(m)
        except LookupError as exc:
            rows.append((m, f"not applied: {exc} (BAD)", 0.0))
            continue
        try:
            rc, summary = pytest_run(m.selection, env, args.workers, out / f"{m.name}.log", args.timeout)
            verdict = judge(rc, summary)
            mutated_race = None
            if rc == 0 and m.race and sanitizer:
                (out / m.name).mkdir(exist_ok=True)
                mutated_race = sanitize.run_tool(sanitizer, "racecheck", m.race, out / m.name, env, args.timeout)
        finally:
            restore(path, original)
        if mutated_race is not None:  # the same racecheck on the restored sources must be clean
            (out / f"{m.name}-unmutated").mkdir(exist_ok=True)
            clean = sanitize.run_tool(sanitizer, "racecheck", m.race, out / f"{m.name}-unmutated", env, args.timeout)
            if mutated_race["errors"] and not clean["errors"]:
                verdict = f"caught by racecheck ({len(mutated_race['errors'])} records; the tests passed)"
            elif clean["errors"]:
                verdict = "racecheck reports hazards without the mutation too (BAD)"
        rows.append((m, verdict, time.time() - started))
        print(f"  {m.name}: {verdict}", flush=True)

    print(f"\n{'breakage':24s} {'result':44s} {'s':>5s}  what")
    for m, verdict, seconds in rows:
        print(f"{m.name:24s} {verdict:44s} {seconds:5.0f}  {m.why}")
    bad = [m.name for m, verdict, _ in rows if "BAD" in verdict]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} breakages caught or skipped; undetected/broken: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

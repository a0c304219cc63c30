#!/usr/bin/env python3
"""Run compute-sanitizer (memcheck, racecheck, synccheck, initcheck) over a small, fast selection of
odd-shape forward and backward GPU tests, and fail on any error it reports in flashjit's kernels.

    python3 scripts/sanitize.py --out sanitize-out                      # all four tools
    python3 scripts/sanitize.py --tool racecheck --out sanitize-out     # one (repeat --tool for more)
    python3 scripts/sanitize.py --out o -- 'tests/test_backward_gpu.py::test_odd_shape_backward'   # own selection
    FLASHJIT_SANITIZE_SELECTION='tests/a.py::t "tests/b.py::u[(1, 2)]"' python3 scripts/sanitize.py   # likewise

The selection (SELECTION below, the wgmma backward included) runs once without the sanitizer first,
which compiles its kernels into <out>/flashjit-cache, then once per tool in a single pytest process
(no xdist) with PyTorch's caching allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING=1, so memcheck sees
out-of-bounds accesses between tensors and initcheck sees uninitialised reads). Each report is split
into records, and only the records that name flashjit (the kernels live in namespace flashjit::)
count: PyTorch's own kernels may report, e.g. initcheck on torch.empty buffers. Logs: <out>/<tool>.log
(the sanitizer's) and <out>/<tool>.pytest.log. One summary line per tool; the exit status is 1 if any
tool found an error in a flashjit kernel or a test failed under it. Without a GPU it says so in one
line and exits 0.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
SELECTION = [  # small odd shapes: forward (both dtypes, causal, GQA, Sq > Sk), every backward variant
    "tests/test_forward_gpu.py::test_odd_shapes[(2, 17, 17, 3, 1, 64)-True-fp16]",
    "tests/test_forward_gpu.py::test_odd_shapes[(1, 300, 17, 2, 1, 96)-True-bf16]",
    "tests/test_forward_gpu.py::test_odd_shapes[(2, 17, 300, 4, 2, 128)-False-bf16]",
    "tests/test_forward_gpu.py::test_odd_shapes[(1, 77, 513, 2, 2, 160)-False-fp16]",
    "tests/test_backward_gpu.py::test_odd_shape_backward",  # atomic, deterministic, wgmma, dropout, features
    # The Hopper forward (also what the forward tests above run on sm_90a), persistent: tiles walked
    # by one CTA, the rings and the Q stages across tiles; cross-tile: one pipeline over them, O stored
    # through the Q stage; skipped on other GPUs.
    "tests/test_forward_sm90.py::test_odd_shapes[(2, 17, 300, 4, 2, 72)-True-persistent]",
    "tests/test_forward_sm90.py::test_odd_shapes[(1, 300, 17, 2, 1, 40)-False-persistent]",
    "tests/test_forward_sm90.py::test_odd_shapes[(2, 17, 300, 4, 2, 72)-True-cross_tile]",
    "tests/test_forward_sm90.py::test_odd_shapes[(1, 300, 17, 2, 1, 40)-False-cross_tile]",
    # A value head dim below q/k's: the sm_80 forward and backward with rows that see no key, the Hopper
    # forward (dispatched), a deterministic varlen backward.
    "tests/test_head_dim_v.py::test_flash_attn_func_matches_reference[96-64-torch.bfloat16-True-(1, 300, 17, 4, 2)-sm80]",
    "tests/test_head_dim_v.py::test_flash_attn_func_matches_reference[192-128-torch.bfloat16-True-(2, 77, 300, 4, 2)-dispatched]",
    "tests/test_head_dim_v.py::test_varlen_matches_each_sequence_alone[128-64-False-True]",
    # The KV-cache kernels: paged decode over 3 splits and the combine, a causal windowed chunk, the
    # append, hostile index values (clamped in the kernels), a varlen batch over pages.
    "tests/test_kvattn.py::test_forward_kvcache_matches_the_reference[decode paged 48-3]",
    "tests/test_kvattn.py::test_forward_kvcache_matches_the_reference[chunk causal paged window-17]",
    "tests/test_kvattn.py::test_hostile_index_values_stay_inside_the_tensors[True]",
    "tests/test_kvcache.py::test_jit_matches_the_reference[128-torch.float16-{'new': 3, 'sq': 3, 'causal': True}-3]",
    "tests/test_paged_varlen.py::test_kernels_match_the_reference_per_sequence[48-128-features1-bf16]",
    # The Hopper forward on a varlen batch: tiles past their sequence's end (stored from registers),
    # both tile walks, offsets that break the contract (clamped).
    "tests/test_varlen.py::test_rows_outside_the_sequences_and_around_the_outputs_are_untouched[False-sm90]",
    "tests/test_varlen.py::test_rows_outside_the_sequences_and_around_the_outputs_are_untouched[False-sm90-other-walk]",
    "tests/test_varlen.py::test_offsets_that_break_the_contract_stay_in_bounds[[0, 50, 20, 1000000]-[0, 5, 2147483647, -7]-sm90]",
    "tests/test_varlen.py::test_offsets_that_break_the_contract_stay_in_bounds[[-100, 3, 2, 1]-[0, 0, 0, 1000000000]-sm90-other-walk]",
]
# Record headers that are summaries, not findings.
_NOT_FINDINGS = re.compile(r"(ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY|COMPUTE-SANITIZER|Target application "
                           r"returned|No errors? )", re.I)


def gpu_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    try:
        sys.path.insert(0, str(ROOT))
        from flashjit import toolchain

        candidate = Path(toolchain.find_toolkit().home) / "bin" / "compute-sanitizer"
        if candidate.exists():
            return str(candidate)
    except Exception:  # noqa: BLE001 (no toolkit: reported by the caller)
        pass
    for candidate in (Path("/usr/local/cuda/bin/compute-sanitizer"),
                      Path("/usr/local/cuda/compute-sanitizer/compute-sanitizer")):
        if candidate.exists():
            return str(candidate)
    return None


def records(report: str) -> list[str]:
    """The sanitizer's findings, one string each: a record starts at '========= X' (X not a space)
    and goes on over the indented '=========     ...' lines that follow it."""
    out, current = [], None
    for line in report.splitlines():
        if not line.startswith("========="):
            continue
        body = line[len("========="):]
        if body.startswith(" ") and body[1:2] not in (" ", ""):  # a new record
            if current is not None:
                out.append("\n".join(current))
            current = None if _NOT_FINDINGS.search(body) else [line]
        elif current is not None:
            current.append(line)
    if current is not None:
        out.append("\n".join(current))
    return out


def classify(report: str) -> dict:
    """{'errors': [...], 'warnings': [...], 'other': n}: flashjit's records, and how many name no flashjit code."""
    result = {"errors": [], "warnings": [], "other": 0}
    for rec in records(report):
        if "flashjit" not in rec:
            result["other"] += 1
        elif re.match(r"=========\s+Warning", rec, re.I):
            result["warnings"].append(rec)
        else:
            result["errors"].append(rec)
    return result


def pytest_command(selection: list[str], extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *extra, *selection]


def run_logged(cmd: list[str], env: dict, log: Path, timeout: float):
    """Run cmd from the repository root with its output (after the command line) in `log`: its exit
    status, or 'timeout'. Shared with mutations.py. On a timeout the whole process group is killed:
    pytest-xdist's workers (or a process under the sanitizer) stuck in a hung kernel would otherwise
    outlive pytest and keep the GPU busy for every later run."""
    with open(log, "w") as sink:
        sink.write("$ " + " ".join(cmd) + "\n")
        sink.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timeout"


def run_tool(sanitizer: str, tool: str, selection: list[str], out: Path, env: dict, timeout: float) -> dict:
    """One tool over the selection: (pytest's exit status, classified report, log paths)."""
    log, pytest_log = out / f"{tool}.log", out / f"{tool}.pytest.log"
    cmd = [sanitizer, "--tool", tool, "--target-processes", "all", "--log-file", str(log), "--print-limit", "10000",
           *pytest_command(selection, ["-p", "no:xdist"])]
    started = time.time()
    rc = run_logged(cmd, env, pytest_log, timeout)
    report = log.read_text(errors="replace") if log.exists() else ""
    return dict(rc=rc, seconds=time.time() - started, log=log, pytest_log=pytest_log, **classify(report))


def sanitizer_env(out: Path) -> dict:
    env = dict(os.environ)
    env["FLASHJIT_CACHE_DIR"] = str(out / "flashjit-cache")
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    env.setdefault("FLASHJIT_BACKEND", "jit")
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", action="append", choices=TOOLS, help="a tool to run (repeatable; default: all four)")
    parser.add_argument("--out", default="sanitize-out", help="directory for the logs and the kernel cache")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per tool (default 1800)")
    parser.add_argument("selection", nargs="*", help="pytest node ids (default: SELECTION, or "
                        "$FLASHJIT_SANITIZE_SELECTION, split like a shell line: quote ids with spaces)")
    args = parser.parse_args(argv)
    if not gpu_available():
        print("sanitize: no CUDA GPU is visible on this machine; nothing was run")
        return 0
    sanitizer = find_sanitizer()
    if sanitizer is None:
        print("sanitize: compute-sanitizer was not found (PATH, the CUDA toolkit's bin/); nothing was run")
        return 2
    selection = args.selection or shlex.split(os.environ.get("FLASHJIT_SANITIZE_SELECTION", "")) or SELECTION
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = sanitizer_env(out)

    # Compile the selection's kernels outside the sanitizer (nvcc under it is slow and pointless).
    warm = subprocess.run(pytest_command(selection), cwd=ROOT, env=env, capture_output=True, text=True)
    (out / "warmup.pytest.log").write_text(warm.stdout + warm.stderr)
    if warm.returncode != 0:
        print(f"sanitize: the selection fails even without the sanitizer (pytest exit {warm.returncode}; "
              f"{out / 'warmup.pytest.log'}); running the tools anyway")

    failed = warm.returncode != 0
    for tool in args.tool or TOOLS:
        r = run_tool(sanitizer, tool, selection, out, env, args.timeout)
        bad = bool(r["errors"]) or r["rc"] != 0
        failed |= bad
        tests = "tests passed" if r["rc"] == 0 else f"pytest exit {r['rc']}"
        print(f"{tool:9s} {'FAIL' if bad else 'ok  '}  {len(r['errors'])} errors and {len(r['warnings'])} warnings "
              f"in flashjit kernels, {r['other']} records elsewhere (ignored); {tests}; {r['seconds']:.0f} s; "
              f"log {r['log']}")
        for rec in r["errors"][:3]:
            print("    " + rec.replace("\n", "\n    ")[:1500])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

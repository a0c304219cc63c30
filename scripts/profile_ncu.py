"""Where a kernel's warps wait: one flashjit forward or backward launch profiled by Nsight Compute
(ncu), its warp-state statistics, and the SASS instructions with the most stall samples.

The timing benches say how fast; this says why, before a change is guessed at. The script starts
itself again under ncu (hardware counters: a Firecracker device machine, not gVisor; device/H200.md),
skips the warm-up launches, profiles one launch of the kernel whose name matches --kernel, and writes
to --out: report.ncu-rep, details.txt (every section ncu printed), source.csv (per SASS instruction)
and summary.txt (printed last: the stall reasons and the top instructions).

    python scripts/profile_ncu.py --d 64 --causal --seqlen 1024 --out prof-d64c1k
    python scripts/profile_ncu.py --d 128 --seqlen 2048 --backward --kernel dkdv --out prof-bwd
    python scripts/profile_ncu.py --d 64 --seqlen 1024 --config fwd_sm90_bf16_d64_m192_n128_st4_ov1_pp0_ps1_causal0
    python scripts/profile_ncu.py --kernel FlashAttnFwdSm90 --out prof-fa3 \
        --external ".fa3bench/fa3_bench --d 128 --causal 0 --batch 4 --seqlen 4096 --heads 16 --iters 5"

--external profiles another program's launches the same way (FlashAttention-3's forward through
docs/experiments/fa3_bench, for the same figures beside flashjit's); the problem is then its command line's.

The problem is bench_forward's: batch * seqlen = --tokens, heads * d = --hidden, bf16 by default.
ncu runs with --clock-control none (METHOD.md: leave the clocks alone).
"""
from __future__ import annotations

import argparse
import csv
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

CHILD = "FLASHJIT_PROFILE_CHILD"  # set in the process ncu starts: run the launches, profile nothing
WARMUP = 3  # launches of the profiled kernel before the one ncu measures (compile, caches, clocks)
TENSOR_PIPE = "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active"  # Hopper's wgmma pipe
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SchedulerStats", "SourceCounters",
            "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=128, help="head dim")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seqlen")
    parser.add_argument("--hidden", type=int, default=2048, help="heads * head dim")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--dropout-p", type=float, default=0.0, help="dropout probability")
    parser.add_argument("--backward", action="store_true", help="profile the backward's kernels (after a forward)")
    parser.add_argument("--config", help="a kernel name to run instead of the dispatcher's choice (forward only)")
    parser.add_argument("--kernel", default=None,
                        help="regex on the demangled kernel name (default: 'fwd' forward, 'dkdv' backward)")
    parser.add_argument("--top", type=int, default=30, help="SASS instructions to list")
    parser.add_argument("--external", help="a command whose launches to profile instead of flashjit's (with --kernel "
                        "naming its kernel)")
    parser.add_argument("--metric", action="append", default=[],
                        help="one more raw metric to collect and print (repeatable), e.g. lts__t_sectors_op_red.sum")
    parser.add_argument("--out", default="profile-out")
    return parser.parse_args(argv)


def run_launches(args) -> None:
    """The child: the launches ncu watches (WARMUP + 1 of the profiled kernel, then stop)."""
    import torch

    import flashjit
    from flashjit.configs import config_from_name

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    batch, heads = max(1, args.tokens // args.seqlen), max(1, args.hidden // args.d)
    q, k, v = (torch.randn(batch, args.seqlen, heads, args.d, device="cuda", dtype=dtype,
                           requires_grad=args.backward) for _ in range(3))
    config = config_from_name(args.config) if args.config else None
    for _ in range(WARMUP + 1):
        if args.backward:
            out = flashjit.flash_attn_func(q, k, v, dropout_p=args.dropout_p, causal=args.causal)
            out.backward(torch.ones_like(out))
        else:
            flashjit.forward(q, k, v, config=config, causal=args.causal, dropout_p=args.dropout_p)
    torch.cuda.synchronize()
    print(f"ran {WARMUP + 1} launches: B={batch} S={args.seqlen} H={heads} d={args.d} {args.dtype} "
          f"causal={args.causal} dropout_p={args.dropout_p} {'backward' if args.backward else 'forward'}", flush=True)


def ncu_binary() -> str:
    found = shutil.which("ncu")
    for candidate in [found] + sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu")) + \
            [Path("/usr/local/cuda/bin/ncu")]:
        if candidate and Path(candidate).exists():
            return str(candidate)
    sys.exit("profile_ncu.py: Nsight Compute (ncu) is not on this machine")


def profile(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ncu = ncu_binary()
    kernel = args.kernel or ("dkdv" if args.backward else "fwd")  # flashjit::fwd(_sm90)::...
    report = out / "report"
    command = [ncu, "--clock-control", "none", "--target-processes", "all", "--kernel-name-base", "demangled",
               "-k", f"regex:{kernel}", "--launch-skip", str(WARMUP), "--launch-count", "1",
               "--import-source", "no", "-f", "-o", str(report)]
    for section in SECTIONS:
        command += ["--section", section]
    target = shlex.split(args.external) if args.external else [sys.executable, __file__, *sys.argv[1:]]
    # The tensor pipe's utilisation, which no section above is sure to collect on every ncu; a version that
    # does not know the metric fails the run, which then goes again without it.
    for metrics in (["--metrics", ",".join([TENSOR_PIPE, *args.metric])], []):
        print(" ".join(command + metrics + target), flush=True)
        run = subprocess.run(command + metrics + target, env=dict(os.environ, **{CHILD: "1"}), capture_output=True,
                             text=True)
        if run.returncode == 0 and report.with_suffix(".ncu-rep").exists():
            break
    (out / "ncu.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0 or not report.with_suffix(".ncu-rep").exists():
        sys.exit(f"ncu failed (exit {run.returncode}); the last lines of {out / 'ncu.log'}:\n"
                 + "\n".join((run.stdout + run.stderr).strip().splitlines()[-20:]))
    rep = str(report.with_suffix(".ncu-rep"))
    details = subprocess.run([ncu, "-i", rep, "--page", "details"], capture_output=True, text=True)
    (out / "details.txt").write_text(details.stdout + details.stderr)
    source = subprocess.run([ncu, "-i", rep, "--page", "source", "--csv", "--print-source", "sass"],
                            capture_output=True, text=True)
    (out / "source.csv").write_text(source.stdout + source.stderr)
    raw = subprocess.run([ncu, "-i", rep, "--page", "raw", "--csv"], capture_output=True, text=True)
    (out / "raw.csv").write_text(raw.stdout + raw.stderr)
    summary = summarize(details.stdout, source.stdout, args.top, raw.stdout, args.metric)
    (out / "summary.txt").write_text(summary)
    print(summary)


def raw_metrics(raw_csv: str) -> list[tuple[str, str]]:
    """(metric, value) of the raw page (--csv: names, units, then the profiled launch's values)."""
    rows = list(csv.reader(raw_csv.splitlines()))
    return list(zip(rows[0], rows[-1])) if len(rows) >= 2 else []


def stall_reasons(raw_csv: str) -> list[str]:
    """The sampled stall reasons of the raw page (smsp__pcsamp_warps_issue_stalled_*), largest first."""
    prefix = "smsp__pcsamp_warps_issue_stalled_"
    found = []
    for name, value in raw_metrics(raw_csv):
        if name.startswith(prefix) and not name.endswith("_not_issued"):
            try:
                found.append((float(value.replace(",", "")), name[len(prefix):]))
            except ValueError:
                continue
    total = sum(v for v, _ in found) or 1.0
    return [f"{100 * v / total:5.1f}%  {reason}" for v, reason in sorted(found, reverse=True)[:12] if v > 0]


def tensor_pipe(raw_csv: str) -> list[str]:
    """The raw page's tensor-pipe utilisation metrics (sm__pipe_tensor_*..pct..., as the sections collect
    them), the share of the SMs' cycles the tensor cores were busy."""
    metrics = raw_metrics(raw_csv)
    found = [f"{name}: {value}" for name, value in metrics if name.startswith("sm__pipe_tensor") and "pct" in name]
    return found or (["(no tensor-pipe metric on the raw page)"] if metrics else [])


def number(cell: str) -> float:
    """A table cell as a number (ncu writes thousands separators); 0 for text."""
    try:
        return float(cell.replace(",", ""))
    except ValueError:
        return 0.0


def source_table(source_csv: str) -> tuple[list[str], list[list[str]]] | None:
    """(column names, rows) of the source page (its header is the row naming the "Source" column; ncu may
    write a kernel-name row above it), or None without one."""
    rows = list(csv.reader(source_csv.splitlines()))
    header = next((i for i, row in enumerate(rows) if any("Source" in cell for cell in row)), None)
    return None if header is None else (rows[header], rows[header + 1:])


def summarize(details: str, source_csv: str, top: int, raw_csv: str = "", metrics: tuple = ()) -> str:
    """The warp-state and speed-of-light lines of the details page, the raw page's `metrics` (--metric), the
    sampled stall reasons, then the `top` SASS instructions by stall samples (whichever sampling columns this ncu
    version writes)."""
    keep = ("Duration", "Compute (SM) Throughput", "Memory Throughput", "Warp Cycles Per Issued Instruction",
            "Issued Warp Per Scheduler", "No Eligible", "Active Warps Per Scheduler", "Eligible Warps Per Scheduler",
            "Registers Per Thread", "Achieved Occupancy", "Stall", "stall")
    lines = [line.rstrip() for line in details.splitlines() if any(word in line for word in keep)]
    lines += tensor_pipe(raw_csv)
    lines += [f"{name}: {value}" for name, value in raw_metrics(raw_csv) if name in metrics]
    reasons = stall_reasons(raw_csv)
    if reasons:
        lines += ["", "stall reasons (share of the warps' stall samples):", *reasons]
    table = source_table(source_csv)
    if table is None:
        return "\n".join(lines + ["(no per-instruction table: see source.csv)"])
    names, body = table
    samples = next((i for i, n in enumerate(names) if "Warp Stall Sampling (All" in n), None)
    text = next(i for i, n in enumerate(names) if "Source" in n)
    if samples is None:
        return "\n".join(lines + [f"(no stall-sampling column among {names}: see source.csv)"])
    total = sum(number(row[samples]) for row in body if len(row) > samples) or 1.0
    ranked = sorted((row for row in body if len(row) > samples), key=lambda row: -number(row[samples]))
    lines += ["", f"top {top} SASS instructions by stall samples ({int(total)} samples in all):"]
    for row in ranked[:top]:
        lines.append(f"{100 * number(row[samples]) / total:5.1f}%  {row[0]:>8}  {row[text].strip()[:90]}")
    return "\n".join(lines)


if __name__ == "__main__":
    arguments = parse_args()
    if os.environ.get(CHILD):
        run_launches(arguments)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_forward import exit_unless_gpu  # same folder: one line and exit without a GPU

        exit_unless_gpu("profile_ncu.py")
        profile(arguments)

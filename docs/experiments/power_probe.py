"""Sustained forward (or, with --backward, backward) throughput with the SM clock and board power behind it.
The lent H100 is power-capped under these kernels (docs/perf-log.md: 560-714 W at 1545-1755 MHz against 1980
idle), so a kernel's speed is its work a cycle times the clock its power draw leaves it; two kernels at equal
TFLOP/s per GHz differ only in what their energy costs them. `run` times each contender back to back (no L2
flush between calls, as a model's layers run) for --seconds at one point and appends its window to a JSON-lines
file; FlashAttention-3's binary (docs/experiments/fa3_bench) appends its own windows from the shell
(run-next.sh `power`); `join` puts each window's mean clock and power (run-next.sh's nvidia-smi log, samples
from --settle seconds after the window's start) beside its TFLOP/s.

    python docs/experiments/power_probe.py run --d 128 --seqlen 4096 [--causal] [--dtype fp16] --windows W.jsonl
    python docs/experiments/power_probe.py run --backward --d 256 --gqa 1x8192x32x8 --causal --windows W.jsonl
    python docs/experiments/power_probe.py join --windows W.jsonl --clocks clocks.csv
"""
import argparse
import csv
import json
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))


def run(args) -> None:
    import torch
    from torch.nn.attention import SDPBackend

    import flashjit
    from bench_forward import sdpa, tflops

    batch, heads = 16384 // args.seqlen, 2048 // args.d
    heads_k = heads
    if args.gqa:  # BxSxHxHK, as bench_backward's --gqa
        batch, args.seqlen, heads, heads_k = map(int, args.gqa.split("x"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    grad = dict(requires_grad=args.backward)
    q = torch.randn(batch, args.seqlen, heads, args.d, device="cuda", dtype=dtype, **grad)
    k, v = (torch.randn(batch, args.seqlen, heads_k, args.d, device="cuda", dtype=dtype, **grad) for _ in range(2))
    ours = flashjit.flash_attn_func if args.backward else flashjit.forward  # forward: the low-level call, as before
    contenders = {"flashjit": lambda: ours(q, k, v, causal=args.causal),
                  "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, args.causal),
                  "fa2": sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, args.causal)}
    point = dict(dtype=args.dtype, d=args.d, causal=args.causal, seqlen=args.seqlen, batch=batch, heads=heads,
                 heads_k=heads_k, mode="bwd" if args.backward else "fwd")
    for name in args.contenders.split(","):
        fn = contenders[name]
        if args.backward:  # the backward alone, through autograd, its graph retained (bench_backward's timing)
            out = fn()
            dout = torch.randn_like(out)

            def fn(out=out, dout=dout):
                q.grad = k.grad = v.grad = None
                out.backward(dout, retain_graph=True)
        fn()
        torch.cuda.synchronize()
        events, start = [], time.time()
        while time.time() - start < args.seconds:  # the host runs ahead of the GPU by at most the queue
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            events.append((begin, end))
        torch.cuda.synchronize()
        stop = time.time()
        times = sorted(b.elapsed_time(e) for b, e in events[len(events) // 2:])  # the settled half
        ms = times[len(times) // 2]
        row = dict(point, name=name, start=start, end=stop, calls=len(events), ms=ms,
                   tflops=tflops(batch, heads, args.seqlen, args.d, args.causal, ms, point["mode"]))
        print(f"{name:10s} {point['mode']} {args.dtype} d{args.d} causal={int(args.causal)} B={batch} S={args.seqlen} "
              f"H={heads}/{heads_k}: {ms:.3f} ms "
              f"{row['tflops']:.1f} TFLOP/s over {len(events)} calls", flush=True)
        with open(args.windows, "a") as f:
            f.write(json.dumps(row) + "\n")
        time.sleep(args.gap)


def _clock_samples(path: Path) -> list:
    """(unix time, SM MHz, W) from nvidia-smi's CSV (local-time stamps, this machine's zone)."""
    samples = []
    with open(path) as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader)]
        sm = next(i for i, h in enumerate(header) if h.startswith("clocks.sm") or h.startswith("clocks.current.sm"))
        power = next(i for i, h in enumerate(header) if h.startswith("power.draw"))
        for line in reader:
            try:
                stamp = datetime.strptime(line[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
                samples.append((stamp, float(line[sm].split()[0]), float(line[power].split()[0])))
            except (ValueError, IndexError):
                continue  # a partly written last line, or "[N/A]"
    return samples


def join(args) -> None:
    samples = _clock_samples(Path(args.clocks))
    # busy: the share of the window the contender's kernels ran (calls x median time): a short call launched
    # from Python may leave the GPU idle between calls, which would lift its clock (FA3's C++ loop: ~1).
    print(f"{'contender':14s} {'point':34s} {'TFLOP/s':>8s} {'MHz':>6s} {'W':>6s} {'TFLOP/s/GHz':>11s} {'busy':>5s} "
          "samples")
    for line in open(args.windows):
        row = json.loads(line)
        inside = [(mhz, w) for t, mhz, w in samples if row["start"] + args.settle <= t <= row["end"]]
        point = f"{row.get('mode', 'fwd')} {row['dtype']} d{row['d']} c{int(row['causal'])} S{row['seqlen']}"
        if row.get("heads_k", row.get("heads")) != row.get("heads"):
            point += f" {row['batch']}x{row['heads']}/{row['heads_k']}"
        busy = row["calls"] * row["ms"] / 1e3 / (row["end"] - row["start"])
        if not inside:
            print(f"{row['name']:14s} {point:34s} {row['tflops']:8.1f}  (no clock samples in the window)")
            continue
        mhz = sum(m for m, _ in inside) / len(inside)
        watts = sum(w for _, w in inside) / len(inside)
        print(f"{row['name']:14s} {point:34s} {row['tflops']:8.1f} {mhz:6.0f} {watts:6.0f} "
              f"{row['tflops'] / mhz * 1000:11.1f} {busy:5.2f} {len(inside)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    r.add_argument("--d", type=int, default=128)
    r.add_argument("--seqlen", type=int, default=4096)
    r.add_argument("--causal", action="store_true")
    r.add_argument("--seconds", type=float, default=4.0)
    r.add_argument("--gap", type=float, default=2.0, help="idle seconds after each contender (the card cools)")
    r.add_argument("--contenders", default="flashjit,cudnn,fa2")
    r.add_argument("--backward", action="store_true", help="time the backward (through autograd) instead")
    r.add_argument("--gqa", default="", help="BxSxHxHK: this grid instead of 16k tokens at hidden 2048")
    r.add_argument("--windows", required=True)
    j = sub.add_parser("join")
    j.add_argument("--windows", required=True)
    j.add_argument("--clocks", required=True)
    j.add_argument("--settle", type=float, default=1.0, help="seconds skipped at each window's start")
    args = parser.parse_args()
    run(args) if args.command == "run" else join(args)


if __name__ == "__main__":
    main()

"""Backward and forward+backward benchmark: flashjit.flash_attn_func vs PyTorch SDPA's flash
(FlashAttention-2) and cuDNN backends (and with --flex FlexAttention), through autograd, in one run.

TFLOP/s conventions: forward 4 * B * H * S^2 * D (halved for causal), backward 2.5x that,
forward+backward 3.5x. batch * seqlen = --tokens, heads * head_dim = --hidden.
--kernels lists the GPU kernels of flashjit's and cuDNN's backward with their time per call (torch.profiler).
--host times, for each contender's backward (and forward+backward) through autograd, what one call costs
the host (50 calls queued back to back, no synchronization inside) against the wall time of those calls:
where the host's time a call exceeds the GPU's, a short call is host-bound, and do_bench's figure (which
flushes L2 before each call and times it alone) shows the host's time, not the kernels'.
--candidates also times flashjit.backward alone (no autograd) for each listed (n_warps, block_m,
deterministic[, d_split[, group_rows]]) backward config: how the defaults in flashjit/dispatch.py were chosen.
GQA points (--gqa, BATCHxSEQLENxHEADSxKV_HEADS each, over --dtypes, --head-dims and --causal): the same
contenders (SDPA with enable_gqa), and flashjit.backward alone on the wgmma config with head_split True (one
dK/dV CTA per query head, "split") and False (one per kv head, "group"): how dispatch.backward_splits_heads
was chosen.

    python scripts/bench_backward.py --out bench-out
    python scripts/bench_backward.py --candidates 8x64x0,4x64x0,8x64x1,8x64x0x2x32 --out bench-out
    python scripts/bench_backward.py --candidates wgmma,wgmma_tma --head-dims 64,128 --seqlens 4096 --gqa ''
    python scripts/bench_backward.py --seqlens '' --gqa 1x4096x16x4 --head-dims 128 --causal 1
    python scripts/bench_backward.py --seqlens 1024 --gqa '' --kernels
    python scripts/bench_backward.py --seqlens '' --gqa 1x4096x16x4 --head-dims 64 --causal 1 --kernels --host
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time
from pathlib import Path

from bench_forward import (_require_torch_cuda, add_grid_arguments, exit_unless_gpu, flex, grid, sdpa,  # same folder
                           time_rounds, write_result)

if __name__ == "__main__" and not {"-h", "--help"} & set(sys.argv[1:]):
    exit_unless_gpu("bench_backward.py")  # before the heavy imports: one line, no traceback

import torch  # noqa: E402
from torch.nn.attention import SDPBackend  # noqa: E402
from triton.testing import do_bench  # noqa: E402

os.environ.setdefault("FLASHJIT_BACKEND", "jit")
import flashjit  # noqa: E402
from flashjit.configs.bwd_sm90 import WGMMA_SHAPES, wgmma_tile  # noqa: E402


def timings(attn, q, k, v, dout):
    """(backward ms, forward+backward ms) for attn(q, k, v) -> out, or None if unsupported."""
    try:
        out = attn(q, k, v)
        out.backward(dout, retain_graph=True)
        torch.cuda.synchronize()
    except RuntimeError as exc:
        print(f"    (skipped: {str(exc).splitlines()[0][:100]})")
        return None

    bwd, fwd_bwd = autograd_calls(attn, out, q, k, v, dout)
    return (do_bench(bwd, warmup=25, rep=100, return_mode="median"),
            do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median"))


def autograd_calls(attn, out, q, k, v, dout):
    """(bwd, fwd_bwd): callables that run out's backward again (its graph retained) and attn's forward and
    backward afresh, each with the inputs' gradients reset first (assigned, not accumulated)."""
    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        attn(q, k, v).backward(dout)

    def bwd():
        for t in (q, k, v):
            t.grad = None
        out.backward(dout, retain_graph=True)
    return bwd, fwd_bwd


def host_times(fn, calls: int = 50) -> tuple[float, float]:
    """(host microseconds a call, wall microseconds a call) of `calls` calls of fn queued back to back
    after a synchronized warm-up call: the first until the last call returns (nothing waits for the
    GPU inside the loop), the second until the GPU has finished them too (no L2 flush between calls,
    unlike do_bench). Host close to wall means the GPU waited for the host."""
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    queued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return (queued - started) / calls * 1e6, (done - started) / calls * 1e6


def kernel_times(fn, iters: int = 10) -> dict:
    """{kernel: microseconds per call} of the GPU work fn() launches (kernels and memsets), from
    torch.profiler over `iters` calls after one warm-up, longest first. Template arguments are cut:
    flashjit's kernels by their function name (dvec_kernel, dkdv_tma_kernel, dq_convert_kernel, ...)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    found = {}
    for event in prof.key_averages():
        if getattr(event, "device_type", None) != DeviceType.CUDA:
            continue
        name = event.key.split("<")[0].split("(")[0].split("::")[-1].removeprefix("void ").strip() or event.key[:60]
        found[name] = found.get(name, 0.0) + event.self_device_time_total / iters
    return dict(sorted(found.items(), key=lambda item: -item[1]))


def show_kernel_times(label: str, times: dict) -> str:
    total = sum(times.values()) or 1.0
    return f"{label} {total:.0f} us: " + ", ".join(f"{name[:48]} {us:.1f} ({100 * us / total:.0f}%)"
                                                  for name, us in times.items())


def candidate_tflops(spec: str, point, q, k, v, dout, drop: float, flops: float) -> dict:
    """Backward TFLOP/s of flashjit.backward (kernels only) for each WARPSxBLOCK_MxDET[xD_SPLIT[xGROUP_ROWS]] in spec."""
    philox = flashjit.interface.philox_state(q.get_device()) if drop else None
    with torch.no_grad():
        out, lse = flashjit.forward(q, k, v, causal=point["causal"], return_lse=True, dropout_p=drop, philox=philox)
    out_tflops = {}
    for item in spec.split(","):
        if item in ("wgmma", "wgmma_tma"):  # the Hopper kernel's shape for this head dim, cp.async- or TMA-fed
            block_m = dict(WGMMA_SHAPES).get(wgmma_tile(point["d_head"]), 0)
            cfg = flashjit.BwdSm90Config(point["dtype"], point["d_head"], block_m, point["causal"], dropout=drop > 0,
                                         tma=item == "wgmma_tma")
        else:
            values = [int(x) for x in item.split("x")]
            n_warps, block_m, det, d_split, group_rows = values + [1, 16][len(values) - 3:]  # defaults: 1, 16
            cfg = flashjit.BwdConfig(point["dtype"], point["d_head"], n_warps, block_m, d_split, group_rows, bool(det),
                                     point["causal"], dropout=drop > 0)
        if cfg.problems():
            out_tflops[cfg.name] = None
            continue
        run = lambda: flashjit.backward(dout, q, k, v, out, lse, causal=point["causal"], dropout_p=drop,  # noqa: E731
                                        philox=philox, config=cfg)
        run()
        out_tflops[cfg.name] = flops / (do_bench(run, warmup=25, rep=100, return_mode="median") * 1e-3) / 1e12
    return out_tflops


def gqa_points(args):
    """(point, q, k, v) for each --gqa BATCHxSEQLENxHEADSxKV_HEADS point over dtypes, head dims and causal."""
    for spec, dtype, d_head, causal in itertools.product(
            [s for s in args.gqa.split(",") if s], args.dtypes.split(","), map(int, args.head_dims.split(",")),
            [bool(int(c)) for c in args.causal.split(",")]):
        batch, seqlen, heads, heads_k = map(int, spec.split("x"))
        torch.manual_seed(0)
        dt = torch.bfloat16 if dtype == "bf16" else torch.float16
        q = torch.randn(batch, seqlen, heads, d_head, device="cuda", dtype=dt, requires_grad=True)
        k, v = (torch.randn(batch, seqlen, heads_k, d_head, device="cuda", dtype=dt, requires_grad=True)
                for _ in range(2))
        yield dict(dtype=dtype, d_head=d_head, causal=causal, seqlen=seqlen, batch=batch, heads=heads,
                   heads_k=heads_k), q, k, v


def head_split_tflops(point, q, k, v, dout, drop: float, flops: float) -> dict:
    """Backward TFLOP/s of flashjit.backward (kernels only) on the dispatcher's wgmma config with
    head_split True ("split") and False ("group"); {} where the wgmma kernel does not run this point."""
    cfg = flashjit.dispatch.default_bwd_config(point["dtype"], point["d_head"], point["causal"], dropout=drop > 0,
                                               wgmma=True)
    if not isinstance(cfg, flashjit.BwdSm90Config):
        return {}
    philox = flashjit.interface.philox_state(q.get_device()) if drop else None
    with torch.no_grad():
        out, lse = flashjit.forward(q, k, v, causal=point["causal"], return_lse=True, dropout_p=drop, philox=philox)
    found = {}
    for label, split in (("split", True), ("group", False)):
        config = dataclasses.replace(cfg, head_split=split)

        def run(config=config):
            return flashjit.backward(dout, q, k, v, out, lse, causal=point["causal"], dropout_p=drop, philox=philox,
                                     config=config)
        run()
        found[label] = flops / (do_bench(run, warmup=25, rep=100, return_mode="median") * 1e-3) / 1e12
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    add_grid_arguments(parser, "bf16", "64,128", "1024,2048,4096,8192,16384")
    parser.add_argument("--dropout-p", type=float, default=0.0, help="dropout for every contender")
    parser.add_argument("--deterministic", action="store_true", help="flashjit's deterministic backward")
    parser.add_argument("--sink", action="store_true", help="also time flashjit with learnable sinks (their cost)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every contender this many times, interleaved, and report the median")
    parser.add_argument("--candidates", default="", help="comma-separated WARPSxBLOCK_MxDET[xD_SPLIT[xGROUP_ROWS]] backward configs, or "
                        "'wgmma' for the Hopper kernel fed by cp.async ('wgmma_tma': by its TMA producer warpgroup, the "
                        "dispatcher's choice)")
    parser.add_argument("--flex", action="store_true",
                        help="also time FlexAttention (torch.compile(flex_attention), a causal block mask; its compile "
                        "takes tens of seconds a shape; not with dropout, which it lacks)")
    parser.add_argument("--kernels", action="store_true",
                        help="also list each backward's GPU kernels with their time per call (torch.profiler), "
                        "flashjit's and cuDNN's: where the time goes")
    parser.add_argument("--host", action="store_true",
                        help="also time what each contender's backward call costs the host against its wall time "
                        "(host-bound short calls)")
    parser.add_argument("--gqa", default="1x8192x32x8,2x2048x32x4,1x4096x16x4",
                        help="GQA points BATCHxSEQLENxHEADSxKV_HEADS, comma-separated ('' for none)")
    args = parser.parse_args()
    _require_torch_cuda("bench_backward.py")
    drop = args.dropout_p
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    write_result(out_dir / "bench_backward.json", rows, torch)  # (no stale table from an earlier run)
    points = itertools.chain(grid(args, requires_grad=True) if args.seqlens else (), gqa_points(args))
    for point, q, k, v in points:
        causal = point["causal"]
        dout = torch.randn_like(q)
        fwd_flops = 4 * point["batch"] * point["heads"] * point["seqlen"] ** 2 * point["d_head"] / (2 if causal else 1)
        row = dict(point, dropout_p=drop)
        contenders = {"flashjit": lambda q, k, v: flashjit.flash_attn_func(q, k, v, dropout_p=drop, causal=causal,
                                                                          deterministic=args.deterministic)}
        if args.sink:
            sink = torch.randn(point["heads"], device="cuda", requires_grad=True)
            contenders["flashjit_sink"] = lambda q, k, v: flashjit.flash_attn_func(
                q, k, v, dropout_p=drop, causal=causal, deterministic=args.deterministic, learnable_sink=sink)
        for label, backend in (("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            def attn(q, k, v, backend=backend):
                return sdpa(backend, q, k, v, causal, drop)().transpose(1, 2)
            contenders[label] = attn
        if args.flex and not drop:
            run_flex = flex(q, k, v, causal)  # compiled per shape, its block mask built once
            contenders["flex"] = lambda q, k, v: run_flex().transpose(1, 2)  # noqa: B023 (this point's q, k, v)
        timed = time_rounds(contenders, args.rounds, lambda fn: timings(fn, q, k, v, dout))  # noqa: B023
        for label, (t, _) in timed.items():
            row[f"{label}_bwd_tflops"] = t and 2.5 * fwd_flops / (t[0] * 1e-3) / 1e12
            row[f"{label}_fwdbwd_tflops"] = t and 3.5 * fwd_flops / (t[1] * 1e-3) / 1e12
        rows.append(row)
        fmt = lambda x: f"{x:6.1f}" if x else "   n/a"  # noqa: E731
        shape = (f"B={point['batch']} H={point['heads']}/{point['heads_k']} " if "heads_k" in point else "")
        print(f"{point['dtype']} d{point['d_head']:<3} causal={int(causal)} S={point['seqlen']:<5} {shape}bwd: flashjit "
              f"{fmt(row['flashjit_bwd_tflops'])} fa2 {fmt(row['fa2_bwd_tflops'])} cudnn "
              f"{fmt(row['cudnn_bwd_tflops'])} | fwd+bwd: flashjit {fmt(row['flashjit_fwdbwd_tflops'])} "
              f"fa2 {fmt(row['fa2_fwdbwd_tflops'])} cudnn {fmt(row['cudnn_fwdbwd_tflops'])} TFLOP/s", flush=True)
        if "flex" in contenders:
            print(f"    flex: bwd {fmt(row['flex_bwd_tflops'])} fwd+bwd {fmt(row['flex_fwdbwd_tflops'])} TFLOP/s "
                  f"(flashjit x{(row['flashjit_bwd_tflops'] or 0) / (row['flex_bwd_tflops'] or 1):.2f} bwd)", flush=True)
        if args.sink:
            print(f"    with sinks: bwd {fmt(row['flashjit_sink_bwd_tflops'])} fwd+bwd "
                  f"{fmt(row['flashjit_sink_fwdbwd_tflops'])} TFLOP/s (time x"
                  f"{row['flashjit_fwdbwd_tflops'] / row['flashjit_sink_fwdbwd_tflops']:.3f} of without)", flush=True)
        if args.kernels:
            row["kernels"] = {}
            for label in ("flashjit", "cudnn"):
                out = contenders[label](q, k, v)
                times = kernel_times(lambda: out.backward(dout, retain_graph=True))  # noqa: B023
                row["kernels"][label] = times
                print("    " + show_kernel_times(label, times), flush=True)
            for t in (q, k, v):
                t.grad = None
        if args.host:
            row["host_us"] = {}
            for label, attn in contenders.items():
                if timed[label][0] is None:  # declined this point (timings() said why)
                    continue
                bwd, fwd_bwd = autograd_calls(attn, attn(q, k, v), q, k, v, dout)
                row["host_us"][label] = dict(bwd=host_times(bwd), fwd_bwd=host_times(fwd_bwd))
            for t in (q, k, v):
                t.grad = None
            for part in ("bwd", "fwd_bwd"):
                print(f"    host / wall us a {part} call: " + "  ".join(
                    f"{label} {times[part][0]:.0f} / {times[part][1]:.0f}" for label, times in row["host_us"].items()),
                      flush=True)
        if "heads_k" in point and (split := head_split_tflops(point, q, k, v, dout, drop, 2.5 * fwd_flops)):
            row["head_split"] = split
            print("    flashjit.backward alone: " + "  ".join(f"{name} {fmt(t)}" for name, t in split.items()), flush=True)
        if args.candidates:
            row["candidates"] = candidate_tflops(args.candidates, point, q, k, v, dout, drop, 2.5 * fwd_flops)
            print("    " + "  ".join(f"{name}: {fmt(t)}" for name, t in row["candidates"].items()), flush=True)
        write_result(out_dir / "bench_backward.json", rows, torch)


if __name__ == "__main__":
    main()

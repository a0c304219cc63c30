"""Decode benchmark: one query token per sequence against a KV cache (GQA 32 query / 8 KV heads, d128,
bf16 by default), flashjit's kvcache kernel (flashjit/kvattn.py: GQA packing + split-KV) against
flash_attn_func on the cache (the dense path), PyTorch SDPA's flash (FlashAttention-2) and cuDNN
backends, in one run. Bandwidth = bytes of K and V read / time (the whole cache is valid), beside a
device-to-device copy of the same bytes. Paged points use 16-slot pages (the issue's target size) in shuffled order. "graph" is
the same kvcache call replayed from a CUDA graph: the kernels' own time, without Python's (the eager
columns include the host time per call, which bounds short calls); "FA2 graph" and "cuDNN graph" replay
SDPA's call likewise, so a point where a slow host bounds SDPA's eager call (its `sdpa_kernel` context
costs tens of us) still compares kernels. "api" is a whole decoding step through flash_attn_with_kvcache:
the checks, appending one new key/value in place, the attention. "varlen pg" is the same paged cache read
through flash_attn_varlen_func with block_table (one query a sequence: the decoding route to the kvcache
kernels, plus its host work: the checks and the key counts from cu_seqlens_k).

    python scripts/bench_decode.py --out bench-out
    python scripts/bench_decode.py --points 1x32768 32x2048 --page-size 16
    python scripts/bench_decode.py --points 1x32768 --splits 16,32,64,128 --kernels

--splits times the kvcache call (graph replay) at each given num_splits as well (0 is the heuristic's
choice); --kernels lists its GPU kernels (attention, combine, ...) with their time per call
(torch.profiler): where a short call's time goes.

Every column is timed by do_bench, whose L2 flush writes 256 MB of zeros before each call: the timed
call then also pays for writing back the flush's dirty lines (up to the H200's 50 MB), a larger share
of a 134 MB decode's traffic than of the copy's 268 MB. "copy clean" and "graph clean" time the copy
and the replayed kvcache call after a flush that only reads (nothing to write back), and the last
column is the issue-16 figure, the replayed call's read bandwidth over the copy's traffic (2x its
bytes read), both ways: do_bench's / clean.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_forward import _require_torch_cuda, exit_unless_gpu, sdpa, time_ms  # same folder

POINTS = ["1x32768", "32x2048", "32x8192", "128x1024"]


def replay_of(fn):
    """fn captured in a CUDA graph (after a warm call), as its replay; None where it cannot be captured."""
    import torch

    try:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as exc:
        print(f"    (no graph: {str(exc).splitlines()[0][:100]})")
        return None
    return graph.replay


_FLUSH = []  # the clean flush's 256 MB buffer, made once


def time_clean_l2_ms(fn, warmup: int = 10, reps: int = 100) -> float | None:
    """Median ms of fn over reps calls, each after an L2 flush that leaves the cache clean (a read of a
    256 MB buffer: it evicts as do_bench's zeroing does, and leaves no dirty line for the timed call to
    write back); CUDA events around each call alone. None where fn is None or raises."""
    import torch

    from flashjit.tuner import time_ms as events_ms

    if fn is None:
        return None
    if not _FLUSH:
        _FLUSH.append(torch.ones(64 * 2**20, dtype=torch.float32, device="cuda"))
    try:
        fn()
    except RuntimeError as exc:
        print(f"    (skipped: {str(exc).splitlines()[0][:100]})")
        return None
    return events_ms(fn, warmup, reps, before=_FLUSH[0].amax)  # amax reads every line, writes one value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--points", nargs="+", default=POINTS, help="BATCHxCACHE_LENGTH")
    parser.add_argument("--heads", default="32/8", help="query/KV heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--splits", default="", help="comma-separated num_splits to time too (graph replay)")
    parser.add_argument("--kernels", action="store_true", help="list the kvcache call's GPU kernels and their time")
    args = parser.parse_args()
    exit_unless_gpu("bench_decode.py")
    _require_torch_cuda("bench_decode.py")
    import torch
    from torch.nn.attention import SDPBackend

    import flashjit
    from bench_backward import kernel_times, show_kernel_times  # same folder
    from flashjit import kvattn

    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[args.dtype])
    h, hk = map(int, args.heads.split("/"))
    d = args.head_dim
    rows = []
    print(f"{torch.cuda.get_device_name()}: decode, {h}/{hk} heads, d{d}, {args.dtype}; GB/s of K+V read")
    names = ("copy", "fjit", "graph", "api", "paged", "varlen pg", "dense fn", "FA2", "cuDNN", "FA2 graph",
             "cuDNN graph", "copy clean", "graph clean")
    print(f"{'batch x cache':>14} " + " ".join(f"{n:>{max(8, len(n))}}" for n in names) + "  of copy traffic")
    for point in args.points:
        batch, length = map(int, point.split("x"))
        q = torch.randn(batch, 1, h, d, dtype=dtype, device="cuda")
        k, v = (torch.randn(batch, length, hk, d, dtype=dtype, device="cuda") for _ in range(2))
        lengths = torch.full((batch,), length, dtype=torch.int32, device="cuda")
        before = lengths - 1  # the api column appends the last slot's key and value again
        k_new, v_new = (torch.randn(batch, 1, hk, d, dtype=dtype, device="cuda") for _ in range(2))
        per = -(-length // args.page_size)
        pages = torch.randperm(batch * per, device="cuda")
        table = pages.view(batch, per).to(torch.int32)
        kp, vp = (torch.empty(batch * per, args.page_size, hk, d, dtype=dtype, device="cuda") for _ in range(2))
        for src, dst in ((k, kp), (v, vp)):  # page i of entry b holds slots [i * size, (i + 1) * size)
            padded = torch.nn.functional.pad(src, (0, 0, 0, 0, 0, per * args.page_size - length))
            dst[pages] = padded.view(batch * per, args.page_size, hk, d)
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        cu_k = cu_q * length
        nbytes = 2 * k.numel() * k.element_size()
        copy_dst = torch.empty_like(k)
        fns = {
            "copy": lambda: (copy_dst.copy_(k), copy_dst.copy_(v)),
            "fjit": lambda: kvattn.forward_kvcache(q, k, v, lengths),
            "graph": replay_of(lambda: kvattn.forward_kvcache(q, k, v, lengths)),
            "api": lambda: flashjit.flash_attn_with_kvcache(q, k, v, k=k_new, v=v_new, cache_seqlens=before),
            "paged": lambda: kvattn.forward_kvcache(q, kp, vp, lengths, block_table=table),
            "varlen pg": lambda: flashjit.flash_attn_varlen_func(q[:, 0], kp, vp, cu_q, cu_k, 1, length,
                                                                 block_table=table),
            "dense fn": lambda: flashjit.flash_attn_func(q, k, v, causal=True),
            "FA2": sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, False),
            "cuDNN": sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, False),
        }
        fns["FA2 graph"] = replay_of(fns["FA2"])
        fns["cuDNN graph"] = replay_of(fns["cuDNN"])
        row = {"batch": batch, "cache": length}

        def gbps(ms):  # K and V's bytes read over a time in ms
            return None if ms is None else nbytes / (ms * 1e-3) / 1e9
        for name, fn in fns.items():
            row[name] = gbps(None if fn is None else time_ms(fn))
        for name, fn in (("copy clean", fns["copy"]), ("graph clean", fns["graph"])):
            row[name] = gbps(time_clean_l2_ms(fn))
        # The issue-16 figure: the replayed call's reads over the copy's traffic (reads and writes).
        row["of_copy_traffic"] = [row[g] / (2 * row[c]) if row[g] and row[c] else None
                                  for g, c in (("graph", "copy"), ("graph clean", "copy clean"))]
        ref = fns["FA2"]()
        row["max_abs_diff_vs_fa2"] = (fns["fjit"]().float() - ref.transpose(1, 2).float()).abs().max().item()
        rows.append(row)
        print(f"{point:>14} " + " ".join(f"{row[n]:{max(8, len(n))}.0f}" if row[n] else f"{'-':>{max(8, len(n))}}"
                                        for n in names)
              + "  " + " / ".join(f"{r:.2f}" if r else "-" for r in row["of_copy_traffic"]))
        if args.splits:
            row["by_splits"] = {}
            for splits in map(int, args.splits.split(",")):
                replay = replay_of(lambda: kvattn.forward_kvcache(q, k, v, lengths, num_splits=splits))
                row["by_splits"][splits] = gbps(None if replay is None else time_ms(replay))
            print(f"{'':>14} graph GB/s by num_splits: " +
                  ", ".join(f"{n} {gbs:.0f}" if gbs else f"{n} -" for n, gbs in row["by_splits"].items()))
        if args.kernels:
            row["kernels_us"] = kernel_times(fns["fjit"])
            print(show_kernel_times(f"{'':>14} fjit", row["kernels_us"]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_decode.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "heads": args.heads, "head_dim": d,
         "dtype": args.dtype, "page_size": args.page_size, "rows": rows}, indent=1))


if __name__ == "__main__":
    if not {"-h", "--help"} & set(sys.argv[1:]):
        exit_unless_gpu("bench_decode.py")
    main()

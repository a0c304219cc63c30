"""Forward benchmark: flashjit vs PyTorch SDPA's flash (FlashAttention-2) and cuDNN backends and
FlexAttention (torch.compile(flex_attention), a causal block mask when causal), one run.

Points: dtype x head dim x causal x seqlen, with batch * seqlen = --tokens and heads * head_dim =
--hidden, plus --gqa points (B=1, S, 32 query / 8 KV heads, as long-context serving runs). TFLOP/s =
4 * B * H * S^2 * D (halved for causal) / time; times are the median of triton.testing.do_bench on
random inputs. Writes JSON (+ a PNG plot when matplotlib is present) to --out and prints a table.
--configs times each named kernel as named (a persistent causal one walks the dispatcher's tile lists:
dispatch.causal_walk); where the dispatcher, had it chosen that kernel, would run another on that grid
(causal rows of more than dispatch.WALK_MAX_BLOCKS query blocks run one CTA a tile: dispatch.with_tile_walk),
its line names that kernel too.

    python scripts/bench_forward.py --out bench-out
    python scripts/bench_forward.py --dtypes bf16 --head-dims 128 --seqlens 4096 --configs NAME [NAME ...]
    python scripts/bench_forward.py --no-flex          # skip FlexAttention (its compile takes ~10 s a shape)
    python scripts/bench_forward.py --rounds 3 --configs A B  # A/B: every column timed 3 times, interleaved
    python scripts/bench_forward.py --dropout-p 0.1    # with dropout (FlexAttention has none: not timed then)
"""
from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import sys
import time
import warnings
from pathlib import Path

# torch, triton and flashjit are imported inside the functions: importing this module (as
# bench_backward.py does) or running it without a GPU costs nothing before exit_unless_gpu() speaks.
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def cuda_device_count() -> int:
    """CUDA devices the driver shows this process (honouring CUDA_VISIBLE_DEVICES), asked of the
    driver library directly: milliseconds, where importing torch takes seconds."""
    for library in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(library)
            break
        except OSError:
            continue
    else:
        return 0  # no NVIDIA driver installed
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0  # e.g. CUDA_ERROR_NO_DEVICE with CUDA_VISIBLE_DEVICES=""
    return count.value


def exit_unless_gpu(script: str) -> None:
    """Without a CUDA GPU a benchmark has nothing to time: one line on stderr and exit status 1 (it
    produced no results, so a pipeline running it must notice), not a traceback from deep in torch."""
    if cuda_device_count() == 0:
        sys.exit(f"{script}: no CUDA GPU is visible, so there is nothing to benchmark; run it on a machine "
                 "with one (`python -m flashjit precompile --arch ...` and the CPU tests work without)")


def _require_torch_cuda(script: str):
    """torch, once the driver has shown a GPU; exits the same way if this torch cannot use it (a CPU build)."""
    import torch

    if not torch.cuda.is_available():
        sys.exit(f"{script}: torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False); "
                 "install a CUDA build of torch for this driver")
    return torch


def tflops(batch, heads, seqlen, d_head, causal, ms, mode="fwd"):
    flops = 4 * batch * heads * seqlen * seqlen * d_head / (2 if causal else 1)
    return flops * (2.5 if mode == "bwd" else 1.0) / (ms * 1e-3) / 1e12


def time_ms(fn) -> float | None:
    import torch
    from triton.testing import do_bench

    try:
        fn()
        torch.cuda.synchronize()
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    except RuntimeError as exc:  # a backend that does not support this point
        print(f"    (skipped: {str(exc).splitlines()[0][:100]})")
        return None


def time_rounds(timers: dict, rounds: int, measure=None) -> dict:
    """{key: (median, every round's result)} of measure(fn) (default time_ms) for each callable, timed
    `rounds` times interleaved: round r times each once before round r + 1 starts. Timings of one kernel
    in separate passes or processes moved by up to 5-7% on an H200 (docs/perf-log.md, 2026-12-04), more
    than many a change's effect; interleaving lets each round's drift hit every column alike. A measure
    may return a tuple (medians per component); None where a callable is declined."""
    measure = measure or time_ms
    samples = {key: [] for key in timers}
    for _ in range(max(1, rounds)):
        for key, fn in timers.items():
            if None not in samples[key]:
                samples[key].append(measure(fn))

    def median(values):
        if isinstance(values[0], tuple):
            return tuple(sorted(c)[len(c) // 2] for c in zip(*values))
        return sorted(values)[len(values) // 2]
    return {key: (None, ms) if None in ms else (median(ms), ms) for key, ms in samples.items()}


def sdpa(backend, q, k, v, causal, dropout_p=0.0):
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D] views, no copies

    gqa = q.shape[2] != k.shape[2]  # SDPA broadcasts KV heads only when asked

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, dropout_p=dropout_p, enable_gqa=gqa)
    return run


def flex(q, k, v, causal):
    """FlexAttention as users run it: the compiled flex_attention, GQA through enable_gqa, causal as a
    block mask (built once, outside the timed region)."""
    from torch.nn.attention.flex_attention import create_block_mask

    compiled = _compiled_flex()
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    mask = None
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        mask = create_block_mask(lambda b, h, i, j: j <= i + (sk - sq), None, None, sq, sk, device=q.device)
    gqa = q.shape[2] != k.shape[2]
    return lambda: compiled(qt, kt, vt, block_mask=mask, enable_gqa=gqa)


_FLEX = []


def _compiled_flex():
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    if not _FLEX:
        # dynamic=False compiles once a shape, mask and grad mode: past dynamo's recompile limit (8) it
        # would fall back to eager flex_attention, silently, and that is what would be timed.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX[0]


def add_grid_arguments(parser: argparse.ArgumentParser, dtypes: str, head_dims: str | None, seqlens: str,
                       out: str = "bench-out") -> None:
    """The benchmark grid, shared with bench_backward.py and bench_head_dim_v.py (head_dims None: no
    --head-dims, the script has its own)."""
    parser.add_argument("--dtypes", default=dtypes)
    if head_dims is not None:
        parser.add_argument("--head-dims", default=head_dims)
    parser.add_argument("--causal", default="0,1")
    parser.add_argument("--seqlens", default=seqlens)
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seqlen")
    parser.add_argument("--hidden", type=int, default=2048, help="heads * head_dim (d_qk)")
    parser.add_argument("--out", default=out)


def grid(args, requires_grad: bool = False):
    """(point, q, k, v) for every grid point: fresh random [B, S, H, D] inputs (seeded, never zeros)."""
    import torch

    for dtype, d_head, causal, seqlen in itertools.product(
            args.dtypes.split(","), map(int, args.head_dims.split(",")),
            [bool(int(c)) for c in args.causal.split(",")], list(map(int, args.seqlens.split(",")))):
        batch, heads = max(1, args.tokens // seqlen), args.hidden // d_head
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, seqlen, heads, d_head, device="cuda", dtype=getattr(torch, DTYPES[dtype]),
                               requires_grad=requires_grad) for _ in range(3))
        yield dict(dtype=dtype, d_head=d_head, causal=causal, seqlen=seqlen, batch=batch, heads=heads), q, k, v


def gqa_points(args):
    """(point, q, k, v) for the small-batch GQA long-context points: B=1, 32 query and 8 KV heads."""
    import torch

    for dtype, d_head, causal in itertools.product(args.dtypes.split(","), map(int, args.head_dims.split(",")),
                                                   [bool(int(c)) for c in args.causal.split(",")]):
        for seqlen in (int(s) for s in args.gqa.split(",") if s):
            torch.manual_seed(0)
            dt = getattr(torch, DTYPES[dtype])
            q = torch.randn(1, seqlen, 32, d_head, device="cuda", dtype=dt)
            k, v = (torch.randn(1, seqlen, 8, d_head, device="cuda", dtype=dt) for _ in range(2))
            yield dict(dtype=dtype, d_head=d_head, causal=causal, seqlen=seqlen, batch=1, heads=32, heads_k=8), q, k, v


def write_result(path: Path, rows: list, torch) -> None:
    """The table so far as JSON at `path`, rewritten after every point (whole, by a rename): a run cut off
    by the device's time limit still leaves the points it measured."""
    result = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                  rows=rows)
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(result, indent=1))
    part.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    add_grid_arguments(parser, "bf16,fp16", "64,128,256", "512,1024,2048,4096,8192,16384")
    parser.add_argument("--configs", nargs="*", help="kernel names to time instead of the default choice")
    parser.add_argument("--gqa", default="8192", help="seqlens of the B=1, 32/8-head GQA points ('' for none)")
    parser.add_argument("--no-flex", action="store_true", help="do not time FlexAttention")
    parser.add_argument("--sink", action="store_true", help="also time flashjit with learnable sinks (their cost)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every column this many times, interleaved, and report the median")
    parser.add_argument("--dropout-p", type=float, default=0.0,
                        help="attention dropout for flashjit and SDPA's backends (FlexAttention is then not timed)")
    args = parser.parse_args()
    # SDPA says, once per shape, why a backend it was asked for declines: the table says it (0.0).
    warnings.filterwarnings("ignore", message=".*(not used because|runtime disabled|same num_heads)")
    exit_unless_gpu("bench_forward.py")
    torch = _require_torch_cuda("bench_forward.py")
    from torch.nn.attention import SDPBackend

    import flashjit
    import flashjit.interface  # (score_mods, resolve_config, sm_count: not re-exported at the top)
    from flashjit.configs import config_from_name

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    rows = []
    write_result(out_dir / "bench_forward.json", rows, torch)  # (no stale table from an earlier run)
    for point, q, k, v in itertools.chain(grid(args), gqa_points(args)):
        dtype, d_head, causal, seqlen = point["dtype"], point["d_head"], point["causal"], point["seqlen"]
        batch, heads = point["batch"], point["heads"]
        configs = [config_from_name(n) for n in args.configs] if args.configs else [None]
        configs = [c for c in configs if c is None or (c.dtype, c.d_head, c.causal) == (dtype, d_head, causal)]
        drop = args.dropout_p
        timers = {"fa2": sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, causal, drop),
                  "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, causal, drop)}
        if not (args.no_flex or drop):
            timers["flex"] = flex(q, k, v, causal)
        for i, config in enumerate(configs):
            timers[i] = lambda c=config: flashjit.forward(q, k, v, config=c, causal=causal, dropout_p=drop)
        mods = flashjit.interface.score_mods(q, causal, dropout_p=drop, philox=(0, 0))  # (the kernel's flags only)
        timed = time_rounds(timers, args.rounds)
        base = {label: timed[label][0] and tflops(batch, heads, seqlen, d_head, causal, timed[label][0])
                if label in timed else None for label in ("fa2", "cudnn", "flex")}
        for i, config in enumerate(configs):
            ms, samples = timed[i]
            if ms is None:
                continue
            if args.sink:
                sink = torch.randn(heads, device="cuda")
                sink_ms = time_ms(lambda: flashjit.forward(q, k, v, causal=causal, learnable_sink=sink))
                print(f"    with sinks: time x{sink_ms / ms:.3f} of without", flush=True)
            used = flashjit.interface.resolve_config(q, k, config, causal, mods=mods, v=v)
            # A named persistent causal kernel is timed as named; chosen by the dispatcher, it would run its
            # one-CTA-a-tile twin on this grid where the rows are long (dispatch.with_tile_walk).
            walked = flashjit.dispatch.with_tile_walk(used, (batch, heads), seqlen,
                                                      lambda: flashjit.interface.sm_count(q.get_device()))
            ours = tflops(batch, heads, seqlen, d_head, causal, ms)
            row = dict(point, dropout_p=drop, config=used.name, call_runs=walked.name, ms=ms, ms_rounds=samples, tflops=ours,
                       fa2_tflops=base["fa2"], cudnn_tflops=base["cudnn"], flex_tflops=base["flex"], vs_fa2=base["fa2"] and ours / base["fa2"],
                       vs_cudnn=base["cudnn"] and ours / base["cudnn"], vs_flex=base["flex"] and ours / base["flex"])
            rows.append(row)
            hk = f"/{point['heads_k']}" if "heads_k" in point else ""
            print(f"{dtype} d{d_head:<3} causal={int(causal)} S={seqlen:<5} B={batch:<3} H={heads}{hk:<3} "
                  + (f"p={drop} " if drop else "") +
                  f"flashjit {ours:6.1f}  fa2 {base['fa2'] or 0:6.1f}  cudnn {base['cudnn'] or 0:6.1f}  "
                  f"flex {base['flex'] or 0:6.1f} TFLOP/s  x{row['vs_cudnn'] or 0:.3f} cudnn  "
                  f"x{row['vs_flex'] or 0:.3f} flex  x{row['vs_fa2'] or 0:.3f} fa2  {used.name}"
                  + (f"  (as a default it would run {walked.name} on this grid)" if walked != used else ""), flush=True)
        write_result(out_dir / "bench_forward.json", rows, torch)
    plot(rows, device, out_dir / "bench_forward.png")


def plot(rows, device, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    groups = sorted({(r["dtype"], r["d_head"], r["causal"]) for r in rows})
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.2), squeeze=False, sharey=True)
    for ax, (dtype, d_head, causal) in zip(axes[0], groups):
        sel = [r for r in rows if (r["dtype"], r["d_head"], r["causal"]) == (dtype, d_head, causal)]
        xs = [r["seqlen"] for r in sel]
        for key, label in (("tflops", "flashjit"), ("fa2_tflops", "SDPA flash (FA2)"), ("cudnn_tflops", "SDPA cuDNN")):
            ax.plot(xs, [r[key] or 0 for r in sel], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{dtype} d{d_head}{' causal' if causal else ''}", fontsize=9)
        ax.set_xlabel("seqlen")
    axes[0][0].set_ylabel("TFLOP/s")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"forward, {device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

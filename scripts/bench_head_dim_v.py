"""Benchmark of attention with v's head dim below q/k's (DeepSeek MLA style: q, k [B, S, H, d_qk], v [B, S, H, d_v],
out [B, S, H, d_v]), forward and backward: flashjit's native support against the zero-padding workaround,
PyTorch SDPA's backends and FlexAttention, in one run.

Contenders, each timed where it supports the shape ("-" in the table and the reason in the JSON where not):
  native     flashjit.flash_attn_func(q, k, v, causal=causal): d_v < d_qk natively
  padded     flashjit with v zero-padded to d_qk and out cropped to d_v (the old workaround; its time includes
             the pad and crop, which a user pays)
  cudnn, fa2, efficient: PyTorch SDPA's cuDNN, flash (FlashAttention-2) and memory-efficient backends
  flex       torch.compile(flex_attention) (a causal block mask when causal), as in bench_forward.py

Points: pass x dtype x (d_qk, d_v) x causal x seqlen, batch = --tokens // seqlen, heads = --hidden // d_qk.
Forward times: the forward on inputs without grad. Backward times: one backward call through autograd given
the forward's output and a random dout, the forward excluded (as in bench_backward.py). Medians of
triton.testing.do_bench. Before timing, each contender's output (and in the bwd pass dq, dk, dv) is compared
with native's: a warning line where the max abs error exceeds 2e-2 (times max(1, max |native|) for grads).

TFLOP/s: bench_forward.tflops, the FlashAttention convention, with the mean head dim (d_qk + d_v) / 2: forward
2 * B * H * S^2 * (d_qk + d_v) (QK^T costs 2 S^2 d_qk, PV 2 S^2 d_v per head), halved for causal; backward 2.5x
the forward, as bench_backward.py counts (exact for d_v = d_qk; the five matmuls are 2 S^2 (3 d_qk + 2 d_v) a
head, (d_qk - d_v) / (5 (d_qk + d_v)) more than 2.5x: 4% at 192/128 and 96/64, 7% at 128/64). Every contender
is credited the same (useful) flops, padded too, so the ratios are time ratios: native/padded and native/cudnn
> 1 = native faster.

    python scripts/bench_head_dim_v.py
    python scripts/bench_head_dim_v.py --pairs 192/128 --passes bwd --seqlens 4096 --out bench-out/mla.json
    python scripts/bench_head_dim_v.py --no-flex       # skip FlexAttention (its compile takes ~10 s a shape)
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time
import warnings
from pathlib import Path

from bench_forward import (DTYPES, _require_torch_cuda, add_grid_arguments, exit_unless_gpu, flex, sdpa,  # same folder
                           time_ms, tflops)

TOLERANCE = 2e-2


def makers(causal: bool, no_flex: bool) -> dict:
    """name -> make(q, k, v), which returns run(): out [B, S, H, d_v] (setup such as a block mask done once)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    import flashjit

    def bshd(run):  # SDPA and flex answer [B, H, S, D]: back to flashjit's layout, a view
        return lambda: run().transpose(1, 2)

    def padded(q, k, v):
        d_qk, d_v = q.shape[-1], v.shape[-1]
        return lambda: flashjit.flash_attn_func(q, k, F.pad(v, (0, d_qk - d_v)), causal=causal)[..., :d_v]
    found = {"native": lambda q, k, v: lambda: flashjit.flash_attn_func(q, k, v, causal=causal), "padded": padded}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        found[name] = lambda q, k, v, backend=backend: bshd(sdpa(backend, q, k, v, causal))
    if not no_flex:
        found["flex"] = lambda q, k, v: bshd(flex(q, k, v, causal))
    return found


def first_line(text) -> str:
    """A message's first line, without torch's "(Triggered internally at FILE:LINE.)"."""
    return (str(text).splitlines() or [""])[0].split(" (Triggered internally")[0][:200]


def attempt(make, q, k, v, dout):
    """(run, out) after one forward (and backward, given dout, keeping the graph), or the reason it failed:
    the exception and what SDPA warned about the backend it was asked for."""
    import torch

    for t in (q, k, v):
        t.grad = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run = make(q, k, v)
            out = run()
            if dout is not None:
                out.backward(dout, retain_graph=True)
            torch.cuda.synchronize()
            return run, out
        except Exception as exc:  # unsupported here: ValueError, SDPA's "No available kernel", a compile error
            said = dict.fromkeys(first_line(w.message) for w in caught if issubclass(w.category, UserWarning))
            return "; ".join([f"{type(exc).__name__}: {first_line(exc)}", *said])


def max_error(got, ref) -> float:
    """Max abs error of got against ref, tensor by tensor: out as is, grads divided by max(1, max |ref|)."""
    worst = 0.0
    for i, (g, r) in enumerate(zip(got, ref)):
        scale = 1.0 if i == 0 else max(1.0, r.abs().max().item())
        worst = max(worst, (g.float() - r.float()).abs().max().item() / scale)
    return worst


def cell(x, width: int, spec: str = ".1f") -> str:
    return f"{format(x, spec) if x else '-':>{width}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_grid_arguments(parser, "bf16", None, "1024,4096", out="bench-out/head_dim_v.json")  # --out: the JSON
    parser.add_argument("--pairs", default="192/128,128/64,96/64", help="comma-separated d_qk/d_v")
    parser.add_argument("--passes", default="fwd,bwd")
    parser.add_argument("--no-flex", action="store_true", help="do not time FlexAttention")
    args = parser.parse_args()
    # SDPA says, once per shape, why a backend it was asked for declines: attempt() records it in the JSON.
    warnings.filterwarnings("ignore", message=".*(not used because|runtime disabled|same num_heads)")
    exit_unless_gpu("bench_head_dim_v.py")
    torch = _require_torch_cuda("bench_head_dim_v.py")
    os.environ.setdefault("FLASHJIT_BACKEND", "jit")

    pairs = [tuple(int(d) for d in pair.split("/")) for pair in args.pairs.split(",")]
    for d_qk, d_v in pairs:
        if not 0 < d_v <= d_qk:
            parser.error(f"--pairs {d_qk}/{d_v}: flashjit needs 0 < d_v <= d_qk")
    if not set(args.passes.split(",")) <= {"fwd", "bwd"}:
        parser.error(f"--passes {args.passes}: expected fwd, bwd or both")
    names = list(makers(False, args.no_flex))
    print(f"{'pass':<4} {'dtype':<5} {'dqk/dv':<7} {'causal':<6} {'S':>5} " + " ".join(f"{n:>9}" for n in names)
          + f" {'nat/pad':>8} {'nat/cudnn':>9}   (TFLOP/s)", flush=True)
    rows = []
    for pass_, dtype, (d_qk, d_v), causal, seqlen in itertools.product(
            args.passes.split(","), args.dtypes.split(","), pairs, [bool(int(c)) for c in args.causal.split(",")],
            [int(s) for s in args.seqlens.split(",")]):
        batch, heads = max(1, args.tokens // seqlen), max(1, args.hidden // d_qk)
        grad = pass_ == "bwd"
        torch.manual_seed(0)
        dt = getattr(torch, DTYPES[dtype])
        q, k, v = (torch.randn(batch, seqlen, heads, d, device="cuda", dtype=dt, requires_grad=grad)
                   for d in (d_qk, d_qk, d_v))
        dout = torch.randn(batch, seqlen, heads, d_v, device="cuda", dtype=dt) if grad else None
        row = {"pass": pass_, "dtype": dtype, "d_qk": d_qk, "d_v": d_v, "causal": causal, "seqlen": seqlen,
               "batch": batch, "heads": heads}
        ref = None
        for name, make in makers(causal, args.no_flex).items():
            got = attempt(make, q, k, v, dout)
            row[f"{name}_tflops"] = None
            if isinstance(got, str):
                row[f"{name}_error"] = got
                continue
            run, out = got
            results = [out.detach(), *(t.grad for t in (q, k, v))] if grad else [out]
            if name == "native":
                ref = [t.clone() for t in results]
            elif ref is not None:
                row[f"{name}_max_err"] = max_error(results, ref)
                if row[f"{name}_max_err"] > TOLERANCE:
                    print(f"    warning: {name} differs from native by {row[f'{name}_max_err']:.3g} (max abs error "
                          f"of {'out, dq, dk, dv' if grad else 'out'}; tolerance {TOLERANCE})", flush=True)

            def bwd(out=out):  # as bench_backward.py: the backward call alone, the graph kept for the next
                for t in (q, k, v):
                    t.grad = None
                out.backward(dout, retain_graph=True)
            ms = time_ms(bwd if grad else run)
            del got, run, out, results, bwd  # the retained graph goes before the next contender's
            if ms is None:
                row[f"{name}_error"] = "failed while timing (see the skip line printed)"
                continue
            row[f"{name}_ms"] = ms
            row[f"{name}_tflops"] = tflops(batch, heads, seqlen, (d_qk + d_v) / 2, causal, ms, mode=pass_)
        for other in ("padded", "cudnn"):
            a, b = row["native_tflops"], row[f"{other}_tflops"]
            row[f"native_vs_{other}"] = a / b if a and b else None
        rows.append(row)
        print(f"{pass_:<4} {dtype:<5} {f'{d_qk}/{d_v}':<7} {int(causal):<6} {seqlen:>5} "
              + " ".join(cell(row[f"{n}_tflops"], 9) for n in names)
              + f" {cell(row['native_vs_padded'], 8, '.3f')} {cell(row['native_vs_cudnn'], 9, '.3f')}", flush=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                  rows=rows)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()

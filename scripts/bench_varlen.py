"""Variable-length benchmark: one packed batch of sequences of random lengths (a training or prefill
batch without padding) through flashjit.varlen.varlen_forward with the dispatcher's kernel (the Hopper
family on sm_90a) and with the sm_80 family, beside one dense flash_attn_func call on the same number
of tokens in equal lengths (what the packed batch would cost with no length spread); and the backward,
varlen_backward against flashjit.backward of that dense call. TFLOP/s of the work each does: forward
4 * H * D * sum(Sq * Sk) over the sequences, causal counting the visible (i, j) pairs, backward 2.5x
that. PyTorch's SDPA has no packed-batch entry, so no SDPA column. Writes JSON to --out.

    python scripts/bench_varlen.py --out bench-out
    python scripts/bench_varlen.py --head-dims 128 --causal 1 --lengths 256:4096 --tokens 16384
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_forward import _require_torch_cuda, exit_unless_gpu, time_ms  # same folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--causal", default="0,1")
    parser.add_argument("--tokens", type=int, default=16384, help="about this many tokens a batch")
    parser.add_argument("--hidden", type=int, default=2048, help="heads * head_dim")
    parser.add_argument("--lengths", default="256:4096", help="MIN:MAX sequence length (uniform)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", nargs="*", default=[],
                        help="kernel names also timed on the packed batch (those matching a point's d and causal)")
    args = parser.parse_args()
    _require_torch_cuda("bench_varlen.py")
    import torch

    import flashjit
    from flashjit import interface
    from flashjit.configs import config_from_name
    from flashjit.dispatch import default_config
    from flashjit.varlen import varlen_backward, varlen_forward

    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[args.dtype])
    low, high = map(int, args.lengths.split(":"))
    generator = torch.Generator().manual_seed(args.seed)
    lens = []
    while sum(lens) < args.tokens:  # one batch for every point, so the rows compare
        lens.append(int(torch.randint(low, high + 1, (1,), generator=generator)))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    total, longest = sum(lens), max(lens)
    print(f"{torch.cuda.get_device_name()}: {len(lens)} sequences, {total} tokens, {low}-{high} long; TFLOP/s")
    named = [config_from_name(n) for n in args.configs]
    rows = []
    for d in map(int, args.head_dims.split(",")):
        heads = args.hidden // d
        q, k, v = (torch.randn(total, heads, d, dtype=dtype, device="cuda") for _ in range(3))
        for causal in (bool(int(c)) for c in args.causal.split(",")):
            pairs = sum(s * (s + 1) // 2 if causal else s * s for s in lens)
            flops = 4 * heads * d * pairs
            sm80 = default_config(args.dtype, d, causal, longest, 227 * 1024)

            def varlen(config=None):
                return lambda: varlen_forward(q, k, v, cu, cu, longest, longest, causal=causal, config=config)
            equal = total // len(lens)
            qd = q[:len(lens) * equal].view(len(lens), equal, heads, d)
            dense_flops = 4 * heads * d * len(lens) * (equal * (equal + 1) // 2 if causal else equal * equal)
            row = {"d_head": d, "causal": causal, "sequences": len(lens), "tokens": total}
            for name, fn, work in (("flashjit", varlen(), flops), ("sm80", varlen(sm80), flops),
                                   ("dense", lambda: flashjit.flash_attn_func(qd, qd, qd, causal=causal), dense_flops)):
                ms = time_ms(fn)
                row[name] = None if ms is None else work / (ms * 1e-3) / 1e12
            for cfg in (c for c in named if (c.dtype, c.d_head, c.causal) == (args.dtype, d, causal)):
                ms = time_ms(varlen(cfg))
                row[cfg.name] = None if ms is None else flops / (ms * 1e-3) / 1e12
                print(f"d{d:<4} causal={int(causal)}  {cfg.name}  {row[cfg.name] or 0:7.1f}")
            # the backward of the packed batch and of the dense call (the dispatcher's kernels)
            out, lse = varlen_forward(q, k, v, cu, cu, longest, longest, causal=causal)
            dout = torch.randn_like(out)
            dense_out, dense_lse = flashjit.forward(qd, qd, qd, causal=causal, return_lse=True)
            dense_dout = dout[:len(lens) * equal].view_as(dense_out)
            for name, fn, work in (
                    ("flashjit_bwd", lambda: varlen_backward(dout, q, k, v, out, lse, cu, cu, longest, longest,
                                                             causal=causal), 2.5 * flops),
                    ("dense_bwd", lambda: flashjit.backward(dense_dout, qd, qd, qd, dense_out, dense_lse,
                                                            causal=causal), 2.5 * dense_flops)):
                ms = time_ms(fn)
                row[name] = None if ms is None else work / (ms * 1e-3) / 1e12
            row["kernel"] = interface.chosen_config(
                args.dtype, d, d, causal, longest, interface.score_mods(q[None], causal),
                torch.cuda.current_device(), (q, k, v), grid=None).name
            rows.append(row)
            shown = "  ".join(f"{label} {row[name]:7.1f}" if row[name] else f"{label}       -" for name, label in (
                ("flashjit", "flashjit"), ("sm80", "sm_80 family"), ("dense", "dense same tokens"),
                ("flashjit_bwd", "| bwd flashjit"), ("dense_bwd", "dense same tokens")))
            print(f"d{d:<4} causal={int(causal)}  {shown}  {row['kernel']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_varlen.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype, "lengths": lens,
         "rows": rows}, indent=1))


if __name__ == "__main__":
    if not {"-h", "--help"} & set(sys.argv[1:]):
        exit_unless_gpu("bench_varlen.py")
    main()

"""Short-query probe: the forward's time for calls of at most 64 queries (decoding-like rows without a KV
cache, cross-attention with few queries), through flashjit.forward's own dispatch, so that the same script
run in main and in a variant of the dispatcher compares what a user's call would run. Until the forty-third
session main sent Sq <= 64 on sm_90a to the sm_80 family's 64-row tile; this probe timed the Hopper defaults
1.1-2.5x ahead of it (docs/perf-log.md), and the dispatcher now picks them.

    python3 docs/experiments/short_queries_probe.py [--head-dims 64,128,256] [--sq 1,16,64] [--sk 1024,4096,16384]
        [--bh 16x32,2x8] [--causal 0,1]

One line a point: head dim, causal, Sq, Sk, batch x heads, its median time (do_bench) and the kernel that
ran (interface.chosen_config: the dispatcher's choice for the call, as flashjit.forward makes it).
"""
import argparse

import torch
from triton.testing import do_bench

import flashjit
from flashjit import interface


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--sq", default="1,16,64")
    ap.add_argument("--sk", default="1024,4096,16384")
    ap.add_argument("--bh", default="16x32,2x8", help="batch x heads, comma-separated")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    for d in ints(args.head_dims):
        for causal in ints(args.causal):
            for bh in args.bh.split(","):
                batch, heads = (int(x) for x in bh.split("x"))
                for sk in ints(args.sk):
                    for sq in ints(args.sq):
                        q = torch.randn(batch, sq, heads, d, device="cuda", dtype=dtype)
                        k, v = (torch.randn(batch, sk, heads, d, device="cuda", dtype=dtype) for _ in range(2))
                        call = lambda: flashjit.forward(q, k, v, causal=bool(causal))  # noqa: E731
                        call()
                        name = interface.chosen_config(args.dtype, d, d, bool(causal), sq, interface._NO_MODS,
                                                       q.device.index, (q, k, v), (batch, heads)).name
                        us = do_bench(call, warmup=25, rep=100, return_mode="median") * 1e3
                        print(f"d{d:<3} causal={causal} Sq={sq:<3} Sk={sk:<6} BxH={bh:<6} {us:9.1f} us  {name}",
                              flush=True)


if __name__ == "__main__":
    main()

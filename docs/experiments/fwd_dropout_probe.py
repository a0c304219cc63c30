"""The forward alone with and without dropout (p = 0.1) through flash_attn_func, d64 bf16 at 16k tokens, with the
config the dispatcher chose for each call: times a forward where bench_backward's fwd+bwd figure only lets one
derive it. Usage (on the GPU, from a tree): python3 docs/experiments/fwd_dropout_probe.py [HEAD_DIM ...]"""
import sys

import torch
from triton.testing import do_bench

import flashjit
from flashjit import interface

chosen = []
_orig = interface.chosen_config


def _spy(*args, **kwargs):
    config = _orig(*args, **kwargs)
    chosen.append(config.name)
    return config


interface.chosen_config = _spy
for d in [int(a) for a in sys.argv[1:]] or [64]:
    heads = 2048 // d
    for causal in (False, True):
        for s in (1024, 4096):
            b = 16384 // s
            q, k, v = (torch.randn(b, s, heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 4 * b * heads * s * s * d / (2 if causal else 1)
            line = []
            for p in (0.0, 0.1):
                chosen.clear()
                ms = do_bench(lambda: flashjit.flash_attn_func(q, k, v, dropout_p=p, causal=causal), warmup=50, rep=300)
                line.append(f"p={p}: {flops / ms / 1e9:6.1f} TFLOP/s [{chosen[-1] if chosen else 'planned'}]")
            print(f"d{d} causal={int(causal)} S={s}", " | ".join(line), flush=True)

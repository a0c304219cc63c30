"""Named forward kernels against an fp32 reference on fresh random inputs (a quick correctness gate for an
experiment's kernels before they are timed): prints each name's max error and the reference's bf16 error.

    python docs/experiments/check_configs.py fwd_sm90_bf16_d128_m128_n128_st2_ov0_pp1_ps1_causal1 ...
"""
import sys

import torch

import flashjit
from flashjit.configs import config_from_name

bad = 0
for name in sys.argv[1:]:
    cfg = config_from_name(name)
    for b, s_q, s_k, h in ((2, 1024, 1024, 4), (1, 777, 1290, 3)):
        q, k, v = (torch.randn(b, n, h, cfg.d_head, device="cuda", dtype=torch.bfloat16)
                   for n in (s_q, s_k, s_k))
        out = flashjit.forward(q, k, v, config=cfg, causal=cfg.causal)
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(x.transpose(1, 2).double() for x in (q, k, v)),
            attn_mask=torch.ones(s_q, s_k, device="cuda", dtype=torch.bool).tril(s_k - s_q) if cfg.causal else None)
        ref = ref.transpose(1, 2)
        err = (out.double() - ref).abs().max().item()
        base = (ref.to(torch.bfloat16).double() - ref).abs().max().item()
        ok = err <= 2 * base + 1e-3
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {name} {b}x{s_q}x{s_k}x{h}: max err {err:.2e} (bf16 rounding {base:.2e})")
sys.exit(1 if bad else 0)

"""Where a forward goes wrong on test_softmax_cuts' "jump" inputs (keys from the 300th on x the first argument):
for each config name, the rows whose lse is not finite, and the largest errors against the fp32 reference beside
PyTorch's low-precision ones (the tests' pair, tests/numerics.py).

    python3 docs/experiments/jump_probe.py 8 fwd_sm90_bf16_d128_m128_n128_st2_ov1_pp1_ps0_causal0_lr ...
"""
import os
import sys

import torch

import flashjit
from flashjit.configs import config_from_name

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
from numerics import reference_and_low  # noqa: E402  (the tests' reference pair)

torch.manual_seed(0)
for name in sys.argv[2:]:
    config = config_from_name(name)
    dtype = torch.bfloat16 if config.dtype == "bf16" else torch.float16
    d = config.d_head
    q = torch.randn(2, 700, 4, d, device="cuda", dtype=dtype) * 3
    k = torch.randn(2, 611, 2, d, device="cuda", dtype=dtype)
    v = torch.randn(2, 611, 2, d, device="cuda", dtype=dtype)[..., : config.head_dim_v]
    k = k * torch.where(torch.arange(611, device="cuda") < 300, 1.0, float(sys.argv[1])).to(dtype)[None, :, None, None]
    out, lse = flashjit.forward(q, k, v, config=config, causal=config.causal, return_lse=True)
    (ref, ref_lse), (low, low_lse) = reference_and_low(q, k, v, causal=config.causal)
    bad = torch.isfinite(lse) != torch.isfinite(ref_lse)
    print(name, "lse mismatch rows:", int(bad.sum()), "nan:", int(lse.isnan().sum()), "inf:", int(lse.isinf().sum()),
          "ref inf:", int(ref_lse.isinf().sum()))
    if bad.any():
        idx = bad.nonzero()[:6].tolist()
        print("  first (b, h, row):", idx, "lse:", [lse[tuple(i)].item() for i in idx],
              "ref:", [ref_lse[tuple(i)].item() for i in idx])
        rows = sorted({i[2] for i in bad.nonzero().tolist()})
        print("  rows:", rows[:40], "count", len(rows))
    fin = torch.isfinite(ref_lse) & torch.isfinite(lse)
    err = (out.float() - ref).abs().nan_to_num(1e9)
    low_err = (low.float() - ref).abs()
    print("  lse err max:", (lse[fin] - ref_lse[fin]).abs().max().item(), "low's:",
          (low_lse[fin].float() - ref_lse[fin]).abs().max().item())
    print("  out err max:", err.max().item(), "low's:", low_err.nan_to_num(1e9).max().item(),
          "rows over 2x low's + 1e-2:", int((err > 2 * low_err + 1e-2).any(-1).sum()))

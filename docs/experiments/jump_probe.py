"""Where a forward goes wrong on test_softmax_cuts' "jump" inputs (keys from the 300th on x the first argument): for each config
name, the rows whose lse is not finite, their out, and the largest errors against the fp32 reference."""
import sys

import torch

import flashjit
from flashjit.configs import config_from_name
from flashjit.reference import attention_reference

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
    ref, ref_lse = attention_reference(q.float(), k.float(), v.float(), causal=config.causal)
    low, low_lse = attention_reference(q, k, v, causal=config.causal, compute_dtype=None)
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

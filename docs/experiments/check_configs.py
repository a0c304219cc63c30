"""Named forward kernels against the tests' reference and rule (tests/numerics.py: the fp32 reference, and
at most twice PyTorch's own low-precision error) on fresh random inputs: a quick correctness gate for an
experiment's kernels before they are timed. Prints a line a kernel and shape; exits 1 if any fails.

    python docs/experiments/check_configs.py fwd_sm90_bf16_d128_m128_n128_st2_ov0_pp1_ps1_causal1 ...
"""
import sys
from pathlib import Path

import torch

import flashjit
from flashjit.configs import config_from_name

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from numerics import assert_close, reference_and_low  # noqa: E402

bad = 0
for name in sys.argv[1:]:
    cfg = config_from_name(name)
    for b, s_q, s_k, h in ((2, 1024, 1024, 4), (1, 777, 1290, 3)):
        q, k, v = (torch.randn(b, n, h, cfg.d_head, device="cuda", dtype=torch.bfloat16) for n in (s_q, s_k, s_k))
        out = flashjit.forward(q, k, v, config=cfg, causal=cfg.causal)
        (ref, _), (low, _) = reference_and_low(q, k, v, causal=cfg.causal)
        try:
            assert_close(name, out, ref, low)
            print(f"ok  {name} {b}x{s_q}x{s_k}x{h}")
        except AssertionError as e:
            bad += 1
            print(f"BAD {b}x{s_q}x{s_k}x{h}: {e}")
sys.exit(1 if bad else 0)

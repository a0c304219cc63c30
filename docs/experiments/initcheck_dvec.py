"""Is initcheck's report in dvec_kernel (fortieth session: 10000 "uninitialized global reads" of 16 bytes at a
d80 point) O written by the forward's TMA store, which initcheck does not track? One backward call at that
point with O as the forward wrote it (`fwd`), or the same values copied by a PyTorch kernel (`copy`):
if only `fwd` reports, the reads are of O and the report is initcheck's blind spot; if both do, a real
uninitialised read is there to find.

    compute-sanitizer --tool initcheck --print-limit 100 python3 docs/experiments/initcheck_dvec.py fwd|copy

Fifty-sixth session (H100): `fwd` reports 24000 reads, every 16-byte chunk of O; `copy` reports the clone's
cudaMemcpy reading O as uninitialised: initcheck does not see TMA-store writes (docs/perf-log.md).
"""
import sys

import torch

import flashjit

mode = sys.argv[1]
torch.manual_seed(0)
b, s, hq, hk, d = 1, 300, 8, 2, 80
q = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16)
philox = (1234, 0)
out, lse = flashjit.forward(q, k, v, causal=True, return_lse=True, dropout_p=0.1, philox=philox)
if mode == "copy":
    out = out.clone()  # the same values, now written by a PyTorch kernel initcheck sees
dout = torch.randn_like(out)
torch.cuda.synchronize()
dq, dk, dv = flashjit.backward(dout, q, k, v, out, lse, causal=True, dropout_p=0.1, philox=philox)
torch.cuda.synchronize()
print(mode, "done", float(dq.float().abs().sum()))

"""SDPA's own forward (or, with --backward, forward and backward) launches, for profile_ncu.py --external:
bench_forward's problem (16k tokens, hidden 2048, bf16 unless --dtype) through one torch SDPA backend, timed there
by the same call (scripts/bench_forward.py's sdpa), --iters calls; --names prints the CUDA kernels one call
launches (torch.profiler), so that ncu's --kernel regex can name cuDNN's or FlashAttention-2's kernel.

    python docs/experiments/sdpa_launch.py --backend cudnn --d 128 --seqlen 1024 --causal --names
    python docs/experiments/sdpa_launch.py --backend cudnn --d 256 --seqlen 4096 --causal --backward --names
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_forward import sdpa  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--backend", choices=("cudnn", "flash"), default="cudnn")
parser.add_argument("--d", type=int, default=128)
parser.add_argument("--seqlen", type=int, default=1024)
parser.add_argument("--causal", action="store_true")
parser.add_argument("--iters", type=int, default=10)
parser.add_argument("--names", action="store_true")
parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
parser.add_argument("--backward", action="store_true", help="each call runs the forward and its backward")
args = parser.parse_args()
batch, heads = 16384 // args.seqlen, 2048 // args.d
dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
q, k, v = (torch.randn(batch, args.seqlen, heads, args.d, device="cuda", dtype=dtype, requires_grad=args.backward)
           for _ in range(3))
forward = sdpa({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[args.backend], q, k, v,
               args.causal)
# The backward as profile_ncu.py runs flashjit's: a fresh forward, then its backward with a ones gradient.
call = (lambda: forward().transpose(1, 2).backward(torch.ones_like(q))) if args.backward else forward
call()
torch.cuda.synchronize()
if args.names:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    for event in sorted(kernels, key=lambda e: -e.self_device_time_total):  # longest first
        print(f"kernel: {event.name} ({event.self_device_time_total:.0f} us)")
else:
    for _ in range(args.iters):
        call()
    torch.cuda.synchronize()

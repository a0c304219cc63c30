"""JIT costs on the GPU machine: the cold first call (compile + load + launch) with an empty cache (the
median of --cold runs), the warm first call in a new process (import + load + first launch), and the
per-call host overhead at a tiny shape, each beside PyTorch SDPA's flash backend.

    python scripts/bench_jit.py --out bench-out
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIRST_CALL = r"""
import time, sys
t0 = time.perf_counter()
import torch
t_torch = time.perf_counter()
q = torch.randn(1, 16, 1, 64, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize()
t_ready = time.perf_counter()
if sys.argv[1] == "flashjit":
    import flashjit
    out = flashjit.forward(q, q, q)
else:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2))
torch.cuda.synchronize()
t_done = time.perf_counter()
print(f"{t_torch - t0:.4f} {t_ready - t_torch:.4f} {t_done - t_ready:.4f}")
"""


def first_call(backend: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", FIRST_CALL, backend], env=env, capture_output=True, text=True,
                         check=True)
    import_torch, cuda_init, first = map(float, out.stdout.split())
    return dict(import_torch_s=import_torch, cuda_init_s=cuda_init, first_call_s=first, stderr=out.stderr[-500:])


def host_overhead_us(fns: dict, n=1000, trials=9) -> dict:
    """Host time per call (no synchronisation inside the loop), median over trials that interleave
    the contenders so clock and load drift hit all of them alike."""
    import statistics

    import torch

    samples = {name: [] for name in fns}
    for _ in range(trials):
        for name, fn in fns.items():
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - started) / n * 1e6)
            torch.cuda.synchronize()
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of flash_attn_func (grad) calls")
    parser.add_argument("--cold", type=int, default=3, help="cold first calls to time, each with an empty cache "
                        "(the median is reported; default 3)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_forward import _require_torch_cuda, exit_unless_gpu  # same folder; imports no torch

    exit_unless_gpu("bench_jit.py")
    _require_torch_cuda("bench_jit.py")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The cold first call, each time with an empty cache (it compiles), args.cold times: one sample
    # swings by tenths of a second with the host's load.
    colds = [first_call("flashjit", dict(os.environ, FLASHJIT_CACHE_DIR=tempfile.mkdtemp(prefix="flashjit-cold-")))
             for _ in range(args.cold)]
    env = dict(os.environ, FLASHJIT_CACHE_DIR=tempfile.mkdtemp(prefix="flashjit-cold-"))
    first_call("flashjit", env)  # fills this cache
    result = {
        "cold_flashjit": sorted(colds, key=lambda r: r["first_call_s"])[len(colds) // 2],  # the median run
        "cold_first_call_s": [r["first_call_s"] for r in colds],
        "warm_flashjit": first_call("flashjit", env),   # new process, cache filled
        "sdpa_flash": first_call("sdpa", env),
    }
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flashjit
    from flashjit import native

    node = native.load(native.build())  # flash_attn_func's C++ autograd node (compiled once into the cache)
    native.use(node)
    q = torch.randn(1, 16, 1, 64, device="cuda", dtype=torch.bfloat16)
    qg = q.clone().requires_grad_()
    qt, qgt = q.transpose(1, 2), qg.transpose(1, 2)
    flashjit.forward(q, q, q)

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(qt, qt, qt)

    class Floor(torch.autograd.Function):  # what any Python autograd.Function costs on this torch
        @staticmethod
        def forward(ctx, q, k, v, args):
            out, lse = torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.mark_non_differentiable(lse)
            return out, lse

        @staticmethod
        def backward(ctx, dout, _):
            return dout, dout, dout, None

    contenders = {  # the forward call only (with grad: the autograd graph is built, no backward runs)
        "flashjit.forward": lambda: flashjit.forward(q, q, q),
        "flashjit.forward (lse)": lambda: flashjit.forward(q, q, q, causal=True, return_lse=True),
        "empty autograd.Function (grad)": lambda: Floor.apply(qg, qg, qg, None)[0],
        "flash_attn_func": lambda: flashjit.flash_attn_func(q, q, q, causal=True),
        "flash_attn_func (grad)": lambda: flashjit.flash_attn_func(qg, qg, qg, causal=True),
        "sdpa(flash, in sdpa_kernel)": sdpa,
        "sdpa(default dispatch)": lambda: F.scaled_dot_product_attention(qt, qt, qt, is_causal=True),
        "sdpa(default dispatch, grad)": lambda: F.scaled_dot_product_attention(qgt, qgt, qgt, is_causal=True),
    }
    for fn in contenders.values():
        fn()
    result["host_us"] = host_overhead_us(contenders)
    native.use(None)  # the same calls through the Python autograd.Function and the ctypes launch
    python_path = {f"{name} (without the C++ node)": contenders[name]
                   for name in ("flashjit.forward", "flash_attn_func", "flash_attn_func (grad)")}
    result["host_us"].update(host_overhead_us(python_path))
    native.use(node)
    if args.profile:  # where a call's microseconds go: cProfile over the grad-requiring call
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(2000):
            contenders["flash_attn_func (grad)"]()
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
        print(text.getvalue())
    (out_dir / "bench_jit.json").write_text(json.dumps(result, indent=1))
    for key in ("cold_flashjit", "warm_flashjit", "sdpa_flash"):
        r = result[key]
        print(f"{key:14} import torch {r['import_torch_s']:.3f} s, CUDA init {r['cuda_init_s']:.3f} s, "
              f"first call {r['first_call_s']:.3f} s")
    print(f"cold first calls {', '.join(f'{s:.3f}' for s in result['cold_first_call_s'])} s (median above)")
    for key, us in result["host_us"].items():
        print(f"host overhead {key:30} {us:6.1f} us/call")


if __name__ == "__main__":
    main()

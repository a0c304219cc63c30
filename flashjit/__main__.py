"""Command line: python -m flashjit {info, precompile, cache list|clear, check}."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

from . import __version__, cache, envvars, toolchain
from .config import config_from_name, get_kernels_to_build, smem_limit_for_arch


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def cmd_info(_args) -> int:
    print(f"flashjit      {__version__}")
    print(f"python        {platform.python_version()} ({sys.executable})")
    try:
        import torch

        print(f"torch         {torch.__version__} (CUDA {torch.version.cuda})")
        if torch.cuda.is_available():
            driver = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
            print(f"CUDA driver   {driver if driver else 'available'}")
            for i in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(i)
                try:
                    arch = toolchain.normalize_arch(f"{major}.{minor}")
                except ValueError as exc:
                    arch = f"unsupported ({exc})"
                print(f"GPU {i}         {torch.cuda.get_device_name(i)}: compute capability {major}.{minor} -> {arch}")
        else:
            print("GPU           none visible to torch (kernels can still be precompiled with --arch)")
    except ImportError:
        print("torch         not installed")
    try:
        tk = toolchain.find_toolkit()
        print(f"nvcc          {tk.version} at {tk.nvcc} (toolkit {tk.home}; found via {tk.found_by})")
    except toolchain.ToolchainError as exc:
        print(f"nvcc          NOT FOUND\n{exc}")
    try:
        listed = cache.entries()
        print(f"cache         {cache.root()}: {len(listed)} kernels, {_human(sum(s for _, _, s in listed))}")
    except cache.CacheError as exc:
        print(f"cache         UNUSABLE: {exc}")
    print("environment:")
    for var in envvars.ALL:
        print(f"  {var.name}={os.environ.get(var.name, '')!r:<14} {var.doc}")
    return 0


def _build_one(name: str, arch: str) -> tuple[str, float]:
    from . import jit

    started = time.perf_counter()
    jit.ensure_built(config_from_name(name), arch)
    return name, time.perf_counter() - started


def cmd_precompile(args) -> int:
    if args.arch:
        arch = toolchain.normalize_arch(args.arch)
    else:
        from . import jit

        import torch

        if not torch.cuda.is_available():
            print("no GPU is visible: pass --arch (e.g. --arch sm_90a) to precompile for another machine",
                  file=sys.stderr)
            return 2
        arch = jit.arch_for(torch.cuda.current_device())
    names = args.configs or [c.name for c in get_kernels_to_build(smem_limit_for_arch(arch), arch)]
    for name in names:
        config_from_name(name).validate()  # fail fast on a typo, before any compile
    jobs = args.jobs or int(envvars.JOBS.get() or 0) or os.cpu_count() or 1
    print(f"precompiling {len(names)} kernels for {arch} with {jobs} jobs into {cache.root()}")
    failed = 0
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_build_one, name, arch): name for name in names}
        for future in as_completed(futures):
            try:
                name, seconds = future.result()
                print(f"  ok    {seconds:6.1f} s  {name}")
            except Exception as exc:  # report every failure, keep building the rest
                failed += 1
                print(f"  FAIL  {futures[future]}: {exc}", file=sys.stderr)
    return 1 if failed else 0


def cmd_cache(args) -> int:
    if args.action == "clear":
        print(f"removed {cache.clear()} kernels from {cache.root()}")
        return 0
    listed = cache.entries()
    for entry, manifest, size in listed:
        built = manifest.get("build_seconds", "?") if manifest else "?"
        state = "" if manifest else "  (incomplete)"
        print(f"{entry.path.parent.name:8} {_human(size):>10}  built in {built} s  {entry.path.name}{state}")
    print(f"{len(listed)} kernels, {_human(sum(s for _, _, s in listed))} in {cache.root()}")
    return 0


def cmd_check(args) -> int:
    import torch

    from .interface import forward_timed
    from .reference import attention_reference

    if not torch.cuda.is_available():
        print("flashjit check: no CUDA GPU is visible, so the JIT kernels cannot run here. "
              "(FLASHJIT_BACKEND=reference runs the PyTorch reference on any device.)", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    shape = (args.batch, args.seqlen, args.heads, args.head_dim)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(3))
    from .config import KernelConfig

    config = KernelConfig.from_name(args.config) if args.config else None
    out, ms = forward_timed(q, k, v, config=config, causal=args.causal)
    out, ms = forward_timed(q, k, v, config=config, causal=args.causal)  # warm
    ref, _ = attention_reference(q, k, v, causal=args.causal)
    err = (out.float() - ref).abs().max().item()
    low, _ = attention_reference(q, k, v, causal=args.causal, compute_dtype=None)
    low_err = (low.float() - ref).abs().max().item()
    from .interface import resolve_config

    used = resolve_config(q, k, config, args.causal)
    flops = 4 * args.batch * args.heads * args.seqlen * args.seqlen * args.head_dim / (2 if args.causal else 1)
    ok = err <= max(2 * low_err, 1e-3) and torch.isfinite(out).all().item()
    print(f"{torch.cuda.get_device_name()}  shape [B,S,H,D]={list(shape)} {args.dtype} causal={args.causal}")
    print(f"config   {used.name}")
    print(f"max|err| {err:.3e} vs fp32 reference (PyTorch {args.dtype} math: {low_err:.3e})")
    print(f"time     {ms:.3f} ms  ({flops / ms / 1e9:.1f} TFLOP/s)")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashjit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPUs, nvcc, cache").set_defaults(func=cmd_info)
    pre = sub.add_parser("precompile", help="compile kernels into the cache ahead of use")
    pre.add_argument("configs", nargs="*", help="kernel names (default: the build set)")
    pre.add_argument("--arch", help="target arch, e.g. sm_90a (default: the local GPU's)")
    pre.add_argument("--jobs", type=int, default=0, help="parallel compiles (default: CPU count)")
    pre.set_defaults(func=cmd_precompile)
    cache_cmd = sub.add_parser("cache", help="list or clear the kernel cache")
    cache_cmd.add_argument("action", choices=("list", "clear"))
    cache_cmd.set_defaults(func=cmd_cache)
    check = sub.add_parser("check", help="run one attention call on the GPU and compare with the reference")
    check.add_argument("--batch", type=int, default=2)
    check.add_argument("--seqlen", type=int, default=1024)
    check.add_argument("--heads", type=int, default=16)
    check.add_argument("--head-dim", type=int, default=128)
    check.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    check.add_argument("--causal", action="store_true")
    check.add_argument("--config", help="a kernel name (default: the dispatcher's choice)")
    check.set_defaults(func=cmd_check)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (toolchain.ToolchainError, cache.CacheError, ValueError) as exc:
        print(f"flashjit: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

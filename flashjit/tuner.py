"""The tuning runner behind `python -m flashjit tune`: for one problem, compile the candidates of the
family this GPU runs (its autotuning space, the dispatcher's default first), time each on random
inputs and return the winner's entry for the table (flashjit/tuning.py, which the dispatcher reads).
"""
from __future__ import annotations

import dataclasses
import logging

log = logging.getLogger("flashjit")


def time_ms(fn, warmup: int = 10, reps: int = 30, before=None) -> float:
    """Median of `reps` CUDA-event timings of fn() after `warmup` calls; before(), if given, runs
    untimed ahead of each call (e.g. an L2 flush)."""
    import torch

    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def agrees(got, expected, tolerance: float = 0.05) -> bool:
    """Whether a candidate's result matches the default kernel's: finite everywhere, and no element
    further from it than `tolerance` times the default's largest magnitude. Kernels of one problem
    differ only in summation order, far inside that; a candidate that does not is broken, and a table
    entry would send every later call to it."""
    import torch

    scale = max(expected.abs().max().item(), 1e-6)
    error = (got.float() - expected.float()).abs().max().item()
    return bool(torch.isfinite(got).all()) and error <= tolerance * scale


def candidates(direction: str, dtype: str, d_head: int, causal: bool, arch: str, smem_limit: int,
               deterministic: bool = False, limit: int = 0, seqlen: int = 4096) -> list:
    """The configs `tune` times for a problem: the family's autotuning space for `arch` that fits the
    GPU, the dispatcher's default for the problem (its seqlen included) first, then on sm_90a the default
    with lazy rescaling the other way (the dispatcher's rule is by head dim and mask, and lost 1-3% at some
    lengths) and a persistent default's one-CTA-a-tile twin (what dispatch.with_tile_walk runs for some
    grids: a tuned entry is run as it is). limit > 0 keeps those and an evenly spread subset of the space."""
    from . import dispatch

    first = []  # kept whatever the limit
    if direction == "fwd":
        default = dispatch.default_config(dtype, d_head, causal, seqlen, smem_limit, arch=arch)
        space = dispatch.get_autotuning_kernel_configs(dtype, d_head, causal, arch=arch)
        if isinstance(default, dispatch.FwdSm90Config):
            first = [dataclasses.replace(default, lazy_rescale=not default.lazy_rescale)]
            first += [default.one_cta_per_tile()] if default.persistent else []
    else:
        default = dispatch.default_bwd_config(dtype, d_head, causal, deterministic=deterministic,
                                              smem_limit=smem_limit, wgmma=arch == dispatch.WGMMA_ARCH)
        space = dispatch.get_autotuning_bwd_configs(dtype, d_head, causal, deterministic, arch=arch)
    first = [c for c in first if c.smem_bytes <= smem_limit]
    space = [c for c in space if c != default and c not in first and c.smem_bytes <= smem_limit]
    room = max(limit - 1 - len(first), 0)
    if limit and len(space) > room:
        space = [space[i * len(space) // room] for i in range(room)]
    return [default, *first, *space]


def tune_problem(direction: str, dtype: str, d_head: int, causal: bool, seqlen: int, device_index: int,
                 tokens: int = 16384, hidden: int = 2048, deterministic: bool = False, limit: int = 0,
                 jobs: int = 8) -> dict:
    """Compile and time every candidate for one problem (batch * seqlen = tokens, heads * d_head =
    hidden, random inputs) on the device; the winner's entry for the table. A candidate whose first
    result disagrees with the default's (agrees()) is skipped with a warning, never timed."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from . import interface, jit

    arch = jit.arch_for(device_index)
    smem_limit = interface._smem_limit(device_index)[0]
    configs = candidates(direction, dtype, d_head, causal, arch, smem_limit, deterministic, limit, seqlen)

    def build(config):  # nvcc runs outside the GIL: threads compile in parallel
        try:
            jit.ensure_built(config, arch)
            return config
        except Exception as exc:  # one candidate that does not build must not stop the others
            log.warning("tune: skipping %s (%s)", config.name, str(exc).splitlines()[0])
            return None

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        configs = [c for c in pool.map(build, configs) if c is not None]
    batch, heads = max(1, tokens // seqlen), max(1, hidden // d_head)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
    with torch.cuda.device(device_index):
        q, k, v, dout = (torch.randn(batch, seqlen, heads, d_head, device="cuda", dtype=torch_dtype) for _ in range(4))
        out, lse = interface.forward(q, k, v, causal=causal, return_lse=True)
        grads = [torch.empty_like(t) for t in (q, k, v)]
        expected, timed = None, {}
        for config in configs:
            if direction == "fwd":
                fn = lambda c=config: interface.forward(q, k, v, config=c, causal=causal, out=out)  # noqa: E731
            else:
                fn = lambda c=config: interface.backward(dout, q, k, v, out, lse, causal=causal, config=c,  # noqa: E731
                                                         deterministic=deterministic, dq=grads[0], dk=grads[1],
                                                         dv=grads[2])
            fn()
            got = [out] if direction == "fwd" else grads
            if expected is None:  # the default comes first: the others must agree with it
                expected = [t.clone() for t in got]
            elif not all(agrees(g, e) for g, e in zip(got, expected)):
                log.warning("tune: skipping %s: its result disagrees with the default kernel's", config.name)
                continue
            timed[config.name] = time_ms(fn)
    default = configs[0].name
    best = min(timed, key=timed.get)
    return dict(config=best, ms=timed[best], default=default, default_ms=timed[default], candidates=len(timed))

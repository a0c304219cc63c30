"""Autotuning that persists: `python -m flashjit tune` times the candidates of each kernel family on
the local GPU and stores the winners; the dispatcher prefers them to its built-in defaults.

A table belongs to one GPU identity (name, SM count, driver version, flashjit version): another GPU,
a driver update or a flashjit upgrade starts from the defaults again. It lives in the cache at
<cache>/tuned/<gpu>-<hash>.json, written whole and published with os.replace (a reader sees the old
or the new table, never half of one):

    {"version": 1, "identity": {...}, "entries": {"fwd:bf16:d128:c0:s4096": {"config": NAME,
     "ms": 0.81, "default": NAME, "default_ms": 0.85}, ...}}

An entry holds a problem's winning tiles; a call with score features (window, softcap, ALiBi,
dropout, sinks) gets the same tiles with its features switched on. Calls whose sequence length was
not tuned take the entry of the nearest tuned length (in log2), for the same pass, dtype, head dim,
causal flag (and, for the backward, mode). FLASHJIT_TUNED=0 ignores every table.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path

from . import cache, envvars
from .configs import config_from_name

log = logging.getLogger("flashjit")
TABLE_VERSION = 1


def problem_key(direction: str, dtype: str, d_head: int, causal: bool, seqlen: int, deterministic: bool = False) -> str:
    mode = ":det" if deterministic else ""
    return f"{direction}:{dtype}:d{d_head}:c{int(bool(causal))}:s{seqlen}{mode}"


_KEY_RE = re.compile(r"^(fwd|bwd):(fp16|bf16):d(\d+):c([01]):s(\d+)(:det)?$")


def table_path(identity: dict) -> Path:
    """Where this GPU identity's table lives in the cache."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", identity["name"]).strip("-").lower() or "gpu"
    return cache.root() / "tuned" / f"{slug}-{digest}.json"


@functools.lru_cache(maxsize=None)
def device_identity(device_index: int) -> dict:
    """(GPU name, SM count, driver version, flashjit version) of a CUDA device: what a table is for."""
    import torch

    from ._version import __version__

    props = torch.cuda.get_device_properties(device_index)
    return dict(name=props.name, sm_count=props.multi_processor_count, driver=_driver_version(), flashjit=__version__)


def _driver_version() -> int:
    """The CUDA driver's version (e.g. 13000), asked of libcuda (torch exposes no public call for it)."""
    import ctypes

    for library in ("libcuda.so.1", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(library)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if cuda.cuDriverGetVersion(ctypes.byref(version)) == 0:
            return version.value
    return 0


def read_table(path: Path) -> dict:
    """A table's entries, or {} when there is none; a damaged table is ignored with a warning."""
    try:
        data = json.loads(path.read_text())
        if data.get("version") != TABLE_VERSION or not isinstance(data.get("entries"), dict):
            raise ValueError(f"version {data.get('version')!r}, expected {TABLE_VERSION}")
        return data["entries"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("ignoring the tuned table %s (%s); `python -m flashjit tune` rewrites it", path, exc)
        return {}


def write_table(identity: dict, entries: dict) -> Path:
    """Merge `entries` into the identity's table, atomically (temporary file + os.replace)."""
    path = table_path(identity)
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**read_table(path), **entries}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(dict(version=TABLE_VERSION, identity=identity, entries=merged), f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    _entries_for.cache_clear()
    _lookup.cache_clear()
    return path


@functools.lru_cache(maxsize=None)
def _entries_for(device_index: int) -> dict:
    return read_table(table_path(device_identity(device_index)))


def lookup(device_index: int, direction: str, dtype: str, d_head: int, causal: bool, seqlen: int,
           features: tuple = (), deterministic: bool = False):
    """The tuned config for a call, or None: the entry of the nearest tuned sequence length for the same
    (pass, dtype, head dim, causal, mode) on this GPU, with the call's features (name, value pairs)
    switched on. Cached per argument tuple: one dict lookup per call once seen."""
    if not envvars.TUNED.flag():
        return None
    return _lookup(device_index, direction, dtype, d_head, causal, seqlen, features, deterministic)


@functools.lru_cache(maxsize=4096)
def _lookup(device_index, direction, dtype, d_head, causal, seqlen, features, deterministic):
    best = None
    for key, entry in _entries_for(device_index).items():
        match = _KEY_RE.match(key)
        if not match or (match[1], match[2], int(match[3]), match[4] == "1", match[6] is not None) != \
                (direction, dtype, d_head, bool(causal), bool(deterministic)):
            continue
        distance = abs(math.log2(max(int(match[5]), 1)) - math.log2(max(seqlen, 1)))
        if best is None or distance < best[0]:
            best = (distance, entry)
    if best is None:
        return None
    try:
        config = dataclasses.replace(config_from_name(best[1]["config"]), **dict(features))
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring a tuned entry for %s d%d (%s)", dtype, d_head, exc)
        return None
    return None if config.problems() else config


def time_ms(fn, warmup: int = 10, reps: int = 30) -> float:
    """Median of `reps` CUDA-event timings of fn() after `warmup` calls."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def candidates(direction: str, dtype: str, d_head: int, causal: bool, arch: str, smem_limit: int,
               deterministic: bool = False, limit: int = 0) -> list:
    """The configs `tune` times for a problem: the family's autotuning space for `arch` that fits the
    GPU, the dispatcher's default first. limit > 0 keeps an evenly spread subset of that many."""
    from . import dispatch

    if direction == "fwd":
        default = dispatch.default_config(dtype, d_head, causal, 4096, smem_limit, arch=arch)
        space = dispatch.get_autotuning_kernel_configs(dtype, d_head, causal, arch=arch)
    else:
        default = dispatch.default_bwd_config(dtype, d_head, causal, deterministic=deterministic,
                                              smem_limit=smem_limit, wgmma=arch == "sm_90a")
        space = dispatch.get_autotuning_bwd_configs(dtype, d_head, causal, deterministic, arch=arch)
    space = [c for c in space if c != default and c.smem_bytes <= smem_limit]
    if limit and len(space) > limit - 1:
        step = len(space) / (limit - 1)
        space = [space[int(i * step)] for i in range(limit - 1)]
    return [default, *space]


def tune_problem(direction: str, dtype: str, d_head: int, causal: bool, seqlen: int, device_index: int,
                 tokens: int = 16384, hidden: int = 2048, deterministic: bool = False, limit: int = 0,
                 jobs: int = 8) -> dict:
    """Compile and time every candidate for one problem (batch * seqlen = tokens, heads * d_head =
    hidden, random inputs) on the device; the winner's entry for the table."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from . import interface, jit

    arch = jit.arch_for(device_index)
    smem_limit = interface._smem_limit(device_index)[0]
    configs = candidates(direction, dtype, d_head, causal, arch, smem_limit, deterministic, limit)

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
        timed = {}
        for config in configs:
            if direction == "fwd":
                fn = lambda c=config: interface.forward(q, k, v, config=c, causal=causal, out=out)  # noqa: E731
            else:
                fn = lambda c=config: interface.backward(dout, q, k, v, out, lse, causal=causal, config=c,  # noqa: E731
                                                         deterministic=deterministic, dq=grads[0], dk=grads[1],
                                                         dv=grads[2])
            timed[config.name] = time_ms(fn)
    default = configs[0].name
    best = min(timed, key=timed.get)
    return dict(config=best, ms=timed[best], default=default, default_ms=timed[default], candidates=len(timed))

"""Command line: python -m flashjit {info, precompile, cache list|clear, check, tune, run}.

`python -m flashjit precompile --arch sm_90a --list` shows what would be built; --dry-run also says
which of those are cached already. `precompile --out DIR` builds into a bundle at DIR instead of
the cache: relocatable, usable read-only and without nvcc through FLASHJIT_PREBUILT. Nothing here
imports torch unless it must: a precompile whose kernels are all cached, --list and --dry-run with
--arch, and `cache` run without it.
"""
from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from . import __version__, cache, envvars, toolchain
from .configs import config_from_name, family_of
from .configs.common import smem_limit_for_arch
from .dispatch import get_kernels_to_build

log = logging.getLogger("flashjit")


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def _log_to_stderr(level: int = logging.INFO) -> None:
    """The CLI is an application: show the flashjit logger's records (compiles, cache waits, damaged
    entries) on stderr, each with one "[flashjit] " prefix, as jit.notify does without a handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[flashjit] %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


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
    for bundle in cache.prebuilt():
        manifest = bundle.manifest()
        if manifest is None:
            print(f"bundle        {bundle.path}: NOT A BUNDLE (no readable {cache.BUNDLE_MANIFEST}); skipped")
            continue
        held = manifest.get("kernels") or {}
        built = manifest.get("built_with") or {}
        print(f"bundle        {bundle.path}: " + (", ".join(f"{len(v)} for {k}" for k, v in held.items()) or "empty")
              + f" (flashjit {built.get('flashjit')}, torch {built.get('torch')}, "
              f"nvcc {(manifest.get('toolchain') or {}).get('nvcc')})")
    print("environment:")
    for var in envvars.ALL:
        print(f"  {var.name}={os.environ.get(var.name, '')!r:<14} {var.doc}")
    return 0


# --- precompile --------------------------------------------------------------------------------

def key_inputs(config, arch: str) -> dict:
    """jit.key_inputs for (config, arch) with the toolkit and flags jit.ensure_built uses (it reads
    torch's version without importing torch)."""
    from . import jit

    toolkit = toolchain.find_toolkit()
    return jit.key_inputs(config, arch, toolkit, jit.build_flags(arch, toolkit))


def cached_library(config, arch: str, bundle: Path | None = None) -> Path | None:
    """The verified library for (config, arch) in the cache (or in the bundle at `bundle`), or None:
    what jit.build would return, found without compiling (and without importing torch)."""
    key = cache.key_hash(key_inputs(config, arch))
    if bundle is not None:
        return cache.Bundle(bundle).entry(arch, config.name, key).verified_library()
    return cache.Entry.for_key(arch, config.name, key, base=cache.location()).verified_library()


def _quiet_worker() -> None:
    """Precompile workers: the parent prints one progress line per kernel, so drop jit's own
    "compiling .../compiled ..." lines; warnings (a damaged entry) still show."""
    _log_to_stderr(logging.WARNING)


def _build_one(name: str, arch: str, bundle: Path | None = None) -> tuple[str, float]:
    """In a worker, for a kernel the parent found missing: (name, seconds to build it) into the
    cache or the bundle (never satisfied from FLASHJIT_PREBUILT, never refused by FLASHJIT_DISABLE_JIT)."""
    from . import jit

    started = time.perf_counter()
    jit.build(config_from_name(name), arch, bundle)
    return name, time.perf_counter() - started


def matches(name: str, patterns: list[str]) -> bool:
    """Whether a kernel name matches any --filter: a glob when it has *, ? or [, else a substring."""
    return any(fnmatch.fnmatchcase(name, p) if any(c in p for c in "*?[") else p in name for p in patterns)


def _precompile_arch(args) -> str:
    if args.arch:
        return toolchain.normalize_arch(args.arch)
    if envvars.CUDA_ARCH.get():
        return toolchain.normalize_arch(envvars.CUDA_ARCH.get())
    import torch

    if not torch.cuda.is_available():
        raise _Usage("no GPU is visible: pass --arch (e.g. --arch sm_90a) to precompile for another machine")
    from . import jit

    return jit.arch_for(torch.cuda.current_device())


class _Usage(Exception):
    """A command line that cannot be served: its message is printed, exit status 2."""


def cmd_precompile(args) -> int:
    arch = _precompile_arch(args)
    names = args.names or [c.name for c in get_kernels_to_build(smem_limit_for_arch(arch), arch)]
    configs = [config_from_name(name) for name in names]  # a typo fails here, before any compile
    for config in configs:
        config.validate()
        family_of(config).check_arch(arch, config.name)
    if args.filter:
        configs = [c for c in configs if matches(c.name, args.filter)]
        if not configs:
            raise _Usage(f"no kernel name matches --filter {' --filter '.join(args.filter)} "
                         f"(of {len(names)} names; `precompile --arch {arch} --list` shows them)")
    total = len(configs)
    if args.list:
        for config in configs:
            print(f"{arch}  {config.name}")
        n_bwd = sum(family_of(c).direction == "bwd" for c in configs)
        print(f"{total} kernels for {arch} ({total - n_bwd} forward, {n_bwd} backward); nothing compiled",
              file=sys.stderr)
        return 0

    started = time.perf_counter()
    bundle = Path(args.out).expanduser().absolute() if args.out else None
    where = f"the bundle {bundle}" if bundle else str(cache.location())
    if bundle is not None and not args.dry_run:
        _open_bundle(bundle, arch)
    todo = []
    for config in configs:
        if cached_library(config, arch, bundle) is None:
            todo.append(config)
        elif args.dry_run:
            print(f"cached   {arch}  {config.name}")
    if args.dry_run:
        for config in todo:
            print(f"compile  {arch}  {config.name}")
        print(f"{len(todo)} of {total} kernels for {arch} would be compiled, {total - len(todo)} are cached in "
              f"{where}; nothing was built (--dry-run)", file=sys.stderr)
        return 0

    jobs = max(1, min(args.jobs or int(envvars.JOBS.get() or 0) or os.cpu_count() or 1, len(todo) or 1))
    print(f"precompiling {total} kernels for {arch} into {bundle if bundle else cache.root()}: "
          f"{total - len(todo)} cached, "
          f"{len(todo)} to compile" + (f" with {jobs} jobs" if todo else ""), flush=True)
    done = failed = 0
    width = len(str(total))

    def progress(name: str, seconds: float, state: str) -> None:
        nonlocal done
        done += 1
        print(f"[{done:>{width}}/{total}] {state:8} {seconds:6.1f} s  {name}", flush=True)

    def build_all(batch: list) -> None:
        nonlocal failed
        if not batch:
            return
        # Only kernels missing from the cache reach a worker, and a worker imports torch only to compile.
        with ProcessPoolExecutor(max_workers=jobs, initializer=_quiet_worker) as pool:
            futures = {pool.submit(_build_one, c.name, arch, bundle): c.name for c in batch}
            for future in as_completed(futures):
                try:
                    progress(*future.result(), "compiled")
                except Exception as exc:  # report every failure, keep building the rest
                    failed += 1
                    progress(futures[future], 0.0, "FAILED")
                    print(f"[flashjit] {futures[future]}: {exc}", file=sys.stderr, flush=True)

    cached = {c.name for c in configs} - {c.name for c in todo}
    for config in configs:
        if config.name in cached:
            progress(config.name, 0.0, "cached")
    build_all(todo)
    # The dispatcher runs a kernel's plain twin where this toolkit's ptxas serialized it (jit.unserialized):
    # a bundle (or a cache used with FLASHJIT_DISABLE_JIT) needs the twin too.
    asked = {c.name for c in configs}
    twins = [t for t in _plain_twins(configs, arch, bundle) if t.name not in asked]
    if twins:
        print(f"ptxas serialized {len(twins)} of them here: adding their plain twins, which the dispatcher runs "
              "instead", flush=True)
        total += len(twins)
        width = len(str(total))
        missing = []
        for twin in twins:
            if cached_library(twin, arch, bundle) is None:
                missing.append(twin)
            else:
                progress(twin.name, 0.0, "cached")
        build_all(missing)
        todo += missing
    if not args.names and bundle is None and envvars.NATIVE_AUTOGRAD.flag():
        # The build set also gets flash_attn_func's C++ autograd node; without it flash_attn_func keeps its
        # Python autograd.Function, so its failure is reported and fails no kernel.
        _precompile_native()
    if bundle is not None:
        held = cache.Bundle(bundle).record_contents()["kernels"]
        print(f"bundle {bundle}: {sum(map(len, held.values()))} kernels ("
              + ", ".join(f"{len(names)} for {a}" for a, names in held.items())
              + f"); use it with {envvars.PREBUILT.name}={bundle}")
    print(f"{total - failed} of {total} kernels for {arch} ready ({len(todo) - failed} compiled, "
          f"{total - len(todo)} cached{f', {failed} FAILED' if failed else ''}) in "
          f"{time.perf_counter() - started:.1f} s")
    return 1 if failed else 0


def _plain_twins(configs: list, arch: str, bundle: Path | None) -> list:
    """The plain twins (config.plain()) of the built `configs` whose build ptxas noted (C75xx), in order."""
    twins = {}
    for config in configs:
        library, plain = cached_library(config, arch, bundle), config.plain()
        if library is not None and plain is not None and cache.Entry(library.parent).ptxas_notes():
            twins.setdefault(plain.name, plain)
    return list(twins.values())


def _precompile_native() -> None:
    """Build (or find) the C++ autograd node in the cache (flashjit/native.py), or say why not. Host
    code: the same for every arch, so never part of a bundle."""
    from . import native

    started = time.perf_counter()
    try:
        native.build()
    except Exception as exc:
        print(f"[flashjit] the C++ autograd node was not built ({str(exc).splitlines()[0]}); flash_attn_func "
              "with grad keeps its Python autograd.Function", file=sys.stderr, flush=True)
        return
    print(f"C++ autograd node ready in {time.perf_counter() - started:.1f} s", flush=True)


def _open_bundle(path: Path, arch: str) -> None:
    """Create the bundle at `path` (or check that it holds kernels of this very build) and record
    this build's toolchain and flags in its manifest before any kernel is built into it."""
    from . import jit

    toolkit = toolchain.find_toolkit()
    toolchain_part, found_by, built_with = jit.bundle_build_header(toolkit)
    cache.Bundle(path).open_for_build(toolchain_part, found_by, built_with, arch, jit.build_flags(arch, toolkit))


# --- cache, check ------------------------------------------------------------------------------

def cmd_cache(args) -> int:
    if args.action == "clear":
        print(f"removed {cache.clear()} kernels from {cache.root()}")
        return 0
    listed = cache.entries()
    for entry, manifest, size in listed:
        built = manifest.get("build_seconds", "?") if manifest else "?"
        state = "" if manifest else "  (incomplete)"
        if manifest and manifest.get("ptxas_notes"):  # jit.perf_losses: runs, slower than its config should
            state = f"  (ptxas: {', '.join(n.split(':')[0] for n in manifest['ptxas_notes'])}, wgmma serialized)"
        print(f"{entry.path.parent.name:8} {_human(size):>10}  built in {built} s  {entry.path.name}{state}")
    print(f"{len(listed)} kernels, {_human(sum(s for _, _, s in listed))} in {cache.root()}")
    return 0


def cmd_check(args) -> int:
    import torch

    from . import flash_api
    from .reference import attention_reference

    torch.manual_seed(0)
    shape = (args.batch, args.seqlen, args.heads, args.head_dim)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    flops = 4 * args.batch * args.heads * args.seqlen * args.seqlen * args.head_dim / (2 if args.causal else 1)
    if flash_api.backend() == "reference":
        return _check_reference(args, shape, dtype)
    if not torch.cuda.is_available():  # FLASHJIT_BACKEND=jit forced on a machine without a GPU
        print("check: FLASHJIT_BACKEND=jit needs a CUDA GPU and none is visible; unset it to check the "
              "reference backend", file=sys.stderr)
        return 1
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(3))
    from .interface import forward_timed, resolve_config

    config = config_from_name(args.config) if args.config else None
    if config is not None and family_of(config).direction != "fwd":
        raise _Usage(f"--config takes a forward kernel name; {args.config} is a {family_of(config).name} kernel")
    out, ms = forward_timed(q, k, v, config=config, causal=args.causal)
    out, ms = forward_timed(q, k, v, config=config, causal=args.causal)  # warm
    ref, _ = attention_reference(q, k, v, causal=args.causal)
    err = (out.float() - ref).abs().max().item()
    low, _ = attention_reference(q, k, v, causal=args.causal, compute_dtype=None)
    low_err = (low.float() - ref).abs().max().item()
    used = resolve_config(q, k, config, args.causal)
    ok = err <= max(2 * low_err, 1e-3) and torch.isfinite(out).all().item()
    print(f"{torch.cuda.get_device_name()}  shape [B,S,H,D]={list(shape)} {args.dtype} causal={args.causal}")
    print(f"config   {used.name}")
    print(f"max|err| {err:.3e} vs fp32 reference (PyTorch {args.dtype} math: {low_err:.3e})")
    print(f"time     {ms:.3f} ms  ({flops / ms / 1e9:.1f} TFLOP/s)")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def cmd_tune(args) -> int:
    """Time the candidates of each problem on the local GPU and store the winners (flashjit/tuning.py)."""
    import itertools

    import torch

    from . import jit, tuner, tuning

    if not torch.cuda.is_available():
        print("tune: it times kernels on the local GPU and no CUDA GPU is visible; nothing was tuned",
              file=sys.stderr)
        return 1
    device = torch.cuda.current_device()
    identity = tuning.device_identity(device)
    passes = {"both": ("fwd", "bwd"), "fwd": ("fwd",), "bwd": ("bwd",)}[args.passes]
    problems = list(itertools.product(passes, args.dtypes.split(","), [int(d) for d in args.head_dims.split(",")],
                                      [bool(int(c)) for c in args.causal.split(",")],
                                      [int(s) for s in args.seqlens.split(",")]))
    print(f"tuning {len(problems)} problems on {identity['name']} ({jit.arch_for(device)}, {identity['sm_count']} SMs, "
          f"driver {identity['driver']})", flush=True)
    entries = {}
    for i, (direction, dtype, d_head, causal, seqlen) in enumerate(problems, 1):
        key = tuning.problem_key(direction, dtype, d_head, causal, seqlen, args.deterministic and direction == "bwd")
        entry = tuner.tune_problem(direction, dtype, d_head, causal, seqlen, device, args.tokens, args.hidden,
                                    args.deterministic and direction == "bwd", args.max_candidates,
                                    args.jobs or os.cpu_count() or 1)
        entries[key] = entry
        gain = entry["default_ms"] / entry["ms"]
        print(f"[{i}/{len(problems)}] {key}: {entry['candidates']} candidates, best {entry['config']} "
              f"{entry['ms']:.3f} ms, default {entry['default_ms']:.3f} ms (x{gain:.3f})", flush=True)
    if args.dry_run:
        print("--dry-run: nothing was stored")
        return 0
    path = tuning.write_table(identity, entries)
    print(f"stored {len(entries)} entries in {path}; the dispatcher uses them from now on "
          f"({envvars.TUNED.name}=0 ignores them)")
    return 0


def _check_reference(args, shape, dtype) -> int:
    """FLASHJIT_BACKEND=reference, or no CUDA GPU: check what would run, the PyTorch reference path
    (flash_attn_func forward and backward), and say plainly that no JIT kernel was involved."""
    import torch

    from .flash_api import flash_attn_func
    from .reference import attention_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    why = (f"{envvars.BACKEND.name}=reference" if envvars.BACKEND.get().lower() == "reference"
           else "no CUDA GPU is visible")
    if args.config:
        print(f"--config {args.config} is ignored: the reference backend runs no kernel", file=sys.stderr)
    print(f"reference backend ({why}): flashjit's JIT kernels were not compiled or run; this checks the "
          f"PyTorch reference path on {device} instead", file=sys.stderr)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    started = time.perf_counter()
    out = flash_attn_func(q, k, v, causal=args.causal)
    out.backward(torch.randn_like(out))
    seconds = time.perf_counter() - started
    with torch.no_grad():
        ref, _ = attention_reference(q, k, v, causal=args.causal)
        err = (out.float() - ref).abs().max().item()
        low, _ = attention_reference(q, k, v, causal=args.causal, compute_dtype=None)
        low_err = (low.float() - ref).abs().max().item()
    finite = all(torch.isfinite(t).all().item() for t in (out, q.grad, k.grad, v.grad))
    ok = finite and err <= max(2 * low_err, 1e-3)
    print(f"reference ({device})  shape [B,S,H,D]={list(shape)} {args.dtype} causal={args.causal}")
    print(f"max|err| {err:.3e} vs fp32 reference (PyTorch {args.dtype} math: {low_err:.3e}); "
          f"gradients {'finite' if finite else 'NOT finite'}")
    print(f"time     {seconds * 1e3:.1f} ms forward + backward (PyTorch on {device}, not a kernel timing)")
    print("PASS (reference backend)" if ok else "FAIL (reference backend)")
    return 0 if ok else 1


def cmd_run(args) -> int:
    """Run a script written for flash-attn on flashjit: install the `flash_attn` alias, then run the
    script as `python script.py args...` would (as __main__, with its sys.argv and its directory first
    on sys.path)."""
    import runpy
    import traceback

    from .alias import install_flash_attn_alias

    if not os.path.isfile(args.script):
        raise _Usage(f"run: no such file: {args.script}")
    try:
        install_flash_attn_alias()
    except RuntimeError as exc:  # a real flash-attn is installed: the alias refuses to shadow it
        _error(f"run: {exc}")
        return 1
    # The script's run, not the CLI's: flashjit's log records go where the script's logging sends them.
    log.handlers.clear()
    log.setLevel(logging.NOTSET)
    log.propagate = True
    sys.argv = [args.script, *args.args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
    try:
        runpy.run_path(args.script, run_name="__main__")
    except Exception:  # as Python reports a failing script (main() would print only the message of some)
        traceback.print_exc()
        return 1
    return 0


# --- the parser --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flashjit", description=__doc__.split("\n\n")[0],
        epilog="Environment: " + ", ".join(v.name for v in envvars.ALL) + " (`info` prints what each means).")
    parser.add_argument("--version", action="version", version=f"flashjit {__version__}",
                        help="print flashjit's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do; `python -m flashjit COMMAND --help` says more")
    sub.add_parser("info", help="versions, GPUs and their arch, nvcc and how it was found, the cache",
                   description="Versions, GPUs and their arch, nvcc and how it was found, the cache and "
                   "every FLASHJIT_* variable.").set_defaults(func=cmd_info)

    pre = sub.add_parser(
        "precompile", help="compile kernels into the cache ahead of use (or --list/--dry-run them)",
        description="Compile kernels into the cache ahead of their first use: the default build set for "
        "the arch (the dispatcher's choice for every dtype, tile-width head dim (32, 64, ..., 256), causal flag "
        "and backward mode; another head dim, e.g. 80, is a kernel of its own: name it) or the "
        "NAMEs given. Kernels already cached are skipped without starting a worker. With --out DIR they go "
        "into a bundle at DIR instead, for machines without nvcc (FLASHJIT_PREBUILT=DIR).")
    pre.add_argument("names", nargs="*", metavar="NAME",
                     help="kernel names, e.g. from --list or `cache list` (default: the build set for the arch)")
    pre.add_argument("--arch", help="target arch, e.g. sm_80, sm_86, sm_90a or 8.6 (default: FLASHJIT_CUDA_ARCH, "
                     "else the local GPU's); with it no GPU is needed")
    pre.add_argument("--filter", action="append", metavar="PATTERN",
                     help="keep only names containing PATTERN, or matching it as a glob when it has * ? [ "
                     "(e.g. 'bwd_*', '_d128_'); repeat to keep names matching any")
    pre.add_argument("--list", action="store_true",
                     help="print the names that would be built, with the arch, and exit: nothing is compiled "
                     "(needs no nvcc)")
    pre.add_argument("--dry-run", action="store_true",
                     help="say which kernels would be compiled and which are cached already; build nothing")
    pre.add_argument("--out", metavar="DIR",
                     help="build into a relocatable bundle at DIR instead of the cache: kernels plus a manifest "
                     f"of the toolchain, torch and flashjit versions; machines list it in {envvars.PREBUILT.name} "
                     "and load from it without nvcc or write access")
    pre.add_argument("--jobs", type=int, default=0, metavar="N",
                     help=f"parallel compiles (default: {envvars.JOBS.name}, else the CPU count)")
    pre.set_defaults(func=cmd_precompile)

    cache_cmd = sub.add_parser("cache", help="list or clear the kernel cache",
                               description="List the cached kernels (arch, size, build time, name) or "
                               "remove them all.")
    cache_cmd.add_argument("action", choices=("list", "clear"),
                           help="list: every cached kernel and the total size; clear: remove every kernel")
    cache_cmd.set_defaults(func=cmd_cache)

    check = sub.add_parser(
        "check", help="run one attention call and compare it with the fp32 reference",
        description="Run one forward call on the local GPU and compare it with the fp32 PyTorch reference: "
        "error, kernel config, time. With FLASHJIT_BACKEND=reference, or without a CUDA GPU, it checks the "
        "PyTorch reference path (forward and backward) instead and says so.")
    check.add_argument("--batch", type=int, default=2, help="batch size (default: 2)")
    check.add_argument("--seqlen", type=int, default=1024, help="query and key length (default: 1024)")
    check.add_argument("--heads", type=int, default=16, help="number of heads (default: 16)")
    check.add_argument("--head-dim", type=int, default=128, help="head dim, 1 to 256 (default: 128)")
    check.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="input dtype (default: bf16)")
    check.add_argument("--causal", action="store_true", help="causal masking (bottom-right aligned)")
    check.add_argument("--config", metavar="NAME", help="a forward kernel name (default: the dispatcher's choice)")
    check.set_defaults(func=cmd_check)

    tune = sub.add_parser(
        "tune", help="time the kernel candidates on the local GPU and store the winners for the dispatcher",
        description="For each problem (pass x dtype x head dim x causal x seqlen, batch * seqlen = --tokens, "
        "heads * head dim = --hidden), compile and time the autotuning candidates of the kernel families this "
        "GPU runs, and store the fastest per problem in the cache, for this GPU, driver and flashjit version. "
        "Later calls of any process use it (the nearest tuned seqlen; the call's features on the tuned tiles); "
        f"{envvars.TUNED.name}=0 ignores it.")
    tune.add_argument("--passes", choices=("both", "fwd", "bwd"), default="both", help="which passes (default: both)")
    tune.add_argument("--dtypes", default="bf16", help="comma-separated (default: bf16)")
    tune.add_argument("--head-dims", default="64,128", help="comma-separated (default: 64,128)")
    tune.add_argument("--causal", default="0,1", help="comma-separated 0/1 (default: 0,1)")
    tune.add_argument("--seqlens", default="1024,4096", help="comma-separated (default: 1024,4096)")
    tune.add_argument("--tokens", type=int, default=16384, help="batch * seqlen (default: 16384)")
    tune.add_argument("--hidden", type=int, default=2048, help="heads * head dim (default: 2048)")
    tune.add_argument("--deterministic", action="store_true", help="tune the deterministic backward")
    tune.add_argument("--max-candidates", type=int, default=32, metavar="N",
                      help="time at most N candidates a problem, the default among them (0: all; default 32)")
    tune.add_argument("--jobs", type=int, default=0, metavar="N", help="parallel compiles (default: the CPU count)")
    tune.add_argument("--dry-run", action="store_true", help="time and report, store nothing")
    tune.set_defaults(func=cmd_tune)

    run = sub.add_parser(
        "run", help="run a script written for flash-attn on flashjit (`import flash_attn` gives flashjit)",
        description="Install flashjit's flash-attn alias (flash_attn, flash_attn.flash_attn_interface, "
        "flash_attn.bert_padding map to flashjit's functions) and run SCRIPT as __main__ with ARGS as its "
        "sys.argv[1:], unchanged. Refuses if a real flash-attn is installed: the alias never shadows it.")
    run.add_argument("script", metavar="SCRIPT", help="the Python script to run (path)")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                     help="arguments passed to the script, options included, as its sys.argv[1:]")
    run.set_defaults(func=cmd_run)
    return parser


def _error(message: str) -> None:
    """One "flashjit: " in front of a message, also when the message already names flashjit."""
    print(message if message.startswith("flashjit") else f"flashjit: {message}", file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_stderr()
    try:
        return args.func(args)
    except _Usage as exc:
        _error(str(exc))
        return 2
    except (toolchain.ToolchainError, cache.CacheError, ValueError) as exc:
        _error(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())

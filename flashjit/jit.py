"""Compile-or-load: in-process memo -> prebuilt bundles -> verified disk cache -> (lock, re-check,
render, compile, publish).

The first use of a kernel in a process costs a dict miss plus, when a bundle or the disk cache has
it, a dlopen; every later use is a dict lookup. A build compiles the rendered TU (no torch headers:
about 2 s instead of a minute) twice at once, into a private staging directory: nvcc to a cubin of
the kernels, and torch.utils.cpp_extension.load with the host compiler to the launcher library that
loads it. nvcc then runs no host pass over the CUDA runtime's headers, and cpp_extension's import
and the launcher's compile and link happen while nvcc works (docs/perf-log.md, issue 17).

The key of an entry hashes key_inputs: the config and arch, what this process knows by itself
(local_inputs: flashjit, codegen ABI, sources hash, torch and its CUDA) and what only the toolchain
can tell (toolchain_inputs and the flags: nvcc's version, the toolkit root and identity). A cache
lookup asks nvcc for the latter; a bundle lookup (FLASHJIT_PREBUILT) takes them from the bundle's
manifest, the toolchain it was built with, and needs no nvcc: a bundle of another flashjit, sources
or torch gives another key, a miss, never a stale hit.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import cache, codegen, envvars, toolchain
from .notify import notify
from ._version import __version__
from .configs import family_of
from .configs.common import ConfigBase
from .launch import CompiledKernel


_memo: dict[tuple[str, str], CompiledKernel] = {}
_memo_lock = threading.Lock()


class JitDisabledError(RuntimeError):
    """FLASHJIT_DISABLE_JIT=1 and the kernel is in no bundle and not in the cache."""


class CompileError(RuntimeError):
    """nvcc (or the link) failed. Carries the compiler's log tail and the rendered source's path."""

    def __init__(self, message: str, log_tail: str, source_path: Path):
        super().__init__(message)
        self.log_tail, self.source_path = log_tail, source_path

    def __reduce__(self):  # picklable, so precompile's worker processes can report it
        return (type(self), (str(self), self.log_tail, self.source_path))


# The runtime's library API that the split build's launcher loads its cubin with (cudaLibraryLoadData,
# cudaLibraryGetKernel) is in cudart from CUDA 12.8 on; with an older toolkit nvcc builds the whole TU
# into one library (kernels and launcher, the headers' __CUDACC__ side), as before the split.
SPLIT_BUILD_FROM = (12, 8)


def split_build(toolkit: toolchain.Toolkit) -> bool:
    return toolkit.version_tuple >= SPLIT_BUILD_FROM


def build_flags(arch: str, toolkit: toolchain.Toolkit) -> list[str]:
    """nvcc's flags: for the kernels' cubin (-cubin) where the toolkit allows the split build."""
    return ["-O3", "-std=c++17", "-DNDEBUG", *toolchain.gencode_flags(arch, toolkit),
            *(["-cubin"] if split_build(toolkit) else [])]


# The launcher's host compiler flags (cpp_extension adds its own, which the torch version decides).
# Hidden visibility: each kernel library keeps its statics (kernels/common/launch.cuh: FLASHJIT_EXPORT).
HOST_FLAGS = ["-O2", "-std=c++17", "-DNDEBUG", "-fvisibility=hidden", "-fvisibility-inlines-hidden"]


def host_flags(arch: str) -> list[str]:
    """HOST_FLAGS plus the arch as nvcc names it to host code, so the launcher and the kernels agree on
    what the cubin can do (kernels/fwd_sm80.cuh: programmatic launches from sm_90 on)."""
    return [*HOST_FLAGS, f"-D__CUDA_ARCH_LIST__={toolchain.arch_number(arch)}0"]


@functools.lru_cache(maxsize=None)
def _torch_versions_from_disk() -> tuple[str, str | None]:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torch is not installed; flashjit needs a CUDA build of PyTorch")
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return namespace["__version__"], namespace["cuda"]


def torch_versions() -> tuple[str, str | None]:
    """(torch.__version__, torch.version.cuda). Without importing torch (2-3 s) when it is not
    imported yet: they are read from the installed torch/version.py, where `import torch` takes
    them from; so a cache lookup (precompile of cached kernels, the CLI) needs no torch."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.__version__, torch.version.cuda
    return _torch_versions_from_disk()


# The key inputs that only the toolchain can tell (finding it runs nvcc); a bundle records them.
_TOOLCHAIN_KEYS = ("nvcc", "cuda_home", "toolkit")


def toolchain_inputs(toolkit: toolchain.Toolkit) -> dict:
    """_TOOLCHAIN_KEYS' values for `toolkit`; "toolkit" is the pip wheels' versions and how cudart links."""
    return dict(zip(_TOOLCHAIN_KEYS, (toolkit.version, str(toolkit.home), toolkit.identity)))


def local_inputs() -> dict:
    """The key inputs this process knows without a toolchain. The torch version is there because
    cpp_extension's own flags, compiler checks and link line come from it."""
    torch_version, torch_cuda = torch_versions()
    return {"flashjit": __version__, "codegen_abi": codegen.ABI_VERSION, "sources": codegen.sources_hash(),
            "torch": torch_version, "torch_cuda": torch_cuda, "host_flags": HOST_FLAGS}


def _key_inputs(config: ConfigBase, arch: str, toolchain_part: dict, flags: list[str]) -> dict:
    """The key's inputs from a toolchain's part (this machine's, or a bundle's record of its build
    machine's: only the fields toolchain_inputs gives are taken from it) and this process's own part."""
    return {**{k: toolchain_part[k] for k in _TOOLCHAIN_KEYS}, "config": config.name, "arch": arch,
            **local_inputs(), "flags": flags}


def key_inputs(config: ConfigBase, arch: str, toolkit: toolchain.Toolkit, flags: list[str]) -> dict:
    """Everything that changes the binary, with this machine's toolkit."""
    return _key_inputs(config, arch, toolchain_inputs(toolkit), flags)


@functools.lru_cache(maxsize=None)
def _device_arch_cached(index: int) -> str:
    return toolchain.device_arch(index)


def arch_for(device_index: int) -> str:
    forced = envvars.CUDA_ARCH.get()
    return toolchain.normalize_arch(forced) if forced else _device_arch_cached(device_index)


def get_kernel(config: ConfigBase, arch: str) -> CompiledKernel:
    """The loaded kernel for (config, arch), compiling it on first use anywhere on this machine."""
    memo_key = (config.name, arch)
    kernel = _memo.get(memo_key)
    if kernel is None:
        with _memo_lock:
            kernel = _memo.get(memo_key)
            if kernel is None:
                kernel = CompiledKernel(ensure_built(config, arch), config)
                _memo[memo_key] = kernel
    return kernel


@functools.lru_cache(maxsize=None)
def unserialized(config: ConfigBase, arch: str) -> ConfigBase:
    """A dispatcher's `config`, or its plain twin (config.plain()) where this machine's ptxas serialized
    `config`'s wgmma products (a C75xx note in its manifest: 10-40% slower) and not the twin's. ptxas
    decides that register by register: kernels a small source change apart, or one kernel under two
    toolkits, can fall on either side, so a default measured whole on one toolkit may be serialized on
    another. Builds `config` if needed (the call would next), and the twin only where `config` is noted;
    where the twin cannot be had (FLASHJIT_DISABLE_JIT without it, no nvcc beside a bundle, a read-only
    cache, a failed build) `config` stays. Decided once a process for each (config, arch)."""
    plain = config.plain()
    if plain is None or not notes_of(config, arch):
        return config
    try:
        plain_notes = notes_of(plain, arch)
    except Exception as exc:  # whatever keeps the twin away (no nvcc beside a bundle, a read-only cache, ...):
        # `config` itself is built, so the call runs as it would have without this fallback
        notify(f"{config.name} for {arch} is serialized by ptxas and its plain twin {plain.name} cannot be built "
               f"here ({type(exc).__name__}): running it as it is", logging.WARNING)
        return config
    if plain_notes:
        return config
    notify(f"{config.name} for {arch}: ptxas serialized its wgmma products on this toolkit, not {plain.name}'s; "
           f"running {plain.name} instead", logging.WARNING)
    return plain


def notes_of(config: ConfigBase, arch: str) -> list[str]:
    """ptxas's performance-loss notes recorded when (config, arch) was built, building it if needed."""
    return cache.Entry(ensure_built(config, arch).parent).ptxas_notes()


def ensure_built(config: ConfigBase, arch: str) -> Path:
    """Path of the verified library for (config, arch): from the first FLASHJIT_PREBUILT bundle that
    has it (no nvcc, no writes), else from the cache, compiling it there if needed (unless
    FLASHJIT_DISABLE_JIT). Needs no GPU."""
    _check(config, arch)
    searched = []
    for bundle in cache.prebuilt():
        library, note = _from_bundle(bundle, config, arch)
        if library is not None:
            return library
        searched.append(f"bundle {bundle.path} ({envvars.PREBUILT.name}): {note}")
    if not envvars.DISABLE_JIT.flag():
        return build(config, arch)
    library, note = _from_cache_without_building(config, arch)
    if library is not None:
        return library
    searched.append(note)
    raise JitDisabledError(_disabled_message(config, arch, searched))


def _check(config: ConfigBase, arch: str) -> None:
    """A valid config of a registered family whose arch (if it has one) is `arch`."""
    config.validate()
    family_of(config).check_arch(arch, config.name)


def build(config: ConfigBase, arch: str, bundle: Path | None = None) -> Path:
    """The verified library in the cache (or in the bundle at `bundle`, for precompile --out),
    compiling it there under the entry's lock if it is missing or damaged."""
    _check(config, arch)
    toolkit = toolchain.find_toolkit()
    flags = build_flags(arch, toolkit)
    inputs = key_inputs(config, arch, toolkit, flags)
    key = cache.key_hash(inputs)
    if bundle is None:  # look before demanding a writable cache: a read-only one still serves hits
        entry = cache.Entry.for_key(arch, config.name, key, base=cache.location())
    else:
        entry = cache.Bundle(Path(bundle)).entry(arch, config.name, key)
    library = entry.verified_library()
    if library is None:
        if bundle is None:
            cache.root()  # CacheError with the fix when the cache cannot be written
        with entry.locked():
            library = entry.verified_library()  # someone may have published it while we waited
            if library is None:
                library = _build(entry, config, arch, toolkit, flags, inputs)
    return library


def bundle_build_header(toolkit: toolchain.Toolkit) -> tuple[dict, str, dict]:
    """(toolchain inputs, how the toolkit was found, local inputs): what a bundle records of its build."""
    return toolchain_inputs(toolkit), toolkit.found_by, local_inputs()


def _from_bundle(bundle: cache.Bundle, config: ConfigBase, arch: str) -> tuple[Path | None, str]:
    """(library, None) from `bundle`, or (None, why not). Reads files only: no nvcc, no writes."""
    manifest = bundle.manifest()
    if manifest is None:
        why = (f"not a flashjit bundle (no readable {cache.BUNDLE_MANIFEST})" if bundle.path.is_dir()
               else "no such directory")
        _warn_once(bundle.path, f"{envvars.PREBUILT.name} names {bundle.path}: {why}; it is skipped")
        return None, why
    try:
        flags = manifest["flags"].get(arch)
        if flags is None:
            held = ", ".join(sorted(manifest["flags"])) or "none"
            return None, f"it holds no kernels for {arch} (archs: {held})"
        # The toolchain's part of the key comes from the bundle; the rest is this process's own.
        inputs = _key_inputs(config, arch, manifest["toolchain"], flags)
    except (KeyError, TypeError, AttributeError):
        return None, f"its {cache.BUNDLE_MANIFEST} is not one this flashjit can read"
    entry = bundle.entry(arch, config.name, cache.key_hash(inputs))
    if not entry.path.is_dir():
        built_with, mine = manifest.get("built_with") or {}, local_inputs()
        differ = [f"{k} {built_with.get(k)} (here {v})" for k, v in mine.items() if built_with.get(k) != v]
        return None, ("no entry for this kernel" + (f"; it was built with {', '.join(differ)}" if differ else ""))
    library = entry.verified_library(damaged="bundle entry {path} is damaged (its library does not match the "
                                     "size and sha256 in its manifest); it is not loaded")
    if library is None:
        return None, f"its entry {entry.path} is damaged (library size/sha256 differ from its manifest); not loaded"
    return library, ""


_warned: set[Path] = set()


def _warn_once(path: Path, message: str) -> None:
    if path not in _warned:
        _warned.add(path)
        notify(message, logging.WARNING)


def _from_cache_without_building(config: ConfigBase, arch: str) -> tuple[Path | None, str]:
    """(library, "") from the cache without compiling or writing, or (None, what was searched)."""
    where = f"the kernel cache {cache.location()}"
    try:  # the key needs the toolkit (nvcc's version, how cudart links): any of it may be missing
        toolkit = toolchain.find_toolkit()
        key = cache.key_hash(key_inputs(config, arch, toolkit, build_flags(arch, toolkit)))
    except toolchain.ToolchainError as exc:
        return None, f"{where}: not searched, its keys need nvcc ({str(exc).splitlines()[0]})"
    entry = cache.Entry.for_key(arch, config.name, key, base=cache.location())
    library = entry.verified_library(damaged="cache entry {path} is damaged; not loaded (FLASHJIT_DISABLE_JIT)")
    return library, (f"{where}: no entry" if not entry.path.is_dir() else f"{where}: entry {entry.path} damaged")


def _disabled_message(config: ConfigBase, arch: str, searched: list[str]) -> str:
    bundles = cache.prebuilt()
    if not bundles:
        searched.insert(0, f"no bundles ({envvars.PREBUILT.name} is not set)")
    out = shlex.quote(str(bundles[0].path)) if bundles else "DIR"
    command = f"python -m flashjit precompile --arch {arch} --out {out} {config.name}"
    return (f"flashjit: kernel {config.name} for {arch} is not prebuilt, and {envvars.DISABLE_JIT.name}=1 "
            "forbids compiling it. Searched:\n  - " + "\n  - ".join(searched) + "\n"
            f"Build it on a machine with nvcc and this flashjit and torch ({__version__}, {torch_versions()[0]}):\n"
            f"  {command}\n"
            f"then ship that directory and list it in {envvars.PREBUILT.name} (or unset "
            f"{envvars.DISABLE_JIT.name} to compile on first use).")


@contextlib.contextmanager
def _compiler_environment(toolkit: toolchain.Toolkit):
    """Point cpp_extension at the real toolkit (its own guess breaks on nvcc wrapper scripts) and
    make sure ninja is found even when the interpreter's bin directory is not on PATH."""
    saved_env = {name: os.environ.get(name) for name in ("CUDA_HOME", "PATH")}
    os.environ["CUDA_HOME"] = str(toolkit.home)  # before cpp_extension's import-time guess runs
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "No CUDA runtime is found" is expected on a GPU-less build box
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)

    saved_home = cpp_extension.CUDA_HOME
    extra_path = [os.path.dirname(sys.executable)]
    with contextlib.suppress(ImportError, AttributeError):
        import ninja

        extra_path.insert(0, ninja.BIN_DIR)
    cpp_extension.CUDA_HOME = str(toolkit.home)
    os.environ["PATH"] = os.pathsep.join([*extra_path, os.environ.get("PATH", "")])
    try:
        yield cpp_extension
    finally:
        cpp_extension.CUDA_HOME = saved_home
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _build(entry: cache.Entry, config: ConfigBase, arch: str, toolkit: toolchain.Toolkit,
           flags: list[str], inputs: dict) -> Path:
    staging = entry.staged_build()
    source = staging.path / cache.SOURCE
    source.write_text(codegen.render(config))
    verbose = envvars.VERBOSE.flag()
    notify(f"compiling kernel {config.name} for {arch} (first use on this machine; "
           f"cached afterwards in {entry.path.parent})")
    started = time.perf_counter()
    try:
        make = _build_split if split_build(toolkit) else _build_whole
        built, log = make(entry, config, arch, toolkit, flags, source, staging.path, verbose)
        notes = perf_losses(log) if log is not None else None  # None: a whole build, whose log nobody reads
        for note in notes or ():
            notify(f"{config.name} for {arch}: ptxas: {note}. The kernel is correct but slower than its config "
                   "should be (a tuning candidate that will lose; a dispatcher's choice gives way to its plain twin where "
                   "that compiles whole: jit.unserialized)",
                   logging.WARNING)
        # Publish a copy, not the file cpp_extension just dlopen'ed into this process: a later
        # rewrite of the cache file (damage, a manual edit) must never alter pages this process has mapped.
        shutil.copyfile(built, staging.path / cache.LIBRARY)
        shutil.rmtree(staging.path / _SCRATCH, ignore_errors=True)
        seconds = time.perf_counter() - started
        library = staging.publish(dict(inputs, build_seconds=round(seconds, 3), ptxas_notes=notes))
    except BaseException:
        staging.discard()  # nothing half-written stays behind, also on KeyboardInterrupt
        raise
    notify(f"compiled {config.name} for {arch} in {seconds:.1f} s")
    return library


_SCRATCH = "build"  # in a staging directory: everything a build writes but the entry's files
_LAUNCHER = "launcher.cpp"  # the rendered TU under the name that makes cpp_extension use the host compiler


def _build_split(entry: cache.Entry, config: ConfigBase, arch: str, toolkit: toolchain.Toolkit, flags: list[str],
                 source: Path, staging: Path, verbose: bool) -> tuple[str, str]:
    """nvcc's cubin of the kernels, while the launcher builds beside it; the launcher's path and nvcc's log."""
    # -Xptxas=-v only reports registers/spills; it does not change the binary.
    nvcc = [str(toolkit.nvcc), *flags, *(["-Xptxas=-v"] if verbose else []), "-I", str(codegen.kernels_dir()),
            "-o", str(staging / cache.CUBIN), str(source)]
    log_path = _fresh_dir(staging / _SCRATCH) / "nvcc.log"  # a file, not a pipe: a long log must not stall nvcc
    with open(log_path, "w") as log_file:
        device = subprocess.Popen(nvcc, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        built = _build_launcher(entry, config, arch, toolkit, source, staging, verbose)
        device.wait()
    finally:
        if device.returncode is None:  # the launcher failed, or an interrupt: stop nvcc, reap it
            device.kill()
            device.wait()
    log = log_path.read_text(errors="replace")
    if device.returncode != 0:
        error = subprocess.CalledProcessError(device.returncode, nvcc, output=log)
        raise _compile_error(entry, config, arch, source, error) from None
    if verbose and log:
        notify(log.rstrip())
    return built, log


# ptxas's "Potential Performance Loss" notes (C75xx), printed without -v: wgmma products serialized, which
# costs a Hopper kernel 10-40% with nothing else to show for it (docs/perf-log.md, 2026-12-04).
_PERF_LOSS = re.compile(r"\((C75\d\d)\) Potential Performance Loss: (.*?)(?: in the function '\w+')?\s*$", re.M)


def perf_losses(log: str) -> list[str]:
    """ptxas's performance-loss notes in an nvcc log, one line each ("C7511: wgmma.mma_async ...")."""
    return [f"{code}: {text}" for code, text in _PERF_LOSS.findall(log)]


def _build_whole(entry: cache.Entry, config: ConfigBase, arch: str, toolkit: toolchain.Toolkit, flags: list[str],
                 source: Path, staging: Path, verbose: bool) -> tuple[str, None]:
    """One library of kernels and launcher, nvcc's whole build (a toolkit older than SPLIT_BUILD_FROM);
    its path, and no log (cpp_extension shows nvcc's only with verbose)."""
    # -Xptxas=-v only reports registers/spills; it does not change the binary.
    return _cpp_extension_build(entry, config, arch, toolkit, source, staging, verbose, extra_cflags=["-O2"],
                                extra_cuda_cflags=flags + (["-Xptxas=-v"] if verbose else [])), None


def _build_launcher(entry: cache.Entry, config: ConfigBase, arch: str, toolkit: toolchain.Toolkit, source: Path,
                    staging: Path, verbose: bool) -> str:
    """The launcher library (host code only), built by the host compiler; its path."""
    launcher = _fresh_dir(staging / _SCRATCH) / _LAUNCHER
    shutil.copyfile(source, launcher)
    return _cpp_extension_build(entry, config, arch, toolkit, launcher, staging, verbose,
                                extra_cflags=host_flags(arch), with_cuda=False,
                                extra_include_paths=[str(toolkit.include_dir)])


def _cpp_extension_build(entry: cache.Entry, config: ConfigBase, arch: str, toolkit: toolchain.Toolkit, file: Path,
                         staging: Path, verbose: bool, extra_include_paths=(), **compile_args) -> str:
    """cpp_extension.load of `file` into a library in `staging`; its path."""
    with _compiler_environment(toolkit) as cpp_extension:
        try:
            return cpp_extension.load(
                name=f"flashjit_{entry.path.name.rsplit('-', 1)[1]}",
                sources=[str(file)],
                extra_include_paths=[str(codegen.kernels_dir()), *extra_include_paths],
                # Static cudart (where the toolkit has it: system toolkits and the CUDA 13 wheels), and
                # no torch libraries: the TU uses none, and this keeps the library loadable whatever
                # libcudart the environment would otherwise find. --as-needed drops the torch libraries
                # (and, in a whole build, the -lcudart cpp_extension appends).
                extra_ldflags=[*toolchain.cudart_link_flags(toolkit), "-ldl", "-lrt", "-lpthread", "-Wl,--as-needed"],
                build_directory=str(_fresh_dir(staging / _SCRATCH)),
                verbose=verbose,
                is_python_module=False,
                **compile_args,
            )
        except Exception as exc:  # cpp_extension raises RuntimeError/CalledProcessError
            raise _compile_error(entry, config, arch, file, exc) from exc


def _fresh_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _compile_error(entry: cache.Entry, config: ConfigBase, arch: str, source: Path,
                   exc: Exception) -> CompileError:
    """Keep the rendered source outside the cache (which stays clean) and say where it is."""
    kept = Path(tempfile.gettempdir()) / "flashjit-failed" / entry.path.name
    shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, kept / source.name)
    text = str(exc)
    streams = []  # CalledProcessError's stdout is its output: each stream once
    for stream in ("output", "stdout", "stderr"):
        extra = getattr(exc, stream, None)
        if extra and not any(extra is seen for seen in streams):
            streams.append(extra)
            text += "\n" + (extra.decode(errors="replace") if isinstance(extra, bytes) else str(extra))
    (kept / "build.log").write_text(text)
    tail = "\n".join(text.strip().splitlines()[-40:])
    return CompileError(
        f"flashjit failed to compile {config.name} for {arch}.\n--- compiler log (tail) ---\n{tail}\n"
        f"--- end ---\nRendered source: {kept / source.name}\nFull log: {kept / 'build.log'}",
        tail, kept / source.name)

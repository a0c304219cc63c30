"""flash_attn_func's autograd node in C++ (csrc/autograd_node.cpp): the host cost of a call whose
inputs require grad.

A Python autograd.Function costs about 13 us a call on an H200's host before it does anything, and
SDPA's whole call with grad about 19-22 us (docs/perf-log.md, 2026-12-03); through this node a grad
call costs 18.6-33 us against the Function's 36-87 and SDPA's 21-31 in the same runs (2026-12-04).
This module builds a small torch extension whose C++ autograd::Function launches the forward from
the call's launch plan (interface._Plan: the kernel and its params, packed once a shape) and calls
back into Python only for the backward. Once it is loaded, every planned forward without dropout launches through it too
(interface.native_node), grad or not: ~2 us less Python a call than the ctypes launch. The extension
is built like a kernel: once per key (torch, toolchain, flashjit, this source) into the cache under
the entry's lock, published whole, and loaded by every later process. It returns its failures and
never throws them (csrc/autograd_node.cpp: Launched).

FLASHJIT_NATIVE_AUTOGRAD: 'auto' (the default) loads it from the cache, or builds it in a background
process at the first call that could use it (a GPU call whose launch plan exists), while calls take
the autograd.Function until it is loaded (a failed build is remembered beside the entry and not
retried by later processes); '1' builds it at that call and waits; '0' never uses it. `python -m
flashjit precompile` builds it too when it is on (a failure there fails no kernel). A call uses it
once its launch plan exists (a shape's first call makes the plan on the Python path) and when it has
no dropout, ALiBi or sink (those keep the autograd.Function).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import logging
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

from . import cache, envvars, interface, jit, toolchain
from ._version import __version__
from .notify import notify

NAME = "flashjit_autograd_node"  # the extension's module name (its PyInit_ symbol): fixed
SOURCE = Path(__file__).resolve().parent / "csrc" / "autograd_node.cpp"
ARCH_DIR = "host"  # the cache's directory for it beside the sm_* ones: it runs on the CPU

log = logging.getLogger("flashjit")
_state = None  # None: not looked for yet; "building"; "ready"; "off"; "failed"
_lock = threading.RLock()  # module() may build inline, whose use() takes it again


def key_inputs(toolkit: toolchain.Toolkit) -> dict:
    """What the extension's binary depends on: torch (its headers and libraries), the toolchain, the
    interpreter's ABI, flashjit's version and this source (not the kernel templates: it includes none)."""
    torch_version, torch_cuda = jit.torch_versions()
    return {**jit.toolchain_inputs(toolkit), "flashjit": __version__, "torch": torch_version, "torch_cuda": torch_cuda,
            "extension": NAME, "source": hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
            "python_abi": sysconfig.get_config_var("EXT_SUFFIX") or sys.version}


def _entry(toolkit: toolchain.Toolkit) -> tuple[cache.Entry, dict]:
    """The extension's cache entry (under cache.location(): a lookup writes nothing) and its key inputs."""
    inputs = key_inputs(toolkit)
    return cache.Entry.for_key(ARCH_DIR, NAME, cache.key_hash(inputs), base=cache.location()), inputs


def _failure_marker(entry: cache.Entry) -> Path:
    """Beside the entry: the output of a background build that failed, so that later processes with the
    same key do not build again (build() with compile=True, as precompile calls it, still does)."""
    return entry.path.with_name(entry.path.name + ".failed")


def build(compile: bool = True) -> Path | None:
    """The verified extension library in the cache, compiled there under the entry's lock if it is
    missing or damaged (nothing half-written stays behind); with compile=False, None then. Needs a CUDA
    build of torch and nvcc's toolkit (for the CUDA runtime's headers), no GPU."""
    toolkit = toolchain.find_toolkit()
    entry, inputs = _entry(toolkit)
    library = entry.verified_library()
    if library is not None or not compile:
        return library
    cache.root()  # CacheError with the fix when the cache cannot be written
    with entry.locked():
        library = entry.verified_library()
        if library is not None:
            return library
        staging = entry.staged_build()
        notify(f"compiling flashjit's C++ autograd node (once per torch and flashjit version; cached in "
               f"{entry.path.parent})")
        started = time.perf_counter()
        try:
            scratch = staging.path / "build"
            scratch.mkdir()
            with jit._compiler_environment(toolkit) as cpp_extension:
                built = cpp_extension.load(
                    name=NAME, sources=[str(SOURCE)], extra_cflags=["-O2", "-DNDEBUG"],
                    extra_include_paths=[str(toolkit.include_dir)],  # cuda_runtime_api.h for c10/cuda
                    extra_ldflags=["-lc10_cuda"], build_directory=str(scratch), is_python_module=False,
                    with_cuda=False, verbose=envvars.VERBOSE.flag())
            shutil.copyfile(built, staging.path / cache.LIBRARY)
            shutil.copyfile(SOURCE, staging.path / SOURCE.name)
            shutil.rmtree(scratch, ignore_errors=True)
            seconds = time.perf_counter() - started
            library = staging.publish(dict(inputs, build_seconds=round(seconds, 3)))
            _failure_marker(entry).unlink(missing_ok=True)
        except BaseException:
            staging.discard()
            raise
    notify(f"compiled the C++ autograd node in {seconds:.1f} s")
    return library


def load(library: Path):
    """The extension module from its library file, its backward hook set."""
    loader = importlib.machinery.ExtensionFileLoader(NAME, str(library))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(NAME, loader))
    loader.exec_module(module)
    module.set_backward(_backward)
    return module


def _find_or_build() -> None:
    """FLASHJIT_NATIVE_AUTOGRAD=1's work of module(), inline: the cached extension, else a build unless
    FLASHJIT_DISABLE_JIT; then load it."""
    global _state
    try:
        library = build(compile=not envvars.DISABLE_JIT.flag())
        if library is None:
            _state = "off"  # never compile: the autograd.Function it is
            return
        use(load(library))
    except Exception as exc:  # the autograd.Function still works: say why once and keep using it
        _unavailable(exc)


def _unavailable(why: str | Exception) -> None:
    """Say once why the node is not there (an exception: its first line) and keep the autograd.Function."""
    global _state
    _state = "failed"
    if isinstance(why, Exception):
        why = (str(why).splitlines() or [type(why).__name__])[0][:200]
    notify(f"the C++ autograd node is unavailable ({why}); flash_attn_func with grad keeps the Python "
           "autograd.Function", logging.WARNING)


_builder = None  # auto: (the build process, its output file, its entry) while it runs
# What the auto build's process runs (a test points it elsewhere).
BUILD_COMMAND = (sys.executable, "-c", "from flashjit import native; native.build()")


def _start_auto() -> None:
    """FLASHJIT_NATIVE_AUTOGRAD=auto's first look: load the cached extension, or start its build in a
    process of its own (cpp_extension's changes to PATH and CUDA_HOME stay there, not racing this
    process's kernel builds, and the build finishes and publishes even if this process exits first);
    _poll() loads it once that process is done. Quiet where nothing can build it (no toolkit, or
    FLASHJIT_DISABLE_JIT), and after a build with the same key failed (its marker)."""
    global _state, _builder
    try:
        entry, _ = _entry(toolchain.find_toolkit())
    except toolchain.ToolchainError as exc:  # e.g. a prebuilt bundle's user without nvcc
        _state = "off"
        log.debug("the C++ autograd node is off: %s", str(exc).splitlines()[0])
        return
    library = entry.verified_library()
    if library is not None:
        use(load(library))
        return
    if envvars.DISABLE_JIT.flag() or _failure_marker(entry).exists():
        _state = "off"
        return
    output = tempfile.TemporaryFile()
    process = subprocess.Popen(BUILD_COMMAND, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                               start_new_session=True)
    _builder, _state = (process, output, entry), "building"
    notify("building flashjit's C++ autograd node in the background (once per torch and flashjit version, "
           f"~45 s of one core; cached in {entry.path.parent}); flash_attn_func uses it once it is there")


def _poll() -> None:
    """While the auto build runs: once its process has exited, load what it published, or record its
    failure (the marker, and one warning)."""
    global _builder
    process, output, entry = _builder
    if process.poll() is None:
        return
    _builder = None
    output.seek(0)
    text = output.read().decode(errors="replace")
    output.close()
    library = entry.verified_library() if process.returncode == 0 else None
    if library is None:
        marker = _failure_marker(entry)
        with contextlib.suppress(OSError):
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(text[-8000:])
        _unavailable(f"its build exited with status {process.returncode}; its output is in {marker}, and "
                     "`python -m flashjit precompile` builds it again")
        return
    try:
        use(load(library))
    except Exception as exc:
        _unavailable(exc)


def module():
    """The loaded extension, or None while it is not (yet) usable: see the module docstring."""
    global _state
    if _state is None or _state == "building":
        with _lock:
            if _state is None:
                if not envvars.NATIVE_AUTOGRAD.flag():
                    _state = "off"
                elif envvars.NATIVE_AUTOGRAD.get().lower() == "auto":
                    try:
                        _start_auto()  # sets the state: ready, building or off
                    except Exception as exc:
                        _unavailable(exc)
                else:
                    _find_or_build()
            elif _builder is not None:
                _poll()
    return interface.native_node


def use(node) -> None:
    """Make `node` (load(build())) what flash_attn_func calls, or with None the autograd.Function,
    now and without looking further: benchmarks and tests compare the two."""
    global _state
    with _lock:
        _state = "ready" if node is not None else "off"
        interface.native_node = node  # where the loaded extension lives: planned forwards launch through it


def _backward(dout, q, k, v, out, lse, causal, softmax_scale, window_left, window_right, softcap, deterministic):
    """The node's backward (called from C++ with the GIL): interface.backward's (dq, dk, dv)."""
    return interface.backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale,
                              window_size=(window_left, window_right), softcap=softcap,
                              deterministic=deterministic)[:3]


def attn(q, k, v, causal: bool, softmax_scale, window_size, softcap, deterministic: bool):
    """(out, lse) with the C++ node, or None where this call takes the autograd.Function: the node
    not loaded (yet), no launch plan for this call's key (the plan of interface.forward(...,
    return_lse=True) with no dropout, ALiBi or sink: the key the autograd.Function's forward uses),
    a tuned table written since the plan, or an input not 16-byte aligned."""
    if _state in ("off", "failed") or not (softmax_scale is None or isinstance(softmax_scale, float)):
        return None
    key = interface._plan_key(q, k, v, causal, softmax_scale, window_size, softcap, 0.0, True)
    plan = interface._plans.get(key) if key is not None else None
    if plan is None or not plan.usable(q, k, v):
        return None
    node = interface.native_node or module()  # asked only here: a call with no plan (no GPU) builds nothing
    if node is None:
        return None
    result = node.attn(q, k, v, plan.native_plan(node), causal, softmax_scale, int(window_size[0]),
                       int(window_size[1]), float(softcap), deterministic)
    return plan.checked(result)

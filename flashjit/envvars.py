"""Every FLASHJIT_* environment variable, declared in one place.

Values are read when asked for (not at import), so a test or an application may set them at any
time before the call that needs them. ``python -m flashjit info`` prints this table.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    doc: str

    def get(self) -> str:
        value = os.environ.get(self.name, "").strip()
        return value if value else self.default

    def flag(self) -> bool:
        return self.get().lower() not in ("", "0", "false", "no", "off")


CACHE_DIR = EnvVar(
    "FLASHJIT_CACHE_DIR", "",
    "Root of the kernel cache (default: the platform's per-user cache dir, e.g. ~/.cache/flashjit).")
VERBOSE = EnvVar(
    "FLASHJIT_VERBOSE", "0",
    "1: show the compiler commands, and each new kernel's ptxas register/spill/shared-memory report.")
CUDA_ARCH = EnvVar(
    "FLASHJIT_CUDA_ARCH", "",
    "Force the target arch instead of the GPU's own, e.g. sm_90a, sm_80 or 8.6.")
BACKEND = EnvVar(
    "FLASHJIT_BACKEND", "",
    "'jit' (the compiled kernels; default when CUDA is available) or 'reference' (PyTorch, any device).")
JOBS = EnvVar(
    "FLASHJIT_JOBS", "",
    "Default number of parallel compiles for `python -m flashjit precompile` (default: CPU count).")
PREBUILT = EnvVar(
    "FLASHJIT_PREBUILT", "",
    "Kernel bundles written by `python -m flashjit precompile --out DIR`, searched in order before the "
    "cache: DIR[:DIR...]. A lookup there needs no nvcc and no write access.")
DISABLE_JIT = EnvVar(
    "FLASHJIT_DISABLE_JIT", "0",
    "1: never compile. A kernel found in no bundle and not in the cache raises an error naming the "
    "`precompile --out` command that builds it.")

TUNED = EnvVar(
    "FLASHJIT_TUNED", "1",
    "0: ignore the tables `python -m flashjit tune` wrote; the dispatcher uses its built-in defaults.")

NATIVE_AUTOGRAD = EnvVar(
    "FLASHJIT_NATIVE_AUTOGRAD", "auto",
    "flash_attn_func's C++ autograd node (a grad call's host cost about halved on an H200's host): "
    "'auto' (default) loads it from the cache, or builds it there once in a background process (~45 s of one core); "
    "'1' builds it at the first call that can use it, waiting; '0' never (the Python autograd.Function).")

ALL = (CACHE_DIR, VERBOSE, CUDA_ARCH, BACKEND, JOBS, PREBUILT, DISABLE_JIT, TUNED, NATIVE_AUTOGRAD)

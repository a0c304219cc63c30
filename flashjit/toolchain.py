"""Finding the CUDA toolkit, its nvcc version, and the arch to compile for.

torch.utils.cpp_extension guesses CUDA_HOME as dirname(dirname(which nvcc)); when nvcc on PATH is a
wrapper script (``/usr/local/bin/nvcc`` -> ``exec /usr/local/cuda-13.0/bin/nvcc``) that guess is
``/usr/local`` and linking fails. We ask nvcc itself where it lives (``nvcc -dryrun`` prints TOP=...).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import envvars

DEFAULT_HOME = Path("/usr/local/cuda")
MIN_ARCH = 80  # mma.sync m16n8k16 with bf16, ldmatrix and cp.async all need sm_80


class ToolchainError(RuntimeError):
    """No usable CUDA toolkit, or one that cannot build for the requested GPU."""


@dataclass(frozen=True)
class Toolkit:
    home: Path          # the real toolkit root (bin/nvcc, include/cuda_runtime.h)
    nvcc: Path
    version: str        # e.g. "13.0.88" (from "Cuda compilation tools, release 13.0, V13.0.88")
    found_by: str       # how it was found, for `flashjit info` and error messages

    @property
    def version_tuple(self) -> tuple[int, int]:
        major, minor = self.version.split(".")[:2]
        return int(major), int(minor)


def _is_toolkit(home: Path) -> bool:
    return (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file()


def _real_home_of(nvcc: str) -> Path | None:
    """Ask an nvcc (possibly a wrapper script) which toolkit it belongs to."""
    try:
        # A dry-run compile prints the driver's variables (TOP=<toolkit>/bin/..) without running anything.
        out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if match:
        home = Path(match.group(1).strip()).resolve()
        if _is_toolkit(home):
            return home
    home = Path(nvcc).resolve().parent.parent  # a symlink to the real nvcc
    return home if _is_toolkit(home) else None


def _wheel_homes() -> list[Path]:
    """Toolkit roots that the nvidia-cuda-nvcc wheels install into site-packages."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    roots = []
    for base in spec.submodule_search_locations:
        for sub in ("cuda_nvcc", "cu13", "cu12"):
            roots.append(Path(base) / sub)
    return roots


def _nvcc_version(nvcc: Path) -> str:
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ToolchainError(f"could not run {nvcc} --version: {exc}") from exc
    match = re.search(r"V(\d+\.\d+\.\d+)", out) or re.search(r"release (\d+\.\d+)", out)
    if not match:
        raise ToolchainError(f"could not read the version from `{nvcc} --version`:\n{out}")
    return match.group(1)


@functools.lru_cache(maxsize=None)
def _find(cuda_home: str, cuda_path: str, path: str) -> Toolkit:
    tried: list[str] = []

    def found(home: Path, how: str) -> Toolkit:
        nvcc = home / "bin" / "nvcc"
        return Toolkit(home=home, nvcc=nvcc, version=_nvcc_version(nvcc), found_by=how)

    for var, value in (("CUDA_HOME", cuda_home), ("CUDA_PATH", cuda_path)):
        if value:
            home = Path(value)
            if _is_toolkit(home):
                return found(home.resolve(), f"${var}")
            # A wrapper bin/nvcc inside a non-toolkit dir: let nvcc say where it really lives.
            real = _real_home_of(str(home / "bin" / "nvcc")) if (home / "bin" / "nvcc").exists() else None
            if real:
                return found(real, f"${var} (nvcc there runs {real})")
            tried.append(f"${var}={value} (no bin/nvcc and include/cuda_runtime.h there)")
    on_path = shutil.which("nvcc", path=path or None)
    if on_path:
        real = _real_home_of(on_path)
        if real:
            return found(real, f"nvcc on PATH ({on_path})")
        tried.append(f"nvcc on PATH ({on_path}): could not tell which toolkit it belongs to")
    else:
        tried.append("nvcc on PATH: not found")
    if _is_toolkit(DEFAULT_HOME):
        return found(DEFAULT_HOME.resolve(), str(DEFAULT_HOME))
    tried.append(f"{DEFAULT_HOME}: not a CUDA toolkit")
    for home in _wheel_homes():
        if _is_toolkit(home):
            return found(home, f"the nvidia-cuda-nvcc wheel ({home})")
    tried.append("the nvidia-cuda-nvcc wheel in site-packages: not installed")
    raise ToolchainError(
        "flashjit compiles its kernels on first use and needs the CUDA compiler (nvcc), "
        "but no CUDA toolkit was found. Tried:\n  - " + "\n  - ".join(tried) + "\n"
        "Fix: install the CUDA toolkit matching torch.version.cuda and set CUDA_HOME to its root "
        "(the directory holding bin/nvcc), or `pip install nvidia-cuda-nvcc`.")


def find_toolkit() -> Toolkit:
    """The CUDA toolkit to compile with (memoised per environment)."""
    env = os.environ
    return _find(env.get("CUDA_HOME", ""), env.get("CUDA_PATH", ""), env.get("PATH", ""))


@functools.lru_cache(maxsize=None)
def supported_archs(nvcc: Path) -> frozenset[int]:
    """Real archs (sm_XY) that this nvcc can generate code for, as integers like 90."""
    try:
        out = subprocess.run([str(nvcc), "--list-gpu-code"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(int(m) for m in re.findall(r"sm_(\d+)", out))


_ARCH_RE = re.compile(r"^(?:sm_?|compute_)?(\d+)(?:\.(\d+))?([af]?)$")


def normalize_arch(arch: str) -> str:
    """'sm_90a', '90a', '9.0', 'sm90' -> canonical 'sm_90a' (Hopper gets the 'a' target: wgmma, setmaxnreg)."""
    match = _ARCH_RE.match(arch.strip().lower())
    if not match:
        raise ValueError(f"arch {arch!r} is not an arch name; expected e.g. 'sm_80', 'sm_90a' or '8.6'")
    major, minor, suffix = match.groups()
    number = int(major) * 10 + int(minor) if minor is not None else int(major)
    if number < MIN_ARCH:
        raise ValueError(
            f"arch sm_{number} is older than sm_{MIN_ARCH}: flashjit's kernels need Ampere or newer "
            "(mma.sync with bf16, ldmatrix, cp.async)")
    if number == 90:
        suffix = "a"
    return f"sm_{number}{suffix}"


def arch_number(arch: str) -> int:
    return int(re.match(r"sm_(\d+)", arch).group(1))


def device_arch(device_index: int | None = None) -> str:
    """The arch to build for: FLASHJIT_CUDA_ARCH if set, else the exact arch of the CUDA device."""
    forced = envvars.CUDA_ARCH.get()
    if forced:
        return normalize_arch(forced)
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    if major * 10 + minor < MIN_ARCH:
        name = torch.cuda.get_device_name(device_index)
        raise RuntimeError(
            f"{name} has compute capability {major}.{minor}; flashjit's kernels need sm_{MIN_ARCH} (Ampere) "
            "or newer. Use FLASHJIT_BACKEND=reference on this GPU.")
    return normalize_arch(f"{major}.{minor}")


def gencode_flags(arch: str, toolkit: Toolkit) -> list[str]:
    """Exactly one real target; also reject an nvcc too old for the GPU with a clear message."""
    number = arch_number(arch)
    supported = supported_archs(toolkit.nvcc)
    if supported and number not in supported:
        raise ToolchainError(
            f"nvcc {toolkit.version} at {toolkit.nvcc} cannot generate code for {arch} (it knows "
            f"{', '.join(f'sm_{a}' for a in sorted(supported))}): the toolkit is too old for this GPU. "
            "Install a newer CUDA toolkit and point CUDA_HOME at it.")
    # The -gencode form: with nvcc 13.0 the -arch=sm_90a shorthand also runs a plain sm_90 pass.
    virtual = arch.replace("sm_", "compute_")
    return [f"-gencode=arch={virtual},code={arch}"]

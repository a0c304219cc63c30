"""Finding the CUDA toolkit, its nvcc version, how to link its runtime, and the arch to compile for.

torch.utils.cpp_extension guesses CUDA_HOME as dirname(dirname(which nvcc)); when nvcc on PATH is a
wrapper script (``/usr/local/bin/nvcc`` -> ``exec /usr/local/cuda-13.0/bin/nvcc``) that guess is
``/usr/local`` and linking fails. We ask nvcc itself where it lives (``nvcc -dryrun`` prints TOP=...).

Without a system toolkit, ``pip install "flashjit[cuda]"`` brings NVIDIA's CUDA 13 wheels, which all
unpack into one root, ``site-packages/nvidia/cu13``: ``bin/nvcc`` (nvidia-cuda-nvcc), ``nvvm/bin/cicc``
(nvidia-nvvm), ``include/crt`` (nvidia-cuda-crt), ``include/cuda_runtime.h`` and ``lib/libcudart.so.13``
plus ``lib/libcudart_static.a`` (nvidia-cuda-runtime, which torch itself depends on) and
``include/cccl`` (nvidia-cuda-cccl). The runtime lives in ``lib/``, not ``lib64/``, and there is no
unversioned ``libcudart.so``: see cudart_link_flags.
"""
from __future__ import annotations

import functools
import importlib.metadata
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
# Archs that get nvcc's arch-specific ("a") target: Hopper (wgmma, setmaxnreg) and datacenter
# Blackwell (tcgen05). The sm_80 kernel family builds for them too; consumer Blackwell (sm_120) keeps
# mma.sync and needs no "a".
ARCH_SPECIFIC = frozenset({90, 100})
# What the "no toolkit" error tells a user to run: the CUDA compiler, runtime and headers as wheels.
PIP_ADVICE = 'pip install "flashjit[cuda]"'
# The CUDA wheels that make up a pip toolkit, per root under site-packages/nvidia (their versions
# enter the cache key: a wheel upgrade in place keeps the same root path).
WHEEL_COMPONENTS = {
    "cu13": ("nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-nvvm", "nvidia-cuda-runtime", "nvidia-cuda-cccl"),
    "cu12": ("nvidia-cuda-nvcc-cu12", "nvidia-cuda-runtime-cu12", "nvidia-cuda-cccl-cu12"),
    "cuda_nvcc": ("nvidia-cuda-nvcc-cu12", "nvidia-cuda-runtime-cu12"),
}


class ToolchainError(RuntimeError):
    """No usable CUDA toolkit, or one that cannot build for the requested GPU."""


@dataclass(frozen=True)
class Toolkit:
    home: Path          # the real toolkit root (bin/nvcc, include/cuda_runtime.h)
    nvcc: Path
    version: str        # e.g. "13.0.88" (from "Cuda compilation tools, release 13.0, V13.0.88")
    found_by: str       # how it was found, for `flashjit info` and error messages
    components: tuple[tuple[str, str], ...] = ()  # pip wheels it is made of: (distribution, version)

    @property
    def version_tuple(self) -> tuple[int, int]:
        major, minor = self.version.split(".")[:2]
        return int(major), int(minor)

    @property
    def lib_dir(self) -> Path:
        """Where the CUDA runtime library is: lib64/ in a system toolkit, lib/ in the pip wheels."""
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            lib = self.home / sub
            if (lib / "libcudart_static.a").is_file() or _shared_cudart(lib):
                return lib
        return self.home / "lib64"

    @property
    def include_dir(self) -> Path:
        """The runtime's headers (cuda_runtime_api.h, cuda.h), for the host compiler's launcher build."""
        return self.home / "include"

    @property
    def identity(self) -> dict:
        """What, beyond nvcc's version and the root path, decides the binary: the wheels' versions and
        how cudart is linked. Part of the cache key."""
        return {"components": dict(self.components), "cudart": cudart_link_flags(self)}


def _shared_cudart(lib: Path) -> Path | None:
    """The versioned shared runtime (libcudart.so.13) in `lib`, if any."""
    found = sorted(lib.glob("libcudart.so.*"), key=lambda p: len(p.name)) if lib.is_dir() else []
    return found[0] if found else None


def cudart_link_flags(toolkit: Toolkit) -> list[str]:
    """Link cudart statically when the toolkit has libcudart_static.a (every system toolkit, and
    nvidia-cuda-runtime 13.x), so a library needs no libcudart at load time. Otherwise link the
    versioned shared library by its full path with an rpath to its directory (a process that
    imported a CUDA build of torch has that library loaded already)."""
    lib = toolkit.lib_dir
    if (lib / "libcudart_static.a").is_file():
        return [f"-L{lib}", "-l:libcudart_static.a"]
    shared = _shared_cudart(lib)
    if shared is None:
        raise ToolchainError(f"the CUDA toolkit at {toolkit.home} has no CUDA runtime library "
                             f"(libcudart_static.a or libcudart.so.*) in {lib}. Fix: {PIP_ADVICE}")
    return [f"-L{lib}", str(shared), f"-Wl,-rpath,{lib}"]


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
    """Toolkit roots that the nvidia-cuda-nvcc wheels install into site-packages (CUDA 13 first)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    roots = []
    for base in spec.submodule_search_locations:
        for sub in WHEEL_COMPONENTS:
            roots.append(Path(base) / sub)
    return roots


def _wheel_components(home: Path) -> tuple[tuple[str, str], ...]:
    found = []
    for dist in WHEEL_COMPONENTS.get(home.name, ()):
        try:
            found.append((dist, importlib.metadata.version(dist)))
        except importlib.metadata.PackageNotFoundError:
            pass
    return tuple(found)


def _wheel_problem(home: Path) -> str:
    missing = [name for name, part in (("nvcc", "bin/nvcc"), ("the runtime headers", "include/cuda_runtime.h"))
               if not (home / part).is_file()]
    return f"{home}: no {' and no '.join(missing)}"


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
        # The pip wheels' versions go into the key however their root was found (wheel search,
        # CUDA_HOME or nvcc on PATH pointing into site-packages/nvidia/cuXX): an upgrade rebuilds.
        nvcc = home / "bin" / "nvcc"
        components = _wheel_components(home) if home.parent.name == "nvidia" else ()
        return Toolkit(home=home, nvcc=nvcc, version=_nvcc_version(nvcc), found_by=how, components=components)

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
    wheel_roots = [home for home in _wheel_homes() if home.exists()]
    for home in wheel_roots:
        if _is_toolkit(home):
            return found(home, f"the nvidia-cuda-nvcc wheel ({home})")
    if wheel_roots:
        tried.extend(f"the nvidia-cuda-nvcc wheel: {_wheel_problem(home)}" for home in wheel_roots)
    else:
        tried.append("the nvidia-cuda-nvcc wheel in site-packages: not installed")
    raise ToolchainError(
        "flashjit compiles its kernels on first use and needs the CUDA compiler (nvcc), "
        "but no CUDA toolkit was found. Tried:\n  - " + "\n  - ".join(tried) + "\n"
        f"Fix: {PIP_ADVICE}\n"
        "(the CUDA compiler, runtime and headers as pip wheels), or set CUDA_HOME to a CUDA toolkit's "
        "root (the directory holding bin/nvcc).")


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
    """'sm_90a', '90a', '9.0', 'sm90' -> canonical 'sm_90a'. Hopper and datacenter Blackwell get the
    arch-specific 'a' target (sm_90a: wgmma, setmaxnreg; sm_100a: tcgen05); sm_120 stays plain."""
    match = _ARCH_RE.match(arch.strip().lower())
    if not match:
        raise ValueError(f"arch {arch!r} is not an arch name; expected e.g. 'sm_80', 'sm_90a' or '8.6'")
    major, minor, suffix = match.groups()
    number = int(major) * 10 + int(minor) if minor is not None else int(major)
    if number < MIN_ARCH:
        raise ValueError(
            f"arch sm_{number} is older than sm_{MIN_ARCH}: flashjit's kernels need Ampere or newer "
            "(mma.sync with bf16, ldmatrix, cp.async)")
    if number in ARCH_SPECIFIC:
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

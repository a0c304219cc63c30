"""The pip-only toolchain: with the system CUDA toolkit hidden from discovery, flashjit finds the CUDA
wheels that `pip install "flashjit[cuda]"` (and the `test` extra) installs, compiles a real kernel
with their nvcc and links their runtime, and the library loads with ctypes on a GPU-less machine."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flashjit import KernelConfig, cache, jit, toolchain
from flashjit.launch import CompiledKernel

pytestmark = pytest.mark.compile
CHEAP = KernelConfig(dtype="fp16", d_head=32, B_r=64, B_c=64, n_warps=4)  # as tests/test_jit_cache.py


def _wheel_home() -> Path | None:
    return next((home for home in toolchain._wheel_homes() if toolchain._is_toolkit(home)), None)


@pytest.fixture
def system_toolkit_hidden(tmp_path, monkeypatch):
    """Discovery sees no system toolkit: no CUDA_HOME/CUDA_PATH, no nvcc on PATH (only the
    interpreter's and the host compiler's directories), and no /usr/local/cuda."""
    if _wheel_home() is None:
        pytest.skip('the CUDA toolchain wheels are not installed: pip install "flashjit[cuda]" '
                    "(the test extra includes it)")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    dirs = [os.path.dirname(sys.executable), "/usr/bin", "/bin"]
    path = os.pathsep.join(d for d in dirs if not os.path.exists(os.path.join(d, "nvcc")))
    monkeypatch.setenv("PATH", path)
    monkeypatch.setattr(toolchain, "DEFAULT_HOME", tmp_path / "no-system-cuda")
    toolchain._find.cache_clear()
    yield
    toolchain._find.cache_clear()


def test_discovery_finds_the_wheels(system_toolkit_hidden):
    found = toolchain.find_toolkit()
    assert found.home == _wheel_home() and "nvidia-cuda-nvcc wheel" in found.found_by
    assert found.nvcc == found.home / "bin" / "nvcc" and found.version.count(".") == 2
    dists = dict(found.components)
    # the key sees the wheels' versions; nvcc's own wheel matches the nvcc that runs
    assert dists.get("nvidia-cuda-nvcc") == found.version and "nvidia-cuda-runtime" in dists
    assert found.lib_dir == found.home / "lib"  # the wheels have lib/, not lib64/


def test_wheel_toolchain_compiles_links_and_loads(system_toolkit_hidden, private_cache):
    toolkit = toolchain.find_toolkit()
    library = jit.ensure_built(CHEAP, "sm_80")
    manifest = cache.Entry(library.parent).manifest()
    assert manifest["cuda_home"] == str(toolkit.home) and manifest["nvcc"] == toolkit.version
    assert manifest["toolkit"]["components"] == dict(toolkit.components)
    kernel = CompiledKernel(library, CHEAP.name)  # dlopen + symbol lookup: needs no GPU
    assert kernel.smem_bytes == CHEAP.smem_bytes
    readelf = shutil.which("readelf")
    if readelf:  # cudart is linked statically from the wheel: the library needs no libcudart, no torch
        needed = subprocess.run([readelf, "-d", str(library)], capture_output=True, text=True).stdout
        assert "libcudart" not in needed and "libtorch" not in needed and "libc10" not in needed, needed


def test_shared_cudart_only_links_by_full_path_with_an_rpath(tmp_path):
    """A runtime wheel with no static library (libcudart.so.13 only, as an older or trimmed wheel
    may be): link that file by its path, with an rpath."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libcudart.so.13").write_bytes(b"")
    toolkit = toolchain.Toolkit(home=tmp_path, nvcc=tmp_path / "bin" / "nvcc", version="13.0.88", found_by="test")
    assert toolchain.cudart_link_flags(toolkit) == [
        f"-L{tmp_path / 'lib'}", str(tmp_path / "lib" / "libcudart.so.13"), f"-Wl,-rpath,{tmp_path / 'lib'}"]
    (tmp_path / "lib" / "libcudart_static.a").write_bytes(b"")
    assert toolchain.cudart_link_flags(toolkit) == [f"-L{tmp_path / 'lib'}", "-l:libcudart_static.a"]


def test_system_toolkit_links_as_before():
    """A system toolkit: static cudart from lib64."""
    try:
        toolkit = toolchain.find_toolkit()
    except toolchain.ToolchainError as exc:
        pytest.skip(f"no CUDA toolkit here: {exc}")
    if toolkit.components:
        pytest.skip("the toolkit found here is the pip wheels")
    assert toolchain.cudart_link_flags(toolkit) == [f"-L{toolkit.home / 'lib64'}", "-l:libcudart_static.a"]

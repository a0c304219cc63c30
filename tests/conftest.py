"""Test tiers: CPU tests run anywhere; `compile` tests need nvcc and a CUDA build of torch (CI has
both, no GPU); `gpu` tests need a CUDA GPU and skip with the reason otherwise."""
import os
import shutil
import zlib

import pytest
import torch


def _toolkit_reason():
    from flashjit import toolchain

    if torch.version.cuda is None:
        return "torch is a CPU-only build: cpp_extension cannot compile CUDA"
    try:
        toolchain.find_toolkit()
    except toolchain.ToolchainError as exc:
        return f"no CUDA toolkit: {str(exc).splitlines()[0]}"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_reason = None if torch.cuda.is_available() else "no CUDA GPU is visible on this machine"
    tk_reason = _toolkit_reason()
    for item in items:
        if "gpu" in item.keywords and gpu_reason:
            item.add_marker(pytest.mark.skip(reason=gpu_reason))
        if ("gpu" in item.keywords or "compile" in item.keywords) and tk_reason:
            item.add_marker(pytest.mark.skip(reason=tk_reason))


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One cache for the whole session (kernels compile once), unless FLASHJIT_CACHE_DIR is set."""
    path = os.environ.get("FLASHJIT_CACHE_DIR") or str(tmp_path_factory.mktemp("flashjit-cache"))
    return path


# flash_attn_func's C++ autograd node: its default (auto) would start a background build from the first
# grad call of any GPU test; the suite runs with it off unless the caller's environment says otherwise
# (tests/test_native_autograd.py loads it itself).
_NATIVE_AUTOGRAD = os.environ.get("FLASHJIT_NATIVE_AUTOGRAD", "0")


@pytest.fixture(autouse=True)
def _cache_env(shared_cache, monkeypatch):
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", shared_cache)
    monkeypatch.setenv("FLASHJIT_NATIVE_AUTOGRAD", _NATIVE_AUTOGRAD)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """An empty cache of this test's own (for tests that count compiles or damage entries)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(path))
    from flashjit import jit

    saved = dict(jit._memo)
    jit._memo.clear()
    yield path
    jit._memo.clear()
    jit._memo.update(saved)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed(request):
    """A fixed seed per test and parameter set (crc32 of the test id, the same in every process), so
    a failure reproduces: pytest shows it in the captured output of a failing test."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    print(f"flashjit test seed: {seed} (torch.manual_seed) for {request.node.nodeid}")
    return seed

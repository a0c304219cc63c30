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
    items.sort(key=lambda item: "heavy" not in item.keywords)  # (stable: the rest keep their order)
    for item in items:
        if "gpu" in item.keywords and gpu_reason:
            item.add_marker(pytest.mark.skip(reason=gpu_reason))
        if ("gpu" in item.keywords or "compile" in item.keywords) and tk_reason:
            item.add_marker(pytest.mark.skip(reason=tk_reason))


def pytest_configure(config):
    # pytest-xdist: a test at a time to whichever worker is free (its default sends each worker a quarter of
    # its share at once, which would give one worker every `heavy` test).
    if getattr(config.option, "maxschedchunk", False) is None:
        config.option.maxschedchunk = 1


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (README's test command): a worker a core without a GPU, where the tests are compiles and
    host code (CI's two cores: 687 -> 570 s); none with one, where the GPU tests would share the device."""
    if torch.cuda.is_available():
        return 0
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One cache for the whole session (kernels compile once), unless FLASHJIT_CACHE_DIR is set. Under
    pytest-xdist every worker has its own base temp; their common parent holds one cache for all of them
    (the cache is safe across processes: tests/test_jit_cache.py's sixteen-process test)."""
    if os.environ.get("FLASHJIT_CACHE_DIR"):
        return os.environ["FLASHJIT_CACHE_DIR"]
    if os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.getbasetemp().parent / "flashjit-cache"
        path.mkdir(exist_ok=True)
        return str(path)
    return str(tmp_path_factory.mktemp("flashjit-cache"))


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

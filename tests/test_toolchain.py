"""Toolkit discovery (including nvcc wrapper scripts), arch names and their errors, and the newer
archs (sm_100a, sm_120) that the sm_80 kernel family builds for."""
import os
import stat

import pytest

from flashjit import BwdConfig, BwdSm90Config, KernelConfig, cache, jit, toolchain
from flashjit.configs.common import smem_limit_for_arch
from flashjit.launch import CompiledKernel


@pytest.fixture(autouse=True)
def _fresh_discovery():
    toolchain._find.cache_clear()
    yield
    toolchain._find.cache_clear()


@pytest.mark.parametrize("given, expected", [
    ("sm_80", "sm_80"), ("8.0", "sm_80"), ("86", "sm_86"), ("sm_89", "sm_89"), ("9.0", "sm_90a"),
    ("sm_90", "sm_90a"), ("sm_90a", "sm_90a"), ("compute_90", "sm_90a"), ("10.0", "sm_100a"), ("sm_100", "sm_100a"), ("sm_100a", "sm_100a"),
    ("10.3", "sm_103"), ("12.0", "sm_120"), ("sm_120", "sm_120"), ("121", "sm_121"),
])
def test_normalize_arch(given, expected):
    assert toolchain.normalize_arch(given) == expected


@pytest.mark.parametrize("old", ["sm_75", "7.0", "sm_61"])
def test_old_archs_are_rejected_clearly(old):
    with pytest.raises(ValueError, match="older than sm_80"):
        toolchain.normalize_arch(old)


def test_garbage_arch():
    with pytest.raises(ValueError, match="not an arch name"):
        toolchain.normalize_arch("hopper")


def test_forced_arch_env(monkeypatch):
    monkeypatch.setenv("FLASHJIT_CUDA_ARCH", "8.6")
    assert toolchain.device_arch() == "sm_86"


def _real_toolkit():
    try:
        return toolchain.find_toolkit()
    except toolchain.ToolchainError as exc:
        pytest.skip(f"no CUDA toolkit here: {exc}")


def test_nvcc_wrapper_script_on_path_finds_the_real_toolkit(tmp_path, monkeypatch):
    real = _real_toolkit()
    toolchain._find.cache_clear()
    fake_bin = tmp_path / "usr" / "local" / "bin"   # like /usr/local/bin/nvcc on our machines
    fake_bin.mkdir(parents=True)
    wrapper = fake_bin / "nvcc"
    wrapper.write_text(f"#!/bin/sh\nexec {real.nvcc} \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}/usr/bin{os.pathsep}/bin")
    found = toolchain.find_toolkit()
    assert found.home == real.home and "PATH" in found.found_by
    assert found.home != fake_bin.parent  # torch's guess would be this, and would fail to link


def test_cuda_home_wins(monkeypatch):
    real = _real_toolkit()
    toolchain._find.cache_clear()
    monkeypatch.setenv("CUDA_HOME", str(real.home))
    found = toolchain.find_toolkit()
    assert found.home == real.home and found.found_by == "$CUDA_HOME"
    assert found.version.count(".") == 2


def test_nothing_found_lists_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nope"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(toolchain, "DEFAULT_HOME", tmp_path / "no-cuda")
    monkeypatch.setattr(toolchain, "_wheel_homes", lambda: [])
    with pytest.raises(toolchain.ToolchainError) as info:
        toolchain.find_toolkit()
    text = str(info.value)
    for tried in ("$CUDA_HOME=", "nvcc on PATH: not found", "no-cuda", "nvidia-cuda-nvcc wheel", "Fix:"):
        assert tried in text
    assert 'Fix: pip install "flashjit[cuda]"\n' in text  # exactly the command to run


def test_an_incomplete_wheel_toolkit_says_what_is_missing(tmp_path, monkeypatch):
    """nvcc's wheel without the runtime's headers (or the reverse) is named, not 'not installed'."""
    (tmp_path / "cu13" / "bin").mkdir(parents=True)
    (tmp_path / "cu13" / "bin" / "nvcc").write_text("")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(toolchain, "DEFAULT_HOME", tmp_path / "no-cuda")
    monkeypatch.setattr(toolchain, "_wheel_homes", lambda: [tmp_path / "cu13", tmp_path / "cu12"])
    with pytest.raises(toolchain.ToolchainError, match=r"cu13: no the runtime headers") as info:
        toolchain.find_toolkit()
    assert "cu12" not in str(info.value)  # roots that do not exist are not listed


def test_nvcc_too_old_for_the_gpu(monkeypatch):
    real = _real_toolkit()
    monkeypatch.setattr(toolchain, "supported_archs", lambda nvcc: frozenset({75, 80, 86}))
    with pytest.raises(toolchain.ToolchainError, match="too old for this GPU"):
        toolchain.gencode_flags("sm_90a", real)
    assert toolchain.gencode_flags("sm_80", real) == ["-gencode=arch=compute_80,code=sm_80"]


def test_gencode_for_the_newer_archs(monkeypatch):
    real = _real_toolkit()
    monkeypatch.setattr(toolchain, "supported_archs", lambda nvcc: frozenset({80, 90, 100, 120}))
    assert toolchain.gencode_flags("sm_100a", real) == ["-gencode=arch=compute_100a,code=sm_100a"]
    assert toolchain.gencode_flags("sm_120", real) == ["-gencode=arch=compute_120,code=sm_120"]


@pytest.mark.parametrize("arch, kib", [("sm_80", 163), ("sm_86", 99), ("sm_89", 99), ("sm_90a", 227),
                                       ("sm_100a", 227), ("sm_120", 99)])
def test_shared_memory_limits(arch, kib):
    assert smem_limit_for_arch(arch) == kib * 1024


@pytest.mark.parametrize("arch", ["sm_80", "sm_100a", "sm_120"])
def test_wgmma_stays_sm90a_only(arch):
    with pytest.raises(ValueError, match="builds only for sm_90a"):
        jit.ensure_built(BwdSm90Config("bf16", 128, 64), arch)


# Blackwell runs the sm_80 family (mma.sync, ldmatrix, cp.async): one cheap forward and one cheap
# backward per new arch, compiled for real (built, not run: no Blackwell GPU is lent to us).
NEW_ARCH_BUILDS = [(arch, config) for arch in ("sm_100a", "sm_120") for config in (
    KernelConfig(dtype="fp16", d_head=32, B_r=64, B_c=64, n_warps=4, causal=True),
    BwdConfig("bf16", 32, 4, 64),
)]


@pytest.mark.compile
@pytest.mark.parametrize("arch, config", NEW_ARCH_BUILDS, ids=lambda x: x if isinstance(x, str) else x.name)
def test_sm80_family_builds_for_blackwell(arch, config):
    library = jit.ensure_built(config, arch)
    manifest = cache.Entry(library.parent).manifest()
    assert manifest["arch"] == arch and library.parent.parent.name == arch
    assert f"code={arch}" in " ".join(manifest["flags"])
    kernel = CompiledKernel(library, config.name)  # loads on a GPU-less machine too
    assert kernel.smem_bytes == config.smem_bytes <= smem_limit_for_arch(arch)

"""The JIT pipeline through real nvcc (no GPU needed): compile tests for sm_80 and sm_90a, the cache
key, reuse across processes, concurrency, crashes, corruption, unwritable caches, compile errors."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flashjit import BwdConfig, KernelConfig, cache, jit
from flashjit.launch import CompiledKernel

pytestmark = pytest.mark.compile
REPO = Path(__file__).resolve().parents[1]
CHEAP = KernelConfig(dtype="fp16", d_head=32, B_r=64, B_c=64, n_warps=4)  # ~1.5 s to compile

SUBSET = [  # both dtypes, several head dims, causal, knobs off, both archs
    ("sm_80", KernelConfig(dtype="bf16", d_head=128, causal=True)),
    ("sm_90a", KernelConfig(dtype="bf16", d_head=128)),
    ("sm_80", KernelConfig(dtype="fp16", d_head=64, B_c=128, mma_double_buffer_loads=False)),
    ("sm_90a", KernelConfig(dtype="fp16", d_head=96, B_r=64, causal=True)),
    ("sm_90a", KernelConfig(dtype="bf16", d_head=256, B_r=128, B_c=32, n_warps=8, mma_double_buffer_loads=False)),
    ("sm_80", KernelConfig(dtype="fp16", d_head=160, B_r=64, B_c=32, async_copy=False, eager_load_blocks=False,
                           swizzled=False, optimized_softmax=False)),
    ("sm_90a", BwdConfig("bf16", 128, 8, 64, causal=True)),
    ("sm_80", BwdConfig("fp16", 64, 8, 128, deterministic=True)),
    ("sm_90a", KernelConfig(dtype="fp16", d_head=64, local=True, softcap=True, alibi=True)),
    ("sm_80", BwdConfig("bf16", 96, 4, 64, causal=True, local=True, softcap=True, alibi=True)),
    ("sm_90a", KernelConfig(dtype="bf16", d_head=128, causal=True, dropout=True)),
    ("sm_90a", BwdConfig("bf16", 128, 8, 64, dropout=True)),
    ("sm_90a", BwdConfig("bf16", 256, 8, 64, 4, 32, causal=True)),
    ("sm_80", BwdConfig("bf16", 128, 8, 64, 2, 32, dropout=True)),
    ("sm_80", BwdConfig("fp16", 192, 4, 32, 2, deterministic=True, dropout=True)),
    ("sm_90a", BwdConfig("bf16", 128, 8, 64, causal=True, dropout=True, wgmma=True)),
    ("sm_90a", BwdConfig("fp16", 64, 8, 128, local=True, alibi=True, wgmma=True)),
]


@pytest.mark.parametrize("arch, config", SUBSET, ids=lambda x: x if isinstance(x, str) else x.name)
def test_compile_real_kernels(arch, config):
    library = jit.ensure_built(config, arch)
    entry = cache.Entry(library.parent)
    manifest = entry.manifest()
    assert manifest["config"] == config.name and manifest["arch"] == arch
    assert entry.verified_library() == library
    assert library.parent.name.startswith(config.name + "-")
    kernel = CompiledKernel(library, config.name)  # loads on a GPU-less machine too
    assert kernel.smem_bytes == config.smem_bytes


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)


BUILD = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from flashjit import jit, KernelConfig
print(jit.ensure_built(KernelConfig.from_name({CHEAP.name!r}), "sm_80"))
"""


def test_later_processes_reuse_without_compiling(private_cache):
    env = dict(os.environ, FLASHJIT_CACHE_DIR=str(private_cache))
    first = _run(BUILD, env)
    assert first.returncode == 0, first.stderr
    assert "compiling kernel" in first.stderr and "compiled" in first.stderr  # a user sees it
    second = _run(BUILD, env)
    assert second.returncode == 0, second.stderr
    assert "compiling" not in second.stderr
    assert first.stdout == second.stdout


def test_memo_returns_the_same_loaded_kernel(private_cache):
    a = jit.get_kernel(CHEAP, "sm_80")
    assert jit.get_kernel(CHEAP, "sm_80") is a


def test_eight_processes_one_compile(private_cache):
    env = dict(os.environ, FLASHJIT_CACHE_DIR=str(private_cache))
    procs = [subprocess.Popen([sys.executable, "-c", BUILD], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), [err for _, err, rc in results if rc]
    assert len({out for out, _, _ in results}) == 1
    assert sum("compiling kernel" in err for _, err, _ in results) == 1


def test_sigkill_mid_compile_leaves_nothing_blocking(private_cache):
    env = dict(os.environ, FLASHJIT_CACHE_DIR=str(private_cache))
    victim = subprocess.Popen([sys.executable, "-c", BUILD], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    staging = private_cache / "v1" / "staging"
    deadline = time.time() + 120
    while time.time() < deadline and not list(staging.glob("*/build/*")):
        time.sleep(0.05)
    assert victim.poll() is None, "the compile finished before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not cache.entries()  # nothing was published half-way
    library = jit.ensure_built(CHEAP, "sm_80")  # the lock is free again; the stale staging is swept
    assert cache.Entry(library.parent).verified_library() == library
    leftovers = [p for p in staging.iterdir()] if staging.exists() else []
    assert not leftovers, leftovers


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_library_is_detected_and_rebuilt(private_cache, damage, caplog):
    library = jit.ensure_built(CHEAP, "sm_80")
    data = library.read_bytes()
    library.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-100] + bytes(100))
    assert cache.Entry(library.parent).verified_library() is None
    rebuilt = jit.ensure_built(CHEAP, "sm_80")
    assert rebuilt == library and rebuilt.read_bytes() != b"" and cache.Entry(library.parent).verified_library()
    assert "corrupted" in caplog.text


def test_unwritable_cache_dir_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(cache.CacheError, match="FLASHJIT_CACHE_DIR"):
        jit.ensure_built(CHEAP, "sm_80")


def test_compile_error_carries_log_and_source_and_leaves_no_entry(private_cache, monkeypatch):
    monkeypatch.setattr(jit.codegen, "render", lambda config: '#error "flashjit test: deliberate failure"\n')
    with pytest.raises(jit.CompileError) as info:
        jit.ensure_built(CHEAP, "sm_80")
    err = info.value
    assert "deliberate failure" in err.log_tail and "deliberate failure" in str(err)
    assert err.source_path.is_file() and str(err.source_path) in str(err)
    assert not cache.entries()
    staging = private_cache / "v1" / "staging"
    assert not staging.exists() or not list(staging.iterdir())


def test_key_covers_the_inputs():
    toolkit = jit.toolchain.find_toolkit()
    flags = jit.build_flags("sm_80", toolkit)
    base = jit.key_inputs(CHEAP, "sm_80", toolkit, flags)
    for field in ("config", "arch", "nvcc", "cuda_home", "flashjit", "sources", "flags", "torch"):
        assert field in base
        changed = dict(base, **{field: "something else"})
        assert cache.key_hash(changed) != cache.key_hash(base), field


def test_cli_precompile_list_clear(private_cache):
    env = dict(os.environ, FLASHJIT_CACHE_DIR=str(private_cache))
    cli = [sys.executable, "-m", "flashjit"]
    pre = subprocess.run(cli + ["precompile", "--arch", "sm_90a", "--jobs", "2", CHEAP.name], env=env, cwd=REPO,
                         capture_output=True, text=True)
    assert pre.returncode == 0, pre.stderr
    listing = subprocess.run(cli + ["cache", "list"], env=env, cwd=REPO, capture_output=True, text=True)
    assert CHEAP.name in listing.stdout and "1 kernels" in listing.stdout
    info = subprocess.run(cli + ["info"], env=env, cwd=REPO, capture_output=True, text=True)
    assert info.returncode == 0 and "1 kernels" in info.stdout and "nvcc" in info.stdout
    assert "FLASHJIT_CACHE_DIR" in info.stdout
    cleared = subprocess.run(cli + ["cache", "clear"], env=env, cwd=REPO, capture_output=True, text=True)
    assert "removed 1 kernels" in cleared.stdout
    assert not cache.entries()

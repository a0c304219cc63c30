"""Prebuilt bundles (issue 17 item 2): `precompile --out DIR` writes a relocatable bundle;
FLASHJIT_PREBUILT=DIR[:DIR...] is searched before the cache, reading files only (no nvcc, no writes);
FLASHJIT_DISABLE_JIT=1 turns a miss into an error naming the precompile command. One real compile
(the module's bundle); every other bundle here is a copy of it, edited."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from flashjit import KernelConfig, __main__ as cli, cache, codegen, jit, toolchain

pytestmark = pytest.mark.compile
REPO = Path(__file__).resolve().parents[1]
CHEAP = KernelConfig(dtype="fp16", d_head=32, B_r=64, B_c=64, n_warps=4)  # as tests/test_jit_cache.py
OTHER = KernelConfig(dtype="bf16", d_head=32, B_r=64, B_c=64, n_warps=4)  # never built here
LOOKUP_TARGET_S = 0.1  # issue 17: a lookup from a bundle with no nvcc, in a fresh process


def _flashjit(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashjit", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def _chmod_tree(root: Path, writable: bool) -> None:
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        if writable:
            path.chmod(mode | stat.S_IWUSR)
        else:
            path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _snapshot(root: Path) -> dict:
    """Every path under root with its size and mtime: root ignores chmod, this does not."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(bundle, the cache dir the precompile was given, its output): a read-only one-kernel bundle."""
    base = tmp_path_factory.mktemp("bundles")
    bundle, user_cache = base / "bundle", base / "user-cache"
    env = dict(os.environ, FLASHJIT_CACHE_DIR=str(user_cache))
    env.pop("FLASHJIT_PREBUILT", None)
    result = _flashjit("precompile", "--arch", "sm_80", "--out", str(bundle), CHEAP.name, env=env)
    assert result.returncode == 0, result.stderr
    _chmod_tree(bundle, writable=False)
    yield bundle, user_cache, result
    _chmod_tree(bundle, writable=True)


@pytest.fixture
def bundle(built) -> Path:
    return built[0]


def _copy(bundle: Path, dst: Path) -> Path:
    """A writable copy of the bundle elsewhere (bundles are relocatable)."""
    shutil.copytree(bundle, dst)
    _chmod_tree(dst, writable=True)
    return dst


def _entry(root: Path) -> Path:
    (entry,) = (root / "sm_80").iterdir()
    return entry


def test_precompile_out_writes_a_bundle(built, private_cache, tmp_path):
    bundle, user_cache, result = built
    assert "0 cached, 1 to compile" in result.stdout and f"FLASHJIT_PREBUILT={bundle}" in result.stdout
    assert sorted(p.name for p in bundle.iterdir()) == ["flashjit-bundle.json", "sm_80"]  # no locks, no staging
    assert not user_cache.exists()  # the user's cache is not involved
    toolkit = toolchain.find_toolkit()
    top = json.loads((bundle / "flashjit-bundle.json").read_text())
    assert top["format"] == cache.BUNDLE_FORMAT
    assert top["toolchain"] == json.loads(json.dumps(jit.toolchain_inputs(toolkit)))
    assert top["toolchain"]["nvcc"] == toolkit.version and top["toolchain"]["cuda_home"] == str(toolkit.home)
    assert top["built_with"] == jit.local_inputs()  # flashjit, codegen ABI, sources hash, torch and its CUDA
    assert top["flags"] == {"sm_80": jit.build_flags("sm_80", toolkit)}
    assert top["kernels"] == {"sm_80": [CHEAP.name]}
    # <arch>/<name>-<key>/ as in the cache, with the very key the cache would use on this machine
    entry = cache.Entry(_entry(bundle))
    assert entry.path.name == f"{CHEAP.name}-{cache.key_hash(cli.key_inputs(CHEAP, 'sm_80'))}"
    assert sorted(p.name for p in entry.path.iterdir()) == ["kernel.cubin", "kernel.so", "manifest.json", "source.cu"]
    assert entry.verified_library() == entry.library

    # Again into a writable copy: found there, nothing compiled; a new arch joins the same manifest.
    copy = _copy(bundle, tmp_path / "copy")
    env = dict(os.environ, FLASHJIT_CACHE_DIR=str(private_cache))
    again = _flashjit("precompile", "--arch", "sm_80", "--out", str(copy), CHEAP.name, env=env)
    assert again.returncode == 0 and "1 cached, 0 to compile" in again.stdout, again.stderr
    dry = _flashjit("precompile", "--arch", "sm_86", "--out", str(copy), "--dry-run", CHEAP.name, env=env)
    assert dry.stdout.splitlines() == [f"compile  sm_86  {CHEAP.name}"] and "nothing was built" in dry.stderr
    assert json.loads((copy / "flashjit-bundle.json").read_text())["flags"].keys() == {"sm_80"}  # dry: untouched

    # A directory that is something else is refused, before anything is compiled.
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    refused = _flashjit("precompile", "--arch", "sm_80", "--out", str(junk), CHEAP.name, env=env)
    assert refused.returncode == 2 and "not a flashjit bundle" in refused.stderr
    assert sorted(p.name for p in junk.iterdir()) == ["notes.txt"]


def test_a_bundle_of_another_build_refuses_more_kernels(bundle, private_cache, tmp_path):
    copy = _copy(bundle, tmp_path / "copy")
    top = json.loads((copy / "flashjit-bundle.json").read_text())
    top["built_with"]["flashjit"] = "0.0.1"
    (copy / "flashjit-bundle.json").write_text(json.dumps(top))
    env = dict(os.environ, FLASHJIT_CACHE_DIR=str(private_cache))
    refused = _flashjit("precompile", "--arch", "sm_80", "--out", str(copy), OTHER.name, env=env)
    assert refused.returncode == 2 and "built differently" in refused.stderr and "0.0.1" in refused.stderr
    assert len(list((copy / "sm_80").iterdir())) == 1


# A fresh process as on a fleet machine: no system toolkit and no CUDA wheels visible to discovery, an
# nvcc on PATH that only records that it ran, every subprocess recorded, a cache it cannot create.
FLEET = r"""
import json, subprocess, sys, time
from pathlib import Path
import torch  # an application has it imported already; not part of the measured lookup

started = []
real_init = subprocess.Popen.__init__
def recording_init(self, args, *a, **k):
    started.append(str(args))
    return real_init(self, args, *a, **k)
subprocess.Popen.__init__ = recording_init

t0 = time.perf_counter()
from flashjit import jit, toolchain, KernelConfig
t1 = time.perf_counter()
toolchain.DEFAULT_HOME = Path("/nonexistent/cuda")  # hide /usr/local/cuda
toolchain._wheel_homes = lambda: []                 # hide site-packages/nvidia/cu13 (the [cuda] wheels)
config = KernelConfig.from_name(sys.argv[1])
t2 = time.perf_counter()
kernel = jit.get_kernel(config, "sm_80")
t3 = time.perf_counter()
during_lookup = list(started)
nvcc_log = Path(sys.argv[2])
nvcc_runs = len(nvcc_log.read_text().splitlines()) if nvcc_log.exists() else 0
try:  # the detector works, and there really is no toolchain here
    toolchain.find_toolkit()
    toolkit = "FOUND"
except toolchain.ToolchainError:
    toolkit = "none"
print(json.dumps({"path": str(kernel.path), "smem": kernel.smem_bytes, "import_s": t1 - t0, "lookup_s": t3 - t2,
                  "subprocesses": during_lookup, "nvcc_runs": nvcc_runs, "toolkit": toolkit,
                  "nvcc_runs_after_find": len(nvcc_log.read_text().splitlines()) if nvcc_log.exists() else 0}))
"""


def _fleet_env(tmp_path: Path, **extra) -> tuple[dict, Path]:
    bin_dir, log = tmp_path / "bin", tmp_path / "nvcc.log"
    bin_dir.mkdir(exist_ok=True)
    nvcc = bin_dir / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexit 1\n')
    nvcc.chmod(0o755)
    blocker = tmp_path / "a-file"
    blocker.write_text("the user cache would have to be a directory under this file")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "FLASHJIT_PREBUILT")}
    dirs = [str(bin_dir)] + [d for d in ("/usr/bin", "/bin") if not os.path.exists(os.path.join(d, "nvcc"))]
    env.update(PATH=os.pathsep.join(dirs), FLASHJIT_CACHE_DIR=str(blocker / "cache"), **extra)
    return env, log


def test_fresh_process_loads_from_a_read_only_bundle_without_nvcc(bundle, tmp_path):
    env, log = _fleet_env(tmp_path, FLASHJIT_PREBUILT=str(bundle))
    before = _snapshot(bundle)
    assert not os.access(_entry(bundle), os.W_OK) or os.geteuid() == 0  # read-only (root ignores it: snapshot)
    result = subprocess.run([sys.executable, "-c", FLEET, CHEAP.name, str(log)], env=env, capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["path"] == str(_entry(bundle) / "kernel.so") and out["smem"] == CHEAP.smem_bytes
    assert out["subprocesses"] == [] and out["nvcc_runs"] == 0, out  # nvcc (or anything else) never ran
    assert out["toolkit"] == "none" and out["nvcc_runs_after_find"] > 0, out  # yet discovery would run it
    assert _snapshot(bundle) == before  # nothing written into the bundle
    assert not (tmp_path / "a-file").is_dir()
    print(f"bundle lookup {out['lookup_s'] * 1e3:.1f} ms (import flashjit {out['import_s'] * 1e3:.1f} ms)")
    assert out["lookup_s"] < LOOKUP_TARGET_S, out


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_tampered_library_is_not_loaded(bundle, private_cache, tmp_path, monkeypatch, damage, caplog):
    copy = _copy(bundle, tmp_path / "copy")
    library = _entry(copy) / "kernel.so"
    data = library.read_bytes()
    library.write_bytes(data[:-64] + bytes(b ^ 0xFF for b in data[-64:]) if damage == "flip"
                        else data[: len(data) // 2])
    loaded = []
    monkeypatch.setattr(jit, "CompiledKernel", lambda path, name: loaded.append(path))
    monkeypatch.setenv("FLASHJIT_PREBUILT", str(copy))
    monkeypatch.setenv("FLASHJIT_DISABLE_JIT", "1")
    with pytest.raises(jit.JitDisabledError) as info:
        jit.get_kernel(CHEAP, "sm_80")
    message = str(info.value)
    assert "damaged" in message and str(_entry(copy)) in message and "not loaded" in message
    assert f"python -m flashjit precompile --arch sm_80 --out {copy} {CHEAP.name}" in message
    assert loaded == []
    assert "is damaged" in caplog.text  # warned (stderr when logging is not configured)

    # With JIT allowed, a damaged bundle entry is passed over for the cache: it would compile there.
    monkeypatch.delenv("FLASHJIT_DISABLE_JIT")
    monkeypatch.setattr(jit, "_build", _stop)
    with pytest.raises(_WouldCompile) as would:
        jit.get_kernel(CHEAP, "sm_80")
    assert str(would.value.args[0]).startswith(str(private_cache)) and loaded == []


class _WouldCompile(Exception):
    pass


def _stop(entry, *args, **kwargs):
    raise _WouldCompile(entry.path)


def _torch_version(mp):
    import torch

    mp.setattr(torch, "__version__", torch.__version__ + ".post1")


OTHER_BUILDS = {  # this process differs from the bundle's build in one input the key takes locally
    "flashjit": lambda mp: mp.setattr(jit, "__version__", jit.__version__ + ".post1"),
    "sources": lambda mp: mp.setattr(codegen, "sources_hash", lambda: "0" * 64),
    "codegen_abi": lambda mp: mp.setattr(codegen, "ABI_VERSION", codegen.ABI_VERSION + 1),
    "torch": _torch_version,
}


@pytest.mark.parametrize("change", OTHER_BUILDS)
def test_a_bundle_of_another_build_is_a_miss(bundle, private_cache, monkeypatch, change):
    monkeypatch.setenv("FLASHJIT_PREBUILT", str(bundle))
    monkeypatch.setenv("FLASHJIT_DISABLE_JIT", "1")
    assert jit.ensure_built(CHEAP, "sm_80") == _entry(bundle) / "kernel.so"  # the control: a hit
    with pytest.MonkeyPatch.context() as mp:
        OTHER_BUILDS[change](mp)
        with pytest.raises(jit.JitDisabledError) as info:
            jit.ensure_built(CHEAP, "sm_80")
        monkeypatch.delenv("FLASHJIT_DISABLE_JIT")
        mp.setattr(jit, "_build", _stop)
        with pytest.raises(_WouldCompile):  # and with JIT allowed it compiles into the cache
            jit.ensure_built(CHEAP, "sm_80")
    assert f"no entry for this kernel; it was built with {change} " in str(info.value)


MISS = r"""
import sys
from pathlib import Path
from flashjit import jit, toolchain, KernelConfig
toolchain.DEFAULT_HOME = Path("/nonexistent/cuda")  # as FLEET: no toolchain at all
toolchain._wheel_homes = lambda: []
try:
    jit.get_kernel(KernelConfig.from_name(sys.argv[1]), "sm_80")
except jit.JitDisabledError as exc:
    print(exc)
    sys.exit(3)
"""


def test_disable_jit_with_an_empty_bundle_names_the_precompile_command(bundle, private_cache, tmp_path):
    empty = _copy(bundle, tmp_path / "empty bundle")  # a space: the command quotes the path
    shutil.rmtree(empty / "sm_80")
    env, log = _fleet_env(tmp_path, FLASHJIT_PREBUILT=str(empty), FLASHJIT_DISABLE_JIT="1")
    result = subprocess.run([sys.executable, "-c", MISS, CHEAP.name], env=env, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    message = result.stdout
    assert message.startswith(f"flashjit: kernel {CHEAP.name} for sm_80 is not prebuilt")
    assert "FLASHJIT_DISABLE_JIT=1" in message
    assert f"bundle {empty} (FLASHJIT_PREBUILT): no entry for this kernel" in message
    assert "the kernel cache" in message and "not searched, its keys need nvcc" in message
    command = f"python -m flashjit precompile --arch sm_80 --out '{empty}' {CHEAP.name}"
    assert command in message
    # The command is exactly right: run here (with nvcc), it would compile that one kernel into that bundle.
    args = command.split(" ", 3)[3]
    dry = subprocess.run(f"{sys.executable} -m flashjit {args} --dry-run", shell=True, cwd=REPO, capture_output=True,
                         text=True, env=dict(os.environ, FLASHJIT_CACHE_DIR=str(private_cache)))
    assert dry.returncode == 0 and dry.stdout.splitlines() == [f"compile  sm_80  {CHEAP.name}"], dry.stderr


def test_disable_jit_without_bundles_serves_the_cache_and_says_dir(bundle, private_cache, monkeypatch):
    monkeypatch.delenv("FLASHJIT_PREBUILT", raising=False)
    monkeypatch.setenv("FLASHJIT_DISABLE_JIT", "1")
    with pytest.raises(jit.JitDisabledError) as info:
        jit.ensure_built(CHEAP, "sm_80")
    assert "no bundles (FLASHJIT_PREBUILT is not set)" in str(info.value)
    assert f"the kernel cache {private_cache / 'v1'}: no entry" in str(info.value)
    assert f"precompile --arch sm_80 --out DIR {CHEAP.name}" in str(info.value)
    cached = _copy(_entry(bundle), private_cache / "v1" / "sm_80" / _entry(bundle).name)  # same key here
    assert jit.ensure_built(CHEAP, "sm_80") == cached / "kernel.so"


def test_layering_first_bundle_wins_then_the_cache(bundle, private_cache, tmp_path, monkeypatch, caplog):
    a, b = _copy(bundle, tmp_path / "a"), _copy(bundle, tmp_path / "b")
    empty = _copy(bundle, tmp_path / "empty")
    shutil.rmtree(empty / "sm_80")
    cached = _copy(_entry(bundle), private_cache / "v1" / "sm_80" / _entry(bundle).name)
    monkeypatch.setattr(jit, "_build", _stop)  # nothing here may compile
    for order, expect in [((a, b), a), ((b, a), b), ((empty, b, a), b), ((tmp_path / "missing", a), a),
                          ((empty,), None), ((), None)]:
        monkeypatch.setenv("FLASHJIT_PREBUILT", os.pathsep.join(map(str, order)))
        found = jit.ensure_built(CHEAP, "sm_80")
        assert found == (_entry(expect) if expect else cached) / "kernel.so", order
    assert f"FLASHJIT_PREBUILT names {tmp_path / 'missing'}: no such directory" in caplog.text
    shutil.rmtree(cached)  # neither bundles nor cache: it compiles (into the cache)
    monkeypatch.setenv("FLASHJIT_PREBUILT", str(empty))
    with pytest.raises(_WouldCompile) as would:
        jit.ensure_built(CHEAP, "sm_80")
    assert would.value.args[0] == cached

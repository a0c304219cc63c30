"""The JIT pipeline through real nvcc (no GPU needed): compile tests for sm_80 and sm_90a, the cache
key, reuse across processes, concurrency, crashes, corruption, unwritable caches, compile errors."""
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from flashjit import (BwdConfig, BwdSm90Config, FwdSm90Config, KernelConfig, cache, codegen, get_kernels_to_build, jit,
                      toolchain)
from flashjit.launch import CompiledKernel, cubin_kernels

pytestmark = pytest.mark.compile
REPO = Path(__file__).resolve().parents[1]
NVCC_JOBS = max(2, os.cpu_count() or 2)  # scripts/ptxas_notes.py's nvcc processes at once
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
    ("sm_90a", BwdSm90Config("bf16", 128, 64, causal=True, dropout=True)),
    ("sm_90a", BwdSm90Config("fp16", 64, 128, local=True, alibi=True)),
    ("sm_90a", BwdSm90Config("bf16", 128, 64, causal=True, head_split=True)),  # + the dK/dV conversion kernel
    ("sm_90a", BwdSm90Config("bf16", 64, 128, dropout=True, tma=True)),  # the producer warpgroup, TMA maps
    # the wide kernel (d_head 129-256): warpgroups split by product, dQ by bulk reductions; + head split
    ("sm_90a", BwdSm90Config("fp16", 160, 64, causal=True, softcap=True, dropout=True, tma=True)),
    ("sm_90a", BwdSm90Config("bf16", 256, 64, local=True, alibi=True, head_split=True, tma=True)),
    ("sm_90a", FwdSm90Config("bf16", 128)),
    ("sm_90a", FwdSm90Config("fp16", 64, 128, 128, 4, True, True, True, causal=True, local=True, softcap=True,
                             alibi=True, dropout=True)),
    ("sm_90a", FwdSm90Config("bf16", 64, 192, 128, 4, True, False, True, causal=True, cross_tile=True)),  # two Q stages
    ("sm_90a", FwdSm90Config("bf16", 256, 128, 64, 2, False, False, dropout=True)),
    # dropout's masks from the producer's mask warps (slots beside the tiles) in a cross-tile causal kernel
    ("sm_90a", FwdSm90Config("bf16", 128, persistent=True, cross_tile=True, causal=True, half_blocks=True,
                             dropout=True, mask_warps=True)),
    ("sm_90a", FwdSm90Config("bf16", 256, 128, 80)),  # d256's default: FlashAttention-3's 80-key tile
    # the softmax cuts: lazy rescaling's branch, the row sums' wgmma N = 8 and the ones in shared memory
    ("sm_90a", FwdSm90Config("bf16", 128, persistent=True, lazy_rescale=True, mma_sums=True)),
    # two CTAs an SM: launch bounds of two blocks, 104 registers a consumer thread
    ("sm_90a", FwdSm90Config("bf16", 64, 128, 64, 2, False, False, True, causal=True, two_ctas=True)),
    # Decoding (kvcache): the split-KV combine, a programmatic dependent launch where sm_90 is built.
    ("sm_90a", KernelConfig(dtype="bf16", d_head=128, B_r=64, B_c=128, causal=True, kvcache=True)),
    ("sm_80", KernelConfig(dtype="fp16", d_head=64, B_r=64, B_c=128, kvcache=True)),
    # A value head dim below q/k's (MLA-style d_qk != d_v): every family that has it.
    ("sm_90a", KernelConfig(d_head=192, B_r=64, B_c=64, mma_double_buffer_loads=False, causal=True, d_v=128)),
    ("sm_90a", BwdConfig("bf16", 192, 8, 64, 4, 32, d_v=128)),
    ("sm_80", BwdConfig("fp16", 128, 8, 64, 2, 32, deterministic=True, dropout=True, d_v=64)),
    ("sm_90a", FwdSm90Config("bf16", 192, 128, 96, causal=True, d_v=128)),
]


@pytest.mark.parametrize("arch, config", SUBSET, ids=lambda x: x if isinstance(x, str) else x.name)
def test_compile_real_kernels(arch, config):
    library = jit.ensure_built(config, arch)
    entry = cache.Entry(library.parent)
    manifest = entry.manifest()
    assert manifest["config"] == config.name and manifest["arch"] == arch
    assert not manifest.get("ptxas_notes")  # no wgmma serialized by ptxas (jit.perf_losses)
    assert entry.verified_library() == library
    assert library.parent.name.startswith(config.name + "-")
    kernel = CompiledKernel(library, config.name)  # loads on a GPU-less machine too
    assert kernel.smem_bytes == config.smem_bytes
    # The split build's contract (kernels/common/launch.cuh): the launcher finds each kernel in the cubin
    # by its template's name, so every kernel there is the one instantiation of a name it launches ...
    launched = set(re.findall(r"FLASHJIT_KERNEL\((\w+),", "".join(
        p.read_text() for p in codegen.kernels_dir().rglob("*.cuh"))))
    kernels = cubin_kernels((library.parent / cache.CUBIN).read_bytes())
    assert sorted(kernels) == sorted(n for n, info, other in _elf_symbols(library.parent / cache.CUBIN, 2)
                                     if info == 0x12 and other & 0x10)
    owners = [[t for t in launched if f"{len(t)}{t}I" in name] for name in kernels]
    assert kernels and all(len(o) == 1 for o in owners), list(zip(kernels, owners))
    assert len({o[0] for o in owners}) == len(kernels), kernels
    # ... and the launcher exports nothing of flashjit's but its C ABI: its statics stay its own in a process
    # of many libraries (what else it exports is the C++ library's own template code, the same in all).
    exported = {name for name, info, other in _elf_symbols(library, 11) if info >> 4 != 0 and name}
    abi = {n for n in exported if n.startswith("flashjit_")}
    assert len(abi) == 6 and not [n for n in exported - abi if "flashjit" in n], exported


def test_a_toolkit_before_cuda_12_8_builds_one_whole_library(private_cache, monkeypatch):
    """Without the runtime's library API (cudart before 12.8) nvcc builds kernels and launcher as one
    library, as before the split: no cubin in the entry, none recorded, and it loads (no image to set)."""
    monkeypatch.setattr(jit, "SPLIT_BUILD_FROM", (99, 0))  # this toolkit, treated as too old for the split
    toolkit = toolchain.find_toolkit()
    assert "-cubin" not in jit.build_flags("sm_80", toolkit)
    library = jit.ensure_built(CHEAP, "sm_80")
    entry = cache.Entry(library.parent)
    assert sorted(p.name for p in entry.path.iterdir()) == ["kernel.so", "manifest.json", "source.cu"]
    assert list(entry.manifest()["binaries"]) == ["kernel.so"] and entry.verified_library() == library
    kernel = CompiledKernel(library, CHEAP.name)
    assert kernel.smem_bytes == CHEAP.smem_bytes and not hasattr(kernel.lib, "flashjit_set_image")
    monkeypatch.setattr(jit, "SPLIT_BUILD_FROM", (0, 0))  # and the split build's entry records both binaries
    split = jit.ensure_built(CHEAP, "sm_80")
    assert split != library and sorted(cache.Entry(split.parent).manifest()["binaries"]) == ["kernel.cubin", "kernel.so"]


def test_a_build_inside_an_except_block_completes(private_cache, monkeypatch):
    """The common `try: import flash_attn / except ImportError: <use flashjit>` pattern: a first call
    compiled while an exception is being handled must not take it for its own failure."""
    class SlowNvcc(subprocess.Popen):  # nvcc still running when the launcher is done, as for a big kernel
        def __init__(self, args, **kwargs):
            super().__init__(["sh", "-c", 'sleep 2; exec "$@"', "nvcc", *args], **kwargs)

    monkeypatch.setattr(jit, "subprocess", types.SimpleNamespace(
        Popen=SlowNvcc, STDOUT=subprocess.STDOUT, CalledProcessError=subprocess.CalledProcessError))
    try:
        raise ImportError("No module named 'flash_attn'")
    except ImportError:
        library = jit.ensure_built(CHEAP, "sm_80")
    assert cache.Entry(library.parent).verified_library() == library


def _elf_symbols(path: Path, section_type: int) -> list[tuple[str, int, int]]:
    """(name, st_info, st_other) of the defined symbols of an ELF64 file's SHT_SYMTAB (2) or SHT_DYNSYM (11);
    written apart from flashjit.launch.cubin_kernels, which it checks."""
    import struct

    data = path.read_bytes()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    out = []
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != section_type:
            continue
        strtab = sections[link][4]
        for at in range(offset, offset + size, entsize):
            name, info, other, shndx = struct.unpack_from("<IBBH", data, at)
            if shndx:  # defined here
                out.append((data[strtab + name:data.index(b"\0", strtab + name)].decode(), info, other))
    return out


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


def _fake_toolkit(home: Path, real: Path, version: str | None = None, log: Path | None = None) -> Path:
    """A toolkit root at `home` that is `real` except for bin/nvcc, a wrapper script (as on our own
    machines) that can claim another `--version` and can append each command line to `log`."""
    (home / "bin").mkdir(parents=True, exist_ok=True)
    for item in real.iterdir():
        if item.name != "bin" and not (home / item.name).exists():
            (home / item.name).symlink_to(item)
    for item in (real / "bin").iterdir():
        if item.name != "nvcc" and not (home / "bin" / item.name).exists():
            (home / "bin" / item.name).symlink_to(item)
    lines = ["#!/bin/sh"]
    if log is not None:
        lines.append(f'echo "$*" >> "{log}"')
    if version is not None:
        release = ".".join(version.split(".")[:2])
        lines.append(f'case " $* " in *" --version "*) '
                     f'echo "Cuda compilation tools, release {release}, V{version}"; exit 0;; esac')
    lines.append(f'exec "{real / "bin" / "nvcc"}" "$@"')
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("\n".join(lines) + "\n")
    nvcc.chmod(0o755)
    return home


# README.md (the cache paragraph) and DESIGN.md principle 3 claim it for sixteen processes.
N_PROCESSES = 16

RACE = f"""
import logging, os, sys, time
sys.path.insert(0, {str(REPO)!r})
logging.basicConfig(level=logging.INFO, format="%(message)s")  # shows the lock's "waiting for" line
import torch  # the key reads its version: imported before the start line, like everything else
from flashjit import jit, toolchain, KernelConfig
config = KernelConfig.from_name({CHEAP.name!r})
jit.build_flags("sm_80", toolchain.find_toolkit())  # nvcc --version/--list-gpu-code, before the start line
barrier = sys.argv[1]
open(os.path.join(barrier, str(os.getpid())), "w").close()
while not os.path.exists(os.path.join(barrier, "go")):
    time.sleep(0.005)
kernel = jit.get_kernel(config, "sm_80")  # ensure_built, then dlopen the library
print(kernel.path, kernel.smem_bytes)
"""


@pytest.mark.heavy
def test_sixteen_processes_one_compile(private_cache, tmp_path):
    """N_PROCESSES processes ask for one cold kernel at the same moment (a barrier releases them once
    every one has imported torch and found nvcc): nvcc compiles it once, all load the same file."""
    nvcc_log = tmp_path / "nvcc.log"
    fake_home = _fake_toolkit(tmp_path / "cuda", toolchain.find_toolkit().home, log=nvcc_log)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = dict(os.environ, FLASHJIT_CACHE_DIR=str(private_cache), CUDA_HOME=str(fake_home))
    env.pop("CUDA_PATH", None)
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(barrier)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(N_PROCESSES)]
    try:
        deadline = time.time() + 300
        while len(list(barrier.iterdir())) < N_PROCESSES:
            dead = [p for p in procs if p.poll() is not None]
            assert not dead, dead[0].communicate()[1]
            assert time.time() < deadline, "the processes did not all reach the start line"
            time.sleep(0.05)
        (barrier / "go").touch()
        results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(rc == 0 for _, _, rc in results), [err for _, err, rc in results if rc]
    compiles = [line for line in nvcc_log.read_text().splitlines() if re.search(r"-cubin .*source\.cu\b", line)]
    assert len(compiles) == 1, compiles  # what nvcc itself was asked to do
    assert sum(err.count("compiling kernel") for _, err, _ in results) == 1  # and what users were told
    # The test raced them for real: every other process found the lock held and waited for it.
    waited = sum("waiting for another process" in err for _, err, _ in results)
    assert waited == N_PROCESSES - 1, [err for _, err, _ in results]
    (entry, manifest, _), = cache.entries()
    assert {out for out, _, _ in results} == {f"{entry.library} {CHEAP.smem_bytes}\n"}
    assert entry.verified_library() == entry.library and manifest["cuda_home"] == str(fake_home)
    staging = private_cache / "v1" / "staging"
    assert not staging.exists() or not list(staging.iterdir())


def _session_members(sid: int) -> list[tuple[int, str, int]]:
    """(pid, command name, process group) of every live (not zombie) process in session `sid`."""
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        state, _ppid, pgrp, session = stat[stat.rindex(")") + 2:].split()[:4]
        if int(session) == sid and state not in ("Z", "X"):
            members.append((int(pid), comm, int(pgrp)))
    return members


def _kill_session(sid: int) -> None:
    """SIGKILL every process group in session `sid`, as a job scheduler or a cgroup kill does.
    os.killpg(sid) alone is not enough: ninja runs each build command in a process group of its
    own, so nvcc and cicc would outlive it."""
    os.killpg(sid, signal.SIGKILL)  # the victim and ninja first: nothing new gets started
    for _ in range(100):
        groups = {pgrp for _, _, pgrp in _session_members(sid)}
        if not groups:
            return
        for pgrp in groups:
            try:
                os.killpg(pgrp, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)


COMPILER_PROCESSES = {"nvcc", "cicc", "ptxas", "cudafe++", "fatbinary", "nvlink", "cc1plus"}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process sessions from /proc")
@pytest.mark.parametrize("kill", ["session", "parent"])
def test_sigkill_mid_compile_leaves_nothing_blocking(private_cache, tmp_path, kill):
    """SIGKILL a build while nvcc is running, then run the next build at once.
    session: every process of the build dies (a job scheduler, a cgroup OOM kill).
    parent: only the Python process dies (kill -9 PID, the OOM killer's pick); ninja, nvcc and cicc
    run on as orphans, writing into the dead build's staging directory while the next build starts.
    Either way nothing is published half-way, the lock is free, the next build sweeps the dead
    build's staging directory and publishes, and nothing is left behind."""
    env = dict(os.environ, FLASHJIT_CACHE_DIR=str(private_cache))
    # The next run waits at a start line, torch imported, so that it starts the moment the kill is done.
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    nxt = subprocess.Popen([sys.executable, "-c", RACE, str(barrier)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen([sys.executable, "-c", BUILD], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    staging = private_cache / "v1" / "staging"
    try:
        deadline = time.time() + 120
        compiling = []
        while time.time() < deadline and victim.poll() is None:
            compiling = [m for m in _session_members(victim.pid) if m[1] in COMPILER_PROCESSES]
            if compiling and list(staging.glob("*/build/*")):
                break
            time.sleep(0.01)
        assert victim.poll() is None and compiling, "the compile finished (or never started) before the kill"
        if kill == "session":
            _kill_session(victim.pid)
        else:
            os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        survivors = _session_members(victim.pid)
        if kill == "session":
            assert not survivors, f"outlived the killed build: {survivors}"
        else:  # an orphaned compile lasts about a second more for this kernel: the race below is real
            assert any(comm in COMPILER_PROCESSES for _, comm, _ in survivors), survivors
        assert not cache.entries()  # nothing was published half-way
        stale = list(staging.iterdir())
        assert len(stale) == 1 and f".{victim.pid}." in stale[0].name, stale  # the dead build's directory
        while not list(barrier.iterdir()):
            assert nxt.poll() is None, nxt.communicate()[1]
            time.sleep(0.01)
        (barrier / "go").touch()
        # The next run must not wait on the dead holder's lock (a lock file that outlived it would hang it).
        out, err = nxt.communicate(timeout=60)
        assert nxt.returncode == 0, err
        deadline = time.time() + 30  # let orphans finish, then look at what they left
        while _session_members(victim.pid) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        for proc in (nxt, victim):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if _session_members(victim.pid):
            _kill_session(victim.pid)
    assert "compiling kernel" in err
    (entry, _, _), = cache.entries()
    assert out.split()[0] == str(entry.library) and entry.verified_library() == entry.library
    assert stale[0].name.startswith(entry.path.name + ".")
    assert not list(staging.iterdir())  # the dead build's staging directory was swept


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


def test_cache_dir_through_a_symlink_to_a_missing_directory_is_created(tmp_path, monkeypatch):
    """FLASHJIT_CACHE_DIR naming a symlink whose target does not exist yet: the target is made (a fresh
    machine whose cache link points at a scratch directory), not a "File exists" error."""
    (tmp_path / "link").symlink_to(tmp_path / "scratch" / "flashjit")
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(tmp_path / "link"))
    root = cache.root()
    assert root.is_dir() and (tmp_path / "scratch" / "flashjit").is_dir()


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


class _WouldCompile(Exception):
    pass


def _stop_before_compiling(entry, *args, **kwargs):
    raise _WouldCompile(entry.path)


def _entry_dir(config: KernelConfig = CHEAP, arch: str = "sm_80") -> Path:
    """The entry directory ensure_built uses for (config, arch) in the current environment: its
    real toolkit lookup, flags, key_inputs, key_hash and Entry.for_key, stopped just before it would
    compile (or the published entry it returns, when there is one)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jit, "_build", _stop_before_compiling)
        try:
            return jit.ensure_built(config, arch).parent
        except _WouldCompile as stop:
            return stop.args[0]


def _same_entry_but_key(a: Path, b: Path) -> None:
    """a and b are the same config's entries for the same arch under different keys."""
    assert a.parent == b.parent and a.name.rsplit("-", 1)[0] == b.name.rsplit("-", 1)[0]
    assert a.name != b.name, a


def test_entry_dir_is_where_ensure_built_publishes(private_cache):
    predicted = _entry_dir()
    library = jit.ensure_built(CHEAP, "sm_80")
    assert library.parent == predicted and predicted.name.startswith(CHEAP.name + "-")
    assert _entry_dir() == predicted


def test_key_follows_every_byte_of_the_kernel_sources(private_cache, tmp_path):
    """A one-byte edit of a real template (or of a header it includes) gives a new entry; undoing
    the edit gives the old one back."""
    tree = tmp_path / "kernels"
    shutil.copytree(codegen.kernels_dir(), tree)
    try:
        with pytest.MonkeyPatch.context() as mp:
            codegen.sources_hash.cache_clear()
            real = _entry_dir()
            mp.setattr(codegen, "kernels_dir", lambda: tree)
            codegen.sources_hash.cache_clear()
            assert _entry_dir() == real  # a faithful copy: the key reads bytes, not paths or times
            for name in ("fwd_sm80.cuh", "common/params.cuh"):
                template = tree / name
                original = template.read_bytes()
                flipped = bytearray(original)
                flipped[len(flipped) // 2] ^= 0x01
                template.write_bytes(bytes(flipped))
                codegen.sources_hash.cache_clear()
                _same_entry_but_key(_entry_dir(), real)
                template.write_bytes(original)
                codegen.sources_hash.cache_clear()
                assert _entry_dir() == real, name
    finally:
        codegen.sources_hash.cache_clear()


def test_key_follows_the_toolkit_and_its_nvcc_version(private_cache, tmp_path, monkeypatch):
    """Another CUDA_HOME, or the same one whose nvcc now reports another version, gives a new
    entry. The version goes through the real lookup: a wrapper nvcc that answers --version."""
    real_toolkit = toolchain.find_toolkit()
    real = _entry_dir()
    major, minor, patch = real_toolkit.version.split(".")
    home = tmp_path / "cuda"
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(home))
    seen = {}
    try:
        for version in (real_toolkit.version, f"{major}.{minor}.{int(patch) + 1}", f"{major}.{int(minor) + 1}.0",
                        real_toolkit.version):
            _fake_toolkit(home, real_toolkit.home, version=version)
            toolchain._find.cache_clear()  # find_toolkit memoises per environment; the nvcc changed under it
            toolkit = toolchain.find_toolkit()
            assert toolkit.home == home and toolkit.version == version
            seen.setdefault(version, _entry_dir())
            assert _entry_dir() == seen[version], version  # the same toolkit again: the same entry
    finally:
        toolchain._find.cache_clear()
    _same_entry_but_key(seen[real_toolkit.version], real)  # only CUDA_HOME differs
    entries = list(seen.values())
    for i, a in enumerate(entries):
        for b in entries[i + 1:]:
            _same_entry_but_key(a, b)


def _torch_version(mp):
    import torch

    mp.setattr(torch, "__version__", torch.__version__ + ".post1")


def _torch_cuda(mp):
    import torch

    mp.setattr(torch.version, "cuda", "99.9")


ENVIRONMENT_CHANGES = {
    "torch": _torch_version,
    "torch_cuda": _torch_cuda,
    "flashjit": lambda mp: mp.setattr(jit, "__version__", jit.__version__ + ".post1"),
    "codegen_abi": lambda mp: mp.setattr(codegen, "ABI_VERSION", codegen.ABI_VERSION + 1),
    "flags": lambda mp: mp.setattr(jit, "build_flags",
                                   lambda arch, tk, real=jit.build_flags: real(arch, tk) + ["-lineinfo"]),
}


@pytest.mark.parametrize("change", ENVIRONMENT_CHANGES)
def test_key_follows_the_build_environment(private_cache, change):
    real = _entry_dir()
    with pytest.MonkeyPatch.context() as mp:
        ENVIRONMENT_CHANGES[change](mp)
        _same_entry_but_key(_entry_dir(), real)
    assert _entry_dir() == real


def test_key_follows_the_arch(private_cache):
    dirs = {arch: _entry_dir(arch=arch) for arch in ("sm_80", "sm_86", "sm_90a")}
    for arch, path in dirs.items():
        assert path.parent.name == arch
    hashes = {path.name.rsplit("-", 1)[1] for path in dirs.values()}
    assert len(hashes) == len(dirs)  # a different key, not only a different folder


@pytest.mark.heavy
def test_hopper_forward_build_set_compiles(private_cache):
    """Every fwd_sm90 kernel of the sm_90a build set compiles (the GPU tests run them on an H100/H200;
    this keeps a template change that breaks one tile or head dim from reaching them): the bf16 ones to cubins
    with the JIT's flags, none with its wgmma products serialized by ptxas (C7511-C7513: -17% for the one a
    template change once did it to, with no other sign), none spilling and none with a compiler warning; an fp16
    twin of each tile shape to PTX, also without a warning (ptxas gives a twin bf16's registers, so the same
    notes). The launchers are host code whose only part of a kernel's own is Config's constants (fwd_sm90.cuh's launch): the SUBSET above builds them whole in a dozen forms
    (persistent, two CTAs an SM, cross-tile with mask warps, d_v, an fp16 one), and one kernel of the set goes
    through precompile here (cubin, launcher, manifest with ptxas's notes). All 27 launchers whole cost ~70
    CPU-s of CI's two cores (sixty-third session: 162 against 94 CPU-s)."""
    build_set = [c for c in get_kernels_to_build(arch="sm_90a") if c.family.name == "fwd_sm90"]
    bf16 = [c for c in build_set if c.dtype == "bf16"]
    fp16 = [c for c in build_set if c.dtype == "fp16"]
    assert bf16 and sorted(c.name.replace("_fp16_", "_bf16_") for c in fp16) == sorted(c.name for c in bf16)
    _assert_cubins_clean(bf16)
    # fp16 differs from bf16 only in the element type, so one twin a tile shape (head dim, block_m, block_n) goes to
    # PTX, not all 27 (CI's 10 minutes: the sixty-fifth session's clean-clone run took 590 s with all of them)
    shapes = {(c.d_head, c.block_m, c.block_n): c for c in fp16}
    warned = _ptxas_notes().ptx(list(shapes.values()), jobs=NVCC_JOBS)
    assert sorted(warned) == sorted(c.name for c in shapes.values())
    assert not {name: w for name, w in warned.items() if w}, "compiler warnings"
    # One whole, the way a user's precompile builds it (the smallest: the d32 two-CTA kernel, ~2 s).
    one = min(bf16, key=lambda c: (c.d_head, c.block_m, c.persistent))
    env = dict(os.environ, FLASHJIT_CACHE_DIR=str(private_cache))
    pre = subprocess.run([sys.executable, "-m", "flashjit", "precompile", "--arch", "sm_90a", one.name], env=env,
                         cwd=REPO, capture_output=True, text=True)
    assert pre.returncode == 0, pre.stderr[-3000:]
    (entry, manifest, _), = cache.entries()
    assert manifest["config"] == one.name and entry.verified_library() == entry.library
    # the manifest keeps ptxas's notes (jit.perf_losses), empty here; a whole build's log is not read: None
    assert manifest["ptxas_notes"] == ([] if jit.split_build(toolchain.find_toolkit()) else None)


def _ptxas_notes():
    """scripts/ptxas_notes.py as a module (its kernel list and nvcc runs)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import ptxas_notes
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return ptxas_notes


def _assert_cubins_clean(configs: list) -> None:
    """Each config's cubin, built with the JIT's nvcc flags (no launcher), has no ptxas performance-loss note,
    no spill and no compiler warning (the JIT shows nvcc's log only when a build fails)."""
    found = _ptxas_notes().check(configs, jobs=NVCC_JOBS)
    assert sorted(found) == sorted(c.name for c in configs)
    assert not {name: r for name, r in found.items() if r != ([], 0, [])}, "ptxas notes, spills or warnings"


@pytest.mark.heavy
def test_the_dispatchers_two_cta_kernels_compile_unserialized_without_spills():
    """Every kernel the dispatcher can pick (scripts/ptxas_notes.py's list) with two CTAs an SM at d64 (104
    registers a consumer thread, the tightest budget, and no plain twin to fall back to) compiles without a
    ptxas performance-loss note or a spill with this toolkit: ptxas tips kernels for changes outside their
    loops (docs/perf-log.md, thirtieth session). Only the cubins are built, with the JIT's nvcc flags (the
    launchers are the SUBSET's, as in the build-set test). Below d64 the list's two-CTA kernels are d64's tiles
    with a narrower O, so fewer registers a thread. The half-block kernels, which ptxas has serialized, have their
    plain twin (jit.unserialized): correct, a knob's gain short. Those off the build set (23 from d64 up, ~140 CPU-s on
    CI's two cores, ~40% of CI's longest path), the two-CTA ones below d64 (98) and the kernels with lazy
    rescaling alone (472) are left to scripts/ptxas_notes.py, run after a kernel or dispatcher change (all of
    those, fifty-fourth session: none noted, none spilling); the build set's own to the build-set test above."""
    chosen = [c for c in _ptxas_notes().kernels() if getattr(c, "two_ctas", False) and c.d_head == 64]
    assert len(chosen) >= 10
    _assert_cubins_clean(chosen)


@pytest.mark.heavy
def test_a_kernel_ptxas_serializes_is_named_and_precompile_adds_its_plain_twin(private_cache, caplog):
    """The persistent d128 causal kernel with softcap and half blocks (why the dispatcher gives softcap no half
    blocks): nvcc 13.0's ptxas serializes its wgmmas (C7511, its third compiled step's registers). A warning
    names the kernel, and the manifest keeps the note; were the dispatcher to choose it, jit.unserialized runs
    its plain twin (no half blocks), which ptxas compiles whole, so precompile builds the twin too (a bundle,
    or a cache used with FLASHJIT_DISABLE_JIT, must hold it); a clean kernel gets none. (The d64 192-row
    non-causal one with half blocks was the example until the tile decode by FastDivs left its consumers the
    registers.) One test, one cache: three heavy kernels built once each."""
    config = FwdSm90Config("bf16", 128, persistent=True, causal=True, softcap=True, half_blocks=True)
    library = jit.ensure_built(config, "sm_90a")
    notes = cache.Entry(library.parent).manifest()["ptxas_notes"]
    assert notes and all(n.startswith("C75") and "serialized" in n for n in notes), notes
    assert f"{config.name} for sm_90a: ptxas: C75" in caplog.text
    env = dict(os.environ, FLASHJIT_CACHE_DIR=str(private_cache))
    listed = subprocess.run([sys.executable, "-m", "flashjit", "cache", "list"], capture_output=True, text=True,
                            env=env, cwd=REPO)
    assert "(ptxas: C7511, wgmma serialized)" in listed.stdout, listed.stdout + listed.stderr
    # precompile: the noted kernel (cached above) and a clean one; it builds the clean one and the twin
    clean = FwdSm90Config("bf16", 128, persistent=True, causal=True, half_blocks=True)
    run = subprocess.run([sys.executable, "-m", "flashjit", "precompile", "--arch", "sm_90a", config.name, clean.name],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    built = {manifest["config"] for _, manifest, _ in cache.entries()}
    if not jit.split_build(toolchain.find_toolkit()):  # (a whole build records no notes: nothing to fall back from)
        assert built == {config.name, clean.name}
        return
    assert "adding their plain twins" in run.stdout and "3 of 3 kernels" in run.stdout, run.stdout
    assert "(2 compiled, 1 cached)" in run.stdout, run.stdout
    assert built == {config.name, clean.name, config.plain().name}
    jit.unserialized.cache_clear()
    assert jit.unserialized(config, "sm_90a") == config.plain() == dataclasses.replace(config, half_blocks=False)
    assert jit.notes_of(config.plain(), "sm_90a") == []
    assert f"running {config.plain().name} instead" in caplog.text


@pytest.mark.parametrize("noted", [(), ("config",), ("config", "plain"), ("config", "no plain"),
                                   ("config", "no nvcc")])
def test_unserialized_takes_the_plain_twin_only_where_the_choice_alone_is_serialized(monkeypatch, noted):
    """jit.unserialized: no note, the choice (and its twin is never built); the choice alone noted, the twin;
    both noted, or the twin not to be had (FLASHJIT_DISABLE_JIT without it, no nvcc), the choice; a config without
    a twin (BwdSm90Config, the sm_80 families, a forward without half blocks or lazy rescaling) is never built
    here."""
    config = FwdSm90Config("bf16", 128, persistent=True, causal=True, half_blocks=True)
    built = []

    def notes_of(cfg, arch):
        built.append(cfg)
        if cfg == config.plain() and "no plain" in noted:
            raise jit.JitDisabledError("not prebuilt")
        if cfg == config.plain() and "no nvcc" in noted:  # a bundle's kernel, and no toolkit to build the twin
            raise toolchain.ToolchainError("no nvcc")
        return ["C7511: serialized"] if ("config" if cfg == config else "plain") in noted else []

    monkeypatch.setattr(jit, "notes_of", notes_of)
    jit.unserialized.cache_clear()
    try:
        chosen = jit.unserialized(config, "sm_90a")
        assert chosen == (config.plain() if noted == ("config",) else config)
        assert built == ([config] if not noted else [config, config.plain()])
        assert jit.unserialized(config, "sm_90a") == chosen and len(built) == max(1, 2 * bool(noted))  # memoized
        for other in (dataclasses.replace(config, half_blocks=False), BwdSm90Config("bf16", 128, 64),
                      KernelConfig(dtype="bf16", d_head=128)):
            assert jit.unserialized(other, "sm_90a") == other
        assert len(built) == max(1, 2 * bool(noted))
    finally:
        jit.unserialized.cache_clear()


def test_ptxas_performance_losses_are_read_from_the_log():
    log = ("ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
           "insufficient register resources for the wgmma pipeline in the function '_ZN8flashjit8fwd_sm9010fwd_kernelE'\n"
           "ptxas info    : Used 168 registers, used 16 barriers\n"
           "ptxas info    : (C7513) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
           "non wgmma instructions defining input registers of a wgmma between start and end of the pipeline stage "
           "in the function '_Z1fv'\n")
    assert jit.perf_losses(log) == [
        "C7511: wgmma.mma_async instructions are serialized due to insufficient register resources for the wgmma pipeline",
        "C7513: wgmma.mma_async instructions are serialized due to non wgmma instructions defining input registers of "
        "a wgmma between start and end of the pipeline stage"]
    assert jit.perf_losses("ptxas info    : Used 168 registers\n") == []


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

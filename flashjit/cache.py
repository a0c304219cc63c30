"""The on-disk kernel cache: where it lives, how entries are named, locked, verified and published.

Layout (``python -m flashjit info`` prints the root)::

    <root>/v1/<arch>/<config name>-<12-hex key>/   one published entry
        kernel.so       the launcher: the translation unit's host code (the host compiler's build)
        kernel.cubin    its kernels (nvcc's build of the same unit), which the launcher loads; absent
                        where nvcc built one library of both (a toolkit before CUDA 12.8: flashjit/jit.py)
        source.cu       what both were compiled from
        manifest.json   the key's inputs, both binaries' sizes and sha256, build time
    <root>/v1/locks/<entry>.lock                    one filelock per entry (the OS drops it if the holder dies)
    <root>/v1/staging/<entry>.<pid>.<random>/       private build directories, never read by loaders

An entry is built in its own staging directory and published with ``os.replace`` (a rename within
one file system: readers see either no entry or a whole one). A loader trusts an entry only when
its library and cubin match the sizes and sha256 recorded in the manifest; anything else is rebuilt.

A bundle (``python -m flashjit precompile --out DIR``) is the same entry layout under DIR, built by
the same Entry/Staging code with DIR as the root, plus ``DIR/flashjit-bundle.json``: the toolchain
it was built with (the key inputs that need nvcc to know), the flashjit, sources and torch versions,
and the archs and names it holds. Looking an entry up there reads files only: no nvcc, no writes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import envvars
from .notify import notify

LAYOUT = "v1"
LIBRARY = "kernel.so"   # the launcher (host code), which loads ...
CUBIN = "kernel.cubin"  # ... the kernels (device code): both are the entry's binary
BINARIES = (LIBRARY, CUBIN)
MANIFEST = "manifest.json"
SOURCE = "source.cu"


class CacheError(RuntimeError):
    """The cache directory cannot be used."""


def _location() -> tuple[Path, str]:
    configured = envvars.CACHE_DIR.get()
    if configured:
        base, how = Path(configured).expanduser(), f"{envvars.CACHE_DIR.name}={configured}"
    else:
        import platformdirs

        base, how = Path(platformdirs.user_cache_dir("flashjit")), "the default per-user cache dir"
    return base / LAYOUT, how


def location() -> Path:
    """Where the cache is, without creating it or checking that it is writable: enough to look an
    entry up (a read-only cache filled elsewhere serves its hits)."""
    return _location()[0]


def root() -> Path:
    """The cache root, created and checked writable (CacheError otherwise): what a build needs."""
    path, how = _location()
    ensure_writable(path, f"its kernel cache at {path} ({how})",
                    f"Set {envvars.CACHE_DIR.name} to a writable directory.")
    return path


def ensure_writable(path: Path, what: str, fix: str) -> None:
    try:
        # resolved first: a symlink to a directory not made yet (a scratch disk's) is created, where
        # mkdir on the link itself fails with "File exists"
        path.resolve().mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CacheError(f"flashjit cannot write {what}: {exc.strerror or exc}. {fix}") from exc


def key_hash(inputs: dict) -> str:
    """12 hex digits over every input that changes the binary (canonical JSON)."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Entry:
    path: Path
    lock_dir: Path | None = None  # default: <root>/locks; a bundle keeps its locks out of itself

    @classmethod
    def for_key(cls, arch: str, name: str, key: str, base: Path | None = None) -> "Entry":
        """The entry under `base` (a bundle's directory, or cache.location() for a lookup that must
        not write), by default under root(), the writable cache."""
        return cls((root() if base is None else Path(base)) / arch / f"{name}-{key}")

    @property
    def library(self) -> Path:
        return self.path / LIBRARY

    @property
    def lock_path(self) -> Path:
        locks = self.lock_dir if self.lock_dir is not None else self.path.parent.parent / "locks"
        return locks / f"{self.path.parent.name}-{self.path.name}.lock"

    @property
    def staging_dir(self) -> Path:
        return self.path.parent.parent / "staging"

    def manifest(self) -> dict | None:
        try:
            return json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def ptxas_notes(self) -> list[str]:
        """ptxas's performance-loss notes its build recorded (jit.perf_losses; none: a whole build, whose log
        nobody reads, or none printed)."""
        return list((self.manifest() or {}).get("ptxas_notes") or ())

    def intact(self) -> bool:
        """Whether the manifest is there and the library and cubin match their recorded sizes and sha256."""
        manifest = self.manifest()
        try:
            binaries = manifest["binaries"] if manifest is not None else {}
            return LIBRARY in binaries and all(
                (self.path / name).stat().st_size == record["size"] and file_sha256(self.path / name) == record["sha256"]
                for name, record in binaries.items())
        except (OSError, KeyError, TypeError):
            return False

    def verified_library(self, damaged: str = "cache entry {path} is incomplete or corrupted; it will be rebuilt"
                         ) -> Path | None:
        """The library if the entry is complete and intact, else None (a damaged one is logged with
        the `damaged` message)."""
        if not self.path.is_dir():
            return None
        if not self.intact():
            notify(damaged.format(path=self.path), logging.WARNING)
            return None
        return self.library

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        from filelock import FileLock

        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        from filelock import Timeout

        lock = FileLock(str(self.lock_path))
        try:
            lock.acquire(timeout=0)
        except Timeout:  # another process is building this entry: wait for it, then re-check
            notify(f"waiting for another process to finish compiling {self.path.name}")
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def staged_build(self) -> "Staging":
        """A fresh private directory to build into; call with the entry's lock held."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        # Leftovers of builds of this entry that died (SIGKILL, OOM, power): nobody else can be
        # using them while we hold the lock.
        for stale in self.staging_dir.glob(f"{self.path.name}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        path = Path(tempfile.mkdtemp(prefix=f"{self.path.name}.{os.getpid()}.", dir=self.staging_dir))
        return Staging(self, path)


@dataclass
class Staging:
    entry: Entry
    path: Path

    def publish(self, manifest: dict) -> Path:
        binaries = {name: {"size": (self.path / name).stat().st_size, "sha256": file_sha256(self.path / name)}
                    for name in BINARIES if (self.path / name).exists()}  # no cubin: nvcc's whole build
        manifest = dict(manifest, binaries=binaries, published=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        tmp = self.path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp, self.path / MANIFEST)
        self.entry.path.parent.mkdir(parents=True, exist_ok=True)
        if self.entry.path.exists():  # a damaged entry we are replacing: move it aside, then drop it
            doomed = self.entry.staging_dir / f"{self.entry.path.name}.replaced.{uuid.uuid4().hex[:8]}"
            os.replace(self.entry.path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        os.replace(self.path, self.entry.path)  # atomic: readers see no entry or a whole one
        return self.entry.library

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def entries(base: Path | None = None) -> list[tuple[Entry, dict | None, int]]:
    """Every published entry (of the cache, or of the bundle at `base`) with its manifest and size
    on disk in bytes."""
    base = root() if base is None else Path(base)
    out = []
    for arch_dir in sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith("sm_")):
        for path in sorted(p for p in arch_dir.iterdir() if p.is_dir()):
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            entry = Entry(path)
            out.append((entry, entry.manifest(), size))
    return out


def clear() -> int:
    """Remove every entry and staging directory; returns how many entries were removed. Entries
    another process is building right now are published after this returns, as they should be."""
    base = root()
    removed = len(entries())
    for path in base.iterdir():
        if path.is_dir() and (path.name.startswith("sm_") or path.name == "staging"):
            shutil.rmtree(path, ignore_errors=True)
    return removed


# --- bundles -------------------------------------------------------------------------------------

BUNDLE_MANIFEST = "flashjit-bundle.json"
BUNDLE_FORMAT = 1


class BundleError(CacheError):
    """A directory that cannot be used as (or made into) a bundle."""


def prebuilt() -> list["Bundle"]:
    """The bundles FLASHJIT_PREBUILT names, in search order."""
    return [Bundle(Path(part).expanduser()) for part in envvars.PREBUILT.get().split(os.pathsep) if part.strip()]


_manifests: dict[Path, tuple[tuple[int, int], dict | None]] = {}


@dataclass(frozen=True)
class Bundle:
    """A relocatable, read-only-usable set of entries: <dir>/<arch>/<name>-<key>/ as in the cache, plus
    <dir>/flashjit-bundle.json::

        format       BUNDLE_FORMAT
        toolchain    the key inputs only the build machine's nvcc could tell: nvcc (version),
                     cuda_home, toolkit (wheel versions, how cudart is linked)
        flags        {arch: the compiler flags}: the key inputs that came from that toolchain
        built_with   flashjit, codegen_abi, sources, torch, torch_cuda of the build (for messages:
                     a lookup computes these itself, so a bundle of another build is a miss)
        kernels      {arch: [names]} it holds
    """
    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / BUNDLE_MANIFEST

    def manifest(self) -> dict | None:
        """The parsed bundle manifest, or None if there is none (read once per change of the file)."""
        try:
            st = self.manifest_path.stat()
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        known = _manifests.get(self.manifest_path)
        if known is None or known[0] != stamp:
            try:
                data = json.loads(self.manifest_path.read_text())
                data = data if isinstance(data, dict) and data.get("format") == BUNDLE_FORMAT else None
            except (OSError, ValueError):
                data = None
            known = _manifests[self.manifest_path] = (stamp, data)
        return known[1]

    @property
    def lock_dir(self) -> Path:
        """Locks for building into the bundle live outside it (per user, per bundle), so that the
        bundle holds nothing but its manifest and entries."""
        tag = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"flashjit-locks-{os.getuid() if hasattr(os, 'getuid') else 0}" / tag

    def entry(self, arch: str, name: str, key: str) -> Entry:
        return Entry(self.path / arch / f"{name}-{key}", lock_dir=self.lock_dir)

    def open_for_build(self, toolchain: dict, found_by: str, built_with: dict, arch: str, flags: list) -> None:
        """Create the bundle (or check that it can take kernels of this build) before building into
        it: one bundle holds the kernels of one toolchain, flashjit, sources and torch."""
        ensure_writable(self.path, f"the bundle directory {self.path}", "Pass a writable --out directory.")
        with self._locked():
            current = self.manifest()
            if current is None:
                if any(p.name not in ("staging",) and not p.name.startswith(".write-test")
                       for p in self.path.iterdir()):
                    raise BundleError(f"{self.path} is not empty and is not a flashjit bundle (it has no "
                                      f"{BUNDLE_MANIFEST}); pass a new or empty directory to --out")
                current = {"format": BUNDLE_FORMAT, "toolchain": toolchain, "toolchain_found_by": found_by,
                           "built_with": built_with, "flags": {}, "kernels": {}}
            problems = [f"{what} {current.get(field)!r} (this build: {mine!r})" for field, what, mine in (
                ("toolchain", "toolchain", toolchain), ("built_with", "flashjit/sources/torch", built_with))
                if current.get(field) != mine]
            if arch in current.get("flags", {}) and current["flags"][arch] != flags:
                problems.append(f"flags for {arch} {current['flags'][arch]} (this build: {flags})")
            if problems:
                raise BundleError(f"the bundle at {self.path} was built differently, and one bundle holds the "
                                  f"kernels of one build: {'; '.join(problems)}. Pass a new --out directory "
                                  "(or remove this one).")
            current.setdefault("flags", {})[arch] = flags
            self._write(current)

    def record_contents(self) -> dict:
        """Rewrite the manifest's list of kernels from the entries on disk; tidy the staging dir."""
        with self._locked():
            current = self.manifest()
            if current is None:
                raise BundleError(f"{self.manifest_path} disappeared during the build")
            kernels: dict[str, list[str]] = {}
            for entry, manifest, _ in entries(self.path):
                if manifest and "config" in manifest:
                    kernels.setdefault(entry.path.parent.name, []).append(manifest["config"])
            current["kernels"] = {arch: sorted(names) for arch, names in sorted(kernels.items())}
            self._write(current)
        with contextlib.suppress(OSError):
            (self.path / "staging").rmdir()  # only if empty: another build may be using it
        return current

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        from filelock import FileLock

        self.lock_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.lock_dir / "bundle-manifest.lock")):
            yield

    def _write(self, manifest: dict) -> None:
        manifest = dict(manifest, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        tmp = self.path / f".{BUNDLE_MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp, self.manifest_path)

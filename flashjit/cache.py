"""The on-disk kernel cache: where it lives, how entries are named, locked, verified and published.

Layout (``python -m flashjit info`` prints the root)::

    <root>/v1/<arch>/<config name>-<12-hex key>/   one published entry
        kernel.so       the compiled translation unit
        source.cu       what it was compiled from
        manifest.json   the key's inputs, the library's size and sha256, build time, resource usage
    <root>/v1/locks/<entry>.lock                    one filelock per entry (the OS drops it if the holder dies)
    <root>/v1/staging/<entry>.<pid>.<random>/       private build directories, never read by loaders

An entry is built in its own staging directory and published with ``os.replace`` (a rename within
one file system: readers see either no entry or a whole one). A loader trusts an entry only when
its library matches the size and sha256 recorded in the manifest; anything else is rebuilt.
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
LIBRARY = "kernel.so"
MANIFEST = "manifest.json"
SOURCE = "source.cu"


class CacheError(RuntimeError):
    """The cache directory cannot be used."""


def root() -> Path:
    configured = envvars.CACHE_DIR.get()
    if configured:
        base, how = Path(configured).expanduser(), f"{envvars.CACHE_DIR.name}={configured}"
    else:
        import platformdirs

        base, how = Path(platformdirs.user_cache_dir("flashjit")), "the default per-user cache dir"
    path = base / LAYOUT
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CacheError(
            f"flashjit cannot write its kernel cache at {path} ({how}): {exc.strerror or exc}. "
            f"Set {envvars.CACHE_DIR.name} to a writable directory.") from exc
    return path


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

    @classmethod
    def for_key(cls, arch: str, name: str, key: str) -> "Entry":
        return cls(root() / arch / f"{name}-{key}")

    @property
    def library(self) -> Path:
        return self.path / LIBRARY

    @property
    def lock_path(self) -> Path:
        return self.path.parent.parent / "locks" / f"{self.path.parent.name}-{self.path.name}.lock"

    @property
    def staging_dir(self) -> Path:
        return self.path.parent.parent / "staging"

    def manifest(self) -> dict | None:
        try:
            return json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def verified_library(self) -> Path | None:
        """The library if the entry is complete and intact, else None (a damaged one is logged)."""
        if not self.path.is_dir():
            return None
        manifest = self.manifest()
        try:
            ok = (manifest is not None and self.library.stat().st_size == manifest["library_size"]
                  and file_sha256(self.library) == manifest["library_sha256"])
        except (OSError, KeyError, TypeError):
            ok = False
        if not ok:
            notify(f"cache entry {self.path} is incomplete or corrupted; it will be rebuilt", logging.WARNING)
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
        library = self.path / LIBRARY
        manifest = dict(manifest, library_size=library.stat().st_size, library_sha256=file_sha256(library),
                        published=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
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


def entries() -> list[tuple[Entry, dict | None, int]]:
    """Every published entry with its manifest and size on disk in bytes."""
    base = root()
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

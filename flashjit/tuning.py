"""Autotuning that persists, the table: `python -m flashjit tune` (flashjit/tuner.py) times the
candidates of each kernel family on the local GPU and stores the winners here; the dispatcher
prefers them to its built-in defaults.

A table belongs to one GPU identity (name, SM count, driver version, flashjit version): another GPU,
a driver update or a flashjit upgrade starts from the defaults again. It lives in the cache at
<cache>/tuned/<gpu>-<hash>.json, written whole and published with os.replace (a reader sees the old
or the new table, never half of one):

    {"version": 1, "identity": {...}, "entries": {"fwd:bf16:d128:c0:s4096": {"config": NAME,
     "ms": 0.81, "default": NAME, "default_ms": 0.85}, ...}}

An entry holds a problem's winning tiles; a call with score features (window, softcap, ALiBi,
dropout, sinks) gets the same tiles with its features switched on. Calls whose sequence length was
not tuned take the entry of the nearest tuned length (in log2), for the same pass, dtype, head dim,
causal flag (and, for the backward, mode). FLASHJIT_TUNED=0 ignores every table.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path

from . import cache, envvars
from .configs import config_from_name

log = logging.getLogger("flashjit")
TABLE_VERSION = 1
generation = 0  # bumped by write_table: launch plans made before a table was written are retired


def current_generation() -> tuple:
    """What launch plans depend on in the tuned tables: the tables written and whether they are used."""
    return generation, os.environ.get(envvars.TUNED.name)


def problem_key(direction: str, dtype: str, d_head: int, causal: bool, seqlen: int, deterministic: bool = False) -> str:
    mode = ":det" if deterministic else ""
    return f"{direction}:{dtype}:d{d_head}:c{int(bool(causal))}:s{seqlen}{mode}"


_KEY_RE = re.compile(r"^(fwd|bwd):(fp16|bf16):d(\d+):c([01]):s(\d+)(:det)?$")


def table_path(identity: dict) -> Path:
    """Where this GPU identity's table lives in the cache."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", identity["name"]).strip("-").lower() or "gpu"
    return cache.root() / "tuned" / f"{slug}-{digest}.json"


@functools.lru_cache(maxsize=None)
def device_identity(device_index: int) -> dict:
    """(GPU name, SM count, driver version, flashjit version) of a CUDA device: what a table is for."""
    import torch

    from ._version import __version__

    props = torch.cuda.get_device_properties(device_index)
    return dict(name=props.name, sm_count=props.multi_processor_count, driver=_driver_version(), flashjit=__version__)


def _driver_version() -> int:
    """The CUDA driver's version (e.g. 13000), asked of libcuda (torch exposes no public call for it)."""
    import ctypes

    for library in ("libcuda.so.1", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(library)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if cuda.cuDriverGetVersion(ctypes.byref(version)) == 0:
            return version.value
    return 0


def read_table(path: Path) -> dict:
    """A table's entries, or {} when there is none; a damaged table is ignored with a warning."""
    try:
        data = json.loads(path.read_text())
        if data.get("version") != TABLE_VERSION or not isinstance(data.get("entries"), dict):
            raise ValueError(f"version {data.get('version')!r}, expected {TABLE_VERSION}")
        return data["entries"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("ignoring the tuned table %s (%s); `python -m flashjit tune` rewrites it", path, exc)
        return {}


def write_table(identity: dict, entries: dict) -> Path:
    """Merge `entries` into the identity's table, atomically (temporary file + os.replace)."""
    path = table_path(identity)
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**read_table(path), **entries}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(dict(version=TABLE_VERSION, identity=identity, entries=merged), f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    global generation
    generation += 1
    _entries_for.cache_clear()
    _lookup.cache_clear()
    return path


@functools.lru_cache(maxsize=None)
def _entries_for(device_index: int) -> dict:
    return read_table(table_path(device_identity(device_index)))


def lookup(device_index: int, direction: str, dtype: str, d_head: int, causal: bool, seqlen: int,
           features: tuple = (), deterministic: bool = False):
    """The tuned config for a call, or None: the entry of the nearest tuned sequence length for the same
    (pass, dtype, head dim, causal, mode) on this GPU, with the call's features (name, value pairs)
    switched on. Cached per argument tuple: one dict lookup per call once seen."""
    if not envvars.TUNED.flag():
        return None
    return _lookup(device_index, direction, dtype, d_head, causal, seqlen, features, deterministic)


@functools.lru_cache(maxsize=4096)
def _lookup(device_index, direction, dtype, d_head, causal, seqlen, features, deterministic):
    best = None
    for key, entry in _entries_for(device_index).items():
        match = _KEY_RE.match(key)
        if not match or (match[1], match[2], int(match[3]), match[4] == "1", match[6] is not None) != \
                (direction, dtype, d_head, bool(causal), bool(deterministic)):
            continue
        distance = abs(math.log2(max(int(match[5]), 1)) - math.log2(max(seqlen, 1)))
        if best is None or distance < best[0]:
            best = (distance, entry)
    if best is None:
        return None
    try:
        config = dataclasses.replace(config_from_name(best[1]["config"]), **dict(features))
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring a tuned entry for %s d%d (%s)", dtype, d_head, exc)
        return None
    return None if config.problems() else config

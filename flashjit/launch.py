"""Calling a compiled kernel library: the ctypes mirror of kernels/common/params.cuh and the launch.

No torch extension is involved: the library (the launcher) exports plain C functions, is handed the
kernels' cubin from its cache entry, and is called with a pointer to a params struct and torch's
current CUDA stream.
"""
from __future__ import annotations

import ctypes
import struct
from pathlib import Path

from .cache import CUBIN
from .configs import config_from_name, family_of

_i64, _i32, _ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p


def _tensor_refs(*names: str) -> list:
    """flashjit::TensorRef {data, batch_stride, row_stride, head_stride} for each name, laid out flat
    (same memory layout as the nested C structs; flat fields keep the per-call construction cheap)."""
    return [(f"{n}{suffix}", kind) for n in names
            for suffix, kind in (("", _ptr), ("_batch_stride", _i64), ("_row_stride", _i64), ("_head_stride", _i64))]


# Sizes, the scale and flashjit::ScoreParams (window, softcap, ALiBi slopes, dropout), flat.
_SIZES = [("batch", _i32), ("seqlen_q", _i32), ("seqlen_k", _i32), ("heads", _i32), ("heads_k", _i32),
          ("softmax_scale", ctypes.c_float), ("window_left", _i32), ("window_right", _i32),
          ("softcap", ctypes.c_float), ("alibi_slopes", _ptr), ("alibi_batch_stride", _i64),
          ("philox_seed", ctypes.c_uint64), ("philox_offset", ctypes.c_uint64), ("dropout_threshold", _i32),
          ("dropout_scale", ctypes.c_float), ("sink", _ptr)]


# flashjit::VarlenParams, last in both structs: a dense call's positional construction leaves it
# null (cu_seqlens_q = None: dense). flashjit/varlen.py sets it for variable-length batches.
_VARLEN = [("cu_seqlens_q", _ptr), ("cu_seqlens_k", _ptr), ("total_q", _i32), ("total_k", _i32)]

# flashjit::CacheParams, after VarlenParams in FwdParams only: null unless flashjit/kvattn.py sets it.
_CACHE = [("seqused_k", _ptr), ("leftpad_k", _ptr), ("batch_idx", _ptr), ("block_table", _ptr),
          ("table_stride", _i32), ("page_size", _i32), ("num_rows", _i32), ("num_splits", _i32),
          ("o_accum", _ptr), ("lse_accum", _ptr), *_tensor_refs("k_new", "v_new"), ("new_rows", _i32)]


class FwdParams(ctypes.Structure):
    """flashjit::FwdParams: TensorRef q, k, v, o; float* lse; sizes; scale; ScoreParams; VarlenParams;
    CacheParams; the persistent causal kernel's tile walk and the grid it is for (set by keyword:
    interface._walk)."""

    _fields_ = [*_tensor_refs("q", "k", "v", "o"), ("lse", _ptr), *_SIZES, *_VARLEN, *_CACHE, ("tile_walk", _ptr),
                ("tile_walk_grid", _i32)]


class BwdParams(ctypes.Structure):
    """flashjit::BwdParams: TensorRef q, k, v, o, dout, dq, dk, dv; lse; dvec; dq_accum; sizes; scale;
    ScoreParams; VarlenParams; dkv_accum (set by keyword: the wgmma kernel's one CTA per query head)."""

    _fields_ = [*_tensor_refs("q", "k", "v", "o", "dout", "dq", "dk", "dv"), ("lse", _ptr), ("dvec", _ptr),
                ("dq_accum", _ptr), *_SIZES, *_VARLEN, ("dkv_accum", _ptr)]


# The params struct of each Family.params (kernels/common/params.cuh has one struct a direction).
PARAMS = {"FwdParams": FwdParams, "BwdParams": BwdParams}


def tensor_ref(t) -> tuple:
    """The four TensorRef values of a [B, S, H, D] tensor, in field order."""
    b, r, h, _ = t.stride()
    return t.data_ptr(), b, r, h


def cubin_kernels(cubin: bytes) -> list[str]:
    """The mangled names of a cubin's entry kernels: its ELF64 symbol table's global functions marked
    STO_CUDA_ENTRY (0x10). The launcher looks its kernels up among them (kernels/common/launch.cuh)."""
    try:
        if cubin[:5] != b"\x7fELF\x02":
            raise ValueError("not an ELF64 file")
        shoff, = struct.unpack_from("<Q", cubin, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", cubin, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
        names = []
        for _, kind, _, _, offset, size, link, _, _, entsize in sections:
            if kind != 2 or not entsize:  # SHT_SYMTAB
                continue
            strings = sections[link][4]
            for at in range(offset, offset + size, entsize):
                name, info, other, shndx = struct.unpack_from("<IBBH", cubin, at)
                if info == 0x12 and other & 0x10 and shndx:  # STB_GLOBAL | STT_FUNC, a kernel, defined here
                    names.append(cubin[strings + name:cubin.index(b"\0", strings + name)].decode())
        return names
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the cubin's kernels: {exc}") from exc


class KernelLibraryError(RuntimeError):
    """A cached library that cannot be loaded or does not match this flashjit."""


class CompiledKernel:
    """One loaded kernel library; calling it launches its kernel(s) on `stream`. `config` is the
    config it was built from, or its name; its family names the params struct the library takes."""

    def __init__(self, path: Path, config):
        config = config_from_name(config) if isinstance(config, str) else config
        name, params_type = config.name, PARAMS[family_of(config).params]
        try:
            self.lib = ctypes.CDLL(str(path))
            fn = self.lib.flashjit_run
            image = None
            if hasattr(self.lib, "flashjit_set_image"):  # a launcher, whose kernels are the entry's cubin
                cubin = (path.parent / CUBIN).read_bytes()
                image = (cubin, len(cubin), "\n".join(cubin_kernels(cubin)).encode())
                self.lib.flashjit_set_image.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p]
                self.lib.flashjit_set_image.restype = None
        except (OSError, AttributeError, ValueError) as exc:
            raise KernelLibraryError(f"cannot load kernel library {path}: {exc}") from exc
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
        self._fn = fn
        self.lib.flashjit_config_name.restype = ctypes.c_char_p
        self.lib.flashjit_error_string.restype = ctypes.c_char_p
        self.lib.flashjit_error_string.argtypes = [ctypes.c_int]
        built_for = self.lib.flashjit_config_name().decode()
        params_size = self.lib.flashjit_params_size()
        if built_for != name or params_size != ctypes.sizeof(params_type):
            raise KernelLibraryError(
                f"kernel library {path} was built for {built_for} with a {params_size}-byte params struct; "
                f"expected {name} and {ctypes.sizeof(params_type)} bytes")
        if image is not None:  # the library loads it at its first launch
            self.lib.flashjit_set_image(*image)
        self.path, self.name = path, name
        self.smem_bytes = self.lib.flashjit_smem_bytes()

    def __call__(self, params: ctypes.Structure, stream: int) -> None:
        err = self._fn(ctypes.byref(params), stream)
        if err:
            raise self.launch_error(err)

    def launch_error(self, err: int) -> RuntimeError:
        """The error of a launch that returned CUDA error `err` (here, or through flashjit/native.py)."""
        return RuntimeError(f"flashjit kernel {self.name} failed to launch: CUDA error {err} "
                            f"({self.lib.flashjit_error_string(err).decode()})")

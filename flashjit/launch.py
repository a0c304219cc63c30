"""Calling a compiled kernel library: the ctypes mirror of kernels/common/params.cuh and the launch.

No torch extension is involved: the library exports plain C functions and is called with a pointer
to a params struct and torch's current CUDA stream.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

_i64, _i32, _ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p


class FwdParams(ctypes.Structure):
    """Field for field the C struct flashjit::FwdParams (strides in elements)."""

    _fields_ = [
        ("q", _ptr), ("k", _ptr), ("v", _ptr), ("o", _ptr), ("lse", _ptr),
        ("q_batch_stride", _i64), ("q_row_stride", _i64), ("q_head_stride", _i64),
        ("k_batch_stride", _i64), ("k_row_stride", _i64), ("k_head_stride", _i64),
        ("v_batch_stride", _i64), ("v_row_stride", _i64), ("v_head_stride", _i64),
        ("o_batch_stride", _i64), ("o_row_stride", _i64), ("o_head_stride", _i64),
        ("batch", _i32), ("seqlen_q", _i32), ("seqlen_k", _i32), ("heads", _i32), ("heads_k", _i32),
        ("softmax_scale", ctypes.c_float),
    ]


class BwdParams(ctypes.Structure):
    """Field for field the C struct flashjit::BwdParams."""

    _fields_ = [
        ("q", _ptr), ("k", _ptr), ("v", _ptr), ("o", _ptr), ("dout", _ptr), ("lse", _ptr), ("dvec", _ptr),
        ("dq", _ptr), ("dk", _ptr), ("dv", _ptr),
        *[(f"{t}_{s}_stride", _i64) for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv")
          for s in ("batch", "row", "head")],
        ("batch", _i32), ("seqlen_q", _i32), ("seqlen_k", _i32), ("heads", _i32), ("heads_k", _i32),
        ("softmax_scale", ctypes.c_float),
    ]


class KernelLibraryError(RuntimeError):
    """A cached library that cannot be loaded or does not match this flashjit."""


class CompiledKernel:
    """One loaded kernel library; calling it launches its kernel(s) on `stream`."""

    def __init__(self, path: Path, name: str):
        params_type = BwdParams if name.startswith("bwd_") else FwdParams
        try:
            self.lib = ctypes.CDLL(str(path))
            fn = self.lib.flashjit_run
        except (OSError, AttributeError) as exc:
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
        self.path, self.name = path, name
        self.smem_bytes = self.lib.flashjit_smem_bytes()

    def __call__(self, params: ctypes.Structure, stream: int) -> None:
        err = self._fn(ctypes.byref(params), stream)
        if err:
            raise RuntimeError(f"flashjit kernel {self.name} failed to launch: CUDA error {err} "
                               f"({self.lib.flashjit_error_string(err).decode()})")

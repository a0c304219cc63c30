"""Public functions: input validation, config choice, and the launch on torch's current stream.

    forward(q, k, v, config=None, causal=False, softmax_scale=None, return_lse=False)
    forward_timed(q, k, v, config=None, causal=False, softmax_scale=None) -> (out, milliseconds)

q/k: [B, Sq/Sk, H/H_k, D], v: [B, Sk, H_k, D_v] with D_v <= D (MLA-style, e.g. 192/128; usually
D_v = D), fp16 or bf16, one CUDA device, H divisible by H_k, any strides on B, S and H with a
contiguous last dim (slices of a packed qkv tensor need no copy).
Returns out [B, Sq, H, D_v] (q's dtype) and, if asked, lse [B, H, Sq] fp32 (natural log).
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import functools
import logging
import math
import numbers
from collections import OrderedDict
from typing import NamedTuple

import torch

from . import envvars, jit, tuning
from .configs import families
from .configs.bwd_sm80 import BwdConfig
from .configs.bwd_sm90 import WGMMA_ARCH, BwdSm90Config
from .configs.common import FEATURES, MAX_HEAD_DIM, ConfigBase
from .configs.fwd_sm90 import FwdSm90Config
from .dispatch import (backward_pads_value, causal_walk, default_bwd_config, default_config, with_head_split,
                       with_mask_warps, with_tile_walk)
from .launch import BwdParams, FwdParams, tensor_ref

log = logging.getLogger("flashjit")

BACKENDS = ("jit", "reference")


_cuda_seen = False  # once CUDA is available it stays so: asked of torch until then, not on every call


def backend() -> str:
    global _cuda_seen
    chosen = envvars.BACKEND.get().lower()
    if not chosen:
        _cuda_seen = _cuda_seen or torch.cuda.is_available()
        return "jit" if _cuda_seen else "reference"
    if chosen not in BACKENDS:
        raise ValueError(f"{envvars.BACKEND.name}={chosen!r}: expected one of {BACKENDS}")
    return chosen


_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
# The reference backend (PyTorch on any device) also computes in fp32 and fp64 (for gradcheck).
_REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT32_MAX = 2**31 - 1
_U64 = 2**64
# The longest sequence (and varlen total) the kernels take: they index rows, and sum a row, the
# query-key diagonal and a window edge, in 32-bit ints, which stays exact below 2^31 while each term is
# under 2^29. A window at least this long is as unbounded as -1 (score_mods maps it to -1).
MAX_SEQLEN = 2**29


def check_4d(name: str, t, layout: str, dtypes, allowed: str) -> None:
    """TypeError/ValueError naming argument `name` unless t is a 4-dim tensor (`layout`) of one of `dtypes`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have 4 dims {layout}, got shape {tuple(t.shape)}")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; pass {name}.to_dense()")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {allowed}, got {t.dtype}; cast it with .half() or .bfloat16()")


def contiguous_last_dim(*tensors) -> tuple:
    """flash-attn copies a q/k/v whose last dim is strided (flash_attn_interface.py: maybe_contiguous)
    instead of refusing it; the kernels need stride 1 there, so the same copy is made here (on the
    paths that run checks: a planned call's key holds the strides of a call that needed no copy)."""
    return tuple(t.contiguous() if isinstance(t, torch.Tensor) and t.dim() and t.stride(-1) != 1 else t
                 for t in tensors)


def _contiguous_qkv(q, k, v) -> tuple:
    """(q, k, v, whether any was copied) after contiguous_last_dim."""
    copies = contiguous_last_dim(q, k, v)
    return (*copies, any(c is not t for c, t in zip(copies, (q, k, v))))


def check_qkv(q, k, v, reference: bool = False) -> None:
    """ValueError/TypeError naming the offending argument, before anything is launched. Ordered so
    that the common, valid call costs a handful of attribute reads. reference=True: the checks of
    the reference backend, which also takes fp32/fp64 and tensors on any device."""
    dtypes, allowed = ((_REFERENCE_DTYPES, "float16, bfloat16, float32 or float64 (reference backend)") if reference
                       else (_DTYPES, "float16 or bfloat16"))
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_4d(name, t, "[batch, seqlen, heads, head_dim]", dtypes, allowed)
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}; "
                             f"pass {name}.contiguous()")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, seqlen_q, heads, d_head = q.shape
    k_shape, d_v = k.shape, v.shape[3]
    if k_shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must have the same shape (but for v's head_dim, which may be smaller), got "
                         f"{tuple(k_shape)} and {tuple(v.shape)}")
    if k_shape[0] != batch or k_shape[3] != d_head:
        raise ValueError(f"k shape {tuple(k_shape)} does not match q shape {tuple(q.shape)} in batch or head_dim")
    if not 0 < d_head <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d_head} is not supported: flashjit supports head dims from 1 to {MAX_HEAD_DIM} "
                         "(as flash-attn)")
    if not 0 < d_v <= d_head:  # the kernels stage O through Q's tile, so V's may not be the wider one
        raise ValueError(f"v has head_dim {d_v} with q/k's {d_head}: the kernels need 0 < d_v <= d_qk (the head_dim "
                         "of v must not exceed q's and k's)")
    heads_k = k_shape[2]
    if heads_k == 0 or heads % heads_k:
        raise ValueError(f"the number of query heads ({heads}) must be divisible by the number of key/value "
                         f"heads ({heads_k}) for GQA/MQA")
    if seqlen_q > MAX_SEQLEN or k_shape[1] > MAX_SEQLEN:
        raise ValueError(f"sequence lengths must be at most 2**29 = {MAX_SEQLEN} (the kernels index rows in 32 bits), "
                         f"got seqlen_q {seqlen_q} and seqlen_k {k_shape[1]}")
    if batch * heads > _INT32_MAX:
        raise ValueError(f"batch * heads must fit in 32 bits, got {batch} * {heads}")
    if not q.is_cuda and not reference:
        raise ValueError(f"q is on {q.device}: the JIT kernels need CUDA tensors. For CPU (or any device) use "
                         "the PyTorch reference backend: FLASHJIT_BACKEND=reference")


def _pad_head_dim(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[B, S, H, D] tensors with D rounded up to a multiple of 8, each on its own (q/k and v may have
    different head dims): zero-padded copies, or the tensor itself where D already is one. The kernels
    move 16-byte chunks, so a head dim like 59 or 111 is padded once, as flash-attn pads it (the cost:
    one copy of each such input, and the outputs are views of padded results). Multiples of 8 run
    natively in the next tile width."""
    return tuple(t if t.shape[-1] % 8 == 0 else torch.nn.functional.pad(t, (0, -t.shape[-1] % 8)) for t in tensors)


def _unpad_into(given: torch.Tensor | None, padded: torch.Tensor, d_head: int) -> torch.Tensor:
    """The first d_head columns of a padded result: a view, or copied into the caller's tensor."""
    result = padded[..., :d_head]
    return result if given is None else given.copy_(result)


def out_shape(q: torch.Tensor, v: torch.Tensor) -> tuple:
    """The shape of out (and dout): q's with v's head dim ([B, Sq, H, D_v], or varlen's [total_q, H, D_v])."""
    return (*q.shape[:-1], v.shape[-1])


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """The kernels copy 16-byte chunks: base pointer and row/head/batch strides must be multiples
    of 8 elements. Views that are not (rare: odd slicing) are copied once."""
    misaligned = t.data_ptr() & 15
    for stride in t.stride()[:-1]:  # [B, S, H, D], or varlen's [total, H, D]
        misaligned |= stride & 7
    if not misaligned:
        return t
    log.debug("copying a %s view with strides %s to meet 16-byte alignment", tuple(t.shape), t.stride())
    return torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)


@functools.lru_cache(maxsize=None)
def _smem_limit(device_index: int) -> tuple[int, str]:
    props = torch.cuda.get_device_properties(device_index)
    return props.shared_memory_per_block_optin, props.name


def softmax_scale_or_default(q: torch.Tensor, softmax_scale) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    # Any real number, as flash-attn's C++ binding converts it: a NumPy scalar or a one-element tensor too.
    scale = softmax_scale
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not scale.is_complex():
        scale = scale.item()
    if not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale!r}")
    return float(scale)


class ScoreMods(NamedTuple):
    """The score features of a call (window, softcap, ALiBi, dropout, learnable sinks): which kernel
    variants they need, and the ScoreParams values."""
    local: bool = False
    softcap: bool = False
    alibi: bool = False
    dropout: bool = False
    # window_left, window_right, softcap, slopes pointer, slopes batch stride, philox seed, philox
    # offset, dropout threshold (of 256), dropout scale, sink logits pointer
    values: tuple = (-1, -1, 0.0, None, 0, 0, 0, 0, 1.0, None)
    slopes: torch.Tensor | None = None       # keeps the (possibly copied) slopes alive with the params
    sink: torch.Tensor | None = None         # the sink logits as the kernels read them: [H] fp32, contiguous

    @property
    def flags(self) -> tuple:
        return self.local, self.softcap, self.alibi, self.dropout


_NO_MODS = ScoreMods()


def dropout_threshold(dropout_p: float) -> int:
    """The kernels drop an entry when its random byte is below this: p rounded to a multiple of
    1/256 (at least 1/256 when p > 0), so entries are dropped with probability threshold / 256. Kept
    entries are scaled by 1 / (1 - p) for the requested p, as flash-attn does: outputs match
    flash-attn's, and the expectation is off by a factor (1 - threshold / 256) / (1 - p), within
    1 / (512 (1 - p)) of 1 (flash-attn has the same bias)."""
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return 0 if dropout_p == 0 else min(255, max(1, round(dropout_p * 256)))


def philox_state(device_index: int, increment: int = 4) -> tuple[int, int]:
    """(seed, offset) for one dropout call, taken from torch's CUDA generator for the device and
    advanced, so torch.manual_seed reproduces the masks and consecutive calls differ."""
    gen = torch.cuda.default_generators[device_index]
    offset = gen.get_offset()
    gen.set_offset(offset + increment)
    return gen.initial_seed(), offset


def checked_philox(philox) -> tuple[int, int]:
    """philox as the kernels take it: a pair of ints (seed, offset), each an unsigned 64-bit value.
    Every dropout call passes one (flash_attn_func's from philox_state): the common form is checked
    first, in a few hundred nanoseconds."""
    if type(philox) is tuple and len(philox) == 2:
        seed, offset = philox
        if type(seed) is int and type(offset) is int and 0 <= seed < _U64 and 0 <= offset < _U64:
            return philox
    try:
        seed, offset = philox
        ok = all(isinstance(x, numbers.Integral) and not isinstance(x, bool) and 0 <= x < _U64 for x in (seed, offset))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"philox must be a pair of ints (seed, offset) in [0, 2**64), as philox_state() returns, "
                         f"got {philox!r}")
    return int(seed), int(offset)


def score_mods(q: torch.Tensor, causal: bool, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
               dropout_p: float = 0.0, philox: tuple[int, int] | None = None, learnable_sink=None) -> ScoreMods:
    """Validate flash-attn's window_size/softcap/alibi_slopes/dropout_p (ValueError naming the
    argument) and turn them into kernel flags and ScoreParams values. causal forces the window's
    right edge to 0. With dropout and no `philox` (seed, offset), one is drawn from torch's generator.
    learnable_sink: [H] logits of any float dtype on q's device, read as fp32."""
    if window_size == (-1, -1) and not softcap and alibi_slopes is None and not dropout_p and learnable_sink is None:
        return _NO_MODS
    try:
        left, right = (int(w) for w in window_size)
        ok = left == window_size[0] and right == window_size[1]
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        ok = False
    if not ok:
        raise ValueError(f"window_size must be a pair of ints (negative: unbounded), got {window_size!r}")
    # Any negative edge is unbounded, as in flash-attn (mha_fwd). A window as long as any sequence can
    # be is unbounded too: exact, and the kernels' 32-bit sums of a row, the diagonal and the edge
    # cannot overflow (MAX_SEQLEN).
    left, right = (-1 if w < 0 or w >= MAX_SEQLEN else w for w in (left, right))
    if causal:
        right = 0
    if not isinstance(softcap, (int, float)) or not math.isfinite(softcap):
        raise ValueError(f"softcap must be a finite number (0 or less disables it, as in flash-attn), got {softcap!r}")
    softcap = max(float(softcap), 0.0)  # flash-attn: "<=0.0 means deactivate"
    pointer, stride = None, 0
    if alibi_slopes is not None:
        batch, heads = q.shape[0], q.shape[2]
        if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32 or \
                tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)) or alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes must be a float32 tensor of shape ({heads},) or ({batch}, {heads}) "
                             f"on {q.device}")
        alibi_slopes = alibi_slopes.contiguous()
        pointer, stride = alibi_slopes.data_ptr(), (heads if alibi_slopes.dim() == 2 else 0)
    sink = None
    if learnable_sink is not None:
        heads = q.shape[2]
        if not isinstance(learnable_sink, torch.Tensor) or not learnable_sink.is_floating_point() or \
                tuple(learnable_sink.shape) != (heads,) or learnable_sink.device != q.device:
            got = (f"{tuple(learnable_sink.shape)} {learnable_sink.dtype} on {learnable_sink.device}"
                   if isinstance(learnable_sink, torch.Tensor) else type(learnable_sink).__name__)
            raise ValueError(f"learnable_sink must be a floating-point tensor of shape ({heads},) (one logit per "
                             f"query head) on {q.device}, got {got}")
        sink = learnable_sink.detach().to(torch.float32).contiguous()
    local = left >= 0 or (not causal and right >= 0)
    threshold = dropout_threshold(dropout_p)
    seed, offset = (philox or philox_state(q.get_device())) if threshold else (0, 0)
    return ScoreMods(local, softcap > 0, alibi_slopes is not None, threshold > 0,
                     (left, right, float(softcap), pointer, stride, seed, offset, threshold, 1.0 / (1.0 - dropout_p),
                      None if sink is None else sink.data_ptr()),
                     alibi_slopes, sink)


def _check_config_type(config, direction: str) -> None:
    """TypeError unless `config` is a config of a `direction` ("fwd"/"bwd") family: a backward
    kernel called with forward params (or the other way round) would read garbage."""
    family = getattr(type(config), "family", None)  # two lookups: forward() runs this on every call
    if family is None or family.direction != direction:
        accepted = " or ".join(f"flashjit.{f.config.__name__}" for f in families(direction))
        raise TypeError(f"config must be a {accepted}, got {type(config).__name__}")


def _tma_unaddressable(*tensors) -> str | None:
    """Why a TMA map cannot describe one of these [B, S, H, D] (or varlen [total, H, D]) tensors, or
    None. The kernels' inputs are 16-byte aligned by then (_aligned, _check_output); what is left is a
    zero stride over an extent above 1 (a tensor broadcast with expand), which the map's encoder refuses."""
    for t in tensors:
        if t is not None and any(stride == 0 and extent > 1 for stride, extent in zip(t.stride()[:3], t.shape[:3])):
            return f"an input of shape {tuple(t.shape)} with strides {t.stride()} (a zero stride: broadcast by expand?)"
    return None


def _refuse_tma_unaddressable(config: ConfigBase, tensors, instead: str) -> None:
    """ValueError where a caller's `config` loads with TMA and a map cannot address one of `tensors`."""
    if config.loads_with_tma and (why := _tma_unaddressable(*tensors)):
        raise ValueError(f"config {config.name} loads with TMA, which cannot address {why}; pass contiguous "
                         f"tensors (e.g. k.contiguous()) or {instead}")


def resolve_config(q: torch.Tensor, k: torch.Tensor, config: ConfigBase | None, causal: bool,
                   device_index: int | None = None, mods: ScoreMods = _NO_MODS, v: torch.Tensor | None = None,
                   out: torch.Tensor | None = None) -> ConfigBase:
    """The forward config for this call: the dispatcher's choice for the device's arch when `config`
    is None (the Hopper family on sm_90a unless TMA cannot address a tensor: then the sm_80 family,
    with a DEBUG line), else `config`, checked against the call."""
    dtype, d_head = _DTYPES[q.dtype], q.shape[3]
    d_v = d_head if v is None else v.shape[3]
    if config is not None:
        return checked_config(config, dtype, d_head, d_v, causal, mods, (q, k, v, out))
    device_index = q.get_device() if device_index is None else device_index
    config = chosen_config(dtype, d_head, d_v, causal, q.shape[1], mods, device_index, (q, k, v, out),
                           grid=(q.shape[0], q.shape[2]))
    if log.isEnabledFor(logging.DEBUG):
        log.debug("dispatching [B=%d, Sq=%d, Sk=%d, H=%d, H_k=%d, D=%d, D_v=%d] to %s (tuned table, else the "
                  "default for dtype/head dims/causal/seqlen and shared memory)", q.shape[0], q.shape[1],
                  k.shape[1], q.shape[2], k.shape[2], d_head, d_v, config.name)
    return config


def chosen_config(dtype: str, d_head: int, d_v: int, causal: bool, seqlen_q: int, mods: ScoreMods,
                  device_index: int, tensors, grid: tuple | None) -> ConfigBase:
    """The dispatcher's forward config on this device (dense and varlen calls alike; seqlen_q: the
    longest sequence): the tuned table's entry, else the default for the device's arch with its tile walk
    fitted to the call's `grid`, (batch, heads), or None for a varlen batch (dispatch.with_tile_walk),
    and its plain twin where this machine's ptxas serialized it (jit.unserialized: builds it here); in the
    sm_80 family where TMA cannot address one of `tensors` (with a DEBUG line)."""
    arch, limit = jit.arch_for(device_index), _smem_limit(device_index)[0]
    sink = mods.sink is not None
    features = (*zip(FEATURES, mods.flags), ("sink", sink))
    # tuned entries are for d_v == d_head: another d_v takes the dispatcher's default
    tuned = d_v == d_head and tuning.lookup(device_index, "fwd", dtype, d_head, bool(causal), seqlen_q, features)
    tuned = tuned and with_mask_warps(tuned, seqlen_q)  # (the table's entries are tuned without dropout)
    config = tuned or with_tile_walk(default_config(dtype, d_head, bool(causal), seqlen_q, limit, *mods.flags,
                                                    arch=arch, sink=sink, d_v=d_v),
                                     grid, seqlen_q, functools.partial(sm_count, device_index))
    if config.loads_with_tma and (why := _tma_unaddressable(*tensors)):
        config = default_config(dtype, d_head, bool(causal), seqlen_q, limit, *mods.flags, sink=sink, d_v=d_v)
        log.debug("TMA cannot address %s: running the %s family instead", why, config.family.name)
    elif not tuned:  # a default: its plain twin where this machine's ptxas serialized it (a tuned entry was timed)
        config = jit.unserialized(config, arch)
    return config


def checked_config(config: ConfigBase, dtype: str, d_head: int, d_v: int, causal: bool, mods: ScoreMods,
                   tensors) -> ConfigBase:
    """A caller's forward config, validated: ValueError (naming the field and the fix) where it does
    not match the call, or where it loads with TMA and TMA cannot address one of `tensors`."""
    _check_config_type(config, "fwd")
    _refuse_tma_unaddressable(config, tensors, "a flashjit.KernelConfig")
    for field, wanted, given in (("dtype", dtype, config.dtype), ("d_head", d_head, config.d_head),
                                 ("causal", bool(causal), config.causal), ("local", mods.local, config.local),
                                 ("softcap", mods.softcap, config.softcap), ("alibi", mods.alibi, config.alibi),
                                 ("dropout", mods.dropout, config.dropout), ("sink", mods.sink is not None, config.sink)):
        if wanted != given:
            raise ValueError(f"config.{field}={given!r} does not match the call ({field}={wanted!r}); "
                             f"use dataclasses.replace(config, {field}={wanted!r})")
    check_head_dim_v(config, d_v)
    return config.validate()


def check_head_dim_v(config: ConfigBase, d_v: int) -> None:
    """ValueError unless a caller's config computes v's head dim (config.head_dim_v: its d_v, or
    d_head where d_v is 0 or the family has none)."""
    if config.head_dim_v != d_v:
        fix = (f"use dataclasses.replace(config, d_v={d_v})" if hasattr(type(config), "d_v") else
               f"{type(config).__name__} has no d_v: pass a config of a family that has (flashjit.BwdConfig for the "
               "backward), or None")
        raise ValueError(f"config {config.name} has head_dim_v={config.head_dim_v} but v's head_dim is {d_v}; {fix}")


_kernels: dict = {}  # (config, device index) -> CompiledKernel: one dict lookup per call once loaded


def _kernel_for(config: ConfigBase, device_index: int):
    """First use of a config on a device: check its shared memory, find the arch (FLASHJIT_CUDA_ARCH
    is read here), compile or load."""
    limit, device_name = _smem_limit(device_index)
    config.check_shared_memory(limit, device_name)
    kernel = _kernels[(config, device_index)] = jit.get_kernel(config, jit.arch_for(device_index))
    return kernel


def _current_stream(device_index: int) -> int:
    # The raw handle without building a torch.cuda.Stream object (a few microseconds a call).
    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return getter(device_index) if getter else torch.cuda.current_stream(device_index).cuda_stream


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) bytes a strided tensor can touch (what an overlap test may compare)."""
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0) + 1
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _check_output(given, like: torch.Tensor, name: str, kernel_writes: bool = True, shape=None,
                  reads: tuple = ()) -> torch.Tensor:
    """An output tensor the caller passed: shaped like `like` (or `shape`), typed and placed like it
    and, where a kernel writes it directly, with a contiguous last dim and 16-byte aligned rows
    (16-byte stores), no element twice, and none of the memory of `reads` (named tensors the kernels
    read while they write it: e.g. dk in k's memory would feed dK to the deterministic dQ kernel)."""
    shape = like.shape if shape is None else shape
    if not isinstance(given, torch.Tensor) or given.shape != shape or given.dtype != like.dtype \
            or given.device != like.device:
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)} and dtype {like.dtype} on {like.device}")
    if kernel_writes and (given.stride(-1) != 1 or given.data_ptr() % 16 or any(s % 8 for s in given.stride()[:-1])):
        raise ValueError(f"{name} must have a contiguous last dim and 16-byte aligned rows, got strides "
                         f"{given.stride()}")
    if kernel_writes and torch._debug_has_internal_overlap(given) == 1:  # e.g. expand()ed: CTAs would race
        raise ValueError(f"{name} has elements that share memory (strides {given.stride()}, e.g. from expand()); "
                         "pass a tensor of its own, e.g. torch.empty of that shape")
    if kernel_writes and given.numel():
        start, end = _byte_span(given)
        for other_name, other in reads:
            if isinstance(other, torch.Tensor) and other.numel() and other.device == given.device:
                other_start, other_end = _byte_span(other)
                if start < other_end and other_start < end:
                    raise ValueError(f"{name} shares memory with {other_name}, which the kernels read while they write "
                                     f"{name}; pass a tensor of its own")
    return given


def _grad_out(given, like: torch.Tensor, name: str, reads: tuple = ()) -> torch.Tensor:
    """A gradient output shaped like `like`: the caller's (checked), else a fresh contiguous one."""
    if given is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    return _check_output(given, like, name, reads=reads)


def _out_for(given, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The out a forward kernel writes ([.., D_v]): the caller's (checked: not in k's or v's memory,
    which other CTAs read), else a fresh contiguous one."""
    if given is None:
        return torch.empty(out_shape(q, v), dtype=q.dtype, device=q.device)
    return _check_output(given, q, "out", shape=out_shape(q, v), reads=(("k", k), ("v", v)))


def _run(kernel, params, device_index: int) -> None:
    """Launch on torch's current stream of the tensors' device (the CUDA runtime launches on the
    current device: make it theirs when it is not)."""
    if torch.cuda.current_device() == device_index:
        kernel(params, _current_stream(device_index))
    else:
        with torch.cuda.device(device_index):
            kernel(params, _current_stream(device_index))


native_node = None  # flash_attn_func's C++ extension once flashjit/native.py has loaded it: plans launch through it


class _Plan:
    """A repeated forward call, worked out once: the kernel and its params with every size, stride and
    score value filled in. Made by the first call of a (shapes, strides, dtypes, devices, flags) key that
    the dispatcher chose a kernel for with no copies; later calls with that key skip the input checks,
    the config choice and the params packing: two allocations, four or five pointers, the launch.
    FLASHJIT_CUDA_ARCH is read when a key is first seen (as for every kernel); a tuned table written in
    this process (tuning.generation) retires the plans made before it, and so does a change of
    FLASHJIT_TUNED (its value is part of that generation)."""

    __slots__ = ("kernel", "template", "device_index", "device", "dtype", "out_shape", "lse_shape", "dropout",
                 "generation", "native")

    def __init__(self, kernel, params, q: torch.Tensor, out: torch.Tensor, want_lse: bool, dropout: bool):
        self.kernel, self.template, self.dropout = kernel, bytes(params), dropout
        self.native = None  # this plan in native_node's terms, made at its first use there
        self.device_index, self.device, self.dtype = q.get_device(), q.device, q.dtype
        batch, seqlen_q, heads, _ = q.shape
        self.out_shape, self.lse_shape = out.shape, ((batch, heads, seqlen_q) if want_lse else None)
        self.generation = tuning.current_generation()

    def launch(self, q, k, v, philox):
        """(out, lse or None), or None when this call cannot use the plan (an input not 16-byte aligned,
        or a tuned table written since)."""
        if not self.usable(q, k, v):
            return None
        node = native_node
        if node is not None and not self.dropout:  # the same launch from C++: ~2 us less Python a call
            return self.checked(node.launch(q, k, v, self.native_plan(node)))
        out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        params = FwdParams.from_buffer_copy(self.template)
        params.q, params.k, params.v, params.o = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
        lse = None
        if self.lse_shape is not None:
            lse = torch.empty(self.lse_shape, dtype=torch.float32, device=self.device)
            params.lse = lse.data_ptr()
        if self.dropout:
            params.philox_seed, params.philox_offset = philox or philox_state(self.device_index)
        _run(self.kernel, params, self.device_index)
        return out, lse

    def usable(self, q, k, v) -> bool:
        """Whether this call may take the plan: inputs 16-byte aligned (the kernels' vector loads; the
        planless path copies) and no tuned table written since it was made."""
        return not (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15 and self.generation == tuning.current_generation()

    def checked(self, result):
        """A result of native_node's launch or attn with this plan: itself, or the error it stands for
        raised (the extension returns its failures, never throws them: flashjit/csrc/autograd_node.cpp):
        a launch's CUDA error (an int) as the ctypes path raises it, a failure's message (a str) as
        torch.OutOfMemoryError or RuntimeError."""
        if isinstance(result, int):
            raise self.kernel.launch_error(result)
        if isinstance(result, str):
            kind, _, message = result.partition(": ")
            raise (torch.OutOfMemoryError if kind == "OutOfMemoryError" else RuntimeError)(message)
        return result

    def native_plan(self, node):
        """This plan as `node` (the C++ extension, flashjit/native.py) takes it: the params bytes, where
        q, k, v, o and lse go in them (checked here: the extension writes there unchecked), the
        library's launch entry point, the shapes."""
        if self.native is None:
            offsets = [getattr(FwdParams, f).offset for f in ("q", "k", "v", "o", "lse")]
            if not all(0 <= at <= len(self.template) - 8 for at in offsets):
                raise RuntimeError(f"flashjit: pointer offsets {offsets} outside the {len(self.template)}-byte params")
            self.native = node.Plan(self.template, offsets, ctypes.cast(self.kernel.lib.flashjit_run, ctypes.c_void_p).value,
                                    list(self.out_shape), list(self.lse_shape or ()))
        return self.native


class _BwdPlan:
    """A repeated backward call, worked out once, as _Plan is for the forward: made by the first call
    of a key (shapes, strides, dtypes, devices, flags of dout, q, k, v, out, lse) whose kernel the
    dispatcher chose with no copies, no caller outputs, no ALiBi or sink and no padding; later calls
    skip the checks, the config choice and the params packing: the gradients' and the scratch buffers'
    allocations, the pointers, the launch. Retired by a tuned table written since; FLASHJIT_CUDA_ARCH
    is read when a key is first seen, as for _Plan."""

    __slots__ = ("kernel", "template", "device_index", "device", "dtype", "shapes", "dvec_shape", "accum_shape",
                 "dkv_numel", "dropout", "generation")

    def __init__(self, kernel, params, q, k, v, dvec, dq_accum, dkv_accum, dropout: bool):
        self.kernel, self.template, self.dropout = kernel, bytes(params), dropout
        self.device_index, self.device, self.dtype = q.get_device(), q.device, q.dtype
        self.shapes, self.dvec_shape = (q.shape, k.shape, v.shape), dvec.shape
        self.accum_shape = None if dq_accum is None else dq_accum.shape
        self.dkv_numel = None if dkv_accum is None else dkv_accum.numel()
        self.generation = tuning.current_generation()

    def launch(self, dout, q, k, v, out, lse, philox):
        """(dq, dk, dv), or None when this call cannot use the plan (an input not 16-byte aligned, or a
        tuned table written since)."""
        if (q.data_ptr() | k.data_ptr() | v.data_ptr() | out.data_ptr() | dout.data_ptr()) & 15 \
                or self.generation != tuning.current_generation():
            return None
        dq, dk, dv = (torch.empty(shape, dtype=self.dtype, device=self.device) for shape in self.shapes)
        dvec = torch.empty(self.dvec_shape, dtype=torch.float32, device=self.device)
        params = BwdParams.from_buffer_copy(self.template)
        params.q, params.k, params.v, params.o, params.dout = (t.data_ptr() for t in (q, k, v, out, dout))
        params.dq, params.dk, params.dv = dq.data_ptr(), dk.data_ptr(), dv.data_ptr()
        params.lse, params.dvec = lse.data_ptr(), dvec.data_ptr()
        if self.accum_shape is not None:  # the atomic path's fp32 dQ sums (zeroed by the first kernel)
            dq_accum = torch.empty(self.accum_shape, dtype=torch.float32, device=self.device)
            params.dq_accum = dq_accum.data_ptr()
        if self.dkv_numel is not None:  # the head split's dK/dV sums, zeroed here (dkv_sums)
            dkv_accum = torch.zeros(self.dkv_numel, dtype=torch.float32, device=self.device)
            params.dkv_accum = dkv_accum.data_ptr()
        if self.dropout:
            params.philox_seed, params.philox_offset = philox
        _run(self.kernel, params, self.device_index)
        return dq, dk, dv


_plans: OrderedDict = OrderedDict()  # forward plan key -> _Plan, least recently made first
_bwd_plans: OrderedDict = OrderedDict()  # backward plan key -> _BwdPlan, likewise
_MAX_PLANS = 2048  # a server decoding against a growing cache makes a key per length: bounded, oldest out


def _plan_key(q, k, v, *flags, more=()):
    """The key of a call for _plans (or _bwd_plans, with the `more` tensors): everything its checks,
    config and params depend on but the data pointers. None when an argument is not what a plan can
    describe."""
    try:  # spelled out for q, k, v: this runs on every forward call (a generator costs ~2 us more)
        key = (q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype, k.device,
               v.shape, v.stride(), v.dtype, v.device, *flags)
        for t in more:
            key += _layout(t)
        hash(key)
        return key
    except (AttributeError, TypeError):  # not tensors, or a window_size given as a list
        return None


def _layout(t: torch.Tensor) -> tuple:
    return t.shape, t.stride(), t.dtype, t.device


def _remember(plans: OrderedDict, key, plan) -> None:
    plans[key] = plan
    if len(plans) > _MAX_PLANS:
        plans.popitem(last=False)


_walks: dict = {}  # (device, grid, lengths, tile) -> (dispatch.causal_walk's lists on the device, its grid) or None
_MAX_WALKS = 1024  # each at most ~35 KB (32 rounds of CTAs); past this many, new grids take the kernel's own walk


def _walk(config, q: torch.Tensor, k: torch.Tensor, device_index: int) -> tuple | None:
    """(the int32 tile walk on q's device, the grid it is for) that a persistent causal Hopper forward of this
    dense call's grid takes (dispatch.causal_walk), or None (the kernel then walks its static order). Made once
    a grid and never freed: plans and CUDA graphs captured with it hold its pointer. Not made while a graph
    is being captured (the copy to the device would break the capture): such a call walks the static order
    unless an earlier call of the same grid made it."""
    if not (isinstance(config, FwdSm90Config) and config.persistent and config.causal and not config.local):
        return None
    ctas = sm_count(device_index) * config.ctas_per_sm
    key = (device_index, q.shape[0] * q.shape[2], q.shape[1], k.shape[1], config.block_m, config.block_n, ctas)
    if key not in _walks and len(_walks) < _MAX_WALKS and not torch.cuda.is_current_stream_capturing():
        tiles = causal_walk(*key[1:])
        # setdefault: of two threads making one grid's walk, both launch the first stored (a replaced walk
        # would be freed under a plan holding its pointer).
        return _walks.setdefault(key, None if tiles is None else (
            _on_own_thread(lambda: torch.tensor(tiles, dtype=torch.int32, device=q.device)), tiles[0]))
    return _walks.get(key)


def _on_own_thread(make):
    """make() on a thread of its own, for a device tensor kept across calls: torch.compile's CUDA graph trees
    route every allocation of the calling thread into a graph's private pool while they warm the graph up,
    and a block kept there that no graph output owns fails their check of the pool (mode="reduce-overhead").
    The copy from host memory has finished when make() returns (a blocking copy: torch syncs its stream). A
    capture in torch's default "global" mode running meanwhile on another stream or thread still fails on that
    copy, as it did on the caller's thread (thread_local captures, the graph trees', do not)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flashjit-walk") as maker:
        return maker.submit(make).result()  # make()'s exception, if any, raised here


def _launch(q, k, v, config, causal, softmax_scale, out=None, want_lse=True, mods: ScoreMods = _NO_MODS,
            plan_key=None):
    """Choose and build the kernel (inputs already checked), allocate outputs. Returns (run, out, lse).
    With a plan_key, the call's _Plan is recorded when the dispatcher chose the kernel and no input
    needed a copy."""
    softmax_scale = softmax_scale_or_default(q, softmax_scale)
    device_index = q.get_device()
    chosen = config is None
    config = resolve_config(q, k, config, causal, device_index, mods, v=v, out=out)
    kernel = _kernels.get((config, device_index)) or _kernel_for(config, device_index)

    given = (q, k, v)
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    batch, seqlen_q, heads, _ = q.shape
    out = _out_for(out, q, k, v)
    lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device) if want_lse else None
    params = FwdParams(*tensor_ref(q), *tensor_ref(k), *tensor_ref(v), *tensor_ref(out),
                       lse.data_ptr() if want_lse else None, batch, seqlen_q, k.shape[1], heads, k.shape[2],
                       softmax_scale, *mods.values)
    walk = _walk(config, q, k, device_index)
    if walk is not None:
        params.tile_walk, params.tile_walk_grid = walk[0].data_ptr(), walk[1]
    if plan_key is not None and chosen and all(a is b for a, b in zip(given, (q, k, v))) and not mods.alibi and mods.sink is None:
        _remember(_plans, plan_key, _Plan(kernel, params, q, out, want_lse, mods.dropout))

    def run():
        _run(kernel, params, device_index)

    return run, out, lse


def forward(q, k, v, config: ConfigBase | None = None, causal: bool = False,
            softmax_scale: float | None = None, return_lse: bool = False, out: torch.Tensor | None = None,
            window_size=(-1, -1), softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
            dropout_p: float = 0.0, philox: tuple[int, int] | None = None, learnable_sink: torch.Tensor | None = None):
    """Attention forward with the JIT kernel `config` (default: the dispatcher's choice), written
    into `out` when given (shaped [B, Sq, H, D_v]: q's with v's head dim). window_size/softcap/
    alibi_slopes/dropout_p as in flash-attn; for dropout, pass the same `philox` (seed, offset) to
    backward() (philox_state() draws one from torch's generator; without it forward draws its own).
    learnable_sink: [H] logits (gpt-oss sinks, FlashAttention-4's name), one per query head in the
    units of the scaled scores, each joining its head's softmax denominators; the lse returned
    includes it (a row that sees no key then has lse = its sink, out = 0)."""
    if philox is not None:
        philox = checked_philox(philox)
    if isinstance(softmax_scale, torch.Tensor):  # a number in the plan key, not the tensor object
        softmax_scale = softmax_scale_or_default(q, softmax_scale)
    plan_key = None
    if config is None and out is None and alibi_slopes is None and learnable_sink is None:
        plan_key = _plan_key(q, k, v, causal, softmax_scale, window_size, softcap, dropout_p, return_lse)
        plan = _plans.get(plan_key) if plan_key is not None else None
        if plan is not None and (result := plan.launch(q, k, v, philox)) is not None:
            return result if return_lse else result[0]
    q, k, v, copied = _contiguous_qkv(q, k, v)
    if copied:  # no plan for the caller's strides
        plan_key = None
    check_qkv(q, k, v)
    if q.shape[-1] % 8 or v.shape[-1] % 8:
        if out is not None:  # checked before anything runs; written by a copy, so any layout does
            _check_output(out, q, "out", kernel_writes=False, shape=out_shape(q, v))
        padded = forward(*_pad_head_dim(q, k, v), config=config, causal=causal,
                         softmax_scale=softmax_scale_or_default(q, softmax_scale), return_lse=return_lse,
                         window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                         philox=philox, learnable_sink=learnable_sink)
        out = _unpad_into(out, padded[0] if return_lse else padded, v.shape[-1])
        return (out, padded[1]) if return_lse else out
    mods = score_mods(q, causal, window_size, softcap, alibi_slopes, dropout_p, philox, learnable_sink)
    run, out, lse = _launch(q, k, v, config, causal, softmax_scale, out, want_lse=return_lse, mods=mods,
                            plan_key=plan_key)
    run()
    return (out, lse) if return_lse else out


def forward_timed(q, k, v, config: ConfigBase | None = None, causal: bool = False,
                  softmax_scale: float | None = None, window_size=(-1, -1), softcap: float = 0.0,
                  alibi_slopes: torch.Tensor | None = None, dropout_p: float = 0.0,
                  learnable_sink: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """forward(), plus the kernel's own time in milliseconds from CUDA events around the launch
    (compilation and input checks are outside the timed region). Synchronises the stream."""
    check_qkv(q, k, v)
    d_v = v.shape[-1]
    if q.shape[-1] % 8 or d_v % 8:
        softmax_scale = softmax_scale_or_default(q, softmax_scale)
        q, k, v = _pad_head_dim(q, k, v)
    mods = score_mods(q, causal, window_size, softcap, alibi_slopes, dropout_p, learnable_sink=learnable_sink)
    run, out, _ = _launch(q, k, v, config, causal, softmax_scale, want_lse=False, mods=mods)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.device(q.device):
        start.record()
        run()
        end.record()
        end.synchronize()
    return out[..., :d_v], start.elapsed_time(end)


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, causal: bool = False, softmax_scale: float | None = None, window_size=(-1, -1),
             softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None, dropout_p: float = 0.0,
             philox: tuple[int, int] | None = None, deterministic: bool = False,
             config: BwdConfig | BwdSm90Config | None = None, dq: torch.Tensor | None = None,
             dk: torch.Tensor | None = None, dv: torch.Tensor | None = None,
             learnable_sink: torch.Tensor | None = None):
    """Gradients (dq, dk, dv) of forward() given dout and the forward's out (both [B, Sq, H, D_v]) and lse;
    (dq, dk, dv, dsink) when the forward had learnable_sink (dsink shaped and typed like it: per head,
    -sum over batch and rows of P_sink * rowsum(dO o O), P_sink = exp(sink - lse), computed in fp32).
    GQA: dk/dv are summed over the query heads that share each key/value head. Head dims up to 256.
    deterministic=False (flash-attn's default) adds dQ up with fp32 atomics, so its last bits can
    vary run to run; deterministic=True uses a separate dQ kernel with no atomics (bit-identical
    results, about 1.1-1.2x the time). `config` (a BwdConfig, or a BwdSm90Config on sm_90a) overrides
    the dispatcher's choice (its deterministic then decides: always False for a BwdSm90Config); its
    dtype, head dim and features must match the call.
    dq, dk, dv: optional output tensors (as flash-attn's low-level backward takes), shaped and typed
    like q, k, v with a contiguous last dim and 16-byte aligned rows; every element is written.
    GQA on sm_90a: the dispatcher runs one dK/dV CTA per query head where one per key/value head would
    leave too few CTAs (BwdSm90Config.head_split; dispatch.with_head_split); a config passed here is
    run as it is."""
    if philox is not None:
        philox = checked_philox(philox)
    if isinstance(softmax_scale, torch.Tensor):  # a number in the plan key, not the tensor object
        softmax_scale = softmax_scale_or_default(q, softmax_scale)
    plan_key = None
    if config is None and alibi_slopes is None and learnable_sink is None and dq is dk is dv is None \
            and not (dropout_p and philox is None):
        plan_key = _plan_key(q, k, v, causal, softmax_scale, window_size, softcap, dropout_p, deterministic,
                             more=(dout, out, lse))
        plan = _bwd_plans.get(plan_key) if plan_key is not None else None
        if plan is not None and (grads := plan.launch(dout, q, k, v, out, lse, philox)) is not None:
            return grads
    q, k, v, copied = _contiguous_qkv(q, k, v)
    if copied:  # no plan for the caller's strides
        plan_key = None
    check_qkv(q, k, v)
    check_douts(dout, out, q, v)
    lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != lse_shape or lse.dtype != torch.float32 \
            or lse.device != q.device:
        raise ValueError(f"lse must be the forward's float32 log-sum-exp of shape {lse_shape} [batch, heads, "
                         f"seqlen_q] on {q.device} (forward(..., return_lse=True))")
    softmax_scale = softmax_scale_or_default(q, softmax_scale)
    if q.shape[-1] % 8 or v.shape[-1] % 8:
        given = [None if t is None else _check_output(t, like, name, kernel_writes=False)
                 for t, like, name in zip((dq, dk, dv), (q, k, v), ("dq", "dk", "dv"))]
        padded = backward(*_pad_head_dim(dout, q, k, v, out), lse, causal, softmax_scale, window_size, softcap,
                          alibi_slopes, dropout_p, philox, deterministic, config, learnable_sink=learnable_sink)
        grads = tuple(_unpad_into(t, grad, like.shape[-1]) for t, grad, like in zip(given, padded, (q, k, v)))
        return grads + padded[3:]
    if dropout_p and philox is None:
        raise ValueError("backward with dropout needs the forward's philox=(seed, offset) to regenerate its mask")
    mods = score_mods(q, causal, window_size, softcap, alibi_slopes, dropout_p, philox, learnable_sink)
    device_index = q.get_device()
    if config is None and _pads_value(q, v, causal, mods, deterministic, device_index, q.shape[1]):
        return with_value_padded(lambda dout, v, out: backward(
            dout, q, k, v, out, lse, causal, softmax_scale, window_size, softcap, alibi_slopes, dropout_p, philox,
            deterministic, dq=dq, dk=dk, learnable_sink=learnable_sink), dout, q, v, out, dv)
    given = (q, k, v, out, dout, lse)
    # out and dout are only read: a layout the kernels cannot address is copied once (as _aligned does)
    out, dout = (t if t.stride(-1) == 1 else t.contiguous() for t in (out, dout))
    chosen = config is None
    config = bwd_config(config, q.dtype, q.shape[3], causal, q.shape[1], mods, deterministic, device_index,
                        d_v=v.shape[3], grid=(q.shape[0], q.shape[2], k.shape[2], k.shape[1]), tensors=(q, k, v, dout))
    if chosen and log.isEnabledFor(logging.DEBUG):
        log.debug("backward [B=%d, Sq=%d, Sk=%d, H=%d, H_k=%d, D=%d, D_v=%d] dispatched to %s (default for "
                  "dtype/head dims/features/deterministic on %s and its shared memory)", q.shape[0], q.shape[1],
                  k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3], config.name, jit.arch_for(device_index))
    reads = (("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout))
    dq, dk, dv = (_grad_out(given, like, name, reads) for given, like, name in ((dq, q, "dq"), (dk, k, "dk"), (dv, v, "dv")))
    if q.numel() == 0:  # Sq = 0 (or no batch or heads): no query reaches any key, dK = dV = 0 exactly
        dk.zero_(), dv.zero_()
        return (dq, dk, dv) if learnable_sink is None else (dq, dk, dv, torch.zeros_like(learnable_sink))
    kernel = _kernels.get((config, device_index)) or _kernel_for(config, device_index)
    q, k, v, out, dout = (_aligned(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    batch, seqlen_q, heads, _ = q.shape
    dvec = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    # The atomic path's fp32 dQ sums, zeroed by the first kernel (dQ is q's width: d_tile, whatever D_v).
    dq_accum = None if config.deterministic else torch.empty((batch, heads, seqlen_q, config.d_tile),
                                                             dtype=torch.float32, device=q.device)
    dkv_accum = dkv_sums(config, batch * k.shape[2] * k.shape[1], device_index)
    refs = [x for t in (q, k, v, out, dout, dq, dk, dv) for x in tensor_ref(t)]
    params = BwdParams(*refs, lse.data_ptr(), dvec.data_ptr(), 0 if dq_accum is None else dq_accum.data_ptr(),
                       batch, seqlen_q, k.shape[1], heads, k.shape[2], softmax_scale, *mods.values,
                       dkv_accum=0 if dkv_accum is None else dkv_accum.data_ptr())
    _run(kernel, params, device_index)
    if plan_key is not None and chosen and all(a is b for a, b in zip(given, (q, k, v, out, dout, lse))):
        _remember(_bwd_plans, plan_key, _BwdPlan(kernel, params, q, k, v, dvec, dq_accum, dkv_accum, mods.dropout))
    if learnable_sink is None:
        return dq, dk, dv
    return dq, dk, dv, sink_grad(mods, lse, dvec, head_dim=1).to(learnable_sink.dtype)


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def dkv_sums(config, key_rows: int, device_index: int) -> torch.Tensor | None:
    """The zeroed fp32 dK and dV sums a head-split backward kernel adds to (kernels/common/params.cuh:
    BwdParams::dkv_accum, key_rows rows of the kernel's tile width each), else None."""
    if not (isinstance(config, BwdSm90Config) and config.head_split):
        return None
    return torch.zeros(2 * max(key_rows, 1) * config.d_tile, dtype=torch.float32,
                       device=torch.device("cuda", device_index))


def _pads_value(q: torch.Tensor, v: torch.Tensor, causal: bool, mods: ScoreMods, deterministic: bool,
                device_index: int, seqlen_q: int) -> bool:
    """Whether the dispatcher's backward for this call runs v (and out, dout) zero-padded to q's head
    dim on the wgmma kernel, as faster than the native d_v kernel (dispatch.backward_pads_value), and no
    tuned entry for the padded problem picks another kernel (then padding would only cost)."""
    if v.shape[-1] == q.shape[-1] or not backward_pads_value(
            _DTYPES[q.dtype], q.shape[-1], v.shape[-1], bool(causal), *mods.flags, deterministic=bool(deterministic),
            smem_limit=_smem_limit(device_index)[0], wgmma=jit.arch_for(device_index) == WGMMA_ARCH):
        return False
    tuned = tuning.lookup(device_index, "bwd", _DTYPES[q.dtype], q.shape[-1], bool(causal), seqlen_q,
                          tuple(zip(FEATURES, mods.flags)), bool(deterministic))
    return tuned is None or isinstance(tuned, BwdSm90Config)


def with_value_padded(run, dout: torch.Tensor, q: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dv):
    """The _pads_value route of backward() and varlen_backward(): run(dout, v, out) with the three
    zero-padded to q's head dim (the padded columns give out, D and dP nothing, and dv 0), its dv
    cropped back, into the caller's dv when given (checked first: it is written by a copy afterwards)."""
    if dv is not None:
        _check_output(dv, v, "dv", kernel_writes=False)
    grads = run(*(torch.nn.functional.pad(t, (0, q.shape[-1] - t.shape[-1])) for t in (dout, v, out)))
    return (*grads[:2], _unpad_into(dv, grads[2], v.shape[-1]), *grads[3:])


def bwd_config(config, dtype: torch.dtype, d_head: int, causal: bool, seqlen_q: int, mods: ScoreMods,
               deterministic: bool, device_index: int, d_v: int | None = None, grid: tuple | None = None,
               tensors=()):
    """The backward config of a call (d_v: v's head dim, None for d_head): `config` checked against
    it, or the tuned table's entry for the problem, else the dispatcher's default for the device's arch
    and shared memory; a chosen one with head_split where the call's grid (batch, heads, heads_k,
    seqlen_k) is short (dispatch.with_head_split). `tensors`, what the Hopper kernel's TMA producer
    would load (q, k, v, dout): where a map cannot address one, a chosen config copies with cp.async
    instead (tma=False, a DEBUG line; the wide kernel, TMA-fed only: the sm_80 family) and a given one is a
    ValueError."""
    d_v = d_head if d_v is None else d_v
    default = functools.partial(default_bwd_config, _DTYPES[dtype], d_head, bool(causal), *mods.flags,
                                deterministic=bool(deterministic), smem_limit=_smem_limit(device_index)[0], d_v=d_v)
    wanted = default(wgmma=jit.arch_for(device_index) == WGMMA_ARCH)
    if config is None:  # tuned entries are for d_v == d_head
        chosen = (d_v == d_head and tuning.lookup(device_index, "bwd", _DTYPES[dtype], d_head, bool(causal), seqlen_q,
                                                  tuple(zip(FEATURES, mods.flags)), bool(deterministic))) or wanted
        if chosen.loads_with_tma and (why := _tma_unaddressable(*tensors)):
            chosen = dataclasses.replace(chosen, tma=False)
            if chosen.problems():  # the wide wgmma kernel (d_head > 128) has no cp.async feed: the sm_80 family
                chosen = default()
            log.debug("TMA cannot address %s: the backward copies with cp.async (%s)", why, chosen.name)
        return chosen if grid is None else with_head_split(chosen, *grid, sm_count(device_index))
    _check_config_type(config, "bwd")
    config.validate()
    if config.loads_with_tma and _tma_unaddressable(*tensors):  # (the wide kernel has no tma=False twin)
        copies = not dataclasses.replace(config, tma=False).problems()
        _refuse_tma_unaddressable(config, tensors, "the config with tma=False" if copies else
                                  "config=None (the dispatcher then picks a kernel that can)")
    mismatched = [f"{f}={getattr(config, f)!r} (the call needs {getattr(wanted, f)!r})"
                  for f in ("dtype", "d_head", "causal", *FEATURES) if getattr(config, f) != getattr(wanted, f)]
    if mismatched:
        raise ValueError(f"config {config.name} does not match the inputs: " + ", ".join(mismatched))
    check_head_dim_v(config, d_v)
    return config


def check_douts(dout, out, q: torch.Tensor, v: torch.Tensor) -> None:
    """ValueError unless dout and out are shaped like q with v's head dim, in q's dtype on its device
    (dense [B, Sq, H, D_v] or varlen [total_q, H, D_v])."""
    shape = out_shape(q, v)
    for name, t in (("dout", dout), ("out", out)):
        if not isinstance(t, torch.Tensor) or t.shape != shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must match q (with v's head_dim): shape {shape}, {q.dtype} on {q.device}")


def sink_grad(mods: ScoreMods, lse: torch.Tensor, dvec: torch.Tensor, head_dim: int) -> torch.Tensor:
    """dL/dsink per head, in fp32: -sum over rows of P_sink D, with P_sink = exp(sink - lse) and D =
    rowsum(dO o O), which the first backward kernel left in dvec (times 1 - p with dropout). No kernel
    needed. lse/dvec hold the heads in dimension `head_dim` ([B, H, Sq]: 1; varlen's [H, total_q]: 0)."""
    rowsum = dvec * mods.values[8] if mods.dropout else dvec
    shape = [1] * lse.dim()
    shape[head_dim] = -1
    terms = torch.exp(mods.sink.view(shape) - lse) * rowsum
    return -terms.sum([d for d in range(lse.dim()) if d != head_dim])

"""Variable-length batches: flash-attn 2.x's flash_attn_varlen_func and its packed forms, with autograd.

    q [total_q, H, D], k [total_k, H_k, D]      the batch's B sequences packed along the rows
    v [total_k, H_k, D_v]                       D_v <= D (MLA-style, e.g. 192/128; usually D_v = D)
    cu_seqlens_q, cu_seqlens_k                  int32 [B + 1] on q's device: sequence b is rows
                                                cu_seqlens[b]:cu_seqlens[b + 1] (0, non-decreasing, total)
    max_seqlen_q, max_seqlen_k                  Python ints, at least every sequence's length
    -> out [total_q, H, D_v]; with return_attn_probs also softmax_lse [H, total_q] fp32 (flash-attn's
       varlen layout) and S_dmask: with dropout [B, H, max_seqlen_q, max_seqlen_k] (each sequence's
       probabilities, zero-padded; dropped entries negated), without it empty (as flash-attn)

Each sequence is computed exactly as a dense call of its own lengths: causal is bottom-right aligned
per sequence, windows and ALiBi distances count from its own diagonal, zero-length sequences are
allowed (a sequence with no keys gives out = 0 and lse = +inf, or its sink), and dropout keeps entry
(i, j) of head h of sequence b iff a dense [B, H, max_seqlen_q, max_seqlen_k] call with the same
Philox state would (flashjit.reference.philox_keep_mask, sliced to the sequence).

The kernels are the dense ones (kernels/common/params.cuh: VarlenParams): a CTA reads its sequence's
bounds from cu_seqlens and skips a block that lies past the sequence's end. On sm_90a the varlen
forward dispatches as a dense call does (the Hopper forward, whose TMA maps see the packed tensors as
one batch entry: a tile ending past its sequence stores O from registers and zeroes the V rows it read
past its keys, so no other sequence's rows are written or leak in; the sm_80 family for a
max_seqlen_q of 64 or less or a broadcast input), and so does the backward (the wgmma kernel where the
dense dispatcher picks it). The forward and the backward must not race with writes to cu_seqlens
(the kernels' CTAs read them independently).

What is checked without a device sync: dtypes, devices, shapes, strides, that max_seqlen_* are ints
and 0 only for empty tensors. What is not: cu_seqlens' values (monotonic, from 0 to the totals) and
that max_seqlen_* bound every sequence. The kernels clamp every offset to the tensors, so offsets that
break the contract give wrong results but never an access outside q, k, v or the outputs; rows that
no sequence covers are left unwritten, as in flash-attn. The reference backend (FLASHJIT_BACKEND=
reference) reads the offsets on the host and checks them all.
"""
from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
from torch import Tensor

from . import interface, kvattn, ops
from .flash_api import causal_window, no_s_dmask
from .interface import backend
from .kvcache import reference_kvcache_attention
from .launch import BwdParams, FwdParams, tensor_ref
from .reference import attention_reference, philox_keep_mask

log = logging.getLogger("flashjit")
_INT32_MAX = 2**31 - 1


# ---- argument checks -------------------------------------------------------------------------------

def _check_max_seqlen(value, name: str, total: int, total_name: str) -> int:
    """max_seqlen_q/_k as an int (a one-element integer tensor was read on the host before this, by
    _seqlen_from_tensor), at most the total (no sequence is longer, so a larger bound only launches CTAs
    that exit)."""
    if isinstance(value, torch.Tensor) or isinstance(value, bool):
        got = f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else value
        raise TypeError(f"{name} must be an int or a one-element integer tensor (the longest sequence's length, as "
                        f"flash-attn takes it), got {got}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a Python int (the longest sequence's length), got {value!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value == 0 and total > 0:
        raise ValueError(f"{name} is 0 but {total_name} has {total} rows: it must be at least the longest sequence's "
                         "length")
    return min(value, total)


def _check_cu_seqlens(cu, name: str, device, reference: bool) -> torch.Tensor:
    """int32 [B + 1], 1-D, on `device` (any device for the reference backend); contiguous (copied if not)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype int32, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must have dtype torch.int32 (cumulative sequence lengths, as flash-attn), got "
                         f"{cu.dtype}; pass {name}.to(torch.int32)")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D of shape [batch + 1] with batch >= 1, got shape {tuple(cu.shape)}")
    if not reference and cu.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {cu.device}")
    return cu.contiguous()


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, reference: bool = False):
    """ValueError/TypeError naming the argument, before anything is launched. Returns (batch,
    max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k), the maxima clamped to the totals."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            what = "total_q" if name == "q" else "total_k"
            raise ValueError(f"{name} must have 3 dims [{what}, heads, head_dim] (a variable-length batch packed "
                             f"along the rows), got shape {tuple(t.shape)}; for [batch, seqlen, heads, head_dim] use "
                             "flash_attn_func")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k and v must have the same shape (but for v's head_dim, which may be smaller), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k head_dim {k.shape[2]} does not match q's {q.shape[2]}")
    # The dense checks (dtype, device, last-dim stride, head dims, GQA ratio, 32-bit sizes) on
    # [1, total, H, D] views, with the dense path's messages.
    interface.check_qkv(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), reference=reference)
    cu_seqlens_q = _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.device, reference)
    cu_seqlens_k = _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q.device, reference)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    batch = cu_seqlens_q.numel() - 1
    if batch * q.shape[1] > _INT32_MAX:
        raise ValueError("batch * heads must fit in 32 bits")
    max_seqlen_q = _check_max_seqlen(max_seqlen_q, "max_seqlen_q", q.shape[0], "q")
    max_seqlen_k = _check_max_seqlen(max_seqlen_k, "max_seqlen_k", k.shape[0], "k")
    return batch, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k


def _batch_view(q: torch.Tensor, batch: int) -> torch.Tensor:
    """A [batch, total_q, H, D] view of q (stride 0 over the batch; no copy) for interface.score_mods,
    which reads the batch and head counts (ALiBi slopes [H] or [B, H], sinks [H]) and the device."""
    return q.unsqueeze(0).expand(batch, -1, -1, -1)


def _check_paged(q, k_cache, v_cache, block_table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 reference: bool):
    """flash_attn_varlen_func's checks with block_table: q [total_q, H, D], k/v caches [num_pages,
    page_size, H_k, D] (pages a multiple of 16 rows, one head dim for both, a multiple of 8, as
    flash_attn_with_kvcache's), block_table int32 [B, max_pages]. Returns (batch, max_seqlen_q,
    max_seqlen_k, cu_seqlens_q, cu_seqlens_k, block_table), block_table contiguous."""
    for name, t, dims, layout in (("q", q, 3, "[total_q, heads, head_dim]"),
                                  ("k", k_cache, 4, "[num_pages, page_size, heads_k, head_dim] (a paged cache)"),
                                  ("v", v_cache, 4, "[num_pages, page_size, heads_k, head_dim] (a paged cache)")):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            raise ValueError(f"with block_table, {name} must be a tensor of {dims} dims {layout}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k_cache.shape != v_cache.shape or len(k_cache) == 0:
        raise ValueError(f"with block_table, k and v must be paged caches of one non-empty shape (flash-attn's "
                         f"caches share a head dim), got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    interface.check_qkv(q.unsqueeze(0), k_cache[:1], v_cache[:1], reference=reference)  # dtypes, devices, heads
    if k_cache.shape[1] % kvattn.PAGE_MULTIPLE or q.shape[-1] % 8:
        raise ValueError(f"with block_table, the page size (k.shape[1] = {k_cache.shape[1]}) must be a multiple of "
                         f"{kvattn.PAGE_MULTIPLE} and the head dim ({q.shape[-1]}) a multiple of 8")
    cu_seqlens_q = _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.device, reference)
    cu_seqlens_k = _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q.device, reference)
    batch = cu_seqlens_q.numel() - 1
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 \
            or len(block_table) != batch or cu_seqlens_k.numel() != batch + 1 \
            or (not reference and block_table.device != q.device):
        raise ValueError(f"block_table must be an int32 tensor of shape ({batch}, max_pages) on {q.device} (a row of "
                         f"page numbers a sequence, as cu_seqlens_q/_k's {batch} sequences), got "
                         f"{tuple(block_table.shape) if isinstance(block_table, torch.Tensor) else block_table!r}")
    slots = k_cache.shape[1] * block_table.shape[1]
    if slots > interface.MAX_SEQLEN or len(k_cache) > _INT32_MAX:
        raise ValueError(f"block_table's {block_table.shape[1]} pages of {k_cache.shape[1]} slots, over {len(k_cache)} "
                         f"pages in k/v, exceed what the kernels address (at most 2**29 = {interface.MAX_SEQLEN} "
                         "slots a sequence and 2**31 - 1 pages)")
    max_seqlen_q = _check_max_seqlen(max_seqlen_q, "max_seqlen_q", q.shape[0], "q")
    max_seqlen_k = _check_max_seqlen(max_seqlen_k, "max_seqlen_k", slots, "a block_table row's slots")
    return batch, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k, block_table.contiguous()


def _paged(q, k_cache, v_cache, block_table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
           softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs, learnable_sink):
    """flash_attn_varlen_func over a paged K/V cache: sequence b's keys are the first cu_seqlens_k[b + 1]
    - cu_seqlens_k[b] slots of its block_table row (slot s in page block_table[b, s // page_size], row
    s % page_size). Inference only (no backward, no dropout); the KV-cache kernels. return_attn_probs
    gives (out, softmax_lse [H, total_q], empty S_dmask) as without a block_table (e.g. for merging the
    partial results of cascade attention). Under torch.compile: the custom op flashjit::paged_varlen_fwd."""
    if dropout_p:
        raise ValueError("flash_attn_varlen_func with block_table takes no dropout_p (inference only: the paged "
                         "cache's kernels, as flash_attn_with_kvcache's, have no dropout)")
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in (q, k_cache, v_cache, learnable_sink)):
        raise ValueError("flash_attn_varlen_func with block_table has no backward (as flash-attn's): run it under "
                         "torch.no_grad() or pass k and v as [total_k, heads_k, head_dim] tensors")
    if torch.compiler.is_compiling():  # the checks and the launch inside the op, at run time
        out, lse = paged_varlen_fwd(q, k_cache, v_cache, block_table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, alibi_slopes, learnable_sink, softmax_scale, causal,
                                    int(window_size[0]), int(window_size[1]), float(softcap))
    else:
        out, lse = _paged_run(q, k_cache, v_cache, block_table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, softmax_scale, causal, window_size, softcap, alibi_slopes, learnable_sink,
                              return_attn_probs)
    return (out, lse, no_s_dmask(q)) if return_attn_probs else out


def _paged_run(q, k_cache, v_cache, block_table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
               softmax_scale, causal, window_size, softcap, alibi_slopes, learnable_sink, return_lse: bool):
    """_paged's (out, lse: may be None without return_lse) once its flags are checked."""
    reference = backend() == "reference"
    batch, max_seqlen_q, max_seqlen_k, cu_q, cu_k, block_table = _check_paged(
        q, k_cache, v_cache, block_table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, reference)
    if max_seqlen_q == 1 and q.shape[0] == batch:  # decoding: one query a sequence (B of them, none more than 1)
        return _paged_decode(q, k_cache, v_cache, block_table, cu_q, cu_k, max_seqlen_k, causal, softmax_scale,
                             window_size, softcap, alibi_slopes, learnable_sink, return_lse, reference)
    if reference:  # each sequence's pages in table order, cut to its keys: the dense varlen reference on them
        offsets = _host_offsets(cu_k, "cu_seqlens_k", int(cu_k[-1]), max_seqlen_k, "max_seqlen_k")
        lens = [b - a for a, b in zip(offsets, offsets[1:])]
        k, v = (torch.cat([cache[block_table[b].long().to(cache.device)].flatten(0, 1)[:n] for b, n in enumerate(lens)])
                for cache in (k_cache, v_cache))
        return _reference(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, 0.0, softmax_scale, causal, window_size,
                          softcap, alibi_slopes, True, learnable_sink)[:2]
    return _paged_kernels(q, k_cache, v_cache, block_table, cu_q, cu_k, batch, max_seqlen_q, causal, softmax_scale,
                          window_size, softcap, alibi_slopes, learnable_sink, return_lse)


def _paged_decode(q, k_cache, v_cache, block_table, cu_seqlens_q, cu_seqlens_k, max_seqlen_k: int, causal,
                  softmax_scale, window_size, softcap, alibi_slopes, learnable_sink, return_lse: bool, reference: bool):
    """_paged_run for a decoding batch (sequence b's one query is row b of q) as flash_attn_with_kvcache's call
    with cache_seqlens = the sequences' key counts: its kernels pack a GQA group's query heads into one tile's
    rows and split long key ranges over CTAs (one CTA a query block, _paged_kernels, leaves most SMs idle at a
    decoding batch's B x H), as flash-attn's varlen call does at max_seqlen_q == 1. The reference backend takes
    the same route (kvcache.reference_kvcache_attention, the kernels' contract), so the CPU tests check it."""
    seqlens_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]  # int32 [B]; the kernels clamp each to its table row's slots
    kwargs = dict(block_table=block_table, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                  softcap=softcap, alibi_slopes=alibi_slopes, learnable_sink=learnable_sink)
    if reference:  # the offsets read on the host and checked, as on the reference's other paths
        _host_offsets(cu_seqlens_q, "cu_seqlens_q", q.shape[0], 1, "max_seqlen_q")
        _host_offsets(cu_seqlens_k, "cu_seqlens_k", int(cu_seqlens_k[-1]), max_seqlen_k, "max_seqlen_k")
        out, lse = reference_kvcache_attention(q[:, None], k_cache, v_cache, seqlens_k, **kwargs)
    else:
        out, lse = kvattn.forward_kvcache(q[:, None], k_cache, v_cache, seqlens_k, return_lse=True, **kwargs)
    # lse [B, H, 1] -> [H, total_q] (total_q = B): the varlen layout
    return out[:, 0], (lse[:, :, 0].t().contiguous() if return_lse else None)


# ---- the kernels -----------------------------------------------------------------------------------
def _paged_kernels(q, k_cache, v_cache, block_table, cu_seqlens_q, cu_seqlens_k, batch: int, max_seqlen_q: int,
                   causal: bool, softmax_scale, window_size, softcap, alibi_slopes, learnable_sink, return_lse: bool):
    """(out [total_q, H, D], lse [H, total_q] fp32, None without return_lse) of a variable-length batch (q
    packed, flashjit/varlen.py checked everything) over a paged cache: the kvcache kernels with the queries'
    VarlenParams, each sequence's keys the first cu_seqlens_k[b + 1] - cu_seqlens_k[b] slots of its block_table
    row (kernels/fwd_sm80.cuh clamps them to the row's slots). One CTA a query block: no split-KV, whose
    partials are laid out per dense batch entry. The kvcache kernels: kvattn.py's config and index fields."""
    total_q, heads, d_head = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # The kernels' varlen planes; without it the kernel skips the writes (a serving call's allocation saved).
    lse = torch.empty((heads, total_q), dtype=torch.float32, device=q.device) if return_lse else None
    if total_q == 0:
        return out, lse
    mods = interface.score_mods(_batch_view(q, batch), causal, window_size, softcap, alibi_slopes,
                                learnable_sink=learnable_sink)
    device_index = q.get_device()
    config = kvattn._config(q.dtype, d_head, causal, max_seqlen_q <= 64, *mods.flags[:3], mods.sink is not None,
                            interface._smem_limit(device_index)[0])
    kernel = interface._kernels.get((config, device_index)) or interface._kernel_for(config, device_index)
    q, k_cache, v_cache = (interface._aligned(t) for t in (q, k_cache, v_cache))
    slots = k_cache.shape[1] * block_table.shape[1]
    params = FwdParams(*_ref(q), *tensor_ref(k_cache), *tensor_ref(v_cache), *_ref(out),
                       None if lse is None else lse.data_ptr(), batch, max_seqlen_q, slots, heads, k_cache.shape[2],
                       interface.softmax_scale_or_default(q, softmax_scale),
                       *mods.values, cu_seqlens_q.data_ptr(), cu_seqlens_k.data_ptr(), total_q, 2**31 - 1)
    kvattn._set_indices(params, None, block_table, None)
    params.table_stride, params.page_size, params.num_rows = block_table.shape[1], k_cache.shape[1], k_cache.shape[0]
    if log.isEnabledFor(logging.DEBUG):
        log.debug("paged varlen forward [total_q=%d, B=%d, H=%d, H_k=%d, D=%d, pages of %d] on %s", total_q, batch,
                  heads, k_cache.shape[2], d_head, k_cache.shape[1], config.name)
    interface._run(kernel, params, device_index)
    return out, lse



def _ref(t: torch.Tensor) -> tuple:
    """flashjit::TensorRef of a packed [total, H, D] tensor: batch stride 0 (kernels/common/params.cuh:
    VarlenParams; the rows carry the sequences)."""
    return t.data_ptr(), 0, t.stride(0), t.stride(1)


_aligned = interface._aligned      # any rank: [total, H, D] here
_launch = interface._run
_output = interface._grad_out      # an output a kernel writes: the caller's (checked), else a fresh one


def _kernel(config, device_index: int):
    return interface._kernels.get((config, device_index)) or interface._kernel_for(config, device_index)


def _forward_config(q, k, v, out, config, causal: bool, max_seqlen_q: int, mods, device_index: int):
    """The dispatcher's choice for the longest sequence (as a dense call's: the Hopper family on
    sm_90a), or the caller's config checked against the call."""
    dtype, d_head, d_v = interface._DTYPES[q.dtype], q.shape[-1], v.shape[-1]
    if config is not None:
        return interface.checked_config(config, dtype, d_head, d_v, causal, mods, (q, k, v, out))
    config = interface.chosen_config(dtype, d_head, d_v, causal, max_seqlen_q, mods, device_index, (q, k, v, out),
                                     grid=None)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("varlen forward [total_q=%d, H=%d, D=%d, D_v=%d, max_seqlen_q=%d] dispatched to %s",
                  q.shape[0], q.shape[1], d_head, d_v, max_seqlen_q, config.name)
    return config


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, causal: bool = False,
                   softmax_scale: float | None = None, window_size=(-1, -1), softcap: float = 0.0,
                   alibi_slopes: torch.Tensor | None = None, dropout_p: float = 0.0, philox: tuple[int, int] | None = None,
                   learnable_sink: torch.Tensor | None = None, config=None, out: torch.Tensor | None = None):
    """(out [total_q, H, D_v], lse [H, total_q] fp32) of a variable-length batch with the JIT kernels: the
    low-level call under flash_attn_varlen_func, as interface.forward is under flash_attn_func. For
    dropout pass the same `philox` (seed, offset) to varlen_backward (interface.philox_state() draws
    one; without it this draws its own). `out`, when given, is written ([total_q, H, D_v])."""
    if philox is not None:
        philox = interface.checked_philox(philox)
    batch, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k = _check_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if q.shape[-1] % 8 or v.shape[-1] % 8:  # zero-padded to multiples of 8, as flash-attn (interface._pad_head_dim)
        if out is not None:
            interface._check_output(out, q, "out", kernel_writes=False, shape=interface.out_shape(q, v))
        padded, lse = varlen_forward(*interface._pad_head_dim(q, k, v), cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, causal, interface.softmax_scale_or_default(q, softmax_scale),
                                     window_size, softcap, alibi_slopes, dropout_p, philox, learnable_sink, config)
        return interface._unpad_into(out, padded, v.shape[-1]), lse
    causal = bool(causal)
    mods = interface.score_mods(_batch_view(q, batch), causal, window_size, softcap, alibi_slopes, dropout_p, philox,
                                learnable_sink)
    softmax_scale = interface.softmax_scale_or_default(q, softmax_scale)
    device_index = q.get_device()
    config = _forward_config(q, k, v, out, config, causal, max_seqlen_q, mods, device_index)
    kernel = _kernel(config, device_index)
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    out = interface._out_for(out, q, k, v)
    total_q, heads = q.shape[0], q.shape[1]
    lse = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    if total_q == 0:
        return out, lse
    params = FwdParams(*_ref(q), *_ref(k), *_ref(v), *_ref(out), lse.data_ptr(), batch, max_seqlen_q, max_seqlen_k,
                       heads, k.shape[1], softmax_scale, *mods.values, cu_seqlens_q.data_ptr(),
                       cu_seqlens_k.data_ptr(), total_q, k.shape[0])
    _launch(kernel, params, device_index)
    return out, lse


def varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                    causal: bool = False, softmax_scale: float | None = None, window_size=(-1, -1),
                    softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None, dropout_p: float = 0.0,
                    philox: tuple[int, int] | None = None, deterministic: bool = False, config=None,
                    dq: torch.Tensor | None = None, dk: torch.Tensor | None = None, dv: torch.Tensor | None = None,
                    learnable_sink: torch.Tensor | None = None):
    """Gradients (dq, dk, dv) of varlen_forward given dout and its out ([total_q, H, D_v]) and lse [H, total_q];
    (dq, dk, dv, dsink) with learnable_sink, as interface.backward. GQA: dk/dv summed over the query
    heads of each key/value head (on sm_90a by one CTA per query head where the dispatcher finds the
    grid short, as interface.backward). dq, dk, dv: optional outputs; rows that no sequence covers
    (past cu_seqlens[-1]) stay unwritten, as in flash-attn."""
    if philox is not None:
        philox = interface.checked_philox(philox)
    batch, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k = _check_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    interface.check_douts(dout, out, q, v)
    lse_shape = (q.shape[1], q.shape[0])
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != lse_shape or lse.dtype != torch.float32 \
            or lse.device != q.device:
        raise ValueError(f"lse must be the forward's float32 log-sum-exp of shape {lse_shape} [heads, total_q] on "
                         f"{q.device} (varlen_forward's second result)")
    softmax_scale = interface.softmax_scale_or_default(q, softmax_scale)
    if q.shape[-1] % 8 or v.shape[-1] % 8:
        given = [None if t is None else interface._check_output(t, like, name, kernel_writes=False)
                 for t, like, name in zip((dq, dk, dv), (q, k, v), ("dq", "dk", "dv"))]
        padded = varlen_backward(*interface._pad_head_dim(dout, q, k, v, out), lse, cu_seqlens_q, cu_seqlens_k,
                                 max_seqlen_q, max_seqlen_k, causal, softmax_scale, window_size, softcap, alibi_slopes,
                                 dropout_p, philox, deterministic, config, learnable_sink=learnable_sink)
        grads = tuple(interface._unpad_into(t, grad, like.shape[-1])
                      for t, grad, like in zip(given, padded, (q, k, v)))
        return grads + padded[3:]
    if dropout_p and philox is None:
        raise ValueError("varlen_backward with dropout needs the forward's philox=(seed, offset) to regenerate its mask")
    causal = bool(causal)
    mods = interface.score_mods(_batch_view(q, batch), causal, window_size, softcap, alibi_slopes, dropout_p, philox,
                                learnable_sink)
    device_index = q.get_device()
    if config is None and interface._pads_value(q, v, causal, mods, deterministic, device_index, max_seqlen_q):
        return interface.with_value_padded(lambda dout, v, out: varlen_backward(
            dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
            window_size, softcap, alibi_slopes, dropout_p, philox, deterministic, dq=dq, dk=dk,
            learnable_sink=learnable_sink), dout, q, v, out, dv)
    q, k, v, out, dout = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, out, dout))
    config = interface.bwd_config(config, q.dtype, q.shape[-1], causal, max_seqlen_q, mods, bool(deterministic),
                                  device_index, d_v=v.shape[-1], grid=(batch, q.shape[1], k.shape[1], max_seqlen_k),
                                  tensors=(q, k, v, dout))
    reads = (("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout))
    dq, dk, dv = (_output(given, like, name, reads) for given, like, name in ((dq, q, "dq"), (dk, k, "dk"), (dv, v, "dv")))
    total_q, heads = q.shape[0], q.shape[1]
    if total_q == 0:  # no query reaches any key: dK = dV = 0 exactly
        dk.zero_(), dv.zero_()
        return (dq, dk, dv) if learnable_sink is None else (dq, dk, dv, torch.zeros_like(learnable_sink))
    kernel = _kernel(config, device_index)
    q, k, v, out, dout = (_aligned(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    dvec = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    # The atomic path's fp32 dQ sums ([H, total_q, d_tile], or bwd_sm90.cuh's tiling of as many floats).
    dq_accum = None if config.deterministic else torch.empty((heads, total_q, config.d_tile), dtype=torch.float32,
                                                             device=q.device)
    dkv_accum = interface.dkv_sums(config, k.shape[1] * k.shape[0], device_index)
    refs = [x for t in (q, k, v, out, dout, dq, dk, dv) for x in _ref(t)]
    params = BwdParams(*refs, lse.data_ptr(), dvec.data_ptr(), 0 if dq_accum is None else dq_accum.data_ptr(),
                       batch, max_seqlen_q, max_seqlen_k, heads, k.shape[1], softmax_scale, *mods.values,
                       cu_seqlens_q.data_ptr(), cu_seqlens_k.data_ptr(), total_q, k.shape[0],
                       dkv_accum=0 if dkv_accum is None else dkv_accum.data_ptr())
    _launch(kernel, params, device_index)
    if learnable_sink is None:
        return dq, dk, dv
    return dq, dk, dv, interface.sink_grad(mods, lse, dvec, head_dim=0).to(learnable_sink.dtype)


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                window_size, softcap, alibi_slopes, dropout_p, philox, deterministic, learnable_sink):
        out, lse = varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                  softmax_scale, window_size, softcap, alibi_slopes, dropout_p, philox, learnable_sink)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, learnable_sink)
        # The backward regenerates the dropout mask from the same (seed, offset).
        ctx.args = dict(max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, causal=causal,
                        softmax_scale=softmax_scale, window_size=window_size, softcap=softcap, dropout_p=dropout_p,
                        philox=philox, deterministic=deterministic)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zeros for lse's (never read) gradient; out's is always given
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, learnable_sink = ctx.saved_tensors
        wants_dsink = learnable_sink is not None and ctx.needs_input_grad[15]
        grads = varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes=alibi_slopes,
                                learnable_sink=learnable_sink if wants_dsink else None, **ctx.args)
        return (*grads[:3], *([None] * 12), grads[3] if wants_dsink else None)


# ---- the reference backend ----------------------------------------------------------------------------

def _host_offsets(cu: torch.Tensor, name: str, total: int, max_seqlen: int, max_name: str) -> list[int]:
    """The reference backend reads cu_seqlens on the host and checks what the kernels cannot."""
    offsets = cu.tolist()
    if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{name} must be non-decreasing from 0 to {total} (the rows of the packed tensor), got "
                         f"{offsets if len(offsets) <= 12 else offsets[:6] + ['...'] + offsets[-3:]}")
    longest = max(b - a for a, b in zip(offsets, offsets[1:]))
    if longest > max_seqlen:
        raise ValueError(f"{max_name}={max_seqlen} is less than the longest sequence in {name} ({longest})")
    return offsets


def _reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
               window_size, softcap, alibi_slopes, return_attn_probs, learnable_sink):
    """flashjit.reference.attention_reference per sequence (autograd through plain tensor ops)."""
    batch, _, _, cu_q, cu_k = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            reference=True)
    interface.dropout_threshold(dropout_p)
    interface.softmax_scale_or_default(q, softmax_scale)
    interface.score_mods(_batch_view(q, batch), causal, window_size, softcap, alibi_slopes,  # the same checks
                         learnable_sink=learnable_sink)
    offsets_q = _host_offsets(cu_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q")
    offsets_k = _host_offsets(cu_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k")
    compute = torch.promote_types(q.dtype, torch.float32)
    outs, lses, probs = [], [], []
    want_probs = return_attn_probs and dropout_p > 0  # S_dmask exists only with dropout (no_s_dmask)
    heads = q.shape[1]
    for b in range(batch):
        rows, keys = slice(offsets_q[b], offsets_q[b + 1]), slice(offsets_k[b], offsets_k[b + 1])
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        result = attention_reference(q[rows][None], k[keys][None], v[keys][None], causal=causal,
                                     softmax_scale=softmax_scale, compute_dtype=compute,
                                     window_size=tuple(window_size), softcap=softcap, alibi_slopes=slopes,
                                     dropout_p=dropout_p, return_probs=want_probs,
                                     learnable_sink=learnable_sink)
        outs.append(result[0][0])
        lses.append(result[1][0])
        if want_probs:
            probs.append(result[2][0])
    out = torch.cat(outs).to(q.dtype) if outs else q.new_empty(interface.out_shape(q, v))
    lse = torch.cat(lses, dim=1).detach()  # non-differentiable, as the kernels' (flash_attn_func's reference too)
    if not return_attn_probs:
        return out
    if not dropout_p:
        return out, lse, no_s_dmask(q)
    return out, lse, _padded_probs(probs, batch, heads, max_seqlen_q, max_seqlen_k, lse.device)


def _padded_probs(probs: list, batch: int, heads: int, max_q: int, max_k: int, device) -> torch.Tensor:
    """flash-attn's S_dmask for a varlen batch: [B, H, max_seqlen_q, max_seqlen_k], sequence b's
    [H, Sq_b, Sk_b] probabilities in its top-left corner, zeros elsewhere."""
    dtype = probs[0].dtype if probs else torch.float32
    padded = torch.zeros(batch, heads, max_q, max_k, dtype=dtype, device=device)
    for b, p in enumerate(probs):
        padded[b, :, :p.shape[1], :p.shape[2]] = p
    return padded


# ---- flash-attn's functions -------------------------------------------------------------------------------

def _seqlen_from_tensor(value):
    """flash-attn passes max_seqlen_q/_k to a torch custom op's int argument, which also takes a
    1-element integer tensor (read on the host: a device sync), as code built on
    cu_seqlens.diff().max() passes it; flashjit takes it too. Anything else goes to _check_max_seqlen."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and not value.is_complex() and value.dtype != torch.bool:
        return int(value)
    return value


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, learnable_sink=None):
    """Attention over a variable-length batch, as flash-attn 2.x's flash_attn_varlen_func.

    q [total_q, H, D], k [total_k, H_k, D], v [total_k, H_k, D_v] (H divisible by H_k; D_v <= D),
    cu_seqlens_q/_k int32 [B + 1] on q's device, max_seqlen_q/_k ints. Returns out [total_q, H, D_v];
    with return_attn_probs, (out, softmax_lse [H, total_q] fp32, S_dmask: with dropout [B, H,
    max_seqlen_q, max_seqlen_k], per-sequence probabilities, zero-padded, negated where dropout dropped
    them, for tests only; without it empty, as flash-attn's).
    dropout_p, softmax_scale, causal (bottom-right per sequence), window_size, softcap, alibi_slopes
    ([H] or [B, H]), deterministic and learnable_sink ([H], keyword) as flash_attn_func.
    block_table (int32 [B, max_pages]) makes k and v a paged cache [num_pages, page_size, H_k, D] (pages a
    multiple of 16 rows): sequence b's keys are the first cu_seqlens_k[b + 1] - cu_seqlens_k[b] slots of
    its row of pages; inference only (no backward or dropout); return_attn_probs gives its lse as above."""
    q, k, v = interface.contiguous_last_dim(q, k, v)  # flash-attn copies a strided last dim, as flash_attn_func
    max_seqlen_q, max_seqlen_k = _seqlen_from_tensor(max_seqlen_q), _seqlen_from_tensor(max_seqlen_k)
    if causal:
        window_size = causal_window(window_size)
    if block_table is not None:
        return _paged(q, k, v, block_table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                      softmax_scale, bool(causal), tuple(window_size), softcap, alibi_slopes, return_attn_probs,
                      learnable_sink)
    if torch.compiler.is_compiling():  # a custom op, as flash_attn_func (flashjit/ops.py)
        if return_attn_probs and dropout_p:  # as flash_attn_func's: without dropout S_dmask is empty
            raise ValueError("return_attn_probs=True with dropout is not supported under torch.compile (S_dmask "
                             "materialises [B, H, max_seqlen_q, max_seqlen_k] for tests); call "
                             "flash_attn_varlen_func eagerly for it")
        out, lse, _ = varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                                 learnable_sink, softmax_scale, bool(causal), int(window_size[0]),
                                 int(window_size[1]), float(softcap), float(dropout_p), bool(deterministic))
        return (out, lse, no_s_dmask(q)) if return_attn_probs else out
    if backend() == "reference":
        return _reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                          bool(causal), window_size, softcap, alibi_slopes, return_attn_probs, learnable_sink)
    # The checks before any generator state is drawn (varlen_forward repeats the cheap ones).
    batch, _, _, _, _ = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    window_size = tuple(window_size)
    threshold = interface.dropout_threshold(dropout_p)
    interface.score_mods(_batch_view(q, batch), bool(causal), window_size, softcap, alibi_slopes,
                         learnable_sink=learnable_sink)
    philox = interface.philox_state(q.get_device()) if threshold else None
    out, lse = _VarlenAttention.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                      bool(causal), window_size, softcap, alibi_slopes, dropout_p, philox,
                                      bool(deterministic), learnable_sink)
    if not return_attn_probs:
        return out
    if not dropout_p:
        return out, lse, no_s_dmask(q)
    return out, lse, _attn_probs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, philox,
                                 softmax_scale, bool(causal), window_size, softcap, alibi_slopes, learnable_sink)


@torch.no_grad()
def _attn_probs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, philox, softmax_scale,
                causal, window_size, softcap, alibi_slopes, learnable_sink) -> torch.Tensor:
    """S_dmask recomputed per sequence by the reference, with the kernels' dropout mask (for
    inspection, as flash-attn's tests use it; reads cu_seqlens on the host)."""
    batch, heads = cu_seqlens_q.numel() - 1, q.shape[1]
    offsets_q, offsets_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    mask = None
    if philox is not None:
        mask = philox_keep_mask(*philox, interface.dropout_threshold(dropout_p), batch, heads, max_seqlen_q,
                                max_seqlen_k, q.device)
    probs = []
    for b in range(batch):
        rows, keys = slice(offsets_q[b], offsets_q[b + 1]), slice(offsets_k[b], offsets_k[b + 1])
        sq, sk = rows.stop - rows.start, keys.stop - keys.start
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        _, _, p = attention_reference(q[rows][None], k[keys][None], v[keys][None], causal=causal,
                                      softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                                      alibi_slopes=slopes, dropout_p=dropout_p,
                                      dropout_mask=None if mask is None else mask[b:b + 1, :, :sq, :sk],
                                      return_probs=True, learnable_sink=learnable_sink)
        probs.append(p[0])
    return _padded_probs(probs, batch, heads, max_seqlen_q, max_seqlen_k, q.device)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, learnable_sink=None):
    """qkv [total, 3, H, D], one cu_seqlens and max_seqlen for queries and keys; the three slices are
    passed as strided views, without copies."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must have shape [total, 3, heads, head_dim], got "
                         f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                                  learnable_sink=learnable_sink)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                                    learnable_sink=None):
    """q [total_q, H, D], kv [total_k, 2, H_k, D]."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 4 or kv.shape[1] != 2:
        raise ValueError(f"kv must have shape [total_k, 2, heads_k, head_dim], got "
                         f"{tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__}")
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, learnable_sink=learnable_sink)


# ---- custom ops for torch.compile, as flashjit/ops.py's: q [total_q, H, D], lse [H, total_q] ------------------

def _varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, learnable_sink,
                      softmax_scale, causal, window, softcap, dropout_p, rng_state):
    """(out, lse) of the per-sequence reference; its dropout masks come from torch's generator seeded
    with the op's seed, so the backward's recomputation draws the same ones."""
    with torch.random.fork_rng(devices=[q.device] if q.is_cuda else []):
        if dropout_p > 0:
            torch.manual_seed(int(rng_state[0]))
        out, lse, _ = _reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                        softmax_scale, causal, window, softcap, alibi_slopes, True, learnable_sink)
    return out, lse


@torch.library.custom_op("flashjit::varlen_fwd", mutates_args=())
def varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
               max_seqlen_k: int, alibi_slopes: Optional[Tensor], learnable_sink: Optional[Tensor],
               softmax_scale: Optional[float], causal: bool, window_left: int, window_right: int, softcap: float,
               dropout_p: float, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """flashjit::fwd for a variable-length batch: (out [total_q, H, D_v], lse [H, total_q], rng_state)."""
    rng_state = ops._rng_state(q, dropout_p)
    window = (window_left, window_right)
    if ops._on_reference():
        out, lse = _varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                                     learnable_sink, softmax_scale, causal, window, softcap, dropout_p, rng_state)
    else:
        out, lse = varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                         softmax_scale, window, softcap, alibi_slopes, dropout_p,
                                         ops._philox(rng_state, dropout_p), learnable_sink)
    return out.contiguous(), lse, rng_state


@varlen_fwd.register_fake
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, learnable_sink,
                     softmax_scale, causal, window_left, window_right, softcap, dropout_p, deterministic):
    rng_state = (torch.empty(2, dtype=torch.int64, device="cpu") if dropout_p > 0
                 else torch.empty(0, dtype=torch.int64, device=q.device))
    return q.new_empty(interface.out_shape(q, v)), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32), rng_state


@torch.library.custom_op("flashjit::paged_varlen_fwd", mutates_args=())
def paged_varlen_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, cu_seqlens_q: Tensor,
                     cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, alibi_slopes: Optional[Tensor],
                     learnable_sink: Optional[Tensor], softmax_scale: Optional[float], causal: bool, window_left: int,
                     window_right: int, softcap: float) -> tuple[Tensor, Tensor]:
    """flash_attn_varlen_func with block_table: (out [total_q, H, D], lse [H, total_q]); no autograd (inference
    only, as flashjit::fwd_kvcache)."""
    out, lse = _paged_run(q, k_cache, v_cache, block_table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          softmax_scale, causal, (window_left, window_right), softcap, alibi_slopes, learnable_sink,
                          True)
    return out.contiguous(), lse


@paged_varlen_fwd.register_fake
def _paged_varlen_fwd_fake(q, *args):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))


@torch.library.custom_op("flashjit::varlen_bwd", mutates_args=())
def varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, rng_state: Tensor,
               cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
               alibi_slopes: Optional[Tensor], learnable_sink: Optional[Tensor], softmax_scale: Optional[float],
               causal: bool, window_left: int, window_right: int, softcap: float, dropout_p: float,
               deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """flashjit::bwd for a variable-length batch."""
    window = (window_left, window_right)
    if ops._on_reference():
        def recompute(q, k, v, *sink):
            return _varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                                     *sink or (None,), softmax_scale, causal, window, softcap, dropout_p, rng_state)[0]

        _, vjp = torch.func.vjp(recompute, q, k, v, *(() if learnable_sink is None else (learnable_sink,)))
        grads = vjp(dout)
    else:
        grads = varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       causal, softmax_scale, window, softcap, alibi_slopes, dropout_p,
                                       ops._philox(rng_state, dropout_p), deterministic,
                                       learnable_sink=learnable_sink)
    dsink = grads[3] if learnable_sink is not None else q.new_empty(0, dtype=torch.float32)
    return grads[0].contiguous(), grads[1].contiguous(), grads[2].contiguous(), dsink


@varlen_bwd.register_fake
def _varlen_bwd_fake(dout, q, k, v, out, lse, rng_state, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     alibi_slopes, learnable_sink, *args):
    return ops._grads_like(q, k, v, learnable_sink)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, learnable_sink, *flags = inputs
    out, lse, rng_state = output
    ctx.mark_non_differentiable(lse, rng_state)  # as the eager call's: no gradient flows back through the lse
    ctx.save_for_backward(q, k, v, out, lse, rng_state, cu_seqlens_q, cu_seqlens_k, alibi_slopes, learnable_sink)
    ctx.max_seqlens, ctx.flags = (max_seqlen_q, max_seqlen_k), flags


def _varlen_backward(ctx, dout, _dlse, _drng):
    q, k, v, out, lse, rng_state, cu_q, cu_k, alibi_slopes, learnable_sink = ctx.saved_tensors
    wants_dsink = learnable_sink is not None and ctx.needs_input_grad[8]
    dq, dk, dv, dsink = varlen_bwd(dout, q, k, v, out, lse, rng_state, cu_q, cu_k, *ctx.max_seqlens, alibi_slopes,
                                   learnable_sink if wants_dsink else None, *ctx.flags)
    return dq, dk, dv, None, None, None, None, None, dsink if wants_dsink else None, *(None,) * 7


varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)

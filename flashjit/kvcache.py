"""Attention over a KV cache: flash-attn 2.x's flash_attn_with_kvcache, for incremental decoding.

    q                  [B, Sq, H, D]
    k_cache, v_cache   dense [B_c, S_cache, H_k, D], or paged [num_blocks, page_size, H_k, D] with
                       block_table int32 [B, max_blocks]: slot s of entry b is row s % page_size of
                       page block_table[b, s // page_size] (page_size: any multiple of 16, where
                       flash-attn 2 asks for a multiple of 256). The cache's capacity is S_cache,
                       or max_blocks * page_size.
    cache_seqlens      int or int32 [B]: entry b's cache holds slots [0, cache_seqlens[b]) (None: the
                       whole capacity); cache_leftpad int32 [B]: its first valid slot (default 0);
                       cache_batch_idx int32 [B]: the cache row of entry b (dense caches only)
    k, v (optional)    [B, S_new, H_k, D]: written into the cache IN PLACE at slots
                       [cache_seqlens[b], cache_seqlens[b] + S_new), rotated first when rotary_cos/
                       rotary_sin are given (the cache keeps the rotated keys)
    -> out [B, Sq, H, D]; with return_softmax_lse also softmax_lse [B, H, Sq] fp32

Entry b then attends to the keys in slots [cache_leftpad[b], cache_seqlens[b] + S_new), exactly as a
dense flash_attn_func call over those keys alone: causal is bottom-right aligned on them, windows and
ALiBi distances count from that diagonal, and an entry with no key gives out = 0 and lse = +inf (or
its sink). There is no backward (as in flash-attn): everything runs under torch.no_grad().

Rotary embeddings (rotary_cos/rotary_sin [seqlen_ro, rotary_dim / 2]) rotate the first rotary_dim
channels of the new keys at their slots, and of q: query i at slot cache_seqlens[b] + i when causal or
local, else every query at cache_seqlens[b] (flash-attn's rule). flash-attn fuses this into the
kernel; here it is a handful of PyTorch ops before the kernel (`apply_rotary`, fp32 math rounded
once, about ten small launches). The append runs in the kernels' own launch (an append kernel
before the attention, flashjit/kvattn.py); the reference backend, and a call with an empty q, append
with PyTorch indexing here. None of it syncs the device, so a call can be captured in a CUDA graph.

What is checked on the host, without a device sync (ValueError/TypeError naming the argument):
dtypes, devices, shapes, strides, the GQA ratio, block_table's dtype and batch, the page size, an
int cache_seqlens and S_new against the capacity, rotary shapes and that seqlen_ro covers the
capacity. What is not, on the JIT backend: the values of cache_seqlens, cache_leftpad,
cache_batch_idx and block_table. Values that break the contract give wrong results but never an
access outside the tensors: the rotary lookup (and a PyTorch append) clamp their indices here, and
the kernels (flashjit/kvattn.py) clamp their own. The reference backend (FLASHJIT_BACKEND=reference) reads
them on the host and checks them all, before anything is written.

Beyond flash-attn 2: page sizes that are multiples of 16, cache_leftpad with a paged cache, rotary
tables of any float dtype and rotary_dim any multiple of 2 (flash-attn: q's dtype, multiples of 16),
learnable_sink [H] (as flashjit.flash_attn_func).

Under torch.compile the call is one custom op, flashjit::fwd_kvcache, declared to mutate k_cache and
v_cache: fullgraph=True traces it, and its checks run when it runs, as flashjit/ops.py's.
"""
from __future__ import annotations

import operator
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor

from . import interface, kvattn
from .flash_api import causal_window
from .interface import backend
from .kvattn import MAX_SPLITS, PAGE_MULTIPLE, _signature  # the kernels' limits (MAX_SPLITS: flash-attn 2's cap too)
from .reference import attention_reference


# ---- rotary embeddings -----------------------------------------------------------------------------

def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 interleaved: bool = True) -> torch.Tensor:
    """x [B, S, H, D] with its first rotary_dim = 2 * cos.shape[1] channels rotated by the angles of
    rows `positions` ([B, S], or [B, 1] for one position per entry) of cos/sin [seqlen_ro, rotary_dim / 2].
    interleaved (GPT-J): channel pairs (2j, 2j + 1) rotate by angle j; else (GPT-NeoX) pairs (j,
    j + rotary_dim / 2). Computed in fp32 (fp64 for fp64 x) and rounded once to x's dtype; the other
    channels are copied unchanged. positions must lie in [0, seqlen_ro)."""
    half = cos.shape[-1]
    compute = torch.promote_types(x.dtype, torch.float32)
    c = cos[positions].to(compute)[:, :, None]  # [B, S or 1, 1, rotary_dim / 2]: broadcast over heads
    s = sin[positions].to(compute)[:, :, None]
    part = x[..., :2 * half].to(compute)
    if interleaved:
        x1, x2 = part[..., 0::2], part[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = part[..., :half], part[..., half:]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), dim=-1)


# ---- argument checks ---------------------------------------------------------------------------------

def _check_index(name: str, t, shape: tuple, meaning: str, device, reference: bool) -> torch.Tensor:
    """An int32 tensor of `shape` on q's device (any device for the reference backend), contiguous."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype int32 ({meaning}), got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must have dtype torch.int32 ({meaning}, as flash-attn), got {t.dtype}; pass "
                         f"{name}.to(torch.int32)")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ({meaning}), got {tuple(t.shape)}")
    if not reference and t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")
    return t.contiguous()


def _check_call(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                block_table, num_splits, reference: bool):
    """ValueError/TypeError naming the argument, before anything is written or launched. Returns
    (capacity, cache_seqlens as an int, a contiguous int32 tensor or None, cache_batch_idx, cache_leftpad,
    block_table), the tensors contiguous."""
    dtypes, allowed = ((interface._REFERENCE_DTYPES, "float16, bfloat16, float32 or float64 (reference backend)")
                       if reference else (interface._DTYPES, "float16 or bfloat16"))
    interface.check_4d("q", q, "[batch, seqlen_q, heads, head_dim]", dtypes, allowed)
    paged = block_table is not None
    layout = "[num_blocks, page_size, heads_k, head_dim]" if paged else "[batch_cache, seqlen_cache, heads_k, head_dim]"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        interface.check_4d(name, t, layout, dtypes, allowed)
        if t.stride(-1) != 1:  # written in place: a contiguous copy would not be the caller's cache
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}: "
                             "the cache is updated in place, so flashjit cannot copy it")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError(f"q, k_cache and v_cache must be on one device, got {q.device}, {k_cache.device}, "
                         f"{v_cache.device}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    batch, _, heads, d_head = q.shape
    rows, slots, heads_k = k_cache.shape[:3]
    if batch == 0:
        raise ValueError("q's batch size must be positive (as flash-attn)")
    if k_cache.shape[3] != d_head:
        raise ValueError(f"k_cache/v_cache head_dim {k_cache.shape[3]} does not match q's {d_head}")
    if not 0 < d_head <= interface.MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d_head} is not supported: flashjit supports head dims from 1 to "
                         f"{interface.MAX_HEAD_DIM} (as flash-attn)")
    if heads_k == 0 or heads % heads_k:
        raise ValueError(f"the number of query heads ({heads}) must be divisible by the number of key/value heads "
                         f"({heads_k}) for GQA/MQA")
    if not q.is_cuda and not reference:
        raise ValueError(f"q is on {q.device}: the JIT kernels need CUDA tensors. For CPU (or any device) use the "
                         "PyTorch reference backend: FLASHJIT_BACKEND=reference")

    if paged:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be used with block_table (as flash-attn): a paged cache is "
                             "addressed through the block table; give each entry its own row of block_table instead")
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
            got = tuple(block_table.shape) if isinstance(block_table, torch.Tensor) else type(block_table).__name__
            raise ValueError(f"block_table must be a 2-D int32 tensor [batch, max_blocks_per_seq], got {got}")
        block_table = _check_index("block_table", block_table, (batch, block_table.shape[1]),
                                   "one row of page indices per batch entry", q.device, reference)
        if slots == 0 or slots % PAGE_MULTIPLE:
            raise ValueError(f"the page size (k_cache.shape[1] with a block_table) must be a positive multiple of "
                             f"{PAGE_MULTIPLE}, got {slots}")
        capacity = block_table.shape[1] * slots
    else:
        capacity = slots
        if cache_batch_idx is not None:
            cache_batch_idx = _check_index("cache_batch_idx", cache_batch_idx, (batch,),
                                           "the cache row of each batch entry", q.device, reference)
        elif rows < batch:
            raise ValueError(f"k_cache has {rows} rows for a batch of {batch}: pass cache_batch_idx (int32 [{batch}]) "
                             "to say which row each entry uses, or a cache with a row per entry")

    if (k is None) != (v is None):
        raise ValueError("k and v (the new keys and values to append) must be given together")
    new = 0
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            interface.check_4d(name, t, "[batch, seqlen_new, heads_k, head_dim]", dtypes, allowed)
            if t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"{name} must match q's dtype and device ({q.dtype} on {q.device}), got {t.dtype} "
                                 f"on {t.device}")
        new = k.shape[1]
        if k.shape != v.shape or (k.shape[0], k.shape[2], k.shape[3]) != (batch, heads_k, d_head):
            raise ValueError(f"k and v must both have shape [batch={batch}, seqlen_new, heads_k={heads_k}, "
                             f"head_dim={d_head}], got {tuple(k.shape)} and {tuple(v.shape)}")
        if cache_seqlens is None:
            raise ValueError("k and v need cache_seqlens: the new keys go into slots [cache_seqlens[b], "
                             "cache_seqlens[b] + seqlen_new) of each entry's cache")
        if new > capacity:
            raise ValueError(f"k has {new} new keys but the cache holds only {capacity} slots per entry "
                             f"({'max_blocks_per_seq * page_size' if paged else 'k_cache.shape[1]'})")

    lengths = None  # a tensor cache_seqlens, or None when it is an int (or absent)
    if isinstance(cache_seqlens, torch.Tensor):
        if cache_seqlens.dim() == 0:
            raise ValueError(f"cache_seqlens must be an int or an int32 tensor of shape ({batch},), got a 0-dim "
                             "tensor; pass int(cache_seqlens) or cache_seqlens.expand(batch)")
        lengths = _check_index("cache_seqlens", cache_seqlens, (batch,), "each entry's cache length", q.device,
                               reference)
        cache_seqlens = None
    elif cache_seqlens is not None:
        if isinstance(cache_seqlens, bool):
            raise TypeError("cache_seqlens must be an int or an int32 tensor [batch], got a bool")
        try:
            cache_seqlens = operator.index(cache_seqlens)
        except TypeError:
            raise TypeError(f"cache_seqlens must be an int or an int32 tensor [batch], got "
                            f"{type(cache_seqlens).__name__}") from None
        _check_int_lengths(cache_seqlens, capacity, new)
    if cache_leftpad is not None:
        cache_leftpad = _check_index("cache_leftpad", cache_leftpad, (batch,), "each entry's first valid slot",
                                     q.device, reference)

    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin rotate the new keys (and q) at their cache slots: they need k and "
                             "v (as flash-attn); rotate q yourself for attention over the cache alone")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point() or t.shape[1] == 0:
                got = (f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__)
                raise ValueError(f"{name} must be a floating-point tensor [seqlen_ro, rotary_dim / 2], got {got}")
            if t.device != q.device:
                raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
        if rotary_cos.shape != rotary_sin.shape:
            raise ValueError(f"rotary_cos and rotary_sin must have the same shape, got {tuple(rotary_cos.shape)} and "
                             f"{tuple(rotary_sin.shape)}")
        if 2 * rotary_cos.shape[1] > d_head:
            raise ValueError(f"rotary_dim (2 * rotary_cos.shape[1] = {2 * rotary_cos.shape[1]}) must be at most "
                             f"head_dim {d_head}")
        if rotary_cos.shape[0] < capacity:
            raise ValueError(f"rotary_cos/rotary_sin have {rotary_cos.shape[0]} rows (positions) but the cache has "
                             f"{capacity} slots: they must cover every slot (as flash-attn)")

    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 0 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be an int from 0 to {MAX_SPLITS} (0: chosen by a heuristic, 1: no split), "
                         f"got {num_splits!r}")
    return capacity, cache_seqlens, lengths, cache_batch_idx, cache_leftpad, block_table


def _check_int_lengths(cache_seqlens: int, capacity: int, new: int) -> None:
    if not 0 <= cache_seqlens <= capacity - new:
        raise ValueError(f"cache_seqlens={cache_seqlens}{f' plus {new} new keys' if new else ''} must lie in "
                         f"[0, {capacity}], the cache's capacity")


# ---- host-side value checks (the reference backend) ---------------------------------------------------

def _check_values(ends: list, starts: list | None, new: int, batch_idx: list | None, table: list | None,
                  capacity: int, page_size: int | None, num_rows: int, lengths_name: str = "cache_seqlens") -> None:
    """The contract that the JIT path cannot check without a device sync, read on the host: for each
    entry b, 0 <= start <= end - new and end <= capacity (end: its last key's slot + 1, `new` of them
    appended), its cache row in range, and the pages holding slots [start, end) in range."""
    for b, end in enumerate(ends):
        start = starts[b] if starts is not None else 0
        what = f"{lengths_name}[{b}] = {end - new}" + (f" plus {new} new keys" if new else "")
        if end - new < 0 or end > capacity:
            raise ValueError(f"{what} must lie in [0, {capacity}], the cache's capacity")
        if not 0 <= start <= end - new:
            raise ValueError(f"cache_leftpad[{b}] = {start} must lie in [0, {lengths_name}[{b}] = {end - new}]")
        if batch_idx is not None and not 0 <= batch_idx[b] < num_rows:
            raise ValueError(f"cache_batch_idx[{b}] = {batch_idx[b]} must lie in [0, {num_rows}) (k_cache's rows)")
        if table is not None:
            for column in range(start // page_size, -(-end // page_size)):
                if not 0 <= table[b][column] < num_rows:
                    raise ValueError(f"block_table[{b}, {column}] = {table[b][column]} must lie in [0, {num_rows}) "
                                     "(k_cache's pages)")


def _host_list(t):
    return None if t is None else t.tolist()


def reference_kvcache_attention(q, k_cache, v_cache, seqlens_k, leftpad_k=None, block_table=None, kv_batch_idx=None,
                                causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                                alibi_slopes=None, learnable_sink=None):
    """(out [B, Sq, H, D] in q's dtype, lse [B, H, Sq] fp32): entry b attends to the keys in slots
    [leftpad_k[b], seqlens_k[b]) of its cache (row kv_batch_idx[b], or b; or the pages of
    block_table[b]), as flashjit.reference.attention_reference over those keys alone (computed in fp32,
    fp64 for fp64 inputs). seqlens_k, leftpad_k, kv_batch_idx: int32 [B]; block_table int32 [B,
    max_blocks]. Reads them on the host and checks them (ValueError). The JIT kernel's contract
    (flashjit/kvattn.py: forward_kvcache) is this function's."""
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else None
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    ends, starts, rows, table = (_host_list(t) for t in (seqlens_k, leftpad_k, kv_batch_idx, block_table))
    _check_values(ends, starts, 0, rows, table, capacity, page_size, k_cache.shape[0], "seqlens_k")
    compute = torch.promote_types(q.dtype, torch.float32)
    outs, lses = [], []
    for b, end in enumerate(ends):
        start = starts[b] if starts is not None else 0
        slots = torch.arange(start, end, device=k_cache.device)
        if paged:
            pages = torch.tensor(table[b], dtype=torch.long, device=k_cache.device)[slots // page_size]
            keys, values = k_cache[pages, slots % page_size], v_cache[pages, slots % page_size]
        else:
            row = rows[b] if rows is not None else b
            keys, values = k_cache[row, start:end], v_cache[row, start:end]
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        out, lse = attention_reference(q[b:b + 1], keys[None].to(q.device), values[None].to(q.device), causal=causal,
                                       softmax_scale=softmax_scale, compute_dtype=compute,
                                       window_size=tuple(window_size), softcap=softcap, alibi_slopes=slopes,
                                       learnable_sink=learnable_sink)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs).to(q.dtype), torch.cat(lses)


# ---- flash-attn's function -------------------------------------------------------------------------------

def _append(k_cache, v_cache, k, v, positions, batch_idx, block_table, capacity: int) -> None:
    """k, v [B, S_new, H_k, D] into their slots `positions` [B, S_new] of each entry's cache, in place.
    The indices are clamped into the tensors, so values that break the contract (unchecked on the JIT
    path) overwrite wrong slots of the cache but nothing outside it."""
    positions = positions.clamp(0, capacity - 1)
    if block_table is not None:
        page_size = k_cache.shape[1]
        columns = (positions // page_size).clamp(max=block_table.shape[1] - 1)
        index = (block_table.long().gather(1, columns).clamp(0, k_cache.shape[0] - 1), positions % page_size)
    else:
        rows = (torch.arange(k.shape[0], device=k.device) if batch_idx is None
                else batch_idx.long().clamp(0, k_cache.shape[0] - 1))
        index = (rows[:, None], positions)
    k_cache.index_put_(index, k)
    v_cache.index_put_(index, v)


@torch.no_grad()
def _kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
             block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes, num_splits,
             return_softmax_lse, learnable_sink, plan_key=None):
    reference = backend() == "reference"
    given = (q, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table)
    q, k, v = (t.contiguous() if isinstance(t, torch.Tensor) and t.stride(-1) != 1 else t for t in (q, k, v))
    capacity, cache_seqlens, lengths, cache_batch_idx, cache_leftpad, block_table = _check_call(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
        block_table, num_splits, reference)
    # Whether the checks copied an input (a plan must not skip those copies)
    copied = any(a is not b for a, b in zip(given, (q, k, v, given[3] if lengths is None else lengths, cache_batch_idx,
                                                     cache_leftpad, block_table)))
    if not reference and q.shape[-1] % 8:  # kvattn refuses it too, but only after an empty q's append here
        raise ValueError(f"head dim {q.shape[-1]} of a KV cache must be a multiple of 8 for the kernels (a padded "
                         "copy of the cache would be made on every call); pad the cache's head dim when allocating it")
    causal = bool(causal)
    if causal:
        window_size = causal_window(window_size)
    mods = interface.score_mods(q, causal, window_size, softcap, alibi_slopes, learnable_sink=learnable_sink)
    softmax_scale = interface.softmax_scale_or_default(q, softmax_scale)
    # The window as score_mods normalised it (negative edges -1). flash-attn also drops a side that
    # reaches past the cache's capacity (mha_fwd_kvcache): the mask is the same, but then a window
    # (capacity, -1) is not local for the rotary rule below.
    window_size = kvattn.unbounded_past(mods.values[:2], capacity)

    batch, seqlen_q, new = q.shape[0], q.shape[1], 0 if k is None else k.shape[1]
    device = q.device
    if reference:  # the values, read on the host and checked before anything is written
        ends = ([capacity] * batch if lengths is None and cache_seqlens is None
                else [s + new for s in (lengths.tolist() if lengths is not None else [cache_seqlens] * batch)])
        _check_values(ends, _host_list(cache_leftpad), new, _host_list(cache_batch_idx), _host_list(block_table),
                      capacity, k_cache.shape[1] if block_table is not None else None, k_cache.shape[0])
        lengths, cache_leftpad, cache_batch_idx, block_table = (
            None if t is None else t.to(device) for t in (lengths, cache_leftpad, cache_batch_idx, block_table))
    if lengths is None:  # flash-attn: no cache_seqlens means the whole capacity holds keys
        lengths = torch.full((batch,), capacity if cache_seqlens is None else cache_seqlens, dtype=torch.int32,
                             device=device)

    if rotary_cos is not None:
        # flash-attn: with a causal or local mask query i sits at slot cache_seqlens + i, else every query
        # at cache_seqlens (whatever the mask's bottom-right alignment says when Sq != S_new).
        per_row = causal or window_size != (-1, -1)
        q_positions = lengths.long()[:, None] + (torch.arange(seqlen_q, device=device) if per_row else 0)
        if reference and q_positions.numel() and int(q_positions.max()) >= rotary_cos.shape[0]:  # before any write
            raise ValueError(f"rotary_cos/rotary_sin have {rotary_cos.shape[0]} rows but a query sits at position "
                             f"{int(q_positions.max())} (cache_seqlens + its index)")
        q = apply_rotary(q, rotary_cos, rotary_sin, q_positions.clamp(0, rotary_cos.shape[0] - 1),
                         rotary_interleaved)
    # The kernels append the new keys themselves, in the attention's launch (kvattn's k_new); the
    # reference backend, and an empty q (no launch), append here.
    fused = not reference and new > 0 and q.numel() > 0
    if k is not None and new > 0 and (rotary_cos is not None or not fused):
        positions = lengths.long()[:, None] + torch.arange(new, device=device)  # [B, S_new]: absolute slots
        if rotary_cos is not None:
            k = apply_rotary(k, rotary_cos, rotary_sin, positions.clamp(0, rotary_cos.shape[0] - 1),
                             rotary_interleaved)
        if not fused:
            _append(k_cache, v_cache, k, v, positions, cache_batch_idx, block_table, capacity)
    # int32 [B]: where each entry's keys end (fused: where they end before the kernel's append)
    seqlens_k = lengths + new if new and not fused else lengths

    kwargs = dict(leftpad_k=cache_leftpad, block_table=block_table, kv_batch_idx=cache_batch_idx, causal=causal,
                  softmax_scale=softmax_scale, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                  learnable_sink=learnable_sink)
    if reference:
        out, lse = reference_kvcache_attention(q, k_cache, v_cache, seqlens_k, **kwargs)
    else:
        rows = batch if block_table is None and cache_batch_idx is None else None  # flash-attn reads rows 0..B-1
        if rows is not None:
            k_cache, v_cache = k_cache[:rows], v_cache[:rows]
        out, lse = kvattn.forward_kvcache(q, k_cache, v_cache, seqlens_k, num_splits=num_splits, return_lse=True,
                                          k_new=k if fused else None, v_new=v if fused else None, **kwargs)
        if plan_key is not None and not copied and (fused or not new) and rotary_cos is None:
            settings = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                            num_splits=num_splits)
            interface._remember(_plans, plan_key, _Plan(capacity, new, rows, settings))
    return (out, lse) if return_softmax_lse else out


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False, learnable_sink=None):
    """Attention of q [B, Sq, H, D] over a KV cache, after appending k/v [B, S_new, H_k, D] to it in
    place, as flash-attn 2.x's flash_attn_with_kvcache (see this module's docstring for the layouts).

    Returns out [B, Sq, H, D]; with return_softmax_lse, (out, softmax_lse [B, H, Sq] fp32).
    k_cache/v_cache: dense [B_c, S_cache, H_k, D] or, with block_table int32 [B, max_blocks], paged
    [num_blocks, page_size, H_k, D]. cache_seqlens: int or int32 [B], each entry's cache length before
    the append (None: the whole cache). cache_batch_idx int32 [B]: the cache row of each entry (dense
    caches). cache_leftpad int32 [B]: each entry's first valid slot. rotary_cos/rotary_sin [seqlen_ro,
    rotary_dim / 2]: rotary embedding of the new keys and of q (rotary_interleaved: GPT-J pairs, else
    GPT-NeoX halves). softmax_scale, causal (bottom-right on the valid keys), window_size, softcap,
    alibi_slopes ([H] or [B, H] fp32) and learnable_sink ([H]) as flash_attn_func. num_splits:
    how many chunks the keys are split into (0: a heuristic; the reference backend ignores it).
    No backward. Under torch.compile: the custom op flashjit::fwd_kvcache."""
    if isinstance(num_splits, int) and not isinstance(num_splits, bool) and num_splits < 0:
        num_splits = 0  # flash-attn (mha_fwd_kvcache: num_splits < 1) chooses by its heuristic, as 0 does
    if torch.compiler.is_compiling():  # a custom op that mutates the caches (below)
        seqlens_int = None if isinstance(cache_seqlens, torch.Tensor) or cache_seqlens is None else cache_seqlens
        out, lse = fwd_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin,
                               None if seqlens_int is not None else cache_seqlens, seqlens_int, cache_batch_idx,
                               cache_leftpad, block_table, softmax_scale, bool(causal), int(window_size[0]),
                               int(window_size[1]), float(softcap), bool(rotary_interleaved), alibi_slopes,
                               int(num_splits), learnable_sink)
        return (out, lse) if return_softmax_lse else out
    plan_key = None
    if rotary_cos is None and rotary_sin is None and alibi_slopes is None and learnable_sink is None:
        plan_key = _plan_key(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                             softmax_scale, causal, window_size, softcap, num_splits)
        plan = _plans.get(plan_key) if plan_key is not None else None
        if plan is not None and backend() == "jit":
            out, lse = plan.run(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table)
            return (out, lse) if return_softmax_lse else out
    return _kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                    block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes,
                    num_splits, return_softmax_lse, learnable_sink, plan_key)


# ---- the repeated call ---------------------------------------------------------------------------------------
# Decoding makes the same call every step: the same layouts and flags, only the data and the lengths'
# values change. The checks and normalisation above depend on nothing else, so the first call of a layout
# records their outcome (a _Plan) and later calls skip to the kernels' own planned launch: an H200's host spent
# about 50 us a step there (docs/perf-log.md, nineteenth session). Rotary, ALiBi and sinks take the full path.

class _Plan:
    __slots__ = ("capacity", "new", "rows", "kwargs")

    def __init__(self, capacity: int, new: int, rows: int | None, kwargs: dict):
        self.capacity, self.new, self.rows, self.kwargs = capacity, new, rows, kwargs

    def run(self, q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table):
        """(out, lse) as _kvcache's JIT path: the plan's key fixed everything but the values."""
        if not isinstance(cache_seqlens, torch.Tensor):  # None or an int: the key tells them from a tensor
            length = self.capacity if cache_seqlens is None else operator.index(cache_seqlens)
            _check_int_lengths(length, self.capacity, self.new)
            cache_seqlens = torch.full((q.shape[0],), length, dtype=torch.int32, device=q.device)
        if self.rows is not None:
            k_cache, v_cache = k_cache[:self.rows], v_cache[:self.rows]
        return kvattn.forward_kvcache(q, k_cache, v_cache, cache_seqlens, leftpad_k=cache_leftpad,
                                      block_table=block_table, kv_batch_idx=cache_batch_idx, return_lse=True,
                                      k_new=k if self.new else None, v_new=v if self.new else None, **self.kwargs)


_plans: OrderedDict = OrderedDict()


def _plan_key(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, softmax_scale,
              causal, window_size, softcap, num_splits):
    """Everything _kvcache's checks and choices read but the data and an int cache_seqlens' value; None
    for a call a plan cannot describe (values that are tensors, or a window_size that is no pair of ints)."""
    scalars = (softmax_scale, causal, softcap, num_splits)
    if any(type(x) not in (int, float, bool) for x in scalars if x is not None) or softcap is None:
        return None
    try:
        window = tuple(window_size)
    except TypeError:
        return None
    if any(type(w) is not int for w in window):
        return None
    # The types count too: the checks tell 1 from True and 1.0 (and an int cache_seqlens from None).
    lengths = _signature(cache_seqlens) if isinstance(cache_seqlens, torch.Tensor) else type(cache_seqlens)
    return interface._plan_key(q, k_cache, v_cache, *scalars, *map(type, scalars), window, lengths,
                               *map(_signature, (k, v, cache_batch_idx, cache_leftpad, block_table)))


# ---- a custom op for torch.compile, as flashjit/ops.py's ---------------------------------------------------
# Dynamo cannot trace the ctypes launch; it traces this op, whose fake gives the shapes and whose
# mutates_args tell functionalization that the caches change (so fullgraph=True and CUDA graphs work).
# Eager calls skip it: the custom-op dispatcher only adds cost there.

@torch.library.custom_op("flashjit::fwd_kvcache", mutates_args=("k_cache", "v_cache"))
def fwd_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor], v: Optional[Tensor],
                rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor], cache_seqlens: Optional[Tensor],
                cache_seqlens_int: Optional[int], cache_batch_idx: Optional[Tensor], cache_leftpad: Optional[Tensor],
                block_table: Optional[Tensor], softmax_scale: Optional[float], causal: bool, window_left: int,
                window_right: int, softcap: float, rotary_interleaved: bool, alibi_slopes: Optional[Tensor],
                num_splits: int, learnable_sink: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """flash_attn_with_kvcache's (out, softmax_lse); cache_seqlens is a tensor or cache_seqlens_int an int."""
    out, lse = _kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin,
                        cache_seqlens if cache_seqlens_int is None else cache_seqlens_int, cache_batch_idx,
                        cache_leftpad, block_table, softmax_scale, causal, (window_left, window_right), softcap,
                        rotary_interleaved, alibi_slopes, num_splits, True, learnable_sink)
    return out.contiguous(), lse


@fwd_kvcache.register_fake
def _fwd_kvcache_fake(q, k_cache, v_cache, *args):
    batch, seqlen_q, heads, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((batch, heads, seqlen_q), dtype=torch.float32))

"""Queries over a KV cache on the kernels: the jit backend of flash_attn_with_kvcache (flashjit/kvcache.py).

    forward_kvcache(q [B, Sq, H, D], k_cache, v_cache, seqlens_k int32 [B], ...) -> (out, lse)

The cache is dense [B_c, S_cache, H_k, D] (batch entry b reads row kv_batch_idx[b], or b) or paged
[num_pages, page_size, H_k, D] through block_table [B, max_pages] int32 (slot s of entry b lives in page
block_table[b, s // page_size], row s % page_size). Entry b attends to slots [leftpad_k[b], seqlens_k[b]);
masks count from the first of them (causal is bottom-right on those keys). With k_new/v_new
[B, S_new, H_k, D], a kernel first appends them at slots [seqlens_k[b], seqlens_k[b] + S_new) (in place,
before the attention, in the same launch) and the valid slots then end at seqlens_k[b] + S_new.

It runs in the sm_80 forward family built with `kvcache` (kernels/fwd_sm80.cuh, common/params.cuh:
CacheParams), on every arch, with two things done for decoding, where one query row per head would leave
the GPU idle and read every K/V byte once per query head:
- GQA packing: with Sq = 1 the H / H_k query heads that share a KV head become the rows of one tile
  (q viewed as [B, H / H_k, H_k, D], no copy), so each K/V byte is read once per KV head. Not with
  ALiBi, sinks or a window, whose values depend on the real head or row (as in flash-attn). The tile's
  warps without a packed row only copy tiles: at decode the kernel is bound by issued instructions as
  much as by DRAM (docs/perf-log.md, twentieth session).
- Split-KV: when batch x heads x query blocks cannot fill the GPU, each row's key blocks are split over
  num_splits CTAs (0: chosen here, flash-attn's heuristic); their fp32 partials are combined by a
  second kernel (a warp per 8 splits of a row; on sm_90+ launched as a programmatic dependent of the
  attention kernel, so it starts as that one's last CTAs finish). Useful for prefill chunks against a
  long cache too.

Paged caches: each key block's table entries are fetched into shared memory with the block before
(cp.async), and a block that starts on a multiple of 16 slots is copied as a dense one (one page lookup a
thread), so paged decode runs within a few percent of the dense cache.

Not checked (they would need a device sync): the values of seqlens_k, leftpad_k, kv_batch_idx and
block_table. The kernels clamp each to the tensors' bounds, so bad values give wrong results, never an
access outside q, the cache or the outputs.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from collections import OrderedDict

import torch

from . import interface
from .configs.fwd_sm80 import PAGE_MULTIPLE
from .dispatch import default_config
from .launch import FwdParams, tensor_ref

log = logging.getLogger("flashjit")
MAX_SPLITS = 128  # kernels/fwd_sm80.cuh: kMaxSplits


@functools.lru_cache(maxsize=4096)  # per (grid, GPU, cache length): decoding asks the same every step
def num_splits_heuristic(ctas: int, sms: int, key_blocks: int, max_splits: int = MAX_SPLITS) -> int:
    """flash-attn 2's choice, then the rounds it pays for filled: no split when the CTAs already fill 80%
    of the GPU's slots (`sms`: CTA slots); else the fewest splits whose wave efficiency (CTAs / slots,
    against whole waves) is within 85% of the best, counting only split counts that change the blocks
    per split. That count's waves then take as many splits as still fit in them, and of those the
    fewest with the same blocks per split: at 8 CTAs and 256 key blocks (batch 1, 8 KV heads, a 32k
    cache) flash-attn's 29 splits of 9 blocks become 32 of 8 in the same single wave (measured 2% faster
    on an H200, docs/perf-log.md, seventeenth session); a CTA never gets more blocks, nor a call more
    waves."""
    if ctas >= 0.8 * sms:
        return 1
    max_splits = min(max_splits, sms, key_blocks)
    if max_splits <= 1:
        return 1

    def eligible(s):
        return s == 1 or -(-key_blocks // s) != -(-key_blocks // (s - 1))

    def efficiency(s):
        waves = ctas * s / sms
        return waves / -(-waves // 1)

    best = max(efficiency(s) for s in range(1, max_splits + 1) if eligible(s))
    chosen = next(s for s in range(1, max_splits + 1) if eligible(s) and efficiency(s) >= 0.85 * best)
    fit = min(max_splits, -(-ctas * chosen // sms) * sms // ctas)  # the most splits in the same waves
    blocks = -(-key_blocks // fit)
    return -(-key_blocks // blocks)


@functools.lru_cache(maxsize=None)
def _config(dtype: torch.dtype, d_head: int, causal: bool, short: bool, local: bool, softcap: bool, alibi: bool,
            sink: bool, smem_limit: int):
    """The sm_80 forward family's default for these rows (short: at most 64, decoding), built with
    kvcache; for decoding flash-attn's tile (128 keys a step up to d128) where it does not spill: ptxas
    13.0 spills the 96-wide head-dim tile (d 72-96) at 128 keys (8-52 bytes), so those keep 64."""
    config = default_config(interface._DTYPES[dtype], d_head, causal, 64 if short else 4096, smem_limit, local,
                            softcap, alibi, sink=sink)
    config = dataclasses.replace(config, kvcache=True)
    wide = dataclasses.replace(config, B_c=128)
    if short and wide.d_tile in (32, 64, 128) and not wide.problems() and wide.smem_bytes <= smem_limit:
        config = wide
    return config.validate()


def _check(q, k_cache, v_cache, seqlens_k, leftpad_k, block_table, kv_batch_idx):
    """What the kernels rely on, as ValueErrors naming the argument (flashjit/kvcache.py checks the
    user-facing arguments before this)."""
    batch = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() == 4 else 0

    def rows_as_batch(t):  # check_qkv compares batch sizes; a cache's rows are not the batch
        return t[:1].expand(batch, *t.shape[1:]) if isinstance(t, torch.Tensor) and t.dim() == 4 and len(t) else t

    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if isinstance(t, torch.Tensor) and t.dim() == 4 and not 0 < len(t) <= interface._INT32_MAX:
            raise ValueError(f"{name} must have from 1 to 2**31 - 1 {'pages' if block_table is not None else 'rows'} "
                             f"(dim 0), got {len(t)}")
    # dtypes, devices, 4 dims, contiguous last dims, head dims, GQA divisibility, sequence lengths
    interface.check_qkv(q, rows_as_batch(k_cache), rows_as_batch(v_cache))
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if q.shape[-1] % 8:
        raise ValueError(f"head dim {q.shape[-1]} of a KV cache must be a multiple of 8 (a padded copy of the cache "
                         "would be made on every call); pad the cache's head dim once, when allocating it")
    for name, t, shape in (("seqlens_k", seqlens_k, (batch,)), ("leftpad_k", leftpad_k, (batch,)),
                           ("kv_batch_idx", kv_batch_idx, (batch,)),
                           ("block_table", block_table, (batch, None))):
        if t is None and name != "seqlens_k":
            continue
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.device != q.device or t.dim() != len(shape) \
                or any(want is not None and got != want for got, want in zip(t.shape, shape)):
            raise ValueError(f"{name} must be an int32 tensor of shape {tuple('n' if s is None else s for s in shape)} "
                             f"on {q.device}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                             f"{' ' + str(t.dtype) if isinstance(t, torch.Tensor) else ''}")
    if block_table is not None:
        if kv_batch_idx is not None:
            raise ValueError("kv_batch_idx (cache_batch_idx) cannot be combined with a paged cache (block_table)")
        if k_cache.shape[1] % PAGE_MULTIPLE:
            raise ValueError(f"the paged cache's page size (k_cache.shape[1] = {k_cache.shape[1]}) must be a "
                             f"multiple of {PAGE_MULTIPLE}")
        if block_table.shape[1] * k_cache.shape[1] > interface.MAX_SEQLEN:
            raise ValueError(f"block_table's {block_table.shape[1]} pages of {k_cache.shape[1]} slots exceed the longest "
                             f"cache the kernels address (2**29 = {interface.MAX_SEQLEN} slots, 32-bit rows)")
    elif kv_batch_idx is None and k_cache.shape[0] != batch:
        raise ValueError(f"k_cache has {k_cache.shape[0]} rows for a batch of {batch}: pass kv_batch_idx "
                         "(cache_batch_idx) to pick each entry's row")


class _Plan:
    """A repeated call (decoding: the same shapes every step, only the lengths' values change), worked
    out once: kernel, params with every size and stride, the workspace size. A hit skips the checks,
    the config and split choice and the params packing: three allocations, the pointers, the launch."""

    __slots__ = ("kernel", "template", "device_index", "device", "dtype", "out_shape", "lse_shape", "partials",
                 "d_head")

    def __init__(self, kernel, params, q, lse_shape, partials: int, d_head: int):
        self.kernel, self.template, self.device_index = kernel, bytes(params), q.get_device()
        self.device, self.dtype, self.out_shape, self.lse_shape = q.device, q.dtype, q.shape, lse_shape
        self.partials, self.d_head = partials, d_head

    def launch(self, q, k_cache, v_cache, seqlens_k, leftpad_k, block_table, kv_batch_idx, k_new, v_new):
        pointers = q.data_ptr() | k_cache.data_ptr() | v_cache.data_ptr()
        if k_new is not None:
            pointers |= k_new.data_ptr() | v_new.data_ptr()
        if pointers & 15:
            return None  # the plan's kernel needs 16-byte aligned rows
        out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=self.device)
        params = FwdParams.from_buffer_copy(self.template)
        params.q, params.k, params.v, params.o = q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr()
        params.lse, params.seqused_k = lse.data_ptr(), seqlens_k.data_ptr()
        _set_indices(params, leftpad_k, block_table, kv_batch_idx)
        if k_new is not None:
            params.k_new, params.v_new = k_new.data_ptr(), v_new.data_ptr()
        if self.partials:
            accum = torch.empty(self.partials * (self.d_head + 1), dtype=torch.float32, device=self.device)
            params.o_accum, params.lse_accum = accum.data_ptr(), accum.data_ptr() + self.partials * self.d_head * 4
        interface._run(self.kernel, params, self.device_index)
        return out, lse


_plans: OrderedDict = OrderedDict()
_MAX_PLANS = 1024


def _set_indices(params, leftpad_k, block_table, kv_batch_idx) -> None:
    params.leftpad_k = None if leftpad_k is None else leftpad_k.data_ptr()
    params.batch_idx = None if kv_batch_idx is None else kv_batch_idx.data_ptr()
    params.block_table = None if block_table is None else block_table.data_ptr()


def _signature(t):
    """What a plan key records of an index tensor (its values are read by the kernel, not the host)."""
    if not isinstance(t, torch.Tensor):  # None, or what _check then refuses by name
        return type(t)
    return t.shape, t.stride(), t.dtype, t.device


def _check_new(q, k_cache, k_new, v_new) -> None:
    want = (q.shape[0], None, k_cache.shape[2], k_cache.shape[3])
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype != q.dtype or t.device != q.device \
                or t.stride(-1) != 1 or any(w is not None and g != w for g, w in zip(t.shape, want)):
            raise ValueError(f"{name} must be a {q.dtype} tensor [batch, new, heads_k, head_dim] = [{want[0]}, n, "
                             f"{want[2]}, {want[3]}] on {q.device} with a contiguous last dim, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k_new.shape != v_new.shape:
        raise ValueError(f"k_new and v_new must have the same shape, got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
    if q.numel() == 0:
        raise ValueError("appending (k_new/v_new) needs a non-empty q: the append runs in the attention's launch")


def unbounded_past(window_size, capacity: int) -> tuple:
    """The window with a side that reaches past the cache's capacity as -1, as flash-attn's mha_fwd_kvcache: the
    same mask, but no longer local, which keeps the kernels' GQA packing (a window turns it off)."""
    return tuple(-1 if w >= capacity else w for w in window_size)


def forward_kvcache(q, k_cache, v_cache, seqlens_k, leftpad_k=None, block_table=None, kv_batch_idx=None,
                    causal: bool = False, softmax_scale: float | None = None, window_size=(-1, -1),
                    softcap: float = 0.0, alibi_slopes=None, num_splits: int = 0, learnable_sink=None,
                    return_lse: bool = False, k_new=None, v_new=None):
    """out [B, Sq, H, D] (and lse [B, H, Sq] fp32: +inf, or the sink, for a row that sees no key) of q over
    the cache (module docstring). num_splits: 0 chooses, 1 never splits, n > 1 splits each row's keys n
    ways (at most 128). k_new/v_new: appended first (module docstring); q must then not be empty."""
    plan_key = None
    if alibi_slopes is None and learnable_sink is None:  # their tensors would need keeping alive: no plan
        plan_key = interface._plan_key(q, k_cache, v_cache, causal, softmax_scale, window_size, softcap, num_splits,
                                       *map(_signature, (seqlens_k, leftpad_k, block_table, kv_batch_idx, k_new,
                                                         v_new)))
        plan = _plans.get(plan_key) if plan_key is not None else None
        if plan is not None and (result := plan.launch(q, k_cache, v_cache, seqlens_k, leftpad_k, block_table,
                                                       kv_batch_idx, k_new, v_new)) is not None:
            return result if return_lse else result[0]
    _check(q, k_cache, v_cache, seqlens_k, leftpad_k, block_table, kv_batch_idx)
    if k_new is not None or v_new is not None:
        _check_new(q, k_cache, k_new, v_new)
    indices = (seqlens_k, leftpad_k, block_table, kv_batch_idx)
    if any(t is not None and not t.is_contiguous() for t in indices):
        plan_key = None  # the kernels index them densely: copies, which a plan would not make
        seqlens_k, leftpad_k, block_table, kv_batch_idx = (None if t is None else t.contiguous() for t in indices)
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or not 0 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be an int from 0 (choose) to {MAX_SPLITS}, got {num_splits!r}")
    batch, seqlen_q, heads, d_head = q.shape
    heads_k = k_cache.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("inf"))
        return (out, lse) if return_lse else out
    softmax_scale = interface.softmax_scale_or_default(q, softmax_scale)
    causal = bool(causal)
    capacity = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    window_size = unbounded_past(window_size, capacity)
    if seqlen_q == 1:  # the one query is the last position: neither causal nor a right edge hides a key from it
        causal, window_size = False, (window_size[0], -1)
    mods = interface.score_mods(q, causal, window_size, softcap, alibi_slopes, learnable_sink=learnable_sink)
    q_run, out_run = q, out
    if seqlen_q == 1 and heads > heads_k and not mods.flags[0] and not mods.alibi and mods.sink is None:
        # GQA packing: the group's query heads as rows of one KV head (views; lse [B, H_k, G] is [B, H, 1])
        group = heads // heads_k
        q_run, out_run = (t.squeeze(1).unflatten(1, (heads_k, group)).transpose(1, 2) for t in (q, out))
    device_index = q.get_device()
    config = _config(q.dtype, d_head, causal, q_run.shape[1] <= 64, *mods.flags[:3], mods.sink is not None,
                     interface._smem_limit(device_index)[0])
    kernel = interface._kernels.get((config, device_index)) or interface._kernel_for(config, device_index)
    given = (q_run, k_cache, v_cache, k_new, v_new)
    q_run, k_cache, v_cache, k_new, v_new = (None if t is None else interface._aligned(t) for t in given)
    if any(a is not b for a, b in zip(given, (q_run, k_cache, v_cache, k_new, v_new))):
        if k_new is not None and (k_cache is not given[1] or v_cache is not given[2]):
            raise ValueError("appending needs k_cache/v_cache rows 16-byte aligned (base and strides multiples of 8 "
                             "elements): the kernel writes into the cache itself, not a copy")
        plan_key = None
    b, rows, h_run, _ = q_run.shape
    if num_splits == 0:
        ctas = b * h_run * -(-rows // config.B_r)
        num_splits = num_splits_heuristic(ctas, 2 * interface.sm_count(device_index), -(-capacity // config.B_c))
    params = FwdParams(*tensor_ref(q_run), *tensor_ref(k_cache), *tensor_ref(v_cache), *tensor_ref(out_run),
                       lse.data_ptr(), b, rows, capacity, h_run, heads_k, softmax_scale, *mods.values)
    params.seqused_k = seqlens_k.data_ptr()
    _set_indices(params, leftpad_k, block_table, kv_batch_idx)
    params.num_rows = k_cache.shape[0]
    if k_new is not None:
        params.k_new_batch_stride, params.k_new_row_stride, params.k_new_head_stride = k_new.stride()[:3]
        params.v_new_batch_stride, params.v_new_row_stride, params.v_new_head_stride = v_new.stride()[:3]
        params.k_new, params.v_new, params.new_rows = k_new.data_ptr(), v_new.data_ptr(), k_new.shape[1]
    if block_table is not None:
        # the row width, not stride(0): a one-row table is "contiguous" with any stride(0) (even 0), and
        # the kernels also clamp table indices to it
        params.table_stride, params.page_size = block_table.shape[1], k_cache.shape[1]
    partials = 0
    if num_splits > 1:  # one buffer: the partial O [splits, B, H, Sq, D], then their lse [splits, B, H, Sq]
        partials = num_splits * b * h_run * rows
        accum = torch.empty(partials * (d_head + 1), dtype=torch.float32, device=q.device)
        params.num_splits = num_splits
        params.o_accum, params.lse_accum = accum.data_ptr(), accum.data_ptr() + partials * d_head * 4
    if plan_key is not None:
        _plans[plan_key] = _Plan(kernel, params, q, lse.shape, partials, d_head)
        if len(_plans) > _MAX_PLANS:
            _plans.popitem(last=False)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("kvcache forward [B=%d, Sq=%d, H=%d, H_k=%d, D=%d, capacity=%d%s] on %s, %d split(s)%s", batch,
                  seqlen_q, heads, heads_k, d_head, capacity, ", paged" if block_table is not None else "",
                  config.name, max(num_splits, 1), ", GQA packed" if q_run.shape[1] != seqlen_q else "")
    interface._run(kernel, params, device_index)
    return (out, lse) if return_lse else out


"""The kvcache kernels (flashjit/kvattn.py over kernels/fwd_sm80.cuh built with kvcache): queries over a
dense or paged KV cache with per-entry lengths, left padding, cache rows picked per entry, GQA packing
and split-KV, against flashjit.reference per batch entry (tests/numerics.py's tolerance). Cache slots
that no entry may read hold NaN, as do the outputs before the call."""
from __future__ import annotations

import ctypes
import dataclasses

import pytest
import torch

from flashjit import kvattn
from flashjit.configs.fwd_sm80 import WHY_KVCACHE, KernelConfig
from flashjit.launch import FwdParams
from numerics import assert_close, assert_lse_close, reference_and_low


# ---- CPU: the split heuristic, the config, the params struct ----------------------------------------

def test_split_heuristic_fills_the_gpu_and_never_splits_a_full_one():
    assert kvattn.num_splits_heuristic(ctas=300, sms=264, key_blocks=500) == 1  # 80% full already
    s = kvattn.num_splits_heuristic(ctas=8, sms=264, key_blocks=256)
    assert 8 * s >= 0.8 * 264 * 0.85 and s <= 128
    assert kvattn.num_splits_heuristic(ctas=8, sms=264, key_blocks=3) <= 3  # no more splits than key blocks
    assert kvattn.num_splits_heuristic(ctas=1, sms=264, key_blocks=1) == 1


@pytest.mark.parametrize("ctas, key_blocks, flash_attn, ours", [
    (8, 256, 29, 32),     # batch 1, 8 KV heads, a 32k cache: 9 blocks a split -> 8, one wave either way
    (16, 256, 14, 16),    # batch 2: 19 blocks a split -> 16
    (32, 64, 7, 8),       # batch 4, 8k: 10 -> 8
    (8, 16, 16, 16),      # 2k: already one block a split
    (192, 1024, 4, 4),    # batch 24, 128k: 3 waves, no room for a fifth split in them
])
def test_split_heuristic_fills_the_waves_flash_attn_pays_for(ctas, key_blocks, flash_attn, ours):
    """flash-attn 2's count (`flash_attn`, its rule's result for these grids) takes as many splits as
    fit in its own waves, then the fewest with the same blocks a split: never more waves, never more
    blocks for a CTA."""
    s = kvattn.num_splits_heuristic(ctas=ctas, sms=264, key_blocks=key_blocks)
    assert s == ours
    waves = lambda n: -(-ctas * n // 264)
    assert waves(s) == waves(flash_attn) and -(-key_blocks // s) <= -(-key_blocks // flash_attn)


def test_kvcache_config_name_and_rules():
    config = KernelConfig(d_head=80, B_r=64, B_c=128, kvcache=True, causal=True, local=True)
    assert config.name.endswith("_local_kvcache") and KernelConfig.from_name(config.name) == config
    assert not KernelConfig(kvcache=True).problems()
    assert WHY_KVCACHE in KernelConfig(kvcache=True, dropout=True).problems()


def test_cache_params_follow_the_varlen_params():
    """CacheParams sits after VarlenParams (kernels/common/params.cuh), so dense and varlen callers'
    positional construction leaves it null."""
    assert FwdParams.seqused_k.offset == (FwdParams.total_k.offset + 4 + 7) // 8 * 8  # the next pointer slot
    assert FwdParams.tile_walk.offset == FwdParams.new_rows.offset + 8  # 4 bytes of padding to 8-byte alignment
    assert ctypes.sizeof(FwdParams) == FwdParams.tile_walk_grid.offset + 8
    assert FwdParams.k_new.offset == FwdParams.lse_accum.offset + 8 and FwdParams.v_new.offset == FwdParams.k_new.offset + 32
    params = FwdParams()
    assert not params.seqused_k and not params.block_table and params.num_splits == 0


@pytest.mark.compile
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_kvcache_kernels_compile(arch):
    """A decode kernel (64 rows, 128 keys, split-KV and the combine kernel) and a causal prefill one with
    a sink and a window build, and load with launch.py's params size."""
    from flashjit import jit
    from flashjit.launch import CompiledKernel

    for config in (KernelConfig(d_head=128, B_r=64, B_c=128, kvcache=True),
                   KernelConfig(dtype="fp16", d_head=96, B_r=64, B_c=64, causal=True, local=True, sink=True,
                                kvcache=True)):
        CompiledKernel(jit.ensure_built(config, arch), config)


# ---- GPU ------------------------------------------------------------------------------------------

def _cache(batch, capacity, heads_k, d, dtype, page_size=None, rows=None):
    """(k_cache, v_cache, block_table or None, slots(b) -> (k [n, H_k, D], v) of logical slots 0..capacity).
    Paged: pages shuffled, plus spare pages no table names; everything starts as NaN but the slots the
    test fills."""
    nan = float("nan")
    if page_size is None:
        rows = rows or batch
        k, v = (torch.full((rows, capacity, heads_k, d), nan, dtype=dtype, device="cuda") for _ in range(2))
        return k, v, None
    per = -(-capacity // page_size)
    pages = batch * per + 3
    k, v = (torch.full((pages, page_size, heads_k, d), nan, dtype=dtype, device="cuda") for _ in range(2))
    table = torch.randperm(pages, device="cuda")[:batch * per].view(batch, per).to(torch.int32)
    return k, v, table


def _slots(cache, table, row, start, end, page_size):
    """Logical slots [start, end) of batch entry `row` (or cache row `row` when dense), as [n, H_k, D]."""
    if table is None:
        return cache[row, start:end]
    idx = torch.arange(start, end, device="cuda")
    return cache[table[row, idx // page_size].long(), idx % page_size]


def _fill(cache, table, row, start, end, page_size):
    values = torch.randn((end - start, *cache.shape[2:]), dtype=cache.dtype, device="cuda")
    if table is None:
        cache[row, start:end] = values
    else:
        idx = torch.arange(start, end, device="cuda")
        cache[table[row, idx // page_size].long(), idx % page_size] = values


CASES = [  # (name, kwargs): every knob of the contract, one or two at a time
    ("decode dense", dict()),
    ("decode paged 16", dict(page_size=16)),
    ("decode paged 48", dict(page_size=48, heads=(4, 4))),
    ("decode paged 256 leftpad", dict(page_size=256, leftpad=True)),
    # a key block of 128 slots from an unaligned slot crosses 9 pages: the most the kernel fetches
    ("decode paged 16 leftpad", dict(page_size=16, leftpad=True, d=128)),
    ("chunk paged 16 leftpad", dict(sq=70, page_size=16, leftpad=True)),
    ("decode leftpad batch_idx", dict(leftpad=True, batch_idx=True)),
    ("decode MQA", dict(heads=(8, 1))),
    ("decode softcap", dict(softcap=20.0)),
    ("decode window", dict(window=(37, 0), causal=True)),
    ("decode alibi", dict(alibi=True)),
    ("decode sink", dict(sink=True)),
    ("chunk causal", dict(sq=5, causal=True)),
    ("chunk causal paged window", dict(sq=3, causal=True, page_size=32, window=(50, 0))),
    ("chunk causal sink alibi", dict(sq=4, causal=True, sink=True, alibi=True)),
    ("prefill-like non-causal", dict(sq=70)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [0, 1, 3, 17])
@pytest.mark.parametrize("name, case", CASES, ids=[c[0] for c in CASES])
def test_forward_kvcache_matches_the_reference(name, case, splits):
    _run_case(splits=splits, **case)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [40, 64, 80, 96, 128, 160, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_head_dim_and_dtype(d, dtype):
    _run_case(d=d, dtype=dtype, splits=0, page_size=16 if d % 16 else None, sq=1 if d < 128 else 2, causal=d >= 128)


def _run_case(splits, sq=1, heads=(8, 2), d=64, dtype=torch.bfloat16, page_size=None, leftpad=False,
              batch_idx=False, causal=False, window=(-1, -1), softcap=0.0, alibi=False, sink=False):
    batch, capacity = 5, 700
    h, hk = heads
    lengths = [0, 1, 129, 700, 333]  # an empty entry, one key, a full one
    starts = [0, 0, 17, 0, 100] if leftpad else [0] * batch
    cache_rows = [3, 0, 5, 1, 2] if batch_idx else list(range(batch))
    k, v, table = _cache(batch, capacity, hk, d, dtype, page_size, rows=6 if batch_idx else None)
    for b in range(batch):
        for cache in (k, v):
            _fill(cache, table, cache_rows[b] if table is None else b, starts[b], lengths[b], page_size)
    q = torch.randn(batch, sq, h, d, dtype=dtype, device="cuda")
    slopes = torch.rand(batch, h, device="cuda") * 0.3 if alibi else None
    sinks = torch.randn(h, device="cuda") if sink else None
    i32 = dict(dtype=torch.int32, device="cuda")
    out, lse = kvattn.forward_kvcache(
        q, k, v, torch.tensor(lengths, **i32), leftpad_k=torch.tensor(starts, **i32) if leftpad else None,
        block_table=table, kv_batch_idx=torch.tensor(cache_rows, **i32) if batch_idx else None, causal=causal,
        window_size=window, softcap=softcap, alibi_slopes=slopes, num_splits=splits, learnable_sink=sinks,
        return_lse=True)
    for b in range(batch):
        row = cache_rows[b] if table is None else b
        kb, vb = (_slots(c, table, row, starts[b], lengths[b], page_size)[None] for c in (k, v))
        ref, low = reference_and_low(q[b:b + 1], kb, vb, causal=causal, window_size=window, softcap=softcap,
                                     alibi_slopes=None if slopes is None else slopes[b], learnable_sink=sinks)
        assert_close(f"out[{b}]", out[b:b + 1], ref[0], low[0])
        assert_lse_close(lse[b:b + 1], ref[1], low[1])


COMBINE_CASES = [  # (name, kwargs of _combine_case): the rows the combine kernel sees, each kind once
    # GQA-packed rows (H_k x the group of 4), 128-key blocks, one 16-byte piece a lane
    ("decode GQA d128", dict(sq=1, heads=(8, 2), d=128)),
    # Sq > 1 (not packed), rows that see no key (causal rows before the first key of a short entry), a
    # window that leaves most splits of a long row empty; 3 x 3 x 5 = 45 rows: an odd count, so CTAs of
    # 2 or 4 rows have slots past the last row
    ("chunk causal window d64", dict(sq=3, heads=(3, 1), d=64, causal=True, window=(300, 0))),
    # two pieces a lane, the sink's lse and shrink, 32-key blocks (more of them to split)
    ("decode sink d256", dict(sq=1, heads=(3, 3), d=256, sink=True)),
    # lanes past the row's end (40 columns: 10 pieces)
    ("chunk d40", dict(sq=2, heads=(2, 1), d=40)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("splits", [1, 2, 7, 8, 9, 64, 128])
@pytest.mark.parametrize("name, case", COMBINE_CASES, ids=[c[0] for c in COMBINE_CASES])
def test_combine_at_every_warp_count(name, case, splits, dtype):
    """The split-KV combine (kernels/fwd_sm80.cuh: combine_kernel, 8 splits a warp) at split counts
    around its warp boundaries (1: no combine; 2, 7, 8: one warp a row, several rows a CTA; 9: two; 64
    and 128: 8 and 16 warps), over entries whose keys fill all splits, a few or none (length 0): out and
    lse against the fp32 reference, and within rounding of the unsplit call (num_splits=1). Rows that
    see no key: out exactly 0, lse +inf (the sink's logit with a sink)."""
    out, lse, reference = _combine_case(splits=splits, dtype=dtype, **case)
    out1, lse1, _ = _combine_case(splits=1, dtype=dtype, inputs=reference["inputs"], **case)
    for b, (ref, low) in enumerate(reference["per_entry"]):
        assert_close(f"out[{b}]", out[b:b + 1], ref[0], low[0])
        assert_lse_close(lse[b:b + 1], ref[1], low[1])
    # the unsplit call: the same kernel without partials, so only the rounding order differs
    finite = torch.isfinite(lse1)
    assert torch.equal(torch.isfinite(lse), finite) and torch.equal(lse[~finite], lse1[~finite])
    assert ((lse - lse1)[finite].abs() <= 1e-5 + 1e-5 * lse1[finite].abs()).all(), "lse differs from num_splits=1"
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
    row_scale = out1.float().abs().amax(-1, keepdim=True)
    diff = (out.float() - out1.float()).abs()
    assert (diff <= 2 * ulp * row_scale + 1e-6).all(), f"out differs from num_splits=1 by {diff.max().item():.3e}"
    empty = reference["lengths"] == 0  # entries without keys: every row's splits are all empty
    assert (out[empty] == 0).all()
    if case.get("sink"):
        assert torch.equal(lse[empty], reference["sinks"][None, :, None].expand_as(lse[empty]))
    else:
        assert (lse[empty] == float("inf")).all()


def _combine_case(splits, sq, heads, d, dtype, causal=False, window=(-1, -1), sink=False, inputs=None):
    """forward_kvcache over a dense cache of 5 entries (lengths 0, 1, full, 130, random), cache slots no
    entry reads NaN: (out, lse, {"inputs", "per_entry": [(ref, low)], "lengths", "sinks"})."""
    batch, h, hk = 5, *heads
    capacity = 9000 if d <= 128 else 4600  # 71 key blocks of 128 (d <= 128), 144 of 32 (d256)
    drawn = inputs is None
    if drawn:
        lengths = [0, 1, capacity, 130, int(torch.randint(2, capacity, ()))]
        k, v, _ = _cache(batch, capacity, hk, d, dtype)
        for b in range(batch):
            for cache in (k, v):
                _fill(cache, None, b, 0, lengths[b], None)
        q = torch.randn(batch, sq, h, d, dtype=dtype, device="cuda")
        sinks = torch.randn(h, device="cuda") if sink else None
        inputs = (q, k, v, torch.tensor(lengths, dtype=torch.int32, device="cuda"), sinks)
    q, k, v, lengths, sinks = inputs
    out, lse = kvattn.forward_kvcache(q, k, v, lengths, causal=causal, window_size=window, num_splits=splits,
                                      learnable_sink=sinks, return_lse=True)
    per_entry = []
    if drawn:  # the reference once, for the call that drew the inputs
        for b, n in enumerate(lengths.tolist()):
            per_entry.append(reference_and_low(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], causal=causal,
                                               window_size=window, learnable_sink=sinks))
    return out, lse, {"inputs": inputs, "per_entry": per_entry, "lengths": lengths, "sinks": sinks}


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [2, 9, 29, 128])
def test_split_calls_replay_in_a_cuda_graph(splits):
    """A decode step captured once and replayed with new inputs written in place (as serving loops and
    bench_decode.py do): the attention kernel and its combine (on sm_90+ a programmatic dependent launch,
    kernels/fwd_sm80.cuh: launch_combine, which capture records as a programmatic edge) give exactly what
    an eager call gives, replay after replay, with eager calls and further replays queued behind them."""
    q = torch.randn(3, 1, 32, 128, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(3, 4096, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    lengths = torch.tensor([4096, 1000, 17], dtype=torch.int32, device="cuda")
    kvattn.forward_kvcache(q, k, v, lengths, num_splits=splits)  # compiled, and the plan made, before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, lse_g = kvattn.forward_kvcache(q, k, v, lengths, num_splits=splits, return_lse=True)
    for step, lens in enumerate(([4096, 0, 3000], [1, 4095, 0], [2048, 2049, 4096])):
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        lengths.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        out_e, lse_e = kvattn.forward_kvcache(q, k, v, lengths, num_splits=splits, return_lse=True)
        graph.replay()  # again, queued behind the eager call: the same values
        torch.cuda.synchronize()
        assert torch.equal(out_g, out_e), f"step {step}: the replayed out differs from the eager call's"
        assert torch.equal(lse_g, lse_e), f"step {step}: the replayed lse differs from the eager call's"
        assert (out_g[[b for b, n in enumerate(lens) if n == 0]] == 0).all()


@pytest.mark.gpu
def test_gqa_packing_and_splits_agree_with_the_unpacked_kernel():
    """Packing (Sq = 1, 32/8 heads) and splitting change only the rounding order: within fp32 noise of the
    plain launch (which sees the same cache through alibi slopes of 0, a feature that disables packing)."""
    q = torch.randn(2, 1, 32, 128, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(2, 3000, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    lengths = torch.tensor([3000, 1234], dtype=torch.int32, device="cuda")
    plain = kvattn.forward_kvcache(q, k, v, lengths, num_splits=1, alibi_slopes=torch.zeros(32, device="cuda"))
    for splits in (1, 2, 9, 64):
        packed = kvattn.forward_kvcache(q, k, v, lengths, num_splits=splits)
        assert (packed.float() - plain.float()).abs().max().item() < 2e-2


@pytest.mark.gpu
def test_bad_arguments_are_named():
    q = torch.randn(2, 1, 4, 64, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(2, 64, 2, 64, dtype=torch.bfloat16, device="cuda")
    good = torch.tensor([3, 4], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="seqlens_k must be an int32"):
        kvattn.forward_kvcache(q, k, k, good.long())
    with pytest.raises(ValueError, match="page size"):
        kvattn.forward_kvcache(q, k[:, :40], k[:, :40], good, block_table=torch.zeros(2, 1, dtype=torch.int32,
                                                                                      device="cuda"))
    with pytest.raises(ValueError, match="kv_batch_idx"):
        kvattn.forward_kvcache(q, k[:1], k[:1], good)
    with pytest.raises(ValueError, match="num_splits"):
        kvattn.forward_kvcache(q, k, k, good, num_splits=129)
    with pytest.raises(ValueError, match="multiple of 8"):
        kvattn.forward_kvcache(q[..., :60], k[..., :60], k[..., :60], good)


@pytest.mark.gpu
def test_config_is_a_kvcache_one_and_reused(caplog):
    q = torch.randn(1, 1, 8, 64, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(1, 100, 2, 64, dtype=torch.bfloat16, device="cuda")
    config = kvattn._config(q.dtype, 64, False, True, False, False, False, False, 227 * 1024)
    assert config.kvcache and dataclasses.replace(config, kvcache=False).name + "_kvcache" == config.name
    with caplog.at_level("DEBUG", logger="flashjit"):
        kvattn.forward_kvcache(q, k, k, torch.tensor([100], dtype=torch.int32, device="cuda"))
    assert "GQA packed" in caplog.text


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True])
def test_repeated_calls_run_a_plan_and_read_the_new_values(paged):
    """Decoding repeats shapes with new lengths and data every step: the second call runs the plan the
    first made (no checks, no packing) and must read the new pointers and lengths."""
    kvattn._plans.clear()
    for step, lengths in enumerate(([700, 3, 0], [701, 64, 1])):
        k, v, table = _cache(3, 704, 2, 64, torch.bfloat16, 16 if paged else None)
        for b, n in enumerate(lengths):
            for cache in (k, v):
                _fill(cache, table, b, 0, n, 16 if paged else None)
        q = torch.randn(3, 1, 8, 64, dtype=torch.bfloat16, device="cuda")
        out, lse = kvattn.forward_kvcache(q, k, v, torch.tensor(lengths, dtype=torch.int32, device="cuda"),
                                          block_table=table, num_splits=3, return_lse=True)
        assert len(kvattn._plans) == 1, "one plan for one call signature"
        for b, n in enumerate(lengths):
            kb, vb = (_slots(c, table, b, 0, n, 16 if paged else None)[None] for c in (k, v))
            ref, low = reference_and_low(q[b:b + 1], kb, vb)
            assert_close(f"step {step} out[{b}]", out[b:b + 1], ref[0], low[0])
            assert_lse_close(lse[b:b + 1], ref[1], low[1])


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True])
def test_hostile_index_values_stay_inside_the_tensors(paged):
    """Unchecked device-resident values (lengths near INT32_MAX or negative, page and row numbers out of
    range, a one-row table whose stride(0) is 0) may give wrong results, never a read or write outside the
    tensors: the cache sits between two guard regions that must come back untouched, and the call must
    not fault (the next synchronisation would raise)."""
    hk, d, slots = 2, 64, 64
    rows = 4 if paged else 2
    buffer = torch.zeros(rows + 2, slots, hk, d, dtype=torch.bfloat16, device="cuda")
    k = buffer[1:-1]  # the guards: buffer[0] and buffer[-1]
    v = torch.zeros_like(k)
    q = torch.randn(2, 3, 8, d, dtype=torch.bfloat16, device="cuda")
    k_new, v_new = (torch.randn(2, 3, hk, d, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    i32 = dict(dtype=torch.int32, device="cuda")
    hostile = torch.tensor([2**31 - 1, -5], **i32)
    kwargs = dict(leftpad_k=torch.tensor([2**31 - 2, -7], **i32), num_splits=3, k_new=k_new, v_new=v_new,
                  causal=True)
    if paged:  # one entry whose one-row table has stride(0) = 0 (still "contiguous": a size-1 dim)
        table = torch.tensor([[2**31 - 1, -1, 7, 0]], **i32).as_strided((1, 4), (0, 1))
        kwargs.update(leftpad_k=kwargs["leftpad_k"][:1], k_new=k_new[:1], v_new=v_new[:1])
        kvattn.forward_kvcache(q[:1], k, v, hostile[:1], block_table=table, **kwargs)
    else:
        kwargs["kv_batch_idx"] = torch.tensor([5, -3], **i32)
        kvattn.forward_kvcache(q, k, v, hostile, **kwargs)
    torch.cuda.synchronize()
    assert not buffer[0].any() and not buffer[-1].any(), "a write landed outside the cache"

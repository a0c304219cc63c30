"""Attention over a KV cache (flashjit/kvcache.py): flash_attn_with_kvcache.

CPU (reference backend, float64): against an independent computation in plain torch per entry (the
cache's valid slots gathered by hand, the new keys rotated by a hand-written rotary and concatenated,
masks, softcap, ALiBi and sinks written out), over dense and paged caches (pages of 16, 48, 256),
ragged cache_seqlens (with 0), cache_leftpad, cache_batch_idx, appends (the cache after the call: the
written slots hold the rotated keys, every other slot and page is untouched), rotary GPT-J and
GPT-NeoX (rotary_dim < head_dim too), causal with Sq > 1, windows, GQA/MQA; every argument error; the
values the reference reads on the host; torch.compile with fullgraph=True.
GPU: the JIT kernel (flashjit/kvattn.py) against the fp32 reference of each entry's keys (tests/
numerics.py's tolerance) over the same matrix, odd head dims, fp16/bf16, decode with many splits, and
caches poisoned with NaN outside the valid slots.
"""
from __future__ import annotations

import math

import pytest
import torch

from flashjit.kvcache import apply_rotary, flash_attn_with_kvcache, reference_kvcache_attention
from numerics import assert_close, assert_lse_close, reference_and_low

gpu = pytest.mark.gpu


@pytest.fixture
def reference(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")


# ---- building caches -------------------------------------------------------------------------------------

def _host(t):
    return None if t is None else t.tolist() if isinstance(t, torch.Tensor) else list(t)


class Cache:
    """A dense [B_c, S, H_k, D] cache, or a pool of pages [num_blocks, page, H_k, D] with a shuffled
    block_table [B, max_blocks] (two spare pages that no entry owns), and where an entry's slots are."""

    def __init__(self, batch, capacity, hk, d, dtype, device, page=None, rows=None):
        self.page = page
        if page is None:
            shape = (rows or batch, capacity, hk, d)
            self.block_table, self.table = None, None
        else:
            blocks = -(-capacity // page)
            shape = (batch * blocks + 2, page, hk, d)
            self.block_table = torch.randperm(shape[0], device=device)[:batch * blocks].reshape(batch, blocks).int()
            self.table = self.block_table.tolist()
        self.k = torch.randn(shape, dtype=dtype, device=device)
        self.v = torch.randn(shape, dtype=dtype, device=device)
        self.capacity = capacity if page is None else len(self.table[0]) * page

    def index(self, b: int, start: int, end: int, batch_idx=None):
        """(indices into the cache's first dim, rows within it) of entry b's slots [start, end)."""
        slots = list(range(start, end))
        if self.page is None:
            row = b if batch_idx is None else _host(batch_idx)[b]
            return torch.tensor([row] * len(slots), dtype=torch.long), torch.tensor(slots, dtype=torch.long)
        return (torch.tensor([self.table[b][s // self.page] for s in slots], dtype=torch.long),
                torch.tensor([s % self.page for s in slots], dtype=torch.long))

    def location(self, b: int, slot: int, batch_idx=None):
        return tuple(int(i[0]) for i in self.index(b, slot, slot + 1, batch_idx))

    def slots(self, t, b: int, start: int, end: int, batch_idx=None):
        """Entry b's slots [start, end) of t (self.k, self.v or a copy): [end - start, H_k, D]."""
        first, rows = self.index(b, start, end, batch_idx)
        return t[first.to(t.device), rows.to(t.device)]


def hand_rotary(x, cos, sin, positions, interleaved):
    """x [S, H, D] rotated at positions [S], pair by pair."""
    out = x.clone()
    half = cos.shape[1]
    for j in range(half):
        c, s = cos[positions, j][:, None], sin[positions, j][:, None]
        a, b = (2 * j, 2 * j + 1) if interleaved else (j, j + half)
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., a] * s + x[..., b] * c
    return out


def naive_entry(q, keys, values, scale, causal=False, window=(-1, -1), softcap=0.0, slopes=None, sink=None):
    """One entry by hand, float64: q [Sq, H, D], keys/values [L, H_k, D] -> (out [Sq, H, D], lse [H, Sq])."""
    sq, heads, _ = q.shape
    length, heads_k = keys.shape[0], keys.shape[1]
    keys = keys.repeat_interleave(heads // heads_k, dim=1)
    values = values.repeat_interleave(heads // heads_k, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    diag = torch.arange(sq)[:, None] + length - sq  # query i's diagonal among the valid keys
    j = torch.arange(length)[None, :]
    if slopes is not None:
        scores = scores - slopes[:, None, None] * (diag - j).abs()
    visible = torch.ones(sq, length, dtype=torch.bool)
    left, right = window
    if causal:
        right = 0
    if right >= 0:
        visible &= j <= diag + right
    if left >= 0:
        visible &= j >= diag - left
    scores = scores.masked_fill(~visible, -math.inf)
    extra = sink[:, None, None].expand(heads, sq, 1) if sink is not None else scores.new_full((heads, sq, 1), -math.inf)
    lse = torch.logsumexp(torch.cat([scores, extra], -1), -1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("hqk,khd->qhd", probs, values)
    return out, torch.where(torch.isneginf(lse), math.inf, lse)


# ---- CPU: the reference backend against the hand computation ------------------------------------------------
CASES = [  # (id, dict of the call's features)
    ("dense", dict()),
    ("dense_causal_append", dict(new=3, sq=3, causal=True)),
    ("dense_decode_gqa", dict(new=1, sq=1, h=8, hk=2)),
    ("dense_mqa_window", dict(new=2, sq=4, h=4, hk=1, window=(5, 1))),
    ("dense_leftpad_causal", dict(new=2, sq=2, leftpad=True, causal=True)),
    ("dense_batch_idx_append", dict(new=2, sq=3, batch_idx=True, causal=True)),
    ("dense_spare_rows", dict(new=1, sq=2, spare_rows=True)),  # rows 0..B-1 of a larger cache, as flash-attn
    ("dense_softcap_alibi_bh", dict(new=1, sq=2, softcap=3.0, alibi="bh")),
    ("dense_sink_alibi_h", dict(new=2, sq=2, sink=True, alibi="h", causal=True)),
    ("dense_rotary_gptj", dict(new=3, sq=3, rotary=("gptj", 16), causal=True)),
    ("dense_rotary_neox_partial", dict(new=2, sq=3, rotary=("neox", 8))),
    ("dense_rotary_window_leftpad", dict(new=2, sq=2, rotary=("gptj", 8), window=(6, 0), leftpad=True)),
    ("dense_int_seqlens", dict(new=2, sq=2, seqlens="int", causal=True)),
    ("dense_no_seqlens", dict(sq=3, seqlens=None, causal=True)),
    ("dense_causal_sq_gt_keys", dict(sq=6, causal=True, short=True)),
    ("paged16", dict(page=16, new=3, sq=3, causal=True, h=8, hk=2)),
    ("paged48_rotary_neox", dict(page=48, new=2, sq=2, rotary=("neox", 16), causal=True)),
    ("paged256_decode", dict(page=256, new=1, sq=1, capacity=300, alibi="h", softcap=2.0)),
    ("paged16_leftpad_window", dict(page=16, new=2, sq=3, leftpad=True, window=(9, 2), sink=True)),
    ("paged16_no_seqlens", dict(page=16, sq=2, seqlens=None)),
]


def _call(f: dict, device="cpu", dtype=torch.float64):
    """Random inputs for the features `f`: (Cache, keyword arguments of flash_attn_with_kvcache)."""
    batch, sq, h, hk, d = f.get("batch", 4), f.get("sq", 2), f.get("h", 4), f.get("hk", 2), f.get("d", 32)
    new, capacity = f.get("new", 0), f.get("capacity", 40)
    rows = batch + 3 if f.get("batch_idx") or f.get("spare_rows") else None
    cache = Cache(batch, capacity, hk, d, dtype, device, f.get("page"), rows=rows)
    capacity = cache.capacity
    top = capacity - new
    lens = ([0, top, 1] + torch.randint(0, top + 1, (batch,)).tolist())[:batch]
    if f.get("short"):
        lens = [0, 2, 4, 1][:batch]
    kwargs = dict(q=torch.randn(batch, sq, h, d, dtype=dtype, device=device), k_cache=cache.k, v_cache=cache.v,
                  block_table=cache.block_table, causal=f.get("causal", False), softmax_scale=0.9 / math.sqrt(d),
                  window_size=f.get("window", (-1, -1)), softcap=f.get("softcap", 0.0), return_softmax_lse=True)
    seqlens = f.get("seqlens", "tensor")
    if seqlens == "tensor":
        kwargs["cache_seqlens"] = torch.tensor(lens, dtype=torch.int32, device=device)
    elif seqlens == "int":
        kwargs["cache_seqlens"] = top - 1
    if new:
        kwargs["k"] = torch.randn(batch, new, hk, d, dtype=dtype, device=device)
        kwargs["v"] = torch.randn(batch, new, hk, d, dtype=dtype, device=device)
    if f.get("leftpad"):
        ends = kwargs["cache_seqlens"].tolist()
        kwargs["cache_leftpad"] = torch.tensor([int(torch.randint(0, e + 1, ())) for e in ends], dtype=torch.int32,
                                               device=device)
    if f.get("batch_idx"):
        kwargs["cache_batch_idx"] = torch.randperm(batch + 3, device=device)[:batch].int()
    if f.get("alibi"):
        shape = (h,) if f["alibi"] == "h" else (batch, h)
        kwargs["alibi_slopes"] = torch.rand(shape, dtype=torch.float32, device=device) * 0.3
    if f.get("sink"):
        kwargs["learnable_sink"] = torch.randn(h, dtype=dtype, device=device)
    if f.get("rotary"):
        style, dim = f["rotary"]
        angle = torch.rand(capacity + 5, dim // 2, dtype=torch.float64, device=device) * 2 * math.pi
        kwargs.update(rotary_cos=angle.cos().to(dtype), rotary_sin=angle.sin().to(dtype),
                      rotary_interleaved=style == "gptj")
    return cache, kwargs


def _expected(cache: Cache, kwargs: dict, k_before, v_before):
    """(out, lse, k_cache, v_cache) by hand from the caches as they were before the call."""
    q, k, v = kwargs["q"], kwargs.get("k"), kwargs.get("v")
    batch, sq = q.shape[:2]
    new = 0 if k is None else k.shape[1]
    seqlens = kwargs.get("cache_seqlens")
    lens = ([cache.capacity] * batch if seqlens is None else [seqlens] * batch if isinstance(seqlens, int)
            else seqlens.tolist())
    starts = kwargs["cache_leftpad"].tolist() if kwargs.get("cache_leftpad") is not None else [0] * batch
    idx = kwargs.get("cache_batch_idx")
    window, causal = kwargs["window_size"], kwargs["causal"]
    cos, sin = kwargs.get("rotary_cos"), kwargs.get("rotary_sin")
    k_after, v_after = k_before.clone(), v_before.clone()
    outs, lses = [], []
    for b in range(batch):
        qb = q[b]
        kb, vb = (cache.slots(t, b, starts[b], lens[b], idx) for t in (k_before, v_before))
        if new:
            knew = k[b]
            if cos is not None:
                positions = torch.arange(lens[b], lens[b] + new)
                knew = hand_rotary(knew, cos, sin, positions, kwargs["rotary_interleaved"])
                per_row = causal or window != (-1, -1)
                q_pos = lens[b] + (torch.arange(sq) if per_row else torch.zeros(sq, dtype=torch.long))
                qb = hand_rotary(qb, cos, sin, q_pos, kwargs["rotary_interleaved"])
            for i in range(new):
                where = cache.location(b, lens[b] + i, idx)
                k_after[where], v_after[where] = knew[i], v[b, i]
            kb, vb = torch.cat([kb, knew]), torch.cat([vb, v[b]])
        slopes = kwargs.get("alibi_slopes")
        if slopes is not None:
            slopes = (slopes if slopes.dim() == 1 else slopes[b]).double()
        out, lse = naive_entry(qb, kb, vb, kwargs["softmax_scale"], causal, window, kwargs["softcap"], slopes,
                               kwargs.get("learnable_sink"))
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses), k_after, v_after


@pytest.mark.parametrize("name, features", CASES, ids=[c[0] for c in CASES])
def test_reference_backend_matches_the_hand_computation(name, features, reference):
    cache, kwargs = _call(features)
    k_before, v_before = cache.k.clone(), cache.v.clone()
    out, lse = flash_attn_with_kvcache(**kwargs)
    want_out, want_lse, want_k, want_v = _expected(cache, kwargs, k_before, v_before)
    assert out.dtype == kwargs["q"].dtype and lse.dtype == torch.float32
    assert lse.shape == (out.shape[0], out.shape[2], out.shape[1])
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse.float())
    # The append: the written slots hold the (rotated) new keys; every other slot and page is as it was.
    torch.testing.assert_close(cache.k, want_k, atol=1e-12, rtol=0)
    assert torch.equal(cache.v, want_v)
    untouched = (want_k == k_before).all(-1).all(-1)
    assert torch.equal(cache.k[untouched], k_before[untouched])
    if features.get("short"):  # causal with Sq above the keys: rows that see none give 0 and lse +inf
        assert not out[0].any() and torch.isinf(lse[0]).all()


def test_without_lse_returns_out_only_and_kwargs_default(reference):
    cache, kwargs = _call(dict(new=1, sq=1))
    del kwargs["return_softmax_lse"]
    out = flash_attn_with_kvcache(**kwargs)
    assert isinstance(out, torch.Tensor) and out.shape == kwargs["q"].shape


def test_decode_causal_is_non_causal(reference):
    """Sq = 1: causal changes nothing (flash-attn turns it off); rotary puts the query at cache_seqlens."""
    cache, kwargs = _call(dict(new=1, sq=1, rotary=("gptj", 16), h=8, hk=2))
    k0, v0 = cache.k.clone(), cache.v.clone()
    plain = flash_attn_with_kvcache(**kwargs)
    kwargs.update(k_cache=k0, v_cache=v0, causal=True)
    causal = flash_attn_with_kvcache(**kwargs)
    assert torch.equal(plain[0], causal[0]) and torch.equal(plain[1], causal[1])
    assert torch.equal(cache.k, k0)


def test_window_past_the_capacity_is_no_window(reference):
    """flash-attn drops window sides at or beyond the cache's capacity (and negative ones): (capacity, -1)
    is the plain mask, and the queries' rotary positions are then all cache_seqlens (not per row)."""
    cache, kwargs = _call(dict(new=2, sq=3, rotary=("neox", 16)))
    k0, v0 = cache.k.clone(), cache.v.clone()
    plain = flash_attn_with_kvcache(**kwargs)
    kwargs.update(k_cache=k0, v_cache=v0, window_size=(cache.capacity, -1))
    windowed = flash_attn_with_kvcache(**kwargs)
    assert torch.equal(plain[0], windowed[0])
    kwargs.update(k_cache=cache.k.clone(), v_cache=cache.v.clone(), window_size=(-3, -5))  # negative: unbounded
    assert torch.equal(plain[0], flash_attn_with_kvcache(**kwargs)[0])
    kwargs.update(k_cache=cache.k.clone(), v_cache=cache.v.clone(), window_size=(cache.capacity - 1, -1))
    local = flash_attn_with_kvcache(**kwargs)  # a real window: per-row query positions
    assert not torch.allclose(plain[0], local[0])


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_apply_rotary_matches_the_hand_rotation(interleaved, dtype):
    """Pairs (2j, 2j + 1) or (j, j + rotary_dim / 2) rotate; channels past rotary_dim are copied; fp16
    is computed in fp32 and rounded once."""
    x = torch.randn(2, 5, 3, 40, dtype=dtype)
    angle = torch.rand(50, 12, dtype=torch.float64) * 2 * math.pi
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    positions = torch.randint(0, 50, (2, 5))
    got = apply_rotary(x, cos, sin, positions, interleaved)
    compute = torch.promote_types(dtype, torch.float32)  # the same fp32 products, so bit-equal after rounding
    want = torch.stack([hand_rotary(x[b].to(compute), cos.to(compute), sin.to(compute), positions[b], interleaved)
                        for b in range(2)]).to(dtype)
    assert got.dtype == dtype and torch.equal(got[..., 24:], x[..., 24:])
    assert torch.equal(got, want)
    one = apply_rotary(x, cos, sin, positions[:, :1], interleaved)  # [B, 1]: one position for every row
    torch.testing.assert_close(one, apply_rotary(x, cos, sin, positions[:, :1].expand(2, 5), interleaved))


def test_reference_kvcache_attention_is_attention_over_the_valid_keys():
    """The kernels' contract, directly: seqlens_k is the end slot, leftpad_k the first."""
    cache = Cache(3, 64, 2, 16, torch.float64, "cpu", page=16)
    q = torch.randn(3, 2, 4, 16, dtype=torch.float64)
    ends, starts = [64, 0, 17], [3, 0, 16]
    out, lse = reference_kvcache_attention(q, cache.k, cache.v, torch.tensor(ends, dtype=torch.int32),
                                           leftpad_k=torch.tensor(starts, dtype=torch.int32),
                                           block_table=cache.block_table, causal=True)
    for b in range(3):
        keys, values = (cache.slots(t, b, starts[b], ends[b]) for t in (cache.k, cache.v))
        want_out, want_lse = naive_entry(q[b], keys, values, 0.25, causal=True)
        torch.testing.assert_close(out[b], want_out)
        torch.testing.assert_close(lse[b], want_lse.float())


def test_compiled_fullgraph_matches_eager_and_mutates_the_cache(reference):
    """torch.compile(fullgraph=True): the custom op flashjit::fwd_kvcache, with the caches declared
    mutated (also views of a packed kv cache), gives eager's out, lse and caches."""
    cache, kwargs = _call(dict(new=2, sq=2, rotary=("gptj", 16), causal=True))
    packed = torch.stack([cache.k, cache.v], 2)  # [B, S, 2, H_k, D]: the caches are strided views
    eager_packed = packed.clone()
    compiled = torch.compile(flash_attn_with_kvcache, fullgraph=True, backend="aot_eager")
    got = compiled(**dict(kwargs, k_cache=packed[:, :, 0], v_cache=packed[:, :, 1]))
    want = flash_attn_with_kvcache(**dict(kwargs, k_cache=eager_packed[:, :, 0], v_cache=eager_packed[:, :, 1]))
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert torch.equal(packed, eager_packed) and not torch.equal(packed[:, :, 0], cache.k)
    got_int = compiled(**dict(kwargs, k_cache=packed[:, :, 0], v_cache=packed[:, :, 1], cache_seqlens=5,
                              return_softmax_lse=False))
    want_int = flash_attn_with_kvcache(**dict(kwargs, k_cache=eager_packed[:, :, 0], v_cache=eager_packed[:, :, 1],
                                              cache_seqlens=5, return_softmax_lse=False))
    torch.testing.assert_close(got_int, want_int)
    assert torch.equal(packed, eager_packed)
    torch._dynamo.reset()


# ---- CPU: argument errors -------------------------------------------------------------------------------------
def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


ERRORS = [  # (change, error, match): what is changed in a valid dense (or paged) call
    (dict(q="list"), TypeError, "q must be a torch.Tensor"),
    (dict(q="3d"), ValueError, "q must have 4 dims \\[batch, seqlen_q, heads, head_dim\\]"),
    (dict(q="int"), ValueError, "q must be float16, bfloat16, float32 or float64"),
    (dict(k_cache="3d"), ValueError, "k_cache must have 4 dims \\[batch_cache, seqlen_cache, heads_k, head_dim\\]"),
    (dict(k_cache="3d", paged=True), ValueError, "k_cache must have 4 dims \\[num_blocks, page_size"),
    (dict(v_cache="strided"), ValueError, "v_cache must have a contiguous last dimension.*in place"),
    (dict(k_cache="f32", v_cache="f32"), ValueError, "q, k_cache and v_cache must share a dtype"),
    (dict(v_cache="short"), ValueError, "k_cache and v_cache must have the same shape"),
    (dict(k_cache="d16", v_cache="d16"), ValueError, "head_dim 16 does not match q's 32"),
    (dict(k_cache="heads3", v_cache="heads3"), ValueError, "divisible by the number of key/value heads"),
    (dict(k_cache="rows1", v_cache="rows1"), ValueError, "k_cache has 1 rows for a batch of 2: pass cache_batch_idx"),
    (dict(q="batch0"), ValueError, "batch size must be positive"),
    (dict(k="only"), ValueError, "k and v .* must be given together"),
    (dict(k="f32", v="f32"), ValueError, "k must match q's dtype and device"),
    (dict(k="heads1"), ValueError, "k and v must both have shape \\[batch=2, seqlen_new, heads_k=2, head_dim=32\\]"),
    (dict(k="long", v="long"), ValueError, "k has 65 new keys but the cache holds only 64 slots"),
    (dict(cache_seqlens=None), ValueError, "k and v need cache_seqlens"),
    (dict(cache_seqlens=63), ValueError, "cache_seqlens=63 plus 2 new keys must lie in \\[0, 64\\]"),
    (dict(cache_seqlens=-1), ValueError, "cache_seqlens=-1 plus 2 new keys must lie in"),
    (dict(cache_seqlens=2.0), TypeError, "cache_seqlens must be an int or an int32 tensor"),
    (dict(cache_seqlens=True), TypeError, "cache_seqlens must be an int or an int32 tensor \\[batch\\], got a bool"),
    (dict(cache_seqlens="int64"), ValueError, "cache_seqlens must have dtype torch.int32"),
    (dict(cache_seqlens="scalar"), ValueError, "cache_seqlens must be an int or an int32 tensor of shape \\(2,\\)"),
    (dict(cache_seqlens="b3"), ValueError, "cache_seqlens must have shape \\(2,\\)"),
    (dict(cache_leftpad="int64"), ValueError, "cache_leftpad must have dtype torch.int32"),
    (dict(cache_batch_idx="b3"), ValueError, "cache_batch_idx must have shape \\(2,\\)"),
    (dict(cache_batch_idx="ok", paged=True), ValueError, "cache_batch_idx cannot be used with block_table"),
    (dict(block_table="int64", paged=True), ValueError, "block_table must have dtype torch.int32"),
    (dict(block_table="1d", paged=True), ValueError, "block_table must be a 2-D int32 tensor"),
    (dict(block_table="b3", paged=True), ValueError, "block_table must have shape \\(2, 4\\)"),
    (dict(k_cache="page8", v_cache="page8", paged=True), ValueError, "page size .* multiple of 16, got 8"),
    (dict(rotary_cos="ok"), ValueError, "rotary_cos and rotary_sin must be given together"),
    (dict(rotary_cos="ok", rotary_sin="ok", k=None, v=None), ValueError, "rotary_cos/rotary_sin .* need k and v"),
    (dict(rotary_cos="ok", rotary_sin="narrow"), ValueError, "rotary_cos and rotary_sin must have the same shape"),
    (dict(rotary_cos="1d", rotary_sin="1d"), ValueError, "rotary_cos must be a floating-point tensor \\[seqlen_ro"),
    (dict(rotary_cos="wide", rotary_sin="wide"), ValueError, "rotary_dim .*= 34\\) must be at most head_dim 32"),
    (dict(rotary_cos="few", rotary_sin="few"), ValueError, "have 63 rows .* the cache has 64 slots"),
    (dict(num_splits=1.5), ValueError, "num_splits must be an int from 0 to 128"),  # < 0: chosen, as 0
    (dict(num_splits=129), ValueError, "num_splits must be an int from 0 to 128"),
    (dict(window_size=(1.5, 0)), ValueError, "window_size must be a pair of ints"),
    (dict(softcap=float("nan")), ValueError, "softcap must be a finite number"),  # < 0: off, as flash-attn
    (dict(softmax_scale=0.0), ValueError, "softmax_scale must be a positive finite number"),
    (dict(alibi_slopes="wrong"), ValueError, "alibi_slopes must be a float32 tensor of shape \\(4,\\) or \\(2, 4\\)"),
    (dict(learnable_sink="wrong"), ValueError, "learnable_sink must be a floating-point tensor of shape \\(4,\\)"),
    # values, read on the host by the reference backend (not checked on the JIT path: a device sync)
    (dict(cache_seqlens="past"), ValueError, "cache_seqlens\\[1\\] = 63 plus 2 new keys must lie in \\[0, 64\\]"),
    (dict(cache_seqlens="negative"), ValueError, "cache_seqlens\\[0\\] = -1 plus 2 new keys must lie in"),
    (dict(cache_leftpad="past"), ValueError, "cache_leftpad\\[1\\] = 6 must lie in \\[0, cache_seqlens\\[1\\] = 5\\]"),
    (dict(cache_batch_idx="out"), ValueError, "cache_batch_idx\\[1\\] = 2 must lie in \\[0, 2\\)"),
    (dict(block_table="out", paged=True), ValueError, "block_table\\[1, 0\\] = 8 must lie in \\[0, 8\\)"),
    (dict(rotary_cos="exact", rotary_sin="exact", causal=True, q="long"), ValueError,
     "rotary_cos/rotary_sin have 64 rows but a query sits at position 66"),
]


def _error_call(change: dict):
    """A valid call (B = 2, Sq = 2, H = 4, H_k = 2, D = 32, 2 new keys, capacity 64), then `change`."""
    paged = change.get("paged", False)
    q = torch.randn(2, 2, 4, 32, dtype=torch.float64)
    if paged:
        caches = [torch.randn(8, 16, 2, 32, dtype=torch.float64) for _ in range(2)]
        table = _i32(0, 1, 2, 3, 4, 5, 6, 7).reshape(2, 4)
    else:
        caches = [torch.randn(2, 64, 2, 32, dtype=torch.float64) for _ in range(2)]
        table = None
    args = dict(q=q, k_cache=caches[0], v_cache=caches[1], k=torch.randn(2, 2, 2, 32, dtype=torch.float64),
                v=torch.randn(2, 2, 2, 32, dtype=torch.float64), cache_seqlens=_i32(3, 5), block_table=table)
    variants = {
        "list": lambda t: t.tolist(), "3d": lambda t: t[0], "int": lambda t: t.long(), "f32": lambda t: t.float(),
        "strided": lambda t: t.transpose(1, 3).contiguous().transpose(1, 3), "short": lambda t: t[:, :-1],
        "d16": lambda t: t[..., :16], "heads3": lambda t: t[:, :, :1].expand(-1, -1, 3, -1).contiguous(),
        "rows1": lambda t: t[:1], "batch0": lambda t: t[:0], "heads1": lambda t: t[:, :, :1],
        "long": lambda t: torch.randn(2, 65, *t.shape[2:], dtype=t.dtype),
        "int64": lambda t: t.long(), "scalar": lambda t: t[0], "b3": lambda t: torch.cat([t, t])[:3],
        "1d": lambda t: t.flatten(), "page8": lambda t: t.reshape(16, 8, 2, 32),
        "past": lambda t: _i32(3, 63), "negative": lambda t: _i32(-1, 5), "only": lambda t: t,
    }
    kwargs = {}
    for name, how in change.items():
        if name == "paged":
            continue
        if name == "cache_leftpad":
            kwargs[name] = _i32(0, 6) if how == "past" else _i32(0, 0).long()
        elif name == "cache_batch_idx":
            kwargs[name] = {"ok": _i32(0, 1), "b3": _i32(0, 1, 1), "out": _i32(0, 2)}[how]
        elif name == "block_table" and how == "out":
            args[name] = _i32(0, 1, 2, 3, 8, 5, 6, 7).reshape(2, 4)
        elif name in ("rotary_cos", "rotary_sin"):
            shape = {"ok": (64, 8), "exact": (64, 8), "narrow": (64, 4), "wide": (64, 17), "few": (63, 8), "1d": (64,)}
            kwargs[name] = torch.rand(shape[how], dtype=torch.float64)
        elif name == "alibi_slopes":
            kwargs[name] = torch.ones(3, dtype=torch.float32)
        elif name == "learnable_sink":
            kwargs[name] = torch.ones(3, dtype=torch.float64)
        elif name in args and isinstance(how, str):
            if name == "q" and how == "long":  # queries past the new keys, at cache_seqlens + i
                args[name], args["cache_seqlens"] = torch.randn(2, 5, 4, 32, dtype=torch.float64), _i32(3, 62)
            else:
                args[name] = variants[how](args[name])
        else:
            (args if name in args else kwargs)[name] = how
    if change.get("k") == "only":
        args["v"] = None
    if change.get("q") == "batch0":
        args.update(k=None, v=None, cache_seqlens=None)
    return args, kwargs


@pytest.mark.parametrize("change, error, match", ERRORS, ids=[str(e[0]) for e in ERRORS])
def test_argument_errors_name_the_argument(change, error, match, reference):
    """Every check runs before anything is written or launched and names the argument; the caches are
    untouched when a call is refused."""
    args, kwargs = _error_call(change)
    k_before = args["k_cache"].clone() if isinstance(args["k_cache"], torch.Tensor) else None
    with pytest.raises(error, match=match):
        flash_attn_with_kvcache(**args, **kwargs)
    if k_before is not None:
        assert torch.equal(args["k_cache"], k_before), "a refused call wrote into the cache"


def test_jit_backend_on_cpu_names_the_switch(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    args, _ = _error_call({})
    args = {name: t.half() if name in ("q", "k_cache", "v_cache", "k", "v") else t for name, t in args.items()}
    with pytest.raises(ValueError, match="FLASHJIT_BACKEND=reference"):
        flash_attn_with_kvcache(**args)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        flash_attn_with_kvcache(**dict(args, q=args["q"].float()))


def test_index_tensors_must_be_on_qs_device_on_the_jit_path(monkeypatch):
    """The JIT path needs cache_seqlens & co on q's device (no hidden copy); checked before the CPU
    check, with a meta-device stand-in for the GPU."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    from flashjit.kvcache import _check_index

    with pytest.raises(ValueError, match="cache_seqlens must be on q's device meta"):
        _check_index("cache_seqlens", _i32(1, 2), (2,), "lengths", torch.device("meta"), reference=False)


def test_exported_and_aliased():
    import flashjit
    from flashjit import alias

    assert flashjit.flash_attn_with_kvcache is flash_attn_with_kvcache
    assert "flash_attn_with_kvcache" in alias.INTERFACE and "flash_attn_with_kvcache" in flashjit.__all__


# ---- GPU: the JIT kernel against the reference --------------------------------------------------------------
def _ref_and_low(q, cache: Cache, k_after, v_after, ends, starts, idx, kwargs):
    """(ref, low) as numerics.reference_and_low over each entry's valid keys of the cache after the
    append: (out [B, Sq, H, D], lse [B, H, Sq])."""
    ref, low = [], []
    slopes = kwargs.get("alibi_slopes")
    for b in range(q.shape[0]):
        keys, values = (cache.slots(t, b, starts[b], ends[b], idx)[None] for t in (k_after, v_after))
        extra = dict(causal=kwargs["causal"], softmax_scale=kwargs["softmax_scale"],
                     window_size=tuple(kwargs["window_size"]), softcap=kwargs["softcap"])
        if slopes is not None:
            extra["alibi_slopes"] = slopes if slopes.dim() == 1 else slopes[b]
        if kwargs.get("learnable_sink") is not None:
            extra["learnable_sink"] = kwargs["learnable_sink"]
        r, lo = reference_and_low(q[b:b + 1], keys, values, **extra)
        ref.append(r)
        low.append(lo)
    return [tuple(torch.cat([x[i] for x in xs]) for i in range(2)) for xs in (ref, low)]


GPU_CASES = [  # (d, dtype, features)
    (64, torch.bfloat16, dict(new=1, sq=1, h=8, hk=2)),
    (128, torch.float16, dict(new=3, sq=3, causal=True)),
    (40, torch.bfloat16, dict(new=2, sq=4, h=4, hk=1, window=(5, 1))),
    (80, torch.float16, dict(new=2, sq=2, leftpad=True, causal=True)),
    (96, torch.bfloat16, dict(new=2, sq=3, batch_idx=True, causal=True)),
    (64, torch.float16, dict(new=1, sq=2, spare_rows=True)),
    (128, torch.bfloat16, dict(new=1, sq=2, softcap=3.0, alibi="bh")),
    (256, torch.float16, dict(new=2, sq=2, sink=True, alibi="h", causal=True)),
    (128, torch.bfloat16, dict(new=3, sq=3, rotary=("gptj", 64), causal=True)),
    (96, torch.float16, dict(new=2, sq=3, rotary=("neox", 32))),
    (64, torch.bfloat16, dict(new=2, sq=2, seqlens="int", causal=True)),
    (128, torch.float16, dict(sq=3, seqlens=None, causal=True)),
    (64, torch.bfloat16, dict(sq=5, causal=True, short=True)),
    (128, torch.bfloat16, dict(page=16, new=3, sq=3, causal=True, h=8, hk=2, capacity=700)),
    (80, torch.float16, dict(page=48, new=2, sq=2, rotary=("neox", 16), causal=True, capacity=500)),
    (128, torch.bfloat16, dict(page=256, new=1, sq=1, capacity=3000, alibi="h", softcap=2.0, batch=8)),
    (256, torch.bfloat16, dict(page=16, new=2, sq=3, leftpad=True, window=(90, 2), sink=True)),
    (40, torch.float16, dict(page=16, sq=2, seqlens=None, capacity=300)),
    (128, torch.float16, dict(new=1, sq=1, capacity=3000, batch=8, h=32, hk=8)),
]


def _poison_outside_the_valid_slots(cache: Cache, ends, starts, batch_idx=None):
    """NaN in every slot of every page that no entry reads (its valid range after the append)."""
    keep = torch.zeros(cache.k.shape[:2], dtype=torch.bool)
    for b in range(len(ends)):
        keep[cache.index(b, starts[b], ends[b], batch_idx)] = True
    keep = keep.to(cache.k.device)
    for t in (cache.k, cache.v):
        t[~keep] = float("nan")


@gpu
@pytest.mark.parametrize("num_splits", [0, 1, 3, 17])
@pytest.mark.parametrize("d, dtype, features", GPU_CASES, ids=str)
def test_jit_matches_the_reference(d, dtype, features, num_splits, monkeypatch):
    """The kernel's out and lse against the fp32 reference of each entry's valid keys (numerics'
    tolerance), with every slot outside them NaN; the append identical to the reference backend's."""
    if num_splits not in (0, 3) and features.get("new", 0) != 1:
        pytest.skip("many splits: the decode cases")
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    cache, kwargs = _call(dict(features, d=d), device="cuda", dtype=dtype)
    if kwargs.get("learnable_sink") is not None:
        kwargs["learnable_sink"] = kwargs["learnable_sink"].float()
    batch, new = kwargs["q"].shape[0], 0 if kwargs.get("k") is None else kwargs["k"].shape[1]
    seqlens = kwargs.get("cache_seqlens")
    lens = ([cache.capacity] * batch if seqlens is None else [seqlens] * batch if isinstance(seqlens, int)
            else seqlens.tolist())
    ends = [n + new for n in lens]
    starts = kwargs["cache_leftpad"].tolist() if kwargs.get("cache_leftpad") is not None else [0] * batch
    idx = kwargs.get("cache_batch_idx")
    _poison_outside_the_valid_slots(cache, ends, starts, idx)
    for b in range(batch):  # the slots the append writes are valid ones: poison them too, it must fill them
        cache.k[cache.index(b, lens[b], ends[b], idx)] = float("nan")
    k_ref, v_ref = cache.k.clone(), cache.v.clone()
    out, lse = flash_attn_with_kvcache(**kwargs, num_splits=num_splits)
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    flash_attn_with_kvcache(**dict(kwargs, k_cache=k_ref, v_cache=v_ref))
    assert torch.equal(cache.k.nan_to_num(), k_ref.nan_to_num()) and torch.equal(cache.v.nan_to_num(),
                                                                                 v_ref.nan_to_num())
    assert torch.equal(cache.k.isnan(), k_ref.isnan()), "the append wrote other slots than the reference's"
    q = kwargs["q"]
    if kwargs.get("rotary_cos") is not None:  # the rotated q, as the call computed it
        per_row = kwargs["causal"] or tuple(kwargs["window_size"]) != (-1, -1)
        positions = torch.tensor(lens, device="cuda")[:, None] + (torch.arange(q.shape[1], device="cuda")
                                                                  if per_row else 0)
        q = apply_rotary(q, kwargs["rotary_cos"], kwargs["rotary_sin"], positions, kwargs["rotary_interleaved"])
    (ref_out, ref_lse), (low_out, low_lse) = _ref_and_low(q, cache, cache.k, cache.v, ends, starts, idx, kwargs)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close("out", out, ref_out, low_out)
    assert_lse_close(lse, ref_lse, low_lse)


@gpu
@pytest.mark.parametrize("sq", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("num_splits", [0, 1, 3, 9, 17, 128])
def test_jit_decode_lengths_and_splits(sq, num_splits, monkeypatch):
    """Sq = 1..5 queries per entry over ragged caches of up to 3000 keys, B = 8, GQA, every split count:
    out and lse against the reference_kvcache_attention contract (fp32) and PyTorch's low precision."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    batch, h, hk, d, capacity = 8, 16, 4, 128, 3000
    cache = Cache(batch, capacity, hk, d, torch.bfloat16, "cuda")
    lens = torch.tensor([0, 1, 17, 255, 256, 1000, 2999 - sq, int(torch.randint(0, 2999 - sq, ()))],
                        dtype=torch.int32, device="cuda")
    q = torch.randn(batch, sq, h, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, sq, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ends = (lens + sq).tolist()
    _poison_outside_the_valid_slots(cache, ends, [0] * batch)
    out, lse = flash_attn_with_kvcache(q, cache.k, cache.v, k, v, cache_seqlens=lens, causal=True,
                                       num_splits=num_splits, return_softmax_lse=True)
    kwargs = dict(causal=True, softmax_scale=1 / math.sqrt(d), window_size=(-1, -1), softcap=0.0)
    (ref_out, ref_lse), (low_out, low_lse) = _ref_and_low(q, cache, cache.k, cache.v, ends, [0] * batch, None,
                                                          kwargs)
    assert_close("out", out, ref_out, low_out)
    assert_lse_close(lse, ref_lse, low_lse)
    # the kernel's contract function on fp32 copies is that same reference
    contract_out, contract_lse = reference_kvcache_attention(q.float(), cache.k.float(), cache.v.float(), lens + sq,
                                                             causal=True)
    assert_close("out (reference_kvcache_attention)", out, contract_out, low_out)
    assert_lse_close(lse, contract_lse, low_lse)


# ---- the repeated call: a plan of the checks (flashjit/kvcache.py: _Plan) ------------------------------------
PLANNED = [c for c in CASES if not {"rotary", "alibi", "sink"} & set(c[1])]


def test_plan_key_ignores_the_values_and_refuses_what_a_plan_cannot_describe():
    """Decoding's next step (new data, new lengths) has the first step's key; an int and a tensor
    cache_seqlens do not share one; a tensor softmax_scale or softcap (values a plan would miss) has none."""
    from flashjit import kvcache

    def key(kwargs, **change):
        a = dict(kwargs, **change)
        return kvcache._plan_key(a["q"], a["k_cache"], a["v_cache"], a.get("k"), a.get("v"), a.get("cache_seqlens"),
                                 a.get("cache_batch_idx"), a.get("cache_leftpad"), a["block_table"], a["softmax_scale"],
                                 a["causal"], a["window_size"], a["softcap"], 0)

    _, first = _call(dict(new=1, sq=1, page=16))
    _, second = _call(dict(new=1, sq=1, page=16))
    assert key(first) is not None and key(first) == key(second)
    assert key(first, cache_seqlens=5) != key(first) and key(first, cache_seqlens=5) == key(second, cache_seqlens=9)
    assert key(first, causal=not first["causal"]) != key(first)
    assert key(first, softmax_scale=torch.tensor(0.1)) is None and key(first, softcap=torch.tensor(1.0)) is None
    # the checks tell these apart (True and 5.0 are refused as lengths, None has no int to check): so must the key
    assert len({key(first, cache_seqlens=x) for x in (5, True, 5.0, None, "5")}) == 5
    assert key(first, window_size=(torch.tensor(3), -1)) is None and key(first, causal=torch.tensor(True)) is None


@pytest.mark.parametrize("name, features", PLANNED, ids=[c[0] for c in PLANNED])
def test_plan_hands_the_kernels_what_the_checked_path_does(name, features, monkeypatch):
    """On CPU, with the kernels' entry replaced by a recorder (and the JIT path's CUDA checks waived):
    a repeated call runs from the plan and hands kvattn.forward_kvcache exactly the arguments the
    checked path computed for it (the same tensors, lengths of the same values, the same settings)."""
    import inspect

    from flashjit import kvattn, kvcache

    calls = []
    monkeypatch.setattr(kvcache, "backend", lambda: "jit")
    real_check = kvcache._check_call
    monkeypatch.setattr(kvcache, "_check_call", lambda *a: real_check(*a[:-1], True))  # no CUDA needed here
    signature = inspect.signature(kvattn.forward_kvcache)
    monkeypatch.setattr(kvattn, "forward_kvcache", lambda *a, **kw: calls.append(signature.bind(*a, **kw)) or (0, 0))
    kvcache._plans.clear()
    _, kwargs = _call(dict(features, d=32))
    for _ in range(2):
        flash_attn_with_kvcache(**kwargs)
    assert len(kvcache._plans) == 1 and len(calls) == 2
    # A call the checks refuse never runs from that plan: the same layouts with rotary_sin alone, or
    # num_splits=True, raise as on the checked path.
    with pytest.raises(ValueError, match="rotary_cos and rotary_sin"):
        flash_attn_with_kvcache(**kwargs, rotary_sin=torch.ones(64, 4, dtype=kwargs["q"].dtype))
    with pytest.raises(ValueError, match="num_splits"):
        flash_attn_with_kvcache(**kwargs, num_splits=True)
    assert len(calls) == 2
    for bound in calls:
        bound.apply_defaults()
    checked, planned = (bound.arguments for bound in calls)
    for arg, a in checked.items():
        b = planned[arg]
        if arg == "seqlens_k":  # an int or None becomes a tensor in each call
            assert torch.equal(a, b) and (a is b) == isinstance(kwargs.get("cache_seqlens"), torch.Tensor)
        elif isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor) and (a.data_ptr(), a.shape, a.stride()) == (b.data_ptr(), b.shape,
                                                                                            b.stride()), arg
        else:
            assert a == b, (arg, a, b)
    kvcache._plans.clear()


@gpu
@pytest.mark.parametrize("name, features", PLANNED, ids=[c[0] for c in PLANNED])
def test_repeated_call_runs_from_the_plan_bit_for_bit(name, features, monkeypatch):
    """The second call of a layout (new data and lengths, as decoding's next step) skips the checks
    (_kvcache is not entered) and gives bit for bit what the unplanned path gives: out, lse, the append."""
    from flashjit import kvcache

    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    kvcache._plans.clear()
    flash_attn_with_kvcache(**_call(features, device="cuda", dtype=torch.bfloat16)[1])  # records the plan
    assert len(kvcache._plans) == 1
    cache, kwargs = _call(features, device="cuda", dtype=torch.bfloat16)
    k_copy, v_copy = cache.k.clone(), cache.v.clone()
    entered = []
    full_path = kvcache._kvcache
    monkeypatch.setattr(kvcache, "_kvcache", lambda *a: entered.append(1) or full_path(*a))
    out, lse = flash_attn_with_kvcache(**kwargs)
    assert not entered, "the repeated call did not take the plan"
    kvcache._plans.clear()
    want_out, want_lse = flash_attn_with_kvcache(**dict(kwargs, k_cache=k_copy, v_cache=v_copy))
    assert entered
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    assert torch.equal(cache.k, k_copy) and torch.equal(cache.v, v_copy)
    kvcache._plans.clear()

"""The Hopper forward family (kernels/fwd_sm90.cuh) on an sm_90a GPU: every build-set config, every
knob, every feature, odd shapes with several tiles per persistent CTA, head dims that are not whole
tiles, and equality with the sm_80 family within the tolerance rule (tests/numerics.py). The default
forward tests (test_forward_gpu.py, test_flash_api.py) run this family too: it is the dispatcher's
choice on sm_90a. Outputs are NaN-poisoned; inputs fresh, seeded per test."""
import dataclasses
import itertools
import logging
import math

import pytest
import torch

import flashjit
from flashjit import FwdSm90Config, KernelConfig, dispatch, interface, jit
from flashjit.reference import philox_keep_mask
from numerics import assert_close, assert_lse_close, forward_keep_mask, mask_mismatch, poisoned_like, reference_and_low

pytestmark = pytest.mark.gpu
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _hopper_only():
    if jit.arch_for(torch.cuda.current_device()) != "sm_90a":
        pytest.skip("the Hopper forward family builds and runs only on sm_90a GPUs (H100/H200)")


def _inputs(batch, sq, sk, h, hk, d, dtype):
    return (torch.randn(batch, sq, h, d, device="cuda", dtype=dtype),
            torch.randn(batch, sk, hk, d, device="cuda", dtype=dtype),
            torch.randn(batch, sk, hk, d, device="cuda", dtype=dtype))


def _check(q, k, v, config, causal=False, **kw):
    out = poisoned_like(q[..., : v.shape[-1]])  # (v's head dim: the d_v cases)
    out, lse = flashjit.forward(q, k, v, config=config, causal=causal, return_lse=True, out=out, **kw)
    (ref, ref_lse), (low, low_lse) = reference_and_low(q, k, v, causal=causal, **kw)
    assert_close("out", out, ref, low)
    assert_lse_close(lse, ref_lse, low_lse, _sums_rounding(config))
    return out


def _sums_rounding(config) -> float:
    """The lse error a kernel's row sums add by summing rounded P (mma_sums: the bf16 / fp16 P that PV
    multiplies): each P is off by up to u = 2^-8 (bf16) or 2^-11 (fp16) of itself, so the sum too, and its log
    by up to -log1p(-u). It shows where one key dominates a row and its P is not exactly 1: with lazy rescaling P
    is 2^x against a kept max (the "jump" inputs below: 3.6e-3 on the H200, sixty-second session); without,
    a row's largest P is 1, exact."""
    if not getattr(config, "mma_sums", False):
        return 0.0
    return -math.log1p(-(2.0 ** (-8 if config.dtype == "bf16" else -11)))


def _feature_kwargs(q, feature: dict, causal: bool = False):
    """A feature dict's call kwargs, its tensors made (alibi_slopes "h": a slope a head, anything else: a head
    and batch entry; learnable_sink: one a head), and the call's ScoreMods."""
    kw, batch, heads = dict(feature), q.shape[0], q.shape[2]
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = torch.rand(*((heads,) if kw["alibi_slopes"] == "h" else (batch, heads)), device="cuda") * 0.3
    if "learnable_sink" in kw:
        kw["learnable_sink"] = torch.randn(heads, device="cuda")
    return kw, interface.score_mods(q, causal, kw.get("window_size", (-1, -1)), kw.get("softcap", 0.0),
                                    kw.get("alibi_slopes"))


def test_default_on_hopper_is_this_family():
    q, k, v = _inputs(1, 300, 300, 2, 2, 128, torch.bfloat16)
    assert isinstance(interface.resolve_config(q, k, None, False), FwdSm90Config)


@pytest.mark.parametrize("config", [c for c in dispatch.get_kernels_to_build(arch="sm_90a")
                                    if isinstance(c, FwdSm90Config)], ids=lambda c: c.name)
def test_build_set(config):
    q, k, v = _inputs(2, 333, 301, 4, 2, config.d_head, DTYPES[config.dtype])
    _check(q, k, v, config, causal=config.causal)


KNOBS = [dict(), dict(overlap=False, pingpong=False), dict(pingpong=False), dict(persistent=True),
         dict(stages=3), dict(stages=4, block_n=64), dict(block_n=96), dict(block_n=192, stages=2),
         dict(block_m=192, pingpong=False), dict(block_m=192, pingpong=False, overlap=False, persistent=True),
         dict(persistent=True, cross_tile=True), dict(persistent=True, cross_tile=True, pingpong=False),
         dict(block_m=192, pingpong=False, persistent=True, cross_tile=True, stages=4),
         dict(block_m=192, stages=4), dict(block_m=192, stages=4, persistent=True),  # a token round three
         dict(block_m=192, stages=4, persistent=True, cross_tile=True),
         dict(half_blocks=True), dict(block_m=192, stages=4, persistent=True, half_blocks=True),
         dict(persistent=True, cross_tile=True, half_blocks=True),
         dict(two_ctas=True, overlap=False, pingpong=False, block_n=64),  # d64: two CTAs an SM
         dict(two_ctas=True, overlap=False, pingpong=False, block_n=64, stages=4, persistent=True)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("knobs", KNOBS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "defaults")
def test_knobs(knobs, causal):
    """Each knob on shapes with more tiles than SMs (a persistent CTA walks several, its rings running
    on across tiles, some tiles empty under the causal mask) and GQA."""
    d = 64 if knobs.get("block_m") == 192 or knobs.get("two_ctas") else 128
    config = dataclasses.replace(FwdSm90Config(dtype="fp16", d_head=d, causal=causal), **knobs).validate()
    q, k, v = _inputs(3, 1000, 777, 8, 2, d, torch.float16)
    _check(q, k, v, config, causal=causal)


# The softmax cuts (FwdSm90Config.lazy_rescale, mma_sums) on the tiles the dispatcher picks and on the
# steps they change: overlapped or not, half blocks, cross-tile, a 192-row tile, d256's 80-key tile.
SOFTMAX_CUTS = [dict(lazy_rescale=True), dict(mma_sums=True), dict(lazy_rescale=True, mma_sums=True)]
SOFTMAX_CUT_TILES = [dict(d_head=128), dict(d_head=128, persistent=True, cross_tile=True),
                     dict(d_head=128, overlap=False, pingpong=False), dict(d_head=64, stages=4, persistent=True),
                     dict(d_head=64, stages=4, persistent=True, half_blocks=True), dict(d_head=256, block_n=80),
                     dict(d_head=64, block_m=192, stages=4, persistent=True, cross_tile=True),
                     dict(dtype="fp16", d_head=128, persistent=True),  # wgmma_rs<8>'s f16 form, fp16 P up to 2^8
                     dict(d_head=128, d_v=64),  # the sums' n-tile after d_v's, not d_head's
                     dict(d_head=96, persistent=True, cross_tile=True, half_blocks=True)]  # half a block's scores again


def _softmax_cut_configs():
    for tile, cut, causal in itertools.product(SOFTMAX_CUT_TILES, SOFTMAX_CUTS, (False, True)):
        config = dataclasses.replace(FwdSm90Config(**{"dtype": "bf16", **tile}, causal=causal), **cut)
        if not config.problems() and not (config.half_blocks and not causal):
            yield config


@pytest.mark.parametrize("scores", ["plain", "growing", "jump"])
@pytest.mark.parametrize("config", list(_softmax_cut_configs()), ids=lambda c: c.name)
def test_softmax_cuts(config, scores):
    """Against the fp32 reference. "growing": keys scaled up along the sequence (x1 to x6) and queries
    x3, so rows meet maxima 2^8 and more above their running one in later blocks, some rows of a warp
    and not others: lazy_rescale's rescale runs in some steps and not in others. "jump": the keys from
    the 300th on x8, so most rows' max rises 2^64 or more in one block, where a step with P against the
    kept max alone makes the scores again (KeptSoftmax::settle_kept), and others' less. Sq != Sk, GQA,
    a causal Sq > Sk leaves rows that see no key (out 0 there)."""
    q, k, v = _inputs(2, 700, 611, 4, 2, config.d_head, DTYPES[config.dtype])
    v = v[..., : config.head_dim_v]
    if scores != "plain":
        q = q * 3
        scale = torch.linspace(1, 6, k.shape[1], device="cuda") if scores == "growing" else \
            torch.where(torch.arange(k.shape[1], device="cuda") < 300, 1.0, 8.0)
        k = k * scale.to(k.dtype)[None, :, None, None]
    out = _check(q, k, v, config, causal=config.causal)
    if config.causal:
        assert out[:, : 700 - 611].abs().max().item() == 0


def _check_dropout(q, k, v, config, p):
    """A causal dropout forward against the fp32 reference with the same Philox keep mask."""
    b, sq, h, sk = q.shape[0], q.shape[1], q.shape[2], k.shape[1]
    philox = (torch.randint(0, 2**62, ()).item(), torch.randint(0, 2**40, ()).item())
    out, lse = flashjit.forward(q, k, v, config=config, causal=True, dropout_p=p, philox=philox, return_lse=True,
                                out=poisoned_like(q))
    mask = philox_keep_mask(*philox, interface.dropout_threshold(p), b, h, sq, sk, "cuda")
    (ref, ref_lse), (low, low_lse) = reference_and_low(q, k, v, causal=True, dropout_p=p, dropout_mask=mask)
    assert_close("out", out, ref, low)
    assert_lse_close(lse, ref_lse, low_lse)


@pytest.mark.parametrize("feature", [dict(window_size=(300, 11)), dict(softcap=5.0), dict(alibi_slopes=True),
                                     dict(learnable_sink=True), dict(dropout_p=0.2)], ids=lambda d: ",".join(d))
def test_softmax_cuts_with_score_features(feature):
    """lazy_rescale with each score feature (dropout: against the reference with the same Philox keep
    mask), mma_sums with all but dropout."""
    q, k, v = _inputs(2, 500, 433, 4, 2, 128, torch.bfloat16)
    kw, mods = _feature_kwargs(q, feature, causal=True)
    for cut in SOFTMAX_CUTS:
        config = FwdSm90Config("bf16", 128, persistent=True, causal=True, local=mods.local, softcap=mods.softcap,
                               alibi=mods.alibi, sink="learnable_sink" in kw, dropout="dropout_p" in kw, **cut)
        if config.problems():
            assert "dropout_p" in kw and config.mma_sums
            continue
        if "dropout_p" in kw:
            _check_dropout(q, k, v, config, kw["dropout_p"])
        else:
            _check(q, k, v, config, causal=True, **kw)


@pytest.mark.parametrize("config", [FwdSm90Config("bf16", 128, local=True, lazy_rescale=True),
                                    FwdSm90Config("bf16", 128, local=True, lazy_rescale=True, persistent=True,
                                                  cross_tile=True),
                                    FwdSm90Config("fp16", 96, local=True, lazy_rescale=True),
                                    FwdSm90Config("bf16", 192, block_n=96, local=True, lazy_rescale=True)],
                         ids=lambda c: c.name)
def test_lazy_rows_that_start_seeing_keys(config):
    """lazy_rescale's step computes a thread's P before its quad agrees on the row's max (d72-d192): rows
    that saw no key in a tile's first block and see two in the next (a window of this query's key and the
    one before), which only some threads of the quad hold, with every score ~-260 in exp2 units, so that
    the threads without a visible key go from the reference 0 of a row without keys to the new max 2^-260
    lower (their P is 0, and must stay 0: never 0 * inf). Equal scores: each row averages its visible V."""
    dtype, d = DTYPES[config.dtype], config.d_head
    q = torch.full((1, 700, 4, d), 4.0, device="cuda", dtype=dtype)
    k = torch.full((1, 700, 2, d), -4.0, device="cuda", dtype=dtype)
    v = torch.randn(1, 700, 2, d, device="cuda", dtype=dtype)
    _check(q, k, v, config, window_size=(1, 0))


# FlashAttention-3's tiles: block_n 176 at d128 and 80 at d256, key blocks that are a multiple of 16
# but not of 64 (QK^T's wgmma N = 176 / 80, PV over 11 / 5 k-steps of 16, 22 / 10 S n-tiles in the
# softmax and masks). Test ids are the config names: -k "n176 or n80" selects every test of them.
FA3_TILES = ((128, 176), (256, 80))
FA3_VARIANTS = [dict(), dict(persistent=True), dict(pingpong=False), dict(pingpong=False, persistent=True),
                dict(overlap=False, pingpong=False)]
FA3_CONFIGS = [FwdSm90Config("bf16", d, block_n=n, causal=causal, **knobs).validate()
               for d, n in FA3_TILES for causal in (False, True) for knobs in FA3_VARIANTS] + \
              [FwdSm90Config("fp16", d, block_n=n, causal=causal).validate() for d, n in FA3_TILES for causal in (False, True)]
FA3_SHAPES = [  # batch, Sq, Sk, H, H_k: lengths that are no multiple of 176 or 80, Sq != Sk, GQA
    (3, 1000, 777, 8, 2), (2, 333, 901, 4, 1), (1, 1100, 300, 4, 4), (2, 17, 100, 2, 1), (1, 65, 1, 2, 2)]


@pytest.mark.parametrize("shape", FA3_SHAPES, ids=str)
@pytest.mark.parametrize("config", FA3_CONFIGS, ids=lambda c: c.name)
def test_fa3_tiles(config, shape):
    """Against the fp32 reference (out and lse); causal with Sq > Sk leaves rows that see no key: out
    exactly 0 there. (1000 queries: 8 tiles of 128 rows a head, more tiles than SMs with 8 heads x 3.)"""
    batch, sq, sk, h, hk = shape
    q, k, v = _inputs(batch, sq, sk, h, hk, config.d_head, DTYPES[config.dtype])
    out = _check(q, k, v, config, causal=config.causal)
    if config.causal and sq > sk:
        assert out[:, : sq - sk].abs().max().item() == 0


FA3_FEATURES = [dict(window_size=(300, 11)), dict(window_size=(-1, 5)), dict(window_size=(200, -1)),
                dict(softcap=5.0), dict(alibi_slopes="bh"), dict(learnable_sink=True)]


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("feature", FA3_FEATURES, ids=lambda d: ",".join(d))
@pytest.mark.parametrize("d, n", [pytest.param(d, n, id=f"d{d}_n{n}") for d, n in FA3_TILES])
def test_fa3_tiles_features(d, n, feature, persistent):
    """Window edges inside a 176- or 80-key block, softcap, ALiBi and sinks on the FA3 tiles (windows of
    a few hundred keys start and end at key blocks whose edges are not 64-aligned)."""
    q, k, v = _inputs(2, 700, 533, 4, 2, d, torch.bfloat16)
    kw, mods = _feature_kwargs(q, feature)
    config = FwdSm90Config("bf16", d, block_n=n, persistent=persistent, local=mods.local, softcap=mods.softcap,
                           alibi=mods.alibi, sink="learnable_sink" in kw).validate()
    _check(q, k, v, config, **kw)


@pytest.mark.parametrize("config", [FwdSm90Config("bf16", d, block_n=n, causal=c) for d, n in FA3_TILES
                                    for c in (False, True)] +
                         [FwdSm90Config("bf16", 128, persistent=True, cross_tile=True, causal=c)
                          for c in (False, True)] +
                         [FwdSm90Config("bf16", 64, 192, 128, 4, causal=c, persistent=p)  # three-way ping-pong
                          for c in (False, True) for p in (False, True)] +
                         [FwdSm90Config("bf16", d, m, 128, 2, causal=True, half_blocks=True)  # sequences ending
                          for d, m in ((64, 128), (64, 192), (128, 128))] +  # mid-block: half blocks
                         [FwdSm90Config("bf16", 128, persistent=True, causal=c, **cut)  # the softmax cuts
                          for c in (False, True) for cut in SOFTMAX_CUTS],
                         ids=lambda c: c.name)
def test_fa3_tiles_varlen_equal_dense_calls(config):
    """A varlen batch on the FA3 tiles: each sequence's last key block runs past its keys into the next
    sequence's rows, which hold NaN here (zero_v_past_keys must clear a 176- or 80-row V stage);
    out and lse equal a dense call of each sequence alone, bit for bit."""
    from flashjit.varlen import varlen_forward

    lens_q, lens_k = [300, 5, 177, 0, 81], [190, 353, 176, 40, 79]
    h, hk, d = 4, 2, config.d_head
    q = torch.randn(sum(lens_q), h, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(sum(lens_k) + 200, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k[sum(lens_k):], v[sum(lens_k):] = float("nan"), float("nan")  # rows in no sequence
    cu = lambda lens: torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device="cuda")
    out, lse = varlen_forward(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k), causal=config.causal,
                              config=config)
    q0 = k0 = 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        if lq:
            one, one_lse = flashjit.forward(q[q0:q0 + lq][None], k[k0:k0 + lk][None], v[k0:k0 + lk][None],
                                            config=config, causal=config.causal, return_lse=True)
            assert torch.equal(out[q0:q0 + lq], one[0]), f"out of sequence {b}"
            assert torch.equal(lse[:, q0:q0 + lq], one_lse[0]), f"lse of sequence {b}"
        q0, k0 = q0 + lq, k0 + lk


@pytest.mark.parametrize("cross_tile", [False, True])
@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (False, (100, 0))])
def test_persistent_ctas_walk_many_tiles(causal, window, cross_tile):
    """Several tiles per persistent CTA (so the Q ring's parities and the K/V rings wrap many times),
    with empty tiles mixed in: causal with Sq > Sk leaves the first 800 rows without keys, a window
    with Sq > Sk likewise (cross-tile: a pending tile finished before an empty one)."""
    local = window != (-1, -1)  # a feature: the 192-row tile's registers would spill, so 128 rows with ping-pong
    config = FwdSm90Config("bf16", 64, 128 if local else 192, 128, 4, True, local, True, causal=causal, local=local,
                           cross_tile=cross_tile).validate()
    q, k, v = _inputs(8, 1100, 300, 16, 4, 64, torch.bfloat16)
    out = _check(q, k, v, config, causal=causal, window_size=window)
    if causal:
        assert out[:, :800].abs().max().item() == 0


@pytest.mark.parametrize("config", [FwdSm90Config("bf16", 64, 192, 128, 4, True, True, True, causal=True, half_blocks=True),
                                    FwdSm90Config("bf16", 128, persistent=True, causal=True, cross_tile=True),
                                    FwdSm90Config("fp16", 64, 128, 64, 4, False, False, True, causal=True, two_ctas=True)],
                         ids=lambda c: c.name)
@pytest.mark.parametrize("batch, sq, sk, heads", [(2, 3000, 3000, 5), (1, 4100, 2500, 3), (3, 700, 1900, 7)], ids=str)
def test_causal_walk_equals_the_static_walk_bit_for_bit(config, batch, sq, sk, heads, monkeypatch):
    """A causal persistent grid walks dispatch.causal_walk's lists (interface._walk): which CTA runs a tile and
    when, not what it computes, so out and lse equal the static walk's bit for bit, and are right; a list made
    for another grid size (a stale one) is dropped by the launcher, not followed. Sq > Sk leaves rows without
    keys (empty tiles in the lists); Sq < Sk, bottom-right, tiles of unequal key counts."""
    q, k, v = _inputs(batch, sq, sk, heads, heads, config.d_head, torch.bfloat16 if config.dtype == "bf16" else torch.float16)
    walk, grid = interface._walk(config, q, k, q.get_device())
    tiles = batch * heads * -(-sq // config.block_m)
    assert walk[0].item() == grid == min(tiles, interface.sm_count(q.get_device()) * config.ctas_per_sm)
    out = _check(q, k, v, config, causal=True)
    _, lse = flashjit.forward(q, k, v, config=config, causal=True, return_lse=True)
    monkeypatch.setattr(interface, "_walk", lambda *args: None)
    static = flashjit.forward(q, k, v, config=config, causal=True, return_lse=True, out=poisoned_like(q))
    assert torch.equal(out, static[0]) and torch.equal(lse, static[1])
    stale = torch.tensor(dispatch.causal_walk(batch * heads, sq, sk, config.block_m, config.block_n, 16),
                         dtype=torch.int32, device="cuda")  # sixteen CTAs' lists: the launcher drops them
    monkeypatch.setattr(interface, "_walk", lambda *args: (stale, 16))
    run = flashjit.forward(q, k, v, config=config, causal=True, return_lse=True, out=poisoned_like(q))
    assert torch.equal(out, run[0]) and torch.equal(lse, run[1])


@pytest.mark.parametrize("features", [dict(), dict(local=True), dict(dropout=True), dict(softcap=True, alibi=True),
                                      dict(sink=True), dict(local=True, dropout=True)],
                         ids=lambda f: ",".join(f) or "plain")
@pytest.mark.parametrize("causal", [False, True])
def test_two_ctas_equal_one_cta_bit_for_bit(causal, features):
    """two_ctas changes where the kernel runs (two CTAs an SM, 104 registers a consumer thread, a persistent
    grid of twice the SMs), not what it computes: out and lse equal the one-CTA kernel's bit for bit, with
    every score feature (one fixed Philox seed and offset for both), on 1152 tiles (over four rounds of the
    persistent walk: its reversed odd rounds, the rings wrapping many times) with empty tiles mixed in; and
    so does its one-CTA-a-tile twin, which dispatch.with_tile_walk picks for a varlen batch."""
    one = FwdSm90Config("bf16", 64, 128, 64, 4, overlap=False, pingpong=False, persistent=True, causal=causal,
                        **features).validate()
    two = dataclasses.replace(one, two_ctas=True).validate()
    q, k, v = _inputs(8, 1100, 300, 16, 4, 64, torch.bfloat16)
    kw = dict(window_size=(100, 0) if one.local else (-1, -1), softcap=5.0 if one.softcap else 0.0)
    if one.alibi:
        kw["alibi_slopes"] = torch.rand(8, 16, device="cuda") * 0.3
    if one.sink:
        kw["learnable_sink"] = torch.randn(16, device="cuda")
    if one.dropout:
        kw.update(dropout_p=0.2, philox=(torch.randint(0, 2**62, ()).item(), 4 * torch.randint(1, 2**20, ()).item()))
    runs = [flashjit.forward(q, k, v, config=cfg, causal=causal, return_lse=True, out=poisoned_like(q), **kw)
            for cfg in (one, two, two.one_cta_per_tile())]
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0]) and torch.equal(runs[0][1], other[1])
    if not one.dropout:  # and right, not only alike
        _check(q, k, v, two, causal=causal, **{key: val for key, val in kw.items() if key != "philox"})


@pytest.mark.parametrize("d, block_m", [(64, 192), (128, 128)])
@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (False, (100, 0))])
def test_cross_tile_equals_persistent_bit_for_bit(d, block_m, causal, window):
    """The cross-tile pipeline reorders when each tile starts and stores, not the arithmetic: out and
    lse equal the persistent kernel's bit for bit, over many tiles a CTA, empty tiles among them (Sq > Sk
    under the causal mask or a window), lengths no multiple of the tiles."""
    local = window != (-1, -1)
    block_m = 128 if local else block_m  # a feature: the 192-row tile's registers would spill
    base = FwdSm90Config("bf16", d, block_m, 128, 4 if d == 64 else 2, True, block_m == 128, True, causal=causal,
                         local=local).validate()
    q, k, v = _inputs(6, 1300, 700, 16, 4, d, torch.bfloat16)
    chained = dataclasses.replace(base, cross_tile=True).validate()
    runs = [flashjit.forward(q, k, v, config=cfg, causal=causal, window_size=window, return_lse=True,
                             out=poisoned_like(q)) for cfg in (base, chained)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


HALF_CONFIGS = [FwdSm90Config("bf16", 64, 128, 128, 4, persistent=True), FwdSm90Config("bf16", 64, 192, 128, 4, persistent=True),
                FwdSm90Config("bf16", 64, 192, 128, 4, persistent=True, cross_tile=True),
                FwdSm90Config("bf16", 128, persistent=True, cross_tile=True), FwdSm90Config("fp16", 64, 128, 192, 2),
                FwdSm90Config("bf16", 96, 128, 128, 2, pingpong=False)]


@pytest.mark.parametrize("config", HALF_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("causal, window, softcap, dropout", [
    (True, (-1, -1), 0.0, 0.0), (False, (-1, -1), 0.0, 0.0), (False, (100, 37), 0.0, 0.0), (True, (-1, -1), 4.0, 0.0),
    (False, (-1, 70), 0.0, 0.0), (True, (-1, -1), 0.0, 0.3), (True, (200, -1), 0.0, 0.0)])
def test_half_blocks_change_no_bit(config, causal, window, softcap, dropout):
    """half_blocks leaves out products of zeros (a block's second half no row of a warpgroup sees: the
    causal diagonal, a window's right edge, a short last block of keys): out and lse equal the full-width
    kernel's bit for bit, with dropout's Philox mask too (one fixed seed and offset for both). Sq != Sk and
    lengths no multiple of the tiles put the diagonal anywhere in a block; 1050 keys leave a last block
    of 26 (a half block for every row, non-causal too)."""
    local = window != (-1, -1)
    base = dataclasses.replace(config, causal=causal, local=local, softcap=softcap > 0, dropout=dropout > 0)
    if base.problems():  # the 192-row tile with a score feature: its registers
        pytest.skip(f"{base.name}: {base.problems()[0]}")
    halves = dataclasses.replace(base, half_blocks=True).validate()
    philox = (torch.randint(0, 2**63 - 1, ()).item(), 4 * torch.randint(1, 2**20, ()).item()) if dropout else None
    for batch, sq, sk, h, hk in ((3, 1000, 777, 8, 2), (2, 333, 1050, 4, 1), (1, 1300, 1300, 4, 4)):
        q, k, v = _inputs(batch, sq, sk, h, hk, config.d_head, DTYPES[config.dtype])
        runs = [flashjit.forward(q, k, v, config=cfg, causal=causal, window_size=window, softcap=softcap,
                                 dropout_p=dropout, philox=philox, return_lse=True, out=poisoned_like(q))
                for cfg in (base, halves)]
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), (batch, sq, sk)


ODD = [  # batch, Sq, Sk, H, H_k, D
    (1, 1, 1, 1, 1, 64), (2, 17, 17, 3, 1, 8), (1, 300, 17, 2, 1, 40), (2, 17, 300, 4, 2, 72), (1, 77, 513, 2, 2, 80),
    (1, 200, 129, 4, 4, 136), (2, 65, 1025, 2, 1, 200), (1, 129, 0, 2, 2, 128), (1, 1000, 3, 2, 1, 248),
    (3, 1, 300, 4, 4, 192),
]


# How a config's CTAs take tiles: one CTA each, persistent, persistent as one pipeline.
WALKS = {"tile": dict(persistent=False, cross_tile=False), "persistent": dict(persistent=True, cross_tile=False),
         "cross_tile": dict(persistent=True, cross_tile=True)}


def _walk(config, walk):
    """`config` taking tiles as WALKS[walk]; skips where the cross-tile Q stage does not fit."""
    config = dataclasses.replace(config, **WALKS[walk])
    if config.problems():
        pytest.skip(f"{config.name}: {config.problems()[0]}")
    return config


@pytest.mark.parametrize("walk", WALKS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", ODD, ids=str)
def test_odd_shapes(shape, causal, walk):
    batch, sq, sk, h, hk, d = shape
    # The dispatcher's Hopper tile for this head dim at a long Sq (the shapes' own Sq may pick other knobs).
    config = _walk(dispatch.default_config("bf16", d, causal, 4096, arch="sm_90a"), walk)
    q, k, v = _inputs(batch, sq, sk, h, hk, d, torch.bfloat16)
    out = _check(q, k, v, config, causal=causal)
    if causal and sq > sk:  # rows that see no key are exactly zero
        assert out[:, : sq - sk].abs().max().item() == 0


FEATURES = [dict(window_size=(37, 11)), dict(window_size=(-1, 5)), dict(window_size=(20, -1)), dict(softcap=5.0),
            dict(alibi_slopes="bh"), dict(softcap=3.0, window_size=(64, 0), alibi_slopes="h")]


@pytest.mark.parametrize("walk", WALKS)
@pytest.mark.parametrize("feature", FEATURES, ids=lambda d: ",".join(d))
def test_features(feature, walk):
    q, k, v = _inputs(2, 600, 433, 4, 2, 96, torch.float16)
    kw, mods = _feature_kwargs(q, feature)
    config = _walk(FwdSm90Config("fp16", 96, local=mods.local, softcap=mods.softcap, alibi=mods.alibi), walk)
    _check(q, k, v, config, **kw)


@pytest.mark.parametrize("p", [0.17, 0.5])
@pytest.mark.parametrize("config", [FwdSm90Config("fp16", 64, dropout=True),
                                    FwdSm90Config("fp16", 64, stages=4, persistent=True, dropout=True),
                                    FwdSm90Config("fp16", 64, stages=4, persistent=True, dropout=True, mask_warps=True),
                                    FwdSm90Config("fp16", 64, stages=4, persistent=True, cross_tile=True, dropout=True),
                                    FwdSm90Config("fp16", 64, stages=4, persistent=True, cross_tile=True, dropout=True,
                                                  mask_warps=True),
                                    FwdSm90Config("fp16", 64, block_n=64, stages=4, overlap=False, pingpong=False,
                                                  persistent=True, two_ctas=True, dropout=True),
                                    FwdSm90Config("fp16", 64, block_n=64, stages=4, overlap=False, pingpong=False,
                                                  persistent=True, two_ctas=True, dropout=True,
                                                  mask_warps=True),  # two calls in flight
                                    FwdSm90Config("fp16", 128, block_n=64, stages=3, dropout=True),
                                    FwdSm90Config("fp16", 128, block_n=176, dropout=True),  # FA3's tiles:
                                    FwdSm90Config("fp16", 256, block_n=80, dropout=True),  # 16-key chunks
                                    FwdSm90Config("fp16", 128, block_n=80, dropout=True)],  # an odd count, swapped
                         ids=lambda c: c.name)
def test_dropout_mask_is_philox_keep_mask_bit_for_bit(config, p):
    """The same Philox keep mask as the sm_80 family and reference.philox_keep_mask (so the existing
    backward regenerates it), read exactly from the output (numerics.forward_keep_mask)."""
    b, sq, sk, h, hk = 2, 300, 200, 3, 1
    philox = (torch.randint(0, 2**63 - 1, ()).item(), 2**32 * torch.randint(1, 2**31, ()).item() + 12345)
    got = forward_keep_mask(lambda q, k, v: flashjit.forward(q, k, v, config=config, dropout_p=p, philox=philox,
                                                             out=poisoned_like(q)),
                            b, sq, sk, h, config.d_head, p, heads_k=hk)
    want = philox_keep_mask(*philox, interface.dropout_threshold(p), b, h, sq, sk, "cuda")
    assert torch.equal(got, want), mask_mismatch(f"forward, philox {philox}", got, want)


_CAUSAL_DROPOUT = dict(causal=True, dropout=True)


@pytest.mark.parametrize("config", [
    FwdSm90Config("fp16", 128, persistent=True, cross_tile=True, half_blocks=True, **_CAUSAL_DROPOUT),
    FwdSm90Config("fp16", 128, persistent=True, cross_tile=True, half_blocks=True, mask_warps=True, **_CAUSAL_DROPOUT),
    FwdSm90Config("fp16", 64, stages=4, persistent=True, half_blocks=True, **_CAUSAL_DROPOUT),  # d64's default past 1k
    FwdSm90Config("fp16", 64, 192, 64, persistent=True, cross_tile=True, **_CAUSAL_DROPOUT),  # pair ids 9..14
    FwdSm90Config("fp16", 64, block_n=64, stages=4, overlap=False, pingpong=False, persistent=True, two_ctas=True,
                  **_CAUSAL_DROPOUT)], ids=lambda c: c.name)
def test_dropout_mask_is_philox_keep_mask_across_a_ctas_tiles(config):
    """The same keep mask where persistent CTAs walk several causal tiles each (2 x 16 heads x 12 tiles of 128
    rows on 132 SMs): the swap's buffers alternating across tiles, the cross-tile pipeline's first blocks, half
    blocks, three warpgroups' warp pairs, and the mask warps' run-ahead; entries a row cannot see read as
    dropped."""
    b, s, h, p = 2, 1536, 16, 0.2
    philox = (torch.randint(0, 2**63 - 1, ()).item(), 4 * torch.randint(1, 2**30, ()).item())
    got = forward_keep_mask(lambda q, k, v: flashjit.forward(q, k, v, config=config, causal=True, dropout_p=p,
                                                             philox=philox, out=poisoned_like(q)),
                            b, s, s, h, config.d_head, p, causal=True)
    visible = torch.ones(s, s, dtype=torch.bool, device="cuda").tril()
    want = philox_keep_mask(*philox, interface.dropout_threshold(p), b, h, s, s, "cuda") & visible
    assert torch.equal(got, want), mask_mismatch(f"forward, philox {philox}", got, want)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_equals_the_sm80_family(d):
    """The two families on the same inputs agree within the tolerance rule (each against the fp32
    reference, and with each other in its place)."""
    q, k, v = _inputs(2, 513, 700, 4, 1, d, torch.bfloat16)
    hopper_config, ampere_config = (dispatch.default_config("bf16", d, True, 513, arch=a) for a in ("sm_90a", None))
    assert isinstance(hopper_config, FwdSm90Config) and isinstance(ampere_config, KernelConfig)
    hopper = flashjit.forward(q, k, v, config=hopper_config, causal=True)
    ampere = flashjit.forward(q, k, v, config=ampere_config, causal=True)
    (ref, _), (low, _) = reference_and_low(q, k, v, causal=True)
    assert_close("sm90 out", hopper, ref, low)
    assert_close("sm90 against sm80", hopper.float(), ampere.float(), low)


def test_layout_tma_cannot_address_falls_back(caplog):
    """K/V broadcast over heads with stride 0 (expand): a TMA map needs non-zero strides, so the
    dispatcher picks the sm_80 family and says so at DEBUG."""
    q, k, v = _inputs(1, 300, 300, 4, 1, 128, torch.bfloat16)
    k, v = k.expand(1, 300, 4, 128), v.expand(1, 300, 4, 128)
    with caplog.at_level(logging.DEBUG, logger="flashjit"):
        config = interface.resolve_config(q, k, None, False, v=v)
    assert isinstance(config, KernelConfig) and "TMA" in caplog.text
    _check(q, k, v, None)

"""flash-attn parity (issue 13): rows that see no key, zero-length sequences, every head dim up to
256, flash-attn's dropout scale, and the reference backend validating like the kernels.

GPU tests compare with the fp32 reference through tests/numerics.py's rule, with NaN-poisoned
outputs; empty rows must be exact (out = 0, lse = +inf, dq = 0), and the deterministic backward
bitwise repeatable."""
import math

import pytest
import torch

import flashjit
from flashjit import flash_attn_func, interface
from flashjit.configs.common import FEATURES as SCORE_FEATURES
from flashjit.reference import attention_reference, philox_keep_mask, visible_mask
from numerics import assert_close, poisoned_like, reference_and_low

gpu = pytest.mark.gpu
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _inputs(b, sq, sk, h, hk, d, dtype, dv=None):
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, d if dv is None else dv, device="cuda", dtype=dtype)
    return q, k, v


def _is_sm90a() -> bool:
    return torch.cuda.is_available() and flashjit.jit.arch_for(torch.cuda.current_device()) == "sm_90a"


def _run(q, k, v, dout, deterministic=False, philox=None, config=None, **kw):
    """forward + backward through the low-level API with every output poisoned."""
    out = poisoned_like(q)
    out, lse = flashjit.forward(q, k, v, return_lse=True, out=out, philox=philox, **kw)
    grads = [poisoned_like(t) for t in (q, k, v)]
    dq, dk, dv = flashjit.backward(dout, q, k, v, out, lse, philox=philox, deterministic=deterministic,
                                   config=config, dq=grads[0], dk=grads[1], dv=grads[2], **kw)
    return out, lse, dq, dk, dv


def _reference(q, k, v, dout, dropout_mask=None, **kw):
    """(out, lse, dq, dk, dv) in fp32 and in the inputs' own precision (the tolerance baseline)."""
    results = []
    for compute in (torch.float32, None):
        # fp32 leaves for the fp32 reference, so its gradients are not rounded to the inputs' dtype
        leaves = [t.detach().to(compute or t.dtype).requires_grad_() for t in (q, k, v)]
        out, lse = attention_reference(*leaves, compute_dtype=compute, dropout_mask=dropout_mask, **kw)
        out.backward(dout.to(out.dtype))
        results.append((out, lse, *(t.grad for t in leaves)))
    return results


def _single_key_allowance(q, k, out, dout) -> float:
    """An absolute allowance for dq and dk where every visible row sees a single key: there both are
    exactly 0 (P = 1, so dP = D), but FlashAttention computes D = rowsum(dO o O) from the rounded
    output, so each dS entry carries about eps |D| (flash-attn has the same). dq_i sums one such
    entry times k scale; dk_j sums up to Sq x group of them times q scale (random signs: sqrt)."""
    eps = torch.finfo(q.dtype).eps
    d_row = (dout.float() * out.float()).sum(-1).abs().max().item()
    terms = math.sqrt(q.shape[1] * q.shape[2] // k.shape[2])
    operand = max(q.float().abs().max().item(), k.float().abs().max().item())
    return 2 * eps * d_row * operand * q.shape[-1] ** -0.5 * terms


def _check_all(got, ref, low, names=("out", "dq", "dk", "dv"), atol=(0.0, 0.0, 0.0, 0.0)):
    out, lse, *grads = got
    for name, a, r, lo, tol in zip(names, (out, *grads), (ref[0], *ref[2:]), (low[0], *low[2:]), atol):
        assert_close(name, a.float(), r.float(), lo.float(), atol=tol)
    finite = torch.isfinite(ref[1])
    assert torch.equal(torch.isfinite(lse), finite), "lse must be +inf exactly where a row sees no key"
    assert torch.allclose(lse[finite], ref[1][finite], atol=2e-3, rtol=1e-4)


# ---- 1. rows that see no key -------------------------------------------------------------------
EMPTY_ROWS = [  # (Sq, Sk, d, causal, window): the reported shapes, then windows on each side
    (239, 1, 160, True, (-1, -1)), (512, 256, 64, True, (-1, -1)), (799, 3, 96, True, (-1, -1)),
    (203, 113, 256, True, (-1, -1)), (799, 3, 96, False, (0, 0)), (800, 64, 160, False, (16, 0)),
    (300, 77, 128, False, (3, 2)), (300, 77, 64, False, (-1, 4)), (257, 1, 32, False, (2, 3)),
]  # a left edge alone never empties a row (bottom-right alignment): left windows come with a right one


@gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.17])
@pytest.mark.parametrize("sq, sk, d, causal, window", EMPTY_ROWS, ids=str)
def test_empty_rows_are_exact_and_repeatable(sq, sk, d, causal, window, dropout_p, deterministic, dtype):
    """Rows that see no key: out = 0, lse = +inf, dq = 0 exactly, in every mode; the rest matches the
    reference; the deterministic backward returns the same bits 20 times."""
    q, k, v = _inputs(2, sq, sk, 3, 1, d, DTYPES[dtype])
    dout = torch.randn_like(q)
    philox = (1234567, 2**32 + 8) if dropout_p else None
    kw = dict(causal=causal, window_size=window, dropout_p=dropout_p)
    got = _run(q, k, v, dout, deterministic, philox, **kw)
    empty = ~visible_mask(sq, sk, "cuda", causal, window).any(1)
    assert empty.any(), "the case must have empty rows"
    out, lse, dq = got[0], got[1], got[2]
    assert (out[:, empty] == 0).all() and (dq[:, empty] == 0).all()
    assert torch.isinf(lse[:, :, empty]).all() and (lse[:, :, empty] > 0).all()
    mask = None
    if dropout_p:
        mask = philox_keep_mask(*philox, interface.dropout_threshold(dropout_p), 2, 3, sq, sk, "cuda")
    ref, low = _reference(q, k, v, dout, mask, **kw)
    single_key = not ref[2].any()  # every row sees at most one key: dq and dk are 0 in exact arithmetic
    tol = _single_key_allowance(q, k, got[0], dout) if single_key else 0.0
    _check_all(got, ref, low, atol=(0.0, tol, tol, 0.0))
    if deterministic:
        for _ in range(19):
            again = _run(q, k, v, dout, deterministic, philox, **kw)
            for name, a, b in zip(("dq", "dk", "dv"), got[2:], again[2:]):
                assert torch.equal(a, b), f"{name} differs between two deterministic backward calls"


@gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("sq, sk", [(0, 64), (64, 0), (0, 0), (17, 0)])
def test_zero_length_sequences(sq, sk, deterministic):
    """Sq = 0 or Sk = 0: exact zeros for out and every gradient (never the allocator's leftovers),
    lse = +inf for rows that see no key at all."""
    q, k, v = _inputs(2, sq, sk, 4, 2, 64, torch.bfloat16)
    dout = torch.randn_like(q)
    out, lse, dq, dk, dv = _run(q, k, v, dout, deterministic)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.equal(t, torch.zeros_like(t)), f"{name} must be exact zeros"
    assert lse.shape == (2, 4, sq) and (lse == math.inf).all()
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = flash_attn_func(q, k, v, deterministic=deterministic)
    out.backward(dout)
    assert not any(t.grad.isnan().any() or t.grad.any() for t in (q, k, v))


# ---- 2. every head dim ------------------------------------------------------------------------
# Multiples of 8 run natively in the next tile (40 -> 64, 80 -> 96, 112 -> 128, 200/224 -> 256);
# 59 and 111 are padded to 64 and 112 by a copy, as flash-attn pads them.
HEAD_DIMS = [8, 40, 59, 72, 80, 111, 112, 136, 200, 224]


@gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_every_head_dim(d, causal, dtype):
    """Forward and both backward modes at head dims that are not tile widths, odd lengths and GQA;
    the default scale is 1/sqrt(the real d)."""
    q, k, v = _inputs(2, 77, 129, 4, 2, d, DTYPES[dtype])
    dout = torch.randn_like(q)
    ref, low = _reference(q, k, v, dout, causal=causal)
    for deterministic in (False, True):
        _check_all(_run(q, k, v, dout, deterministic, causal=causal), ref, low)


FEATURES = [dict(window_size=(20, 7)), dict(softcap=3.0), dict(alibi=True), dict(dropout_p=0.2),
            dict(softmax_scale=0.3)]


@gpu
@pytest.mark.parametrize("kwargs", FEATURES, ids=str)
@pytest.mark.parametrize("d", [48, 80, 112, 152])
def test_head_dims_with_every_feature(d, kwargs):
    """Each score feature at head dims narrower than their tile (112: the wgmma backward on sm_90a)."""
    q, k, v = _inputs(2, 150, 190, 4, 2, d, torch.bfloat16)
    dout = torch.randn_like(q)
    kw = dict(kwargs, causal=True)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(2, 4, device="cuda") * 0.3
    philox = (99, 2**33) if kw.get("dropout_p") else None
    mask = None
    if philox:
        mask = philox_keep_mask(*philox, interface.dropout_threshold(kw["dropout_p"]), 2, 4, 150, 190, "cuda")
    ref, low = _reference(q, k, v, dout, mask, **kw)
    _check_all(_run(q, k, v, dout, False, philox, **kw), ref, low)


@gpu
@pytest.mark.skipif(not _is_sm90a(), reason="the wgmma backward is built for sm_90a only")
@pytest.mark.parametrize("d", [40, 104, 112])
def test_wgmma_backward_at_narrower_head_dims(d):
    """The default backward on Hopper for head dims in the 64 and 128 tiles is the wgmma kernel."""
    config = flashjit.dispatch.default_bwd_config("bf16", d, False, wgmma=True)
    assert isinstance(config, flashjit.BwdSm90Config)
    q, k, v = _inputs(1, 200, 333, 4, 4, d, torch.bfloat16)
    dout = torch.randn_like(q)
    ref, low = _reference(q, k, v, dout)
    _check_all(_run(q, k, v, dout, config=config), ref, low)


@gpu
def test_padded_head_dim_writes_into_given_outputs():
    """Head dims that are not multiples of 8 go through a padded copy; out=/dq= still receive the
    result, and flash_attn_func's autograd returns gradients of the real shape."""
    q, k, v = _inputs(1, 33, 47, 2, 1, 59, torch.float16)
    out = poisoned_like(q)
    assert flashjit.forward(q, k, v, out=out) is out
    ref = attention_reference(q, k, v)[0]
    low = attention_reference(q, k, v, compute_dtype=None)[0]
    assert_close("out", out.float(), ref, low.float())
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    flash_attn_func(*leaves, causal=True).sum().backward()
    assert [t.grad.shape for t in leaves] == [t.shape for t in (q, k, v)]


# ---- 3. dropout scale -------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.17, 0.333, 0.5])
def test_dropout_scale_is_flash_attns(p):
    """Kept entries are scaled by 1/(1 - p) for the requested p (flash-attn), not the rounded one."""
    q = torch.zeros(1, 1, 1, 64)
    mods = interface.score_mods(q, False, dropout_p=p, philox=(1, 0))
    assert mods.values[7] == interface.dropout_threshold(p) == round(256 * p)
    assert mods.values[8] == 1.0 / (1.0 - p)


# ---- 4. learnable sinks ------------------------------------------------------------------------
SINK_CASES = [  # (B, Sq, Sk, H, H_k, d, causal, window, dropout_p)
    (2, 300, 300, 4, 2, 128, False, (-1, -1), 0.0), (1, 513, 257, 4, 4, 64, True, (-1, -1), 0.0),
    (2, 257, 129, 2, 1, 96, True, (-1, -1), 0.0),  # Sq > Sk causal: empty rows (lse = sink, out = 0)
    (1, 200, 333, 4, 1, 256, False, (32, 8), 0.0), (2, 77, 190, 3, 3, 80, False, (-1, -1), 0.17),
    (1, 64, 64, 2, 2, 40, True, (-1, -1), 0.0),  # Sq <= 64: one query block (and the short causal tile on sm_90a)
    (1, 1100, 1000, 2, 1, 64, True, (-1, -1), 0.0),  # past the short causal rows: sm_90a's cross-tile causal kernel
]


def _sink_case(case, dtype):
    b, sq, sk, h, hk, d, causal, window, p = case
    q, k, v = _inputs(b, sq, sk, h, hk, d, dtype)
    sink = torch.randn(h, device="cuda") * 2  # logits around the scores' range: the sink matters
    return q, k, v, sink, dict(causal=causal, window_size=window, dropout_p=p)


@gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("family", ["default", "sm80"])
@pytest.mark.parametrize("case", SINK_CASES, ids=str)
def test_learnable_sink_forward_and_backward(case, family, deterministic):
    """out, lse (which includes the sink), dq, dk, dv and dsink against the reference through
    autograd, in each forward family (the dispatcher's, which is the Hopper family on sm_90a, and an
    explicit sm_80 config) and both backward modes; rows that see no key give out = 0, lse = sink."""
    q, k, v, sink, kw = _sink_case(case, torch.bfloat16)
    dout = torch.randn_like(q)
    philox = (99, 2**32 + 5) if kw["dropout_p"] else None
    mods = interface.score_mods(q, kw["causal"], kw["window_size"], dropout_p=kw["dropout_p"], philox=philox,
                                learnable_sink=sink)
    config = None if family == "default" else flashjit.default_config(
        "bf16", q.shape[-1], kw["causal"], q.shape[1], **dict(zip(SCORE_FEATURES, mods.flags)), sink=True)
    out, lse = flashjit.forward(q, k, v, config=config, return_lse=True, out=poisoned_like(q), philox=philox,
                                learnable_sink=sink, **kw)
    grads = flashjit.backward(dout, q, k, v, out, lse, philox=philox, deterministic=deterministic,
                              learnable_sink=sink, **kw)
    assert len(grads) == 4 and grads[3].dtype == sink.dtype and grads[3].shape == sink.shape
    mask = None
    if kw["dropout_p"]:
        mask = philox_keep_mask(*philox, interface.dropout_threshold(kw["dropout_p"]), q.shape[0], q.shape[2],
                                q.shape[1], k.shape[1], "cuda")
    ref, low = reference_and_low(q, k, v, dout, dropout_mask=mask, learnable_sink=sink, **kw)
    names = ("out", "dq", "dk", "dv", "dsink")
    for name, a, r, lo in zip(names, (out, *grads), ref, low):
        assert_close(name, a.float(), r.float(), lo.float())
    ref_lse = attention_reference(q.float(), k.float(), v.float(), learnable_sink=sink, **kw,
                                  dropout_mask=mask)[1]
    assert torch.isfinite(lse).all(), "with a sink every row has a finite lse"
    assert torch.allclose(lse, ref_lse, atol=2e-3, rtol=1e-4)
    empty = ~visible_mask(q.shape[1], k.shape[1], "cuda", kw["causal"], kw["window_size"]).any(1)
    if empty.any():
        assert (out[:, empty] == 0).all() and (grads[0][:, empty] == 0).all()
        assert torch.equal(lse[:, :, empty], sink[None, :, None].expand_as(lse[:, :, empty]))


@gpu
def test_learnable_sink_through_flash_attn_func_autograd():
    """flash_attn_func(learnable_sink=...) trains the sink: autograd returns its gradient, in its dtype,
    equal to the low-level backward's; the packed variant takes it too."""
    q, k, v = (t.requires_grad_() for t in _inputs(2, 200, 200, 4, 4, 64, torch.float16))
    sink = (torch.randn(4, device="cuda") * 2).requires_grad_()
    out = flash_attn_func(q, k, v, causal=True, learnable_sink=sink)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref, low = reference_and_low(q, k, v, dout, causal=True, learnable_sink=sink)
    for name, a, r, lo in zip(("out", "dq", "dk", "dv", "dsink"), (out, q.grad, k.grad, v.grad, sink.grad), ref, low):
        assert_close(name, a.float(), r.float(), lo.float())
    qkv = torch.stack([q.detach(), k.detach(), v.detach()], 2)
    packed = flashjit.flash_attn_qkvpacked_func(qkv, causal=True, learnable_sink=sink.detach())
    assert torch.equal(packed, out.detach())


def test_learnable_sink_reference_gradient_is_exact():
    """The reference (the tests' ground truth for dsink) by finite differences in fp64 (gradcheck),
    with empty rows (causal Sq > Sk) and GQA, and the reference backend's autograd through
    flash_attn_func."""
    torch.manual_seed(0)
    q = torch.randn(2, 7, 4, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 5, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    sink = torch.randn(4, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, s: attention_reference(q, k, v, causal=True, compute_dtype=torch.float64,  # noqa: E731
                                                learnable_sink=s)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v, sink))
    out, lse = attention_reference(q, k, v, causal=True, compute_dtype=torch.float64, learnable_sink=sink)
    assert (out[:, :2] == 0).all()  # rows 0-1 see no key (Sq - Sk = 2): out = 0, lse = the sink (fp32)
    assert torch.allclose(lse[:, :, :2].double(), sink.detach()[None, :, None].expand(2, 4, 2), rtol=1e-6)


def test_learnable_sink_argument_errors(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    q, k, v = (torch.randn(1, 4, 2, 16) for _ in range(3))
    for bad, words in ((torch.randn(3), r"shape \(2,\)"), (torch.zeros(2, dtype=torch.int64), "floating-point"),
                       ([0.0, 0.0], "got list")):
        with pytest.raises(ValueError, match=words):
            flash_attn_func(q, k, v, learnable_sink=bad)


# ---- 6. the reference backend validates like the kernels ---------------------------------------
def _cpu_qkv(dtype=torch.float32, b=(2, 2), d=(64, 64), heads=(4, 2)):
    return tuple(torch.randn(bb, s, hh, dd).to(dtype) for bb, s, hh, dd in
                 ((b[0], 8, heads[0], d[0]), (b[1], 9, heads[1], d[1]), (b[1], 9, heads[1], d[1])))


@pytest.mark.parametrize("make, exc, words", [
    (lambda: _cpu_qkv(b=(2, 3)), ValueError, "does not match q shape"),
    (lambda: _cpu_qkv(torch.int64), ValueError, "q must be float16, bfloat16, float32 or float64"),
    (lambda: (*_cpu_qkv()[:2], _cpu_qkv()[2].half()), ValueError, "share a dtype"),
    (lambda: _cpu_qkv(d=(264, 264)), ValueError, "head_dim 264 is not supported"),
    (lambda: _cpu_qkv(heads=(3, 2)), ValueError, "divisible by the number of key/value heads"),
    (lambda: (_cpu_qkv()[0][0], *_cpu_qkv()[1:]), ValueError, "q must have 4 dims"),
    (lambda: ("q", *_cpu_qkv()[1:]), TypeError, "q must be a torch.Tensor"),
])
def test_reference_backend_validates_like_the_kernels(make, exc, words, monkeypatch):
    """The same checks and messages as the JIT path (interface.check_qkv), not einsum's."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    with pytest.raises(exc, match=words):
        flash_attn_func(*make())


def test_reference_backend_runs_fp32_on_cpu(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    q, k, v = _cpu_qkv()
    out = flash_attn_func(q, k, v, causal=True)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert torch.allclose(out, attention_reference(q, k, v, causal=True)[0])


@pytest.mark.compile
@pytest.mark.parametrize("arch, config", [
    ("sm_80", flashjit.KernelConfig(dtype="fp16", d_head=80, causal=True)),
    ("sm_90a", flashjit.KernelConfig(dtype="bf16", d_head=200, B_r=64, B_c=64, n_warps=4,
                                     mma_double_buffer_loads=False, dropout=True)),
    ("sm_80", flashjit.BwdConfig("bf16", 72, 4, 64, deterministic=True, local=True)),
    ("sm_90a", flashjit.BwdSm90Config("bf16", 112, 64, causal=True, dropout=True)),
    ("sm_90a", flashjit.BwdSm90Config("fp16", 40, 128, alibi=True)),
    ("sm_80", flashjit.BwdConfig("fp16", 224, 8, 64, 4, 32)),
], ids=lambda x: x if isinstance(x, str) else x.name)
def test_head_dims_off_the_tile_compile(arch, config):
    """CI (no GPU) builds kernels whose head dim is narrower than their tile, for both archs."""
    library = flashjit.jit.ensure_built(config, arch)
    assert flashjit.launch.CompiledKernel(library, config.name).smem_bytes == config.smem_bytes

"""flash_attn_func and friends: gradients of the JIT backward against the fp32 reference, GQA,
determinism, the reference backend's features (window, softcap, ALiBi, dropout) with autograd, the
backend switch, every backward tiling (block sizes, split head dim, both dQ paths) and a training step."""
import math

import pytest
import torch

import flashjit
from flashjit import flash_attn_func, flash_attn_qkvpacked_func, interface
from flashjit.reference import attention_reference, philox_keep_mask
from numerics import assert_all_close, assert_close, forward_keep_mask, mask_mismatch, poisoned_like, reference_and_low

gpu = pytest.mark.gpu
DTYPES = [torch.float16, torch.bfloat16]


def _qkv(b, sq, sk, h, hk, d, dtype, device, grad=True):
    mk = lambda s, n: torch.randn(b, s, n, d, device=device, dtype=dtype, requires_grad=grad)  # noqa: E731
    return mk(sq, h), mk(sk, hk), mk(sk, hk)


def _grads(fn, q, k, v, dout):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(dout)
    return out, q.grad.clone(), k.grad.clone(), v.grad.clone()


def _poisoned_grads(q, k, v) -> dict:
    """NaN-filled dq/dk/dv for interface.backward: every element it fails to write shows up."""
    return dict(dq=poisoned_like(q), dk=poisoned_like(k), dv=poisoned_like(v))


def _odd_scale(d: int) -> float:
    """A softmax scale that is not 1/sqrt(d): a kernel that recomputes the default, or drops the
    scale from one of its products, fails with it."""
    return 1.37 / math.sqrt(d)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 17, 17, 3, 1, 64), (1, 300, 190, 4, 2, 128), (2, 129, 257, 2, 2, 32),
                                   (1, 1, 65, 4, 4, 96), (1, 200, 77, 6, 2, 128), (3, 64, 64, 2, 1, 64),
                                   (1, 77, 300, 4, 2, 256), (2, 100, 33, 2, 1, 160), (1, 129, 200, 2, 2, 192)],
                         ids=str)
def test_jit_gradients_match_reference(shape, causal, dtype, monkeypatch):
    """The autograd path (flash_attn_func): output and every gradient against the fp32 reference,
    each within 2x PyTorch's low-precision error relative to its own magnitude (numerics.assert_close:
    also fails on non-finite values)."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    b, sq, sk, h, hk, d = shape
    q, k, v = _qkv(b, sq, sk, h, hk, d, dtype, "cuda")
    dout = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    ours = _grads(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), q, k, v, dout)
    ref, low = reference_and_low(q, k, v, dout, causal=causal)
    assert_all_close(("out", "dq", "dk", "dv"), ours, ref, low)


@gpu
@pytest.mark.parametrize("grad", [False, True])
def test_jit_return_attn_probs_without_dropout_is_out_lse_and_an_empty_s_dmask(grad, monkeypatch):
    """flash-attn's (out, softmax_lse, empty S_dmask) on the planned paths, with and without grad, and a
    strided last dim copied as flash-attn does: out and lse those of interface.forward."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    q, k, v = _qkv(2, 70, 90, 4, 2, 64, torch.bfloat16, "cuda", grad=grad)
    want_out, want_lse = interface.forward(q.detach(), k.detach(), v.detach(), causal=True, return_lse=True)
    for _ in range(2):  # the first call plans, the second runs the plan
        out, lse, s_dmask = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        assert s_dmask.shape == (0,) and s_dmask.dtype == q.dtype and s_dmask.device == q.device
        assert torch.equal(out.detach(), want_out) and torch.equal(lse, want_lse) and out.requires_grad == grad
    strided = [t.detach().transpose(-1, -3).contiguous().transpose(-1, -3) for t in (q, k, v)]
    assert strided[0].stride(-1) != 1 and torch.equal(flash_attn_func(*strided, causal=True), want_out)


@gpu
@pytest.mark.parametrize("config", [c for c in flashjit.get_kernels_to_build(arch="sm_90a")
                                    if c.family.direction == "bwd"], ids=lambda c: c.name)
def test_backward_build_set(config):
    if config.family.arch not in (None, _device_arch()):
        pytest.skip(f"the {config.family.name} backward needs {config.family.arch}")
    dtype = torch.bfloat16 if config.dtype == "bf16" else torch.float16
    q, k, v = _qkv(2, 150, 211, 4, 2, config.d_head, dtype, "cuda", grad=False)
    out, lse = flashjit.forward(q, k, v, causal=config.causal, return_lse=True)
    dout = torch.randn_like(q)
    grads = _poisoned_grads(q, k, v)
    dq, dk, dv = flashjit.backward(dout, q, k, v, out, lse, causal=config.causal, config=config, **grads)
    ref, low = reference_and_low(q, k, v, dout, causal=config.causal)
    assert_all_close(("dq", "dk", "dv"), (dq, dk, dv), ref[1:], low[1:])


@gpu
def test_backward_is_deterministic(monkeypatch):
    """deterministic=True: three backward passes are bit-identical, and right (against the
    reference: equal wrong gradients would pass a run-to-run check alone). Packed and strided
    layouts against the reference: tests/test_backward_gpu.py."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    qkv = torch.randn(2, 333, 3, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(2, 333, 4, 64, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(3):
        qkv.grad = None
        flash_attn_qkvpacked_func(qkv, causal=True, deterministic=True).backward(dout)
        grads.append(qkv.grad.clone())
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[1], grads[2])
    ref, low = reference_and_low(*qkv.detach().unbind(2), dout, causal=True)
    assert_all_close(("dq", "dk", "dv"), grads[0].unbind(2), ref[1:], low[1:])


@gpu
def test_backward_takes_an_explicit_config_that_matches_the_call():
    q, k, v = _qkv(1, 100, 100, 2, 2, 64, torch.bfloat16, "cuda", grad=False)
    out, lse = flashjit.forward(q, k, v, causal=True, return_lse=True)
    dout = torch.randn_like(q)
    ref, low = reference_and_low(q, k, v, dout, causal=True)
    default = flashjit.backward(dout, q, k, v, out, lse, causal=True, deterministic=True, **_poisoned_grads(q, k, v))
    explicit = flashjit.backward(dout, q, k, v, out, lse, causal=True, **_poisoned_grads(q, k, v),
                                 config=flashjit.BwdConfig("bf16", 64, 4, 64, deterministic=True, causal=True))
    assert_all_close(("dq", "dk", "dv"), default, ref[1:], low[1:])
    assert_all_close(("dq", "dk", "dv"), explicit, ref[1:], low[1:])
    with pytest.raises(ValueError, match=r"causal=False \(the call needs True\)"):
        flashjit.backward(dout, q, k, v, out, lse, causal=True, config=flashjit.BwdConfig("bf16", 64, causal=False))


FEATURES = [  # (kwargs, causal); slopes are made on the GPU in the test
    (dict(window_size=(40, 17)), False), (dict(window_size=(25, -1)), True), (dict(window_size=(-1, 30)), False),
    (dict(softcap=3.0), False), (dict(softcap=5.0), True), (dict(alibi_slopes="heads"), False),
    (dict(alibi_slopes="batch_heads"), True), (dict(window_size=(33, 5), softcap=4.0, alibi_slopes="heads"), False),
]


@gpu
@pytest.mark.parametrize("dtype, deterministic", [(torch.float16, False), (torch.bfloat16, False),
                                                  (torch.bfloat16, True)], ids=str)
@pytest.mark.parametrize("kwargs, causal", FEATURES, ids=str)
def test_jit_window_softcap_alibi_match_reference(kwargs, causal, dtype, deterministic, monkeypatch):
    """Forward and gradients of the in-kernel sliding window, softcap and ALiBi (with GQA, Sq != Sk),
    through both dQ paths (atomic and deterministic), at a softmax scale other than 1/sqrt(d)."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    b, sq, sk, h, hk, d = 2, 190, 257, 4, 2, 64
    kwargs = dict(kwargs, softmax_scale=_odd_scale(d))
    if kwargs.get("alibi_slopes") == "heads":
        kwargs["alibi_slopes"] = torch.rand(h, device="cuda") * 0.3
    elif kwargs.get("alibi_slopes") == "batch_heads":
        kwargs["alibi_slopes"] = torch.rand(b, h, device="cuda") * 0.3
    q, k, v = _qkv(b, sq, sk, h, hk, d, dtype, "cuda")
    dout = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    ref_kwargs = dict(kwargs, causal=causal, window_size=kwargs.get("window_size", (-1, -1)))
    ours = _grads(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, deterministic=deterministic, **kwargs),
                  q, k, v, dout)
    ref, low = reference_and_low(q, k, v, dout, **ref_kwargs)
    assert_all_close(("out", "dq", "dk", "dv"), ours, ref, low)


# Explicit backward configs beyond the dispatcher's defaults: (n_warps, block_m, d_split, group_rows,
# deterministic, d_head). Every tiling family: 32-query steps, split head dims below 128 (where they
# are optional), 32-row groups, both dQ paths with a split, and the wide head dims on other tilings.
TILINGS = [(4, 32, 1, 16, False, 64), (8, 128, 2, 16, False, 128), (8, 64, 2, 16, True, 64),
           (4, 32, 2, 16, True, 96), (4, 32, 2, 16, False, 256), (8, 32, 2, 16, False, 192),
           (4, 64, 2, 16, False, 160), (4, 32, 2, 16, True, 256), (8, 64, 2, 32, False, 128),
           (8, 64, 2, 32, True, 96), (8, 64, 4, 32, False, 256), (8, 64, 4, 32, True, 192),
           (4, 64, 1, 32, False, 32)]
# The Hopper kernel (kernels/bwd_sm90.cuh): its two shapes (built for sm_90a only).
WGMMA_TILINGS = [(8, 128, 1, 16, False, 64, True), (8, 64, 1, 16, False, 128, True)]


def _device_arch():
    from flashjit import jit
    return jit.arch_for(torch.cuda.current_device())


def _features_for(tiling) -> list:
    """Every feature set for a tiling; the d_head 64 wgmma kernel has no softcap variant, so it
    takes window and ALiBi without it."""
    wgmma64 = len(tiling) > 6 and tiling[5] == 64
    return ["plain", "causal", "window_alibi" if wgmma64 else "window_softcap_alibi", "dropout", "causal_dropout"]


@gpu
@pytest.mark.parametrize("tiling, features", [(t, f) for t in TILINGS + WGMMA_TILINGS for f in _features_for(t)],
                         ids=str)
def test_backward_tilings_match_reference(tiling, features):
    """Each tiling holds the score and dropout-mask fragments in its own layout (32-query spans
    split over warps, 16- or 32-row groups, both dQ kernels, warpgroup MMAs): gradients against
    the fp32 reference (with dropout given the kernels' own mask), all at a softmax scale other
    than 1/sqrt(d), with NaN-poisoned dq/dk/dv."""
    from flashjit.configs.bwd_sm90 import WGMMA_ARCH

    n_warps, block_m, d_split, group_rows, deterministic, d, *wgmma = tiling
    if wgmma and _device_arch() != WGMMA_ARCH:
        pytest.skip(f"the wgmma backward needs {WGMMA_ARCH} (this GPU builds {_device_arch()})")
    b, sq, sk, h, hk = 2, 150, 211, 4, 2
    scale = _odd_scale(d)
    causal = features.startswith("causal")
    kwargs = {}
    if features.startswith("window"):
        kwargs = dict(window_size=(70, 9), alibi_slopes=torch.rand(h, device="cuda") * 0.3)
        if "softcap" in features:
            kwargs["softcap"] = 4.0
    ref_kwargs = dict(window_size=kwargs.get("window_size", (-1, -1)), softcap=kwargs.get("softcap", 0.0),
                      alibi_slopes=kwargs.get("alibi_slopes"), causal=causal, softmax_scale=scale)
    dropout = features.endswith("dropout")
    if dropout:
        p = 0.17
        philox = (torch.randint(0, 2**62, ()).item(), torch.randint(0, 2**40, ()).item())
        kwargs = dict(dropout_p=p, philox=philox)
        ref_kwargs.update(dropout_p=p,  # flash-attn's scale: 1 / (1 - p) for the requested p
                          dropout_mask=philox_keep_mask(*philox, interface.dropout_threshold(p), b, h, sq, sk, "cuda"))
    q, k, v = _qkv(b, sq, sk, h, hk, d, torch.bfloat16, "cuda", grad=False)
    dout = torch.randn_like(q)
    out, lse = interface.forward(q, k, v, return_lse=True, causal=causal, softmax_scale=scale, out=poisoned_like(q),
                                 **kwargs)
    local = features.startswith("window")
    flags = dict(local=local, softcap="softcap" in features, alibi=local, dropout=dropout)
    if wgmma:  # the Hopper kernel fixes the warps (8, d_split 1, 16-row groups) and is never deterministic
        config = flashjit.BwdSm90Config("bf16", d, block_m, causal, **flags).validate()
    else:
        config = flashjit.BwdConfig("bf16", d, n_warps, block_m, d_split, group_rows, deterministic, causal,
                                    **flags).validate()
    grads = interface.backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=scale, config=config,
                               **kwargs, **_poisoned_grads(q, k, v))
    ref, low = reference_and_low(q, k, v, dout, **ref_kwargs)
    assert_all_close(("out", "dq", "dk", "dv"), (out, *grads), ref, low)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal, shape, deterministic", [
    (False, (2, 190, 257, 4, 2, 64), False), (True, (1, 300, 200, 2, 1, 128), False),
    (False, (2, 77, 65, 2, 2, 96), False), (True, (2, 190, 257, 4, 2, 64), True),
    (True, (1, 150, 211, 4, 2, 256), False), (False, (2, 100, 90, 2, 1, 192), True)], ids=str)
def test_jit_dropout_matches_reference_with_the_same_mask(shape, causal, deterministic, dtype):
    """Forward and gradients (low-level API, NaN-poisoned outputs) with in-kernel dropout against the
    reference given the kernels' mask as reference.philox_keep_mask rebuilds it, at a softmax scale
    other than 1/sqrt(d) and a Philox offset past 2**32. (That the kernels' mask equals it bit for
    bit is checked exactly by the readout tests in test_forward_gpu.py and test_backward_gpu.py.)"""
    b, sq, sk, h, hk, d = shape
    p, scale = 0.17, _odd_scale(d)
    q, k, v = _qkv(b, sq, sk, h, hk, d, dtype, "cuda", grad=False)
    dout = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    philox = (torch.randint(0, 2**62, ()).item(), torch.randint(2**32, 2**52, ()).item())  # offset past 2**32
    out, lse = interface.forward(q, k, v, causal=causal, return_lse=True, dropout_p=p, philox=philox,
                                 softmax_scale=scale, out=poisoned_like(q))
    grads = interface.backward(dout, q, k, v, out, lse, causal=causal, dropout_p=p, philox=philox,
                               softmax_scale=scale, deterministic=deterministic, **_poisoned_grads(q, k, v))
    mask = philox_keep_mask(*philox, interface.dropout_threshold(p), b, h, sq, sk, "cuda")
    ref, low = reference_and_low(q, k, v, dout, causal=causal, softmax_scale=scale, dropout_p=p, dropout_mask=mask)
    assert_all_close(("out", "dq", "dk", "dv"), (out, *grads), ref, low)


@gpu
@pytest.mark.parametrize("dtype, causal, deterministic, offset, d", [
    (torch.float16, False, False, 0, 64), (torch.bfloat16, True, True, 2**32 + 8, 64),
    (torch.bfloat16, False, True, 2**33, 128), (torch.float16, True, False, 2**32 + 4, 128)], ids=str)
def test_flash_attn_func_dropout_gradients_with_the_generators_mask(dtype, causal, deterministic, offset, d,
                                                                    monkeypatch):
    """The autograd path with dropout: flash_attn_func draws (seed, offset) from torch's CUDA
    generator (read here before the call, and set past 2**32 in some cases); its output and
    gradients equal the reference given the mask rebuilt from that state."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    b, sq, sk, h, hk = 2, 190, 257, 4, 2
    p, scale = 0.17, _odd_scale(d)
    q, k, v = _qkv(b, sq, sk, h, hk, d, dtype, "cuda")
    dout = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    gen.set_offset(offset)
    seed = gen.initial_seed()
    ours = _grads(lambda q, k, v: flash_attn_func(q, k, v, dropout_p=p, softmax_scale=scale, causal=causal,
                                                  deterministic=deterministic), q, k, v, dout)
    assert gen.get_offset() == offset + 4, "one dropout call advances the generator's offset by 4"
    mask = philox_keep_mask(seed, offset, interface.dropout_threshold(p), b, h, sq, sk, "cuda")
    ref, low = reference_and_low(q, k, v, dout, causal=causal, softmax_scale=scale, dropout_p=p, dropout_mask=mask)
    assert_all_close(("out", "dq", "dk", "dv"), ours, ref, low)


@gpu
def test_jit_dropout_seed_fraction_and_expectation(monkeypatch):
    """flash_attn_func's dropout, measured on the kernel's own mask (read exactly from its output,
    numerics.forward_keep_mask; never the Python-rebuilt return_attn_probs), at p = 0.17 (not a
    multiple of 1/256): torch.manual_seed reproduces it, consecutive calls draw new masks, it equals
    philox_keep_mask for the generator's (seed, offset) bit for bit, keeps 1 - round(256 p)/256 of
    the entries, and E[out] = (1 - round(256 p)/256) / (1 - p) * out without dropout."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    p, b, sq, sk, h, d = 0.17, 2, 256, 128, 4, 128
    threshold = interface.dropout_threshold(p)
    gen = torch.cuda.default_generators[torch.cuda.current_device()]

    def kernel_mask():
        return forward_keep_mask(lambda q, k, v: flash_attn_func(q, k, v, dropout_p=p), b, sq, sk, h, d, p)

    torch.manual_seed(3)
    seed, offset = gen.initial_seed(), gen.get_offset()
    first, second = kernel_mask(), kernel_mask()
    torch.manual_seed(3)
    assert torch.equal(first, kernel_mask()), "torch.manual_seed must reproduce the dropout mask"
    assert not torch.equal(first, second), "consecutive calls must draw new masks"
    want = philox_keep_mask(seed, offset, threshold, b, h, sq, sk, "cuda")
    assert torch.equal(first, want), mask_mismatch("flash_attn_func vs philox_keep_mask", first, want)
    kept, sigma = first.float().mean().item(), math.sqrt(p * (1 - p) / first.numel())
    assert abs(kept - (1 - threshold / 256)) < 6 * sigma, \
        f"kept fraction {kept:.4f}, expected {1 - threshold / 256:.4f}"

    # The expectation: per element, the mean of n draws against its standard error.
    q, k, v = _qkv(2, 128, 128, 2, 2, 64, torch.float16, "cuda", grad=False)
    n, total, total_sq = 200, 0.0, 0.0
    for _ in range(n):
        out = flash_attn_func(q, k, v, dropout_p=p).double()
        total, total_sq = total + out, total_sq + out * out
    mean = total / n
    stderr = ((total_sq / n - mean * mean).clamp_min(0) / (n - 1)).sqrt()
    expected = attention_reference(q, k, v)[0].double() * (1 - threshold / 256) / (1 - p)
    z = ((mean - expected) / (stderr + 1e-12)).abs().mean().item()
    assert z < 1.0, f"E[out] off: mean |z| {z:.2f} (about 0.8 for an unbiased estimate)"


def test_jit_backend_on_cpu_names_the_switch(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    q, k, v = _qkv(1, 8, 8, 2, 2, 64, torch.float16, "cpu", grad=False)
    with pytest.raises(ValueError, match="FLASHJIT_BACKEND=reference"):
        flash_attn_func(q, k, v)


def test_unknown_backend(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "triton")
    q, k, v = _qkv(1, 8, 8, 2, 2, 64, torch.float16, "cpu", grad=False)
    with pytest.raises(ValueError, match="FLASHJIT_BACKEND"):
        flash_attn_func(q, k, v)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dropout_p=1.0), "dropout_p"), (dict(softmax_scale=-1.0), "softmax_scale"),
    (dict(window_size=(0.5, 0)), "window_size"), (dict(window_size=None, causal=True), "window_size"),
    (dict(softcap=float("nan")), "softcap"),  # a negative softcap is off, a negative window edge unbounded
    (dict(alibi_slopes=torch.ones(3)), "alibi_slopes"),
])
def test_reference_backend_rejects_bad_arguments(kwargs, match, monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    q, k, v = _qkv(1, 8, 8, 2, 2, 64, torch.float32, "cpu", grad=False)
    with pytest.raises(ValueError, match=match):
        flash_attn_func(q, k, v, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(causal=True), dict(window_size=(3, 2)), dict(softcap=2.0),
                                    dict(alibi_slopes=torch.tensor([0.5, 0.25], dtype=torch.float32)),
                                    dict(causal=True, window_size=(4, -1), softcap=1.5)], ids=str)
def test_reference_backend_features_have_exact_gradients(kwargs, monkeypatch):
    """The reference backend on CPU: autograd gradients agree with finite differences (float64)."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    q, k, v = (torch.randn(1, n, 2, 8, dtype=torch.float64, requires_grad=True) for n in (5, 7, 7))

    def fn(q, k, v):
        return attention_reference(q, k, v, compute_dtype=torch.float64, **{
            **kwargs, "window_size": kwargs.get("window_size", (-1, -1)),
            "causal": kwargs.get("causal", False)})[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))
    out = flash_attn_func(q, k, v, **kwargs)
    assert torch.allclose(out, fn(q, k, v))


def test_negative_window_edges_are_unbounded_as_flash_attn(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    q, k, v = _qkv(1, 6, 9, 2, 2, 16, torch.float32, "cpu", grad=False)
    for negative, unbounded in [((-5, 2), (-1, 2)), ((3, -2**40), (3, -1)), ((-3, -7), (-1, -1))]:
        torch.testing.assert_close(flash_attn_func(q, k, v, window_size=negative),
                                   flash_attn_func(q, k, v, window_size=unbounded), atol=0, rtol=0)
    torch.testing.assert_close(flash_attn_func(q, k, v, causal=True, window_size=(-4, -4)),
                               flash_attn_func(q, k, v, causal=True), atol=0, rtol=0)


def test_return_attn_probs_without_dropout_gives_an_empty_s_dmask(monkeypatch):
    """flash-attn returns S_dmask only with dropout (an empty tensor of q's dtype otherwise): code asks for
    return_attn_probs to get the lse, and must not pay for a [B, H, Sq, Sk] tensor."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    q, k, v = _qkv(1, 6, 9, 2, 2, 16, torch.float32, "cpu", grad=False)
    out, lse, s_dmask = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert s_dmask.shape == (0,) and s_dmask.dtype == q.dtype and lse.shape == (1, 2, 6)
    torch.testing.assert_close(out, flash_attn_func(q, k, v, causal=True), atol=0, rtol=0)
    _, _, s_dmask = flash_attn_func(q, k, v, causal=True, dropout_p=0.5, return_attn_probs=True)
    assert s_dmask.shape == (1, 2, 6, 9)


def test_reference_backend_lse_is_not_differentiable_as_the_kernels(monkeypatch):
    """The kernels' autograd (eager and compiled) marks the returned lse non-differentiable; the reference backend
    must give a loss that reads it the same gradients, not a real gradient through the lse that the GPU drops."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    q, k, v = _qkv(1, 6, 9, 2, 1, 16, torch.float32, "cpu")
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert out.requires_grad and not lse.requires_grad
    (out.sum() + lse.sum()).backward()
    with_lse = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    flash_attn_func(q, k, v, causal=True).sum().backward()
    for got, want in zip(with_lse, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    out, lse, _ = flashjit.flash_attn_varlen_func(q[0], k[0], v[0], cu, torch.tensor([0, 9], dtype=torch.int32), 6,
                                                  9, causal=True, return_attn_probs=True)
    assert out.requires_grad and not lse.requires_grad and lse.shape == (2, 6)


def test_reference_window_matches_an_explicit_mask():
    q = torch.randn(1, 6, 1, 8, dtype=torch.float64)
    k, v = torch.randn(1, 9, 1, 8, dtype=torch.float64), torch.randn(1, 9, 1, 8, dtype=torch.float64)
    out, _ = attention_reference(q, k, v, compute_dtype=torch.float64, window_size=(1, 2))
    d = 9 - 6
    for i in range(6):
        keys = [j for j in range(9) if i + d - 1 <= j <= i + d + 2]
        s = torch.stack([q[0, i, 0] @ k[0, j, 0] for j in keys]) / math.sqrt(8)
        expected = (torch.softmax(s, 0)[:, None] * v[0, keys, 0]).sum(0)
        assert torch.allclose(out[0, i, 0], expected)


def test_reference_dropout_fraction_expectation_and_seed(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    q, k, v = _qkv(2, 64, 64, 2, 2, 16, torch.float32, "cpu", grad=False)
    p = 0.3
    torch.manual_seed(1)
    _, _, probs = flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True)
    kept = (probs >= 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.02
    torch.manual_seed(1)
    a = flash_attn_func(q, k, v, dropout_p=p)
    torch.manual_seed(1)
    assert torch.equal(a, flash_attn_func(q, k, v, dropout_p=p))  # torch.manual_seed reproduces it
    mean = torch.stack([flash_attn_func(q, k, v, dropout_p=p) for _ in range(400)]).mean(0)
    exact = flash_attn_func(q, k, v)
    assert (mean - exact).abs().mean().item() < 0.02  # E[dropout(P) / (1 - p)] = P


class FlashSelfAttention(torch.nn.Module):
    """The seed's module: nn.Linear qkv -> flash_attn_qkvpacked_func (or `attention`) -> out_proj."""

    def __init__(self, hidden, heads, causal=True, attention=None):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.attention = attention or (lambda qkv, causal: flash_attn_qkvpacked_func(qkv, causal=causal))
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.out_proj = torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        b, s, hidden = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.heads, hidden // self.heads)
        return self.out_proj(self.attention(qkv, self.causal).reshape(b, s, hidden))


@gpu
def test_training_step_matches_reference_backend(monkeypatch):
    """One training step of a bf16 model through flash_attn_qkvpacked_func: the output, the loss and
    every parameter gradient against an fp32 copy of the model with the fp32 reference attention,
    each judged relative to its own magnitude (numerics.assert_close) with PyTorch's bf16 attention
    in the bf16 model as the baseline. The loss is the error against the fp32 model's own output plus
    small noise, so it is small and most of it depends on the attention (zeroing the attention output
    moves it by far more than its tolerance)."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    model = FlashSelfAttention(256, 4).cuda().to(torch.bfloat16)
    x = torch.randn(2, 200, 256, device="cuda", dtype=torch.bfloat16)

    def reference_attention(compute_dtype):
        return lambda qkv, causal: attention_reference(*qkv.unbind(2), causal=causal,
                                                       compute_dtype=compute_dtype)[0].to(qkv.dtype)

    ref_model = FlashSelfAttention(256, 4, attention=reference_attention(torch.float32)).cuda()
    ref_model.load_state_dict(model.state_dict())  # the same weights, exactly, in fp32
    low_model = FlashSelfAttention(256, 4, attention=reference_attention(None)).cuda().to(torch.bfloat16)
    low_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        target = ref_model(x.float()) + 0.05 * torch.randn(x.shape, device="cuda")
    results = {}
    for name, m, inp in (("jit", model, x), ("reference", ref_model, x.float()), ("low", low_model, x)):
        m.zero_grad()
        out = m(inp)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        results[name] = (out.detach().float(), loss.detach(), [p.grad.float().clone() for p in m.parameters()])
    (out, loss, grads), (ref_out, ref_loss, ref_grads), (low_out, low_loss, low_grads) = (
        results[n] for n in ("jit", "reference", "low"))
    assert_close("output", out, ref_out, low_out)
    assert_close("loss", loss, ref_loss, low_loss)
    names = [n for n, _ in model.named_parameters()]
    assert_all_close([f"grad {n}" for n in names], grads, ref_grads, low_grads)
    with torch.no_grad():  # the loss check can fail: with the attention output zeroed the loss moves far past it
        blind = torch.nn.functional.mse_loss(ref_model.out_proj.bias.expand_as(target), target)
    assert abs(blind.item() - ref_loss.item()) > 10 * (2 * abs(low_loss.item() - ref_loss.item()) +
                                                       1e-3 * ref_loss.item())


@gpu
def test_backward_logs_its_dispatch(caplog, monkeypatch):
    """DEBUG logging names the backward kernel each call dispatched to, and the arch that chose it."""
    import logging

    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    q, k, v = _qkv(1, 130, 130, 2, 2, 128, torch.bfloat16, "cuda", grad=True)
    with caplog.at_level(logging.DEBUG, logger="flashjit"):
        flashjit.flash_attn_func(q, k, v, causal=True).sum().backward()
    arch = _device_arch()
    line = next(r.getMessage() for r in caplog.records if "backward [B=1, Sq=130" in r.getMessage())
    assert f"on {arch}" in line and "bwd_bf16_d128_" in line
    assert line.split(" dispatched to ")[1].split()[0].endswith("_wgmma") == (arch == "sm_90a")


# ---- CPU: flash-attn 2.x's leniencies (flash_attn_interface.py / csrc/flash_attn/flash_api.cpp at v2.8.3) ----
def _last_dim_strided(t):
    """t's values with a last-dim stride of 2 (a view into a wider buffer)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t.detach()
    return wide[..., ::2].requires_grad_(t.requires_grad)


def test_strided_last_dim_is_copied_as_flash_attn_does(monkeypatch):
    """flash-attn copies q/k/v whose last dim is strided (maybe_contiguous) instead of refusing them:
    flash_attn_func, the packed forms and flash_attn_varlen_func give the contiguous call's out and grads."""
    from flashjit import flash_attn_varlen_func

    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    q, k, v = _qkv(2, 5, 7, 4, 2, 16, torch.float64, "cpu")
    strided = [_last_dim_strided(t) for t in (q, k, v)]
    assert all(t.stride(-1) == 2 for t in strided)
    out = flash_attn_func(*strided, causal=True)
    out.sum().backward()
    torch.testing.assert_close(out, flash_attn_func(q, k, v, causal=True))
    assert all(t.grad is not None and t.grad.shape == t.shape for t in strided)
    qkv = _last_dim_strided(torch.randn(2, 5, 3, 4, 16, dtype=torch.float64))
    torch.testing.assert_close(flash_attn_qkvpacked_func(qkv), flash_attn_func(*qkv.contiguous().unbind(2)))
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    packed = [_last_dim_strided(t.flatten(0, 1)) for t in (q, k[:, :5], v[:, :5])]
    torch.testing.assert_close(flash_attn_varlen_func(*packed, cu, cu, 5, 5),
                               flash_attn_varlen_func(*(t.contiguous() for t in packed), cu, cu, 5, 5))


def test_negative_softcap_is_off_as_in_flash_attn(monkeypatch):
    """flash-attn: softcap <= 0 deactivates softcapping (flash_attn_qkvpacked_func's "<=0.0 means
    deactivate"; flash_api.cpp tests softcap > 0), in every function."""
    from flashjit import flash_attn_varlen_func, flash_attn_with_kvcache

    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    q, k, v = _qkv(2, 5, 7, 4, 2, 16, torch.float64, "cpu", grad=False)
    torch.testing.assert_close(flash_attn_func(q, k, v, softcap=-1.0), flash_attn_func(q, k, v))
    qkv = torch.stack([q, q, q], 2)
    torch.testing.assert_close(flash_attn_qkvpacked_func(qkv, softcap=-30), flash_attn_qkvpacked_func(qkv))
    cu_q, cu_k = torch.tensor([0, 5, 10], dtype=torch.int32), torch.tensor([0, 7, 14], dtype=torch.int32)
    args = (q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, 5, 7)
    torch.testing.assert_close(flash_attn_varlen_func(*args, softcap=-2.5), flash_attn_varlen_func(*args))
    torch.testing.assert_close(flash_attn_with_kvcache(q, k, v, softcap=-1.0), flash_attn_with_kvcache(q, k, v))
    with pytest.raises(ValueError, match="softcap"):  # not a number at all: still an error
        flash_attn_func(q, k, v, softcap=float("nan"))


def test_varlen_max_seqlen_may_be_a_one_element_integer_tensor(monkeypatch):
    """flash-attn hands max_seqlen_q/_k to a torch custom op's int argument, which also takes a
    1-element integer tensor (e.g. cu_seqlens.diff().max()); a float or longer tensor is still refused."""
    from flashjit import flash_attn_varlen_func, flash_attn_varlen_qkvpacked_func

    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k, v = (torch.randn(8, 2, 16, dtype=torch.float64) for _ in range(3))
    expected = flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True)
    longest = cu.diff().max()
    assert longest.dim() == 0 and longest.dtype == torch.int32
    torch.testing.assert_close(flash_attn_varlen_func(q, k, v, cu, cu, longest, longest.long()[None], causal=True),
                               expected)
    torch.testing.assert_close(flash_attn_varlen_qkvpacked_func(torch.stack([q, k, v], 1), cu, longest, causal=True),
                               expected)
    for bad in (torch.tensor(5.0), torch.tensor([5, 5])):
        with pytest.raises(TypeError, match="max_seqlen_q must be an int or a one-element integer tensor"):
            flash_attn_varlen_func(q, k, v, cu, cu, bad, 5)


def test_kvcache_negative_num_splits_chooses_as_flash_attn(monkeypatch):
    """flash-attn's mha_fwd_kvcache runs its split heuristic for any num_splits < 1, as for 0."""
    from flashjit import flash_attn_with_kvcache

    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    q, k, v = _qkv(2, 1, 9, 4, 2, 16, torch.float64, "cpu", grad=False)
    seqlens = torch.tensor([4, 9], dtype=torch.int32)
    torch.testing.assert_close(flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, num_splits=-1),
                               flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, num_splits=0))

"""Different head dims for q/k and v (issue 13 item 5; MLA-style, DeepSeek's 192/128): q/k [.., d_qk],
v [.., d_v] with d_v <= d_qk; out and dout are [.., d_v], dv is shaped like v, the softmax scale
defaults to 1/sqrt(d_qk) and the lse is unchanged.

CPU: the checks and their messages (d_v > d_qk names v), the reference backend (shapes, the default
scale, exact fp64 gradients, varlen), the padding of head dims that are not multiples of 8 (q/k and v
each on its own) and the cropping of out, dq, dk, dv, explicit configs whose head_dim_v disagrees with
v, the dispatcher's sm_80 families on Hopper, the custom ops' fake shapes under torch.compile, SDPA's
fallback and the transformers integration passing v as it is. GPU: flash_attn_func forward and
backward against the fp32 reference (tests/numerics.py's rule) over head-dim pairs, fp16/bf16, causal
masks with rows that see no key, GQA, every score feature, dropout with the kernels' mask,
deterministic repeatability, varlen, explicit configs and the planned (repeated) call.
"""
import itertools
import math
import types
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flashjit
from flashjit import BwdConfig, BwdSm90Config, FwdSm90Config, KernelConfig, flash_attn_func, interface, ops, varlen
from flashjit.reference import attention_reference, philox_keep_mask
from numerics import assert_all_close, poisoned_like, reference_and_low

gpu = pytest.mark.gpu
GRADS = ("dq", "dk", "dv")
# (d_qk, d_v): DeepSeek's MLA, smaller value dims at several tile widths, and head dims that are not
# multiples of 8 (q/k and v padded; v alone padded)
PAIRS = [(192, 128), (96, 64), (128, 64), (64, 32), (40, 24), (59, 40), (64, 37)]


def _qkv(b, sq, sk, h, hk, d_qk, d_v, dtype=torch.float32, device="cpu", grad=False):
    def make(s, n, d):
        return torch.randn(b, s, n, d, dtype=dtype, device=device, requires_grad=grad)
    return make(sq, h, d_qk), make(sk, hk, d_qk), make(sk, hk, d_v)


def _cu(lens, device="cpu") -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)


def _odd_scale(d: int) -> float:
    """Not 1/sqrt(d): a kernel that recomputes the default (or from d_v) fails with it."""
    return 1.37 / math.sqrt(d)


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    yield
    torch._dynamo.reset()


# ---- CPU: checks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("d_v", [96, 0])
def test_a_value_head_dim_above_q_s_is_refused_naming_v(d_v, reference_backend):
    """d_v > d_qk (and d_v = 0): ValueError naming v, from the kernels' checks, the reference backend
    and varlen alike, before anything runs."""
    q, k, v = _qkv(1, 5, 7, 2, 2, 64, d_v)
    words = rf"v has head_dim {d_v} with q/k's 64: the kernels need 0 < d_v <= d_qk \(the head_dim of v must not exceed"
    with pytest.raises(ValueError, match=words):
        interface.check_qkv(*(t.half() for t in (q, k, v)))  # the JIT path's checks (before the CPU device's)
    with pytest.raises(ValueError, match=words):
        flash_attn_func(q, k, v)
    cu_q, cu_k = torch.tensor([0, 5], dtype=torch.int32), torch.tensor([0, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match=words):
        flashjit.flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, 5, 7)


def test_k_and_v_still_agree_but_for_the_head_dim():
    q, k, v = _qkv(2, 5, 7, 4, 2, 64, 32)
    interface.check_qkv(q, k, v, reference=True)
    for bad_v in (v[:, :6], v[:1], v[:, :, :1]):
        with pytest.raises(ValueError, match="k and v must have the same shape \\(but for v's head_dim"):
            interface.check_qkv(q, k, bad_v, reference=True)
    with pytest.raises(ValueError, match="does not match q shape"):  # k's head dim is still q's
        interface.check_qkv(q, k[..., :32], v, reference=True)


# ---- CPU: the reference backend ---------------------------------------------------------------------
@pytest.mark.parametrize("d_qk, d_v", [(192, 128), (59, 40), (64, 37)], ids=str)
def test_reference_backend_out_is_d_v_wide_with_q_s_scale(d_qk, d_v, reference_backend):
    """out [B, Sq, H, d_v] = softmax(q k^T / sqrt(d_qk)) v (GQA), lse [B, H, Sq]."""
    b, sq, sk, h, hk = 2, 5, 9, 4, 2
    q, k, v = _qkv(b, sq, sk, h, hk, d_qk, d_v, torch.float64)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.shape == (b, sq, h, d_v) and lse.shape == (b, h, sq)
    kk, vv = (t.repeat_interleave(h // hk, dim=2) for t in (k, v))
    probs = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(d_qk), dim=-1)
    torch.testing.assert_close(out, torch.einsum("bhqk,bkhd->bqhd", probs, vv))


def test_reference_backend_gradients_are_exact(reference_backend):
    """gradcheck (fp64) through flash_attn_func's reference path, causal with GQA and a softcap; dv is
    shaped like v."""
    q, k, v = _qkv(1, 6, 9, 4, 2, 12, 5, torch.float64, grad=True)
    fn = lambda q, k, v: flash_attn_func(q, k, v, causal=True, softcap=3.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    fn(q, k, v).sum().backward()
    assert v.grad.shape == v.shape and q.grad.shape == q.shape


def test_reference_varlen_is_each_sequence_alone(reference_backend):
    lens_q, lens_k = [3, 0, 7], [5, 4, 6]
    h, hk, d_qk, d_v = 4, 2, 24, 16
    q, k, v = (t[0] for t in _qkv(1, sum(lens_q), sum(lens_k), h, hk, d_qk, d_v))
    out = flashjit.flash_attn_varlen_func(q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k), causal=True)
    assert out.shape == (sum(lens_q), h, d_v)
    want = attention_reference(q[3:][None], k[9:][None], v[9:][None], causal=True)[0][0]  # the third sequence
    torch.testing.assert_close(out[3:], want)


# ---- CPU: padding of head dims that are not multiples of 8, and cropping -------------------------------
def _kernels_replaced_by_the_reference(monkeypatch) -> list:
    """interface.forward/backward on the CPU, their kernels replaced by the reference, which records the
    head dims (q, k, v) they were given: the padding and cropping around them are what runs for real."""
    seen = []
    check, backward = interface.check_qkv, interface.backward

    def launch(q, k, v, config, causal, softmax_scale, out=None, want_lse=True, mods=None, plan_key=None):
        seen.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        result, lse = attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale)
        out = result if out is None else out.copy_(result)
        return (lambda: None), out, lse if want_lse else None

    def kernels_backward(dout, q, k, v, out, lse, causal=False, softmax_scale=None, *args, **kwargs):
        if q.shape[-1] % 8 or v.shape[-1] % 8:  # interface.backward pads, then calls backward() again: here
            return backward(dout, q, k, v, out, lse, causal, softmax_scale, *args, **kwargs)
        seen.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        _, vjp = torch.func.vjp(lambda q, k, v: attention_reference(q, k, v, causal=causal,
                                                                    softmax_scale=softmax_scale)[0], q, k, v)
        return vjp(dout)

    monkeypatch.setattr(interface, "check_qkv", lambda q, k, v, reference=False: check(q, k, v, reference=True))
    monkeypatch.setattr(interface, "_launch", launch)
    monkeypatch.setattr(interface, "backward", kernels_backward)
    return seen


@pytest.mark.parametrize("d_qk, d_v, padded", [(59, 40, (64, 64, 40)), (64, 37, (64, 64, 40)),
                                                (61, 13, (64, 64, 16))], ids=str)
def test_padding_each_head_dim_on_its_own_and_cropping(d_qk, d_v, padded, monkeypatch):
    """q/k and v are zero-padded to multiples of 8 independently (a multiple of 8 is not copied); out
    and dv are cropped to d_v, dq and dk to d_qk; the default scale is 1/sqrt(d_qk), not the padded
    one's; a caller's out must be [.., d_v]."""
    seen = _kernels_replaced_by_the_reference(monkeypatch)
    q, k, v = _qkv(2, 7, 11, 4, 2, d_qk, d_v)
    out, lse = interface.forward(q, k, v, causal=True, return_lse=True)
    assert seen == [padded] and out.shape == (2, 7, 4, d_v)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want_out, want_lse = attention_reference(*leaves, causal=True)
    torch.testing.assert_close(out, want_out.detach())
    torch.testing.assert_close(lse, want_lse)
    dout = torch.randn_like(out)
    grads = interface.backward(dout, q, k, v, out, lse, causal=True)
    want_out.backward(dout)
    assert seen[1] == padded
    for grad, leaf in zip(grads, leaves):
        assert grad.shape == leaf.shape
        torch.testing.assert_close(grad, leaf.grad)
    given = torch.full_like(out, float("nan"))
    assert interface.forward(q, k, v, causal=True, out=given) is given and torch.equal(given, out)
    with pytest.raises(ValueError, match=rf"out must be a tensor of shape \(2, 7, 4, {d_v}\)"):
        interface.forward(q, k, v, out=torch.empty_like(q))
    with pytest.raises(ValueError, match=rf"dout must match q \(with v's head_dim\): shape \(2, 7, 4, {d_v}\)"):
        interface.backward(torch.randn_like(q), q, k, v, out, lse)
    if v.shape[-1] % 8 == 0:  # a multiple of 8 goes to the kernels as it is, with no copy
        assert interface._pad_head_dim(v)[0] is v


def test_backward_pads_v_where_the_wgmma_kernel_is_faster(monkeypatch):
    """Where dispatch.backward_pads_value says so (sm_90a, e.g. 128/64), the backward runs v, out and
    dout zero-padded to q's head dim (the wgmma kernel's) and returns dv cropped to d_v: the kernels
    see d_v = d_qk, the gradients are those of the unpadded problem, a caller's dv is filled."""
    seen, original = [], interface.backward
    check = interface.check_qkv

    def kernels_backward(dout, q, k, v, out, lse, causal=False, softmax_scale=None, *args, **kwargs):
        if v.shape[-1] != q.shape[-1]:  # the real interface.backward, which pads and calls backward() again
            return original(dout, q, k, v, out, lse, causal, softmax_scale, *args, **kwargs)
        seen.append((q.shape[-1], v.shape[-1], dout.shape[-1], out.shape[-1]))
        _, vjp = torch.func.vjp(lambda q, k, v: attention_reference(q, k, v, causal=causal,
                                                                    softmax_scale=softmax_scale)[0], q, k, v)
        return vjp(dout)

    monkeypatch.setattr(interface, "check_qkv", lambda q, k, v, reference=False: check(q, k, v, reference=True))
    monkeypatch.setattr(interface, "_pads_value", lambda q, v, *args: True)
    monkeypatch.setattr(interface, "backward", kernels_backward)
    q, k, v = _qkv(2, 9, 13, 4, 2, 128, 64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention_reference(*leaves, causal=True)
    dout = torch.randn_like(out)
    given_dv = torch.full_like(v, float("nan"))
    grads = interface.backward(dout, q, k, v, out.detach(), lse.detach(), causal=True, dv=given_dv)
    out.backward(dout)
    assert seen == [(128, 128, 128, 128)] and grads[2] is given_dv
    for grad, leaf in zip(grads, leaves):
        torch.testing.assert_close(grad, leaf.grad)
    with pytest.raises(ValueError, match="dv must be a tensor of shape"):  # before anything runs, as natively
        interface.backward(dout, q, k, v, out.detach(), lse.detach(), causal=True, dv=given_dv.double())
    assert len(seen) == 1


def test_a_tuned_sm80_backward_keeps_the_native_route(monkeypatch):
    """A tuned entry for the padded problem that is not the wgmma kernel: padding would only cost."""
    q, k, v = _qkv(1, 8, 8, 2, 2, 128, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(interface, "backward_pads_value", lambda *args, **kwargs: True)
    monkeypatch.setattr(interface, "_smem_limit", lambda device_index: (227 * 1024, "test GPU"))
    monkeypatch.setattr(interface.jit, "arch_for", lambda device_index: "sm_90a")
    for tuned, pads in ((None, True), (BwdSm90Config("bf16", 128), True), (BwdConfig(), False)):
        monkeypatch.setattr(interface.tuning, "lookup", lambda *args, tuned=tuned: tuned)
        assert interface._pads_value(q, v, False, interface._NO_MODS, False, 0, 8) == pads


def test_varlen_backward_pads_v_where_the_wgmma_kernel_is_faster(monkeypatch):
    """varlen_backward routes a 128/64 batch as interface.backward does (the same rule and padding)."""
    seen, original = [], varlen.varlen_backward
    check = interface.check_qkv

    def kernels_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal=False, *args, **kwargs):
        if v.shape[-1] != q.shape[-1]:
            return original(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, *args, **kwargs)
        seen.append((q.shape[-1], v.shape[-1], dout.shape[-1], out.shape[-1]))
        return tuple(torch.zeros_like(t) for t in (q, k, v))

    monkeypatch.setattr(interface, "check_qkv", lambda q, k, v, reference=False: check(q, k, v, reference=True))
    monkeypatch.setattr(interface, "_pads_value", lambda q, v, *args: True)
    monkeypatch.setattr(varlen, "varlen_backward", kernels_backward)
    lens = [3, 5]
    q, k, v = (t[0] for t in _qkv(1, sum(lens), sum(lens), 4, 2, 128, 64))
    out, dout = torch.randn(sum(lens), 4, 64), torch.randn(sum(lens), 4, 64)
    lse = torch.randn(4, sum(lens))
    grads = varlen.varlen_backward(dout, q, k, v, out, lse, _cu(lens), _cu(lens), 5, 5, causal=True)
    assert seen == [(128, 128, 128, 128)] and [g.shape for g in grads] == [q.shape, k.shape, v.shape]


# ---- CPU: explicit configs and the dispatcher ------------------------------------------------------------
def test_explicit_configs_must_compute_v_s_head_dim(monkeypatch):
    """A config whose head_dim_v is not v's head dim is refused, naming both and the fix; on sm_90a the
    dispatcher's forward has v's head dim and its backward is the sm_80 family (the wgmma backward
    has no d_v)."""
    from flashjit import BwdSm90Config

    monkeypatch.setattr(interface.jit, "arch_for", lambda device_index: "sm_90a")
    monkeypatch.setattr(interface, "_smem_limit", lambda device_index: (227 * 1024, "H100"))
    q, k, v = (t.half() for t in _qkv(1, 300, 300, 2, 2, 128, 64))
    words = r"head_dim_v=128 but v's head_dim is 64; use dataclasses.replace\(config, d_v=64\)"
    for config in (KernelConfig(dtype="fp16", d_head=128), FwdSm90Config(dtype="fp16", d_head=128)):
        with pytest.raises(ValueError, match=words):
            interface.resolve_config(q, k, config, False, v=v)
    assert interface.resolve_config(q, k, KernelConfig(dtype="fp16", d_head=128, d_v=64), False, v=v).head_dim_v == 64
    with pytest.raises(ValueError, match="head_dim_v=64 but v's head_dim is 128"):
        interface.resolve_config(q, k, KernelConfig(dtype="fp16", d_head=128, d_v=64), False, v=k)
    assert interface.resolve_config(q, k, None, False, device_index=0, v=v).head_dim_v == 64
    mods = interface.score_mods(q, False)
    with pytest.raises(ValueError, match=words):
        interface.bwd_config(BwdConfig("fp16", 128), torch.float16, 128, False, 300, mods, False, 0, d_v=64)
    with pytest.raises(ValueError, match="BwdSm90Config has no d_v: pass a config of a family that has"):
        interface.bwd_config(BwdSm90Config("fp16", 128, 64), torch.float16, 128, False, 300, mods, False, 0, d_v=64)
    chosen = interface.bwd_config(None, torch.float16, 128, False, 300, mods, False, 0, d_v=64)
    assert isinstance(chosen, BwdConfig) and chosen.head_dim_v == 64


# ---- CPU: the custom ops (torch.compile), SDPA and transformers ---------------------------------------------
def test_custom_ops_fake_shapes_and_compile(reference_backend):
    """The fake functions give out [.., d_v] and dv like v (dense and varlen); a fullgraph compile of
    flash_attn_func matches eager, gradients included."""
    q, k, v = _qkv(2, 9, 11, 4, 2, 24, 16)
    torch.library.opcheck(ops.fwd, (q, k, v, None, None, None, True, -1, 0, 0.0, 0.0, False))
    flags = (None, None, None, True, -1, 0, 0.0, 0.0, False)  # alibi, sink, scale, causal, window, softcap, p, det
    cu = [torch.tensor([0, n], dtype=torch.int32) for n in (9, 11)]
    with FakeTensorMode() as mode:
        fq, fk, fv, cu_q, cu_k = (mode.from_tensor(t) for t in (q, k, v, *cu))
        out, lse, rng = ops.fwd(fq, fk, fv, *flags)
        assert out.shape == (2, 9, 4, 16) and lse.shape == (2, 4, 9)
        assert [t.shape for t in ops.bwd(out, fq, fk, fv, out, lse, rng, *flags)[:3]] == [q.shape, k.shape, v.shape]
        out, lse, rng = varlen.varlen_fwd(fq[0], fk[0], fv[0], cu_q, cu_k, 9, 11, *flags)
        assert out.shape == (9, 4, 16) and lse.shape == (4, 9)
        grads = varlen.varlen_bwd(out, fq[0], fk[0], fv[0], out, lse, rng, cu_q, cu_k, 9, 11, *flags)
        assert [t.shape for t in grads[:3]] == [q.shape[1:], k.shape[1:], v.shape[1:]]
    leaves = [[t.clone().requires_grad_() for t in (q, k, v)] for _ in range(2)]
    compiled = torch.compile(flash_attn_func, fullgraph=True)
    results = []
    for fn, (lq, lk, lv) in zip((compiled, flash_attn_func), leaves):
        out = fn(lq, lk, lv, causal=True)
        out.backward(torch.ones_like(out))
        results.append((out, lq.grad, lk.grad, lv.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sdpa_runs_pytorchs_kernel_for_a_smaller_value_head_dim():
    """SDPA's flash op shapes out like query (its meta function), and SDPA sends it equal head dims
    only: a direct call with value's head dim smaller runs PyTorch's kernel, forward and backward."""
    from flashjit import sdpa

    original = mock.Mock()
    original.call_boxed.return_value = "original"
    q, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 8)
    assert sdpa._forward(original, "keys", q, q, v, 0.0, False, False, scale=None) == "original"
    lse, seed = torch.zeros(1, 2, 3), torch.empty(2, dtype=torch.uint64)
    assert sdpa._backward(original, "keys", v, q, q, v, v, lse, None, None, 3, 3, 0.0, False, seed, seed,
                          scale=None) == "original"
    assert original.call_boxed.call_count == 2


def test_transformers_passes_v_as_it_is(reference_backend, monkeypatch):
    """MLA through attn_implementation: v keeps its head dim (no padding to q's), out is
    [B, Sq, H, d_v]; a left-padded batch keeps the KV-cache kernel (whose caches share one head dim:
    v padded to q's there, out cropped), with padded query rows 0."""
    integration = pytest.importorskip("flashjit.integrations.transformers")
    b, s, h, hk, d_qk, d_v = 2, 9, 4, 2, 24, 16
    q, k, v = _qkv(b, s, s, h, hk, d_qk, d_v)
    query, key, value = (t.transpose(1, 2) for t in (q, k, v))  # transformers' [B, H, S, D]
    module = types.SimpleNamespace(is_causal=True)
    seen = []
    real = flashjit.flash_attn_func
    monkeypatch.setattr(flashjit, "flash_attn_func",
                        lambda q, k, v, **kw: seen.append(v.shape[-1]) or real(q, k, v, **kw))
    out, _ = integration.attention_forward(module, query, key, value, None, scaling=0.3)
    assert seen == [d_v] and out.shape == (b, s, h, d_v)
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=True, softmax_scale=0.3)[0])

    cache_dims, with_kvcache = [], flashjit.flash_attn_with_kvcache
    monkeypatch.setattr(flashjit, "flash_attn_with_kvcache",
                        lambda q, k, v, **kw: cache_dims.append(v.shape[-1]) or with_kvcache(q, k, v, **kw))
    segments = torch.ones(b, s, dtype=torch.int32)
    segments[0, :3] = 0  # row 0 left-padded by 3
    with torch.no_grad():
        out, _ = integration.attention_forward(module, query, key, value, segments, scaling=0.3)
    assert cache_dims == [d_qk] and out.shape == (b, s, h, d_v) and not out[0, :3].any()
    torch.testing.assert_close(out[0, 3:], attention_reference(q[:1, 3:], k[:1, 3:], v[:1, 3:], causal=True,
                                                               softmax_scale=0.3)[0][0])
    torch.testing.assert_close(out[1], attention_reference(q[1:], k[1:], v[1:], causal=True, softmax_scale=0.3)[0][0])


# ---- GPU: flash_attn_func against the fp32 reference -------------------------------------------------------
SHAPE, SHORT_KEYS = (2, 77, 300, 4, 2), (1, 300, 17, 4, 2)  # (B, Sq, Sk, H, H_k): GQA; Sq > Sk: rows see no key
COMBOS = [  # (dtype, causal, shape, forward: the dispatcher's through autograd, or an explicit sm_80 config)
    (torch.float16, False, SHAPE, "dispatched"), (torch.bfloat16, True, SHAPE, "dispatched"),
    (torch.bfloat16, True, SHORT_KEYS, "sm80")]


def _autograd(fn, q, k, v, dout, *extra):
    """(out, dq, dk, dv, *grads of extra) of fn through autograd, from cleared gradients."""
    for t in (q, k, v, *extra):
        t.grad = None
    out = fn(q, k, v)
    out.backward(dout)
    return (out.detach(), *(t.grad.clone() for t in (q, k, v, *extra)))


@gpu
@pytest.mark.parametrize("dtype, causal, shape, forward", COMBOS, ids=str)
@pytest.mark.parametrize("d_qk, d_v", PAIRS, ids=str)
def test_flash_attn_func_matches_reference(d_qk, d_v, dtype, causal, shape, forward, monkeypatch):
    """out [.., d_v] and dq, dk, dv (GQA: summed per key head) at the default scale 1/sqrt(d_qk), through
    flash_attn_func's autograd (the dispatcher's forward: the Hopper family on sm_90a) or the low-level
    API with an sm_80 forward config and NaN-poisoned outputs; with causal and Sq > Sk the first
    Sq - Sk rows see no key: out = 0 and dq = 0 there, exactly."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    b, sq, sk, h, hk = shape
    q, k, v = _qkv(b, sq, sk, h, hk, d_qk, d_v, dtype, "cuda", grad=True)
    dout = torch.randn(b, sq, h, d_v, device="cuda", dtype=dtype)
    if forward == "dispatched":
        ours = _autograd(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), q, k, v, dout)
    else:  # the config of the padded head dims where they are not multiples of 8 (as forward() pads them)
        config = flashjit.default_config(interface._DTYPES[dtype], -(-d_qk // 8) * 8, causal, sq,
                                         d_v=-(-d_v // 8) * 8)
        q, k, v = (t.detach() for t in (q, k, v))
        out, lse = flashjit.forward(q, k, v, config=config, causal=causal, return_lse=True, out=poisoned_like(dout))
        ours = (out, *flashjit.backward(dout, q, k, v, out, lse, causal=causal, dq=poisoned_like(q),
                                        dk=poisoned_like(k), dv=poisoned_like(v)))
    assert [t.shape for t in ours] == [dout.shape, q.shape, k.shape, v.shape]
    ref, low = reference_and_low(q, k, v, dout, causal=causal)
    assert_all_close(("out", *GRADS), ours, ref, low)
    empty = sq - sk if causal else 0
    if empty > 0:
        assert not ours[0][:, :empty].any() and not ours[1][:, :empty].any(), "rows that see no key: out, dq = 0"


FEATURE_CASES = [  # (d_qk, d_v, dtype, flash_attn_func keywords)
    (192, 128, torch.bfloat16, dict(window_size=(40, 17))),
    (192, 128, torch.bfloat16, dict(causal=True, softcap=4.0)),
    (192, 128, torch.bfloat16, dict(causal=True, alibi_slopes="heads")),
    (192, 128, torch.bfloat16, dict(causal=True, learnable_sink=True)),
    (96, 64, torch.float16, dict(causal=True, window_size=(25, -1), softcap=4.0, alibi_slopes="heads")),
    (96, 64, torch.float16, dict(learnable_sink=True)),
    (40, 24, torch.bfloat16, dict(window_size=(33, 5), softcap=3.0, alibi_slopes="heads")),
    (59, 40, torch.float16, dict(causal=True, window_size=(20, -1), learnable_sink=True)),
]


@gpu
@pytest.mark.parametrize("d_qk, d_v, dtype, features", FEATURE_CASES, ids=str)
def test_score_features_match_reference(d_qk, d_v, dtype, features, monkeypatch):
    """Windows, softcap, ALiBi and learnable sinks (with the sink's gradient) at a scale other than
    1/sqrt(d_qk), through autograd."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    b, sq, sk, h, hk = 2, 190, 257, 4, 2
    q, k, v = _qkv(b, sq, sk, h, hk, d_qk, d_v, dtype, "cuda", grad=True)
    dout = torch.randn(b, sq, h, d_v, device="cuda", dtype=dtype)
    kwargs = dict(features, softmax_scale=_odd_scale(d_qk))
    if kwargs.get("alibi_slopes") == "heads":
        kwargs["alibi_slopes"] = torch.rand(h, device="cuda") * 0.3
    sink = (torch.randn(h, device="cuda") * 2).requires_grad_() if kwargs.pop("learnable_sink", False) else None
    extra = () if sink is None else (sink,)
    ours = _autograd(lambda q, k, v: flash_attn_func(q, k, v, learnable_sink=sink, **kwargs), q, k, v, dout, *extra)
    ref, low = reference_and_low(q, k, v, dout, learnable_sink=sink, **kwargs)
    assert_all_close(("out", *GRADS, "dsink")[:len(ours)], ours, ref, low)


@gpu
@pytest.mark.parametrize("d_qk, d_v, dtype, causal, deterministic", [
    (192, 128, torch.bfloat16, True, False), (96, 64, torch.float16, False, True),
    (59, 40, torch.bfloat16, False, False)], ids=str)
def test_dropout_matches_reference_with_the_kernels_mask(d_qk, d_v, dtype, causal, deterministic):
    """The low-level API with NaN-poisoned outputs (out [.., d_v], dv like v) and in-kernel dropout,
    against the reference given reference.philox_keep_mask of the same (seed, offset)."""
    b, sq, sk, h, hk, p = 2, 190, 257, 4, 2, 0.17
    scale = _odd_scale(d_qk)
    q, k, v = _qkv(b, sq, sk, h, hk, d_qk, d_v, dtype, "cuda")
    dout = torch.randn(b, sq, h, d_v, device="cuda", dtype=dtype)
    philox = (torch.randint(0, 2**62, ()).item(), torch.randint(2**32, 2**52, ()).item())
    kwargs = dict(causal=causal, softmax_scale=scale, dropout_p=p, philox=philox)
    out, lse = interface.forward(q, k, v, return_lse=True, out=poisoned_like(dout), **kwargs)
    grads = interface.backward(dout, q, k, v, out, lse, deterministic=deterministic, dq=poisoned_like(q),
                               dk=poisoned_like(k), dv=poisoned_like(v), **kwargs)
    mask = philox_keep_mask(*philox, interface.dropout_threshold(p), b, h, sq, sk, "cuda")
    ref, low = reference_and_low(q, k, v, dout, causal=causal, softmax_scale=scale, dropout_p=p, dropout_mask=mask)
    assert_all_close(("out", *GRADS), (out, *grads), ref, low)


@gpu
@pytest.mark.parametrize("d_qk, d_v", [(192, 128), (128, 64), (40, 24)], ids=str)
def test_deterministic_backward_is_bitwise_repeatable(d_qk, d_v, monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    q, k, v = _qkv(2, 190, 257, 4, 2, d_qk, d_v, torch.bfloat16, "cuda", grad=True)
    dout = torch.randn(2, 190, 4, d_v, device="cuda", dtype=torch.bfloat16)
    fn = lambda q, k, v: flash_attn_func(q, k, v, causal=True, deterministic=True)  # noqa: E731
    runs = [_autograd(fn, q, k, v, dout) for _ in range(3)]
    for run in runs[1:]:
        for name, a, b in zip(GRADS, run[1:], runs[0][1:]):
            assert torch.equal(a, b), f"{name} differs between deterministic runs"
    ref, low = reference_and_low(q, k, v, dout, causal=True)
    assert_all_close(("out", *GRADS), runs[0], ref, low)


@gpu
@pytest.mark.parametrize("d_qk, d_v, causal, deterministic", [(192, 128, True, False), (128, 64, False, True),
                                                              (59, 40, True, False)], ids=str)
def test_varlen_matches_each_sequence_alone(d_qk, d_v, causal, deterministic, monkeypatch):
    """flash_attn_varlen_func with v [total_k, H_k, d_v]: lengths with 0 and 1, Sq != Sk per sequence."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    lens_q, lens_k = [37, 0, 1, 200, 129], [50, 17, 0, 150, 300]
    h, hk = 4, 2
    q, k, v = (t[0] for t in _qkv(1, sum(lens_q), sum(lens_k), h, hk, d_qk, d_v, torch.bfloat16, "cuda"))
    cu_q, cu_k = _cu(lens_q, "cuda"), _cu(lens_k, "cuda")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dout = torch.randn(q.shape[0], h, d_v, device="cuda", dtype=torch.bfloat16)
    out = flashjit.flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                          deterministic=deterministic)
    out.backward(dout)
    refs, lows = [], []
    for i in range(len(lens_q)):
        rows, keys = slice(cu_q[i].item(), cu_q[i + 1].item()), slice(cu_k[i].item(), cu_k[i + 1].item())
        ref, low = reference_and_low(q[rows][None], k[keys][None], v[keys][None], dout[rows][None], causal=causal)
        refs.append(ref)
        lows.append(low)
    ref, low = ([torch.cat([r[j][0] for r in results]) for j in range(4)] for results in (refs, lows))
    assert_all_close(("out", *GRADS), (out.detach(), *(t.grad for t in leaves)), ref, low)


@gpu
def test_explicit_configs_and_the_planned_call(monkeypatch):
    """Configs with d_v passed explicitly (the sm_80 families, any arch) match the reference; the
    dispatcher's forward has v's head dim too; a repeated call (interface._Plan) allocates out
    [.., d_v]; forward_timed gives what flash_attn_func gives."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    b, sq, sk, h, hk, d_qk, d_v = 2, 190, 257, 4, 2, 128, 64
    q, k, v = _qkv(b, sq, sk, h, hk, d_qk, d_v, torch.bfloat16, "cuda")
    dout = torch.randn(b, sq, h, d_v, device="cuda", dtype=torch.bfloat16)
    fwd = flashjit.default_config("bf16", d_qk, True, sq, d_v=d_v)
    bwd = flashjit.dispatch.default_bwd_config("bf16", d_qk, True, deterministic=True, d_v=d_v)
    assert isinstance(fwd, KernelConfig) and isinstance(bwd, BwdConfig) and fwd.head_dim_v == bwd.head_dim_v == d_v
    assert interface.resolve_config(q, k, None, True, v=v).head_dim_v == d_v
    out, lse = flashjit.forward(q, k, v, config=fwd, causal=True, return_lse=True, out=poisoned_like(dout))
    grads = flashjit.backward(dout, q, k, v, out, lse, causal=True, config=bwd, dq=poisoned_like(q),
                              dk=poisoned_like(k), dv=poisoned_like(v))
    ref, low = reference_and_low(q, k, v, dout, causal=True)
    assert_all_close(("out", *GRADS), (out, *grads), ref, low)
    with pytest.raises(ValueError, match=f"head_dim_v={d_v} but v's head_dim is {d_qk}"):
        flashjit.forward(q, k, k, config=fwd, causal=True)

    first, second = (flash_attn_func(q, k, v) for _ in range(2))  # no grad: the second is planned
    plan = interface._plans[interface._plan_key(q, k, v, False, None, (-1, -1), 0.0, 0.0, False)]
    assert plan.out_shape == (b, sq, h, d_v) and torch.equal(first, second)
    timed, _ = interface.forward_timed(q, k, v)
    assert torch.equal(timed, first)

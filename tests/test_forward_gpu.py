"""Forward kernels on the GPU against an fp32 reference: every config of the build set, each knob,
odd shapes, GQA, strided views, causal with Sq != Sk. Fresh random inputs, outputs poisoned with NaN.
Tolerance: no more than twice the error of PyTorch's own low-precision math (+ a small floor)."""
import dataclasses
import math

import pytest
import torch

import flashjit
from flashjit import KernelConfig
from flashjit.reference import attention_reference

pytestmark = pytest.mark.gpu
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _inputs(batch, seqlen_q, seqlen_k, heads, heads_k, d_head, dtype):
    q = torch.randn(batch, seqlen_q, heads, d_head, device="cuda", dtype=dtype)
    k = torch.randn(batch, seqlen_k, heads_k, d_head, device="cuda", dtype=dtype)
    v = torch.randn(batch, seqlen_k, heads_k, d_head, device="cuda", dtype=dtype)
    return q, k, v


def _check(q, k, v, causal=False, config=None, softmax_scale=None):
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    out, lse = flashjit.forward(q, k, v, config=config, causal=causal, softmax_scale=softmax_scale,
                                return_lse=True, out=out)
    ref, ref_lse = attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale)
    low, _ = attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale, compute_dtype=None)
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite output elements"
    err = (out.float() - ref).abs().max().item()
    low_err = (low.float() - ref).abs().max().item()
    assert err <= 2 * low_err + 1e-3, f"max error {err:.3e} > 2 x PyTorch low-precision error {low_err:.3e}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse must be +inf exactly for rows that see no key"
    assert torch.allclose(lse[finite], ref_lse[finite], atol=2e-3, rtol=1e-4)
    return out


@pytest.mark.parametrize("config", [c for c in flashjit.get_kernels_to_build() if isinstance(c, KernelConfig)],
                         ids=lambda c: c.name)
def test_build_set(config):
    torch.manual_seed(hash(config.name) % 2**31)
    seqlen = 1 if config.B_r == 64 else 333
    q, k, v = _inputs(2, seqlen, 301, 3, 3, config.d_head, DTYPES[config.dtype])
    _check(q, k, v, causal=config.causal, config=config)


KNOBS = [
    dict(async_copy=False, eager_load_blocks=False), dict(eager_load_blocks=False), dict(swizzled=False),
    dict(B_r=64, q_frag_depth=0, k_frag_depth=2, v_frag_depth=2, mma_double_buffer_loads=False),
    dict(B_r=64, q_frag_depth=2, k_frag_depth=4, v_frag_depth=2), dict(mma_double_buffer_loads=False),
    dict(optimized_softmax=False), dict(B_r=64), dict(B_r=64, B_c=128), dict(n_warps=8),
    dict(B_c=32), dict(B_c=128, n_warps=8, k_frag_depth=2, v_frag_depth=1, mma_double_buffer_loads=False),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("knobs", KNOBS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_knobs(knobs, causal):
    config = dataclasses.replace(KernelConfig(dtype="fp16", d_head=128, causal=causal), **knobs).validate()
    q, k, v = _inputs(2, 257, 190, 4, 2, 128, torch.float16)
    _check(q, k, v, causal=causal, config=config)


ODD = [  # batch, Sq, Sk, H, H_k, D
    (1, 1, 1, 1, 1, 64), (2, 17, 17, 3, 1, 64), (1, 1000, 1000, 2, 2, 128), (2, 17, 300, 4, 2, 128),
    (1, 300, 17, 2, 1, 96), (3, 128, 128, 2, 2, 32), (1, 77, 513, 2, 2, 160), (1, 200, 129, 4, 4, 192),
    (2, 65, 1025, 2, 1, 256), (1, 1, 4097, 8, 1, 128),
]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", ODD, ids=str)
def test_odd_shapes(shape, causal, dtype):
    batch, sq, sk, h, hk, d = shape
    q, k, v = _inputs(batch, sq, sk, h, hk, d, DTYPES[dtype])
    out = _check(q, k, v, causal=causal)
    if causal and sq > sk:  # rows that see no key at all are exactly zero
        assert out[:, : sq - sk].abs().max().item() == 0


def test_packed_qkv_views_need_no_copy():
    qkv = torch.randn(2, 300, 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    _check(q, k, v, causal=True)


def test_transposed_layout_and_scale():
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _inputs(2, 130, 260, 4, 4, 64, torch.float16))
    _check(q, k, v, softmax_scale=0.3)


def test_misaligned_view_is_handled():
    base = torch.randn(2 * 100 * 2 * 64 + 4, device="cuda", dtype=torch.float16)
    q = base[4:].view(2, 100, 2, 64)  # 8-byte offset: not 16-byte aligned
    k, v = torch.randn_like(q), torch.randn_like(q)
    _check(q, k, v)


def test_forward_timed_and_stream():
    q, k, v = _inputs(1, 512, 512, 4, 4, 128, torch.bfloat16)
    out, ms = flashjit.forward_timed(q, k, v)
    assert ms > 0 and math.isfinite(ms)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out2 = flashjit.forward(q, k, v)
    stream.synchronize()
    assert torch.equal(out, out2)


def test_config_mismatch_is_rejected():
    q, k, v = _inputs(1, 16, 16, 1, 1, 64, torch.float16)
    with pytest.raises(ValueError, match="config.dtype"):
        flashjit.forward(q, k, v, config=KernelConfig(dtype="bf16", d_head=64))
    with pytest.raises(ValueError, match="config.causal"):
        flashjit.forward(q, k, v, config=KernelConfig(dtype="fp16", d_head=64), causal=True)

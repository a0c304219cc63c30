"""Forward kernels on the GPU against an fp32 reference: every config of the build set, each knob,
odd shapes, GQA, strided views, causal with Sq != Sk, the launch stream, the A100 and RTX default
configs, and the dropout mask read exactly from the output. Fresh random inputs (seeded per test by
conftest.py), outputs poisoned with NaN. Tolerance: tests/numerics.py (no more than twice the error
of PyTorch's own low-precision math, plus a floor relative to the reference's magnitude)."""
import dataclasses
import itertools
import math

import pytest
import torch

import flashjit
from flashjit import KernelConfig, interface
from flashjit.configs.common import HEAD_DIMS
from flashjit.dispatch import default_config
from flashjit.reference import philox_keep_mask
from numerics import (after_a_late_write, assert_close, assert_lse_close, captured_and_replayed, forward_keep_mask,
                      mask_mismatch, poisoned_like, reference_and_low)

pytestmark = pytest.mark.gpu
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _inputs(batch, seqlen_q, seqlen_k, heads, heads_k, d_head, dtype):
    q = torch.randn(batch, seqlen_q, heads, d_head, device="cuda", dtype=dtype)
    k = torch.randn(batch, seqlen_k, heads_k, d_head, device="cuda", dtype=dtype)
    v = torch.randn(batch, seqlen_k, heads_k, d_head, device="cuda", dtype=dtype)
    return q, k, v


def _check(q, k, v, causal=False, config=None, softmax_scale=None):
    out = poisoned_like(q)  # every element must be written
    out, lse = flashjit.forward(q, k, v, config=config, causal=causal, softmax_scale=softmax_scale,
                                return_lse=True, out=out)
    (ref, ref_lse), (low, low_lse) = reference_and_low(q, k, v, causal=causal, softmax_scale=softmax_scale)
    assert_close("out", out, ref, low)
    assert_lse_close(lse, ref_lse, low_lse)
    return out


@pytest.mark.parametrize("config", [c for c in flashjit.get_kernels_to_build() if isinstance(c, KernelConfig)],
                         ids=lambda c: c.name)
def test_build_set(config):
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


def test_forward_timed():
    q, k, v = _inputs(1, 512, 512, 4, 4, 128, torch.bfloat16)
    out, ms = flashjit.forward_timed(q, k, v)
    assert ms > 0 and math.isfinite(ms)
    (ref, _), (low, _) = reference_and_low(q, k, v)
    assert_close("out", out, ref, low)


def test_forward_runs_on_the_current_stream():
    """The kernel must run on torch's current stream: a side stream sleeps, then overwrites q, then
    forward is called under it. On the right stream the kernel reads the new q; launched on any
    other stream it runs at once, reads the old q and fails the comparison with the new one."""
    q, k, v = _inputs(2, 300, 257, 4, 2, 128, torch.bfloat16)
    new_q = torch.randn_like(q)
    flashjit.forward(q, k, v, causal=True)  # compiled and loaded: the timed part below is launch only
    out = poisoned_like(q)
    after_a_late_write(q, new_q, lambda: flashjit.forward(q, k, v, causal=True, out=out))
    (ref, _), (low, _) = reference_and_low(new_q, k, v, causal=True)
    assert_close("out (launched under a side stream)", out, ref, low)
    captured_and_replayed(lambda: flashjit.forward(q, k, v, causal=True, out=out), [out])
    assert_close("out (graph replay)", out, ref, low)


def test_config_mismatch_is_rejected():
    q, k, v = _inputs(1, 16, 16, 1, 1, 64, torch.float16)
    with pytest.raises(ValueError, match="config.dtype"):
        flashjit.forward(q, k, v, config=KernelConfig(dtype="bf16", d_head=64))
    with pytest.raises(ValueError, match="config.causal"):
        flashjit.forward(q, k, v, config=KernelConfig(dtype="fp16", d_head=64), causal=True)


# ---- the kernels A100 (sm_80: 163 KiB of shared memory per block) and RTX 30xx/40xx (sm_86/89:
# 99 KiB) users get by default, run here as explicit configs ---------------------------------------
SMEM_LIMITS = {"A100": 166912, "RTX": 101376}


def _other_gpu_configs() -> list:
    """The dispatcher's forward configs for those shared-memory limits, every head dim, causal or not,
    long and short query lengths: one entry per distinct config not already in test_build_set's
    list (bf16; the dtype is only a template flag)."""
    tested = set(flashjit.get_kernels_to_build())
    configs = {}
    for (gpu, limit), d, causal, seqlen in itertools.product(SMEM_LIMITS.items(), HEAD_DIMS, (False, True),
                                                             (4096, 1)):
        cfg = default_config("bf16", d, causal, seqlen, limit)
        if cfg not in tested:
            configs.setdefault(cfg, f"{gpu}-{cfg.name}")
    return sorted(configs.items(), key=lambda item: item[1])


@pytest.mark.parametrize("config, label", _other_gpu_configs(), ids=[label for _, label in _other_gpu_configs()])
def test_a100_and_rtx_default_configs(config, label):
    """The forward kernels A100 and RTX users get by default (never the H100's), against the reference."""
    if config.smem_bytes > interface._smem_limit(torch.cuda.current_device())[0]:
        pytest.skip(f"{config.name} needs more shared memory than this GPU has")
    for shape in ((2, 190, 257, 4, 2), (1, 17, 300, 2, 1)):
        _check(*_inputs(*shape, config.d_head, torch.bfloat16), causal=config.causal, config=config)


# ---- the dropout mask, read exactly from the kernel's output ------------------------------------
@pytest.mark.parametrize("p", [0.17, 0.333, 0.7519])  # none a multiple of 1/256
@pytest.mark.parametrize("shape, config", [
    ((2, 77, 256, 3, 3, 256), None), ((1, 300, 200, 2, 1, 128), None), ((2, 129, 64, 2, 2, 64), None),
    ((2, 150, 300, 2, 1, 128), KernelConfig("fp16", 128, B_r=64, B_c=64, dropout=True)),
    ((1, 65, 100, 3, 3, 64), KernelConfig("fp16", 64, B_r=128, B_c=32, n_warps=8, mma_double_buffer_loads=False,
                                          dropout=True)),
], ids=lambda x: x.name if isinstance(x, KernelConfig) else "default" if x is None else str(x))
def test_dropout_mask_is_philox_keep_mask_bit_for_bit(shape, config, p):
    """The forward kernel's keep mask (numerics.forward_keep_mask: q = 0 and one-hot v make each
    output element one keep bit, exactly 0 when dropped) equals reference.philox_keep_mask bit for bit
    (torch.equal), for p not a multiple of 1/256 and Philox offsets past 2**32 (whose high bits go
    into the key), over several batches and heads, GQA and several tilings; kept entries are scaled
    by exactly 1/(1 - p) for the requested p (one fp16 ulp)."""
    b, sq, sk, h, hk, d = shape
    for philox in ((torch.randint(0, 2**63 - 1, ()).item(), 2**32 * torch.randint(1, 2**31, ()).item() + 12345),
                   (torch.randint(0, 2**63 - 1, ()).item(), torch.randint(0, 2**32, ()).item())):
        got = forward_keep_mask(lambda q, k, v: flashjit.forward(q, k, v, config=config, dropout_p=p, philox=philox,
                                                                 out=poisoned_like(q)),
                                b, sq, sk, h, d, p, heads_k=hk)
        want = philox_keep_mask(*philox, interface.dropout_threshold(p), b, h, sq, sk, "cuda")
        assert torch.equal(got, want), mask_mismatch(f"forward, philox {philox}", got, want)

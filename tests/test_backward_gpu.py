"""Backward kernels on the GPU, beyond test_flash_api.py: packed, strided, transposed and misaligned
layouts of q/k/v, dout, out and the gradient outputs; the launch stream; the dropout mask read exactly
from dQ and dV; the A100 and RTX default configs; odd shapes through every kernel variant (also the
compute-sanitizer selection of scripts/sanitize.py); the deterministic dQ kernel's CTAs whose rows
see no key. Every comparison goes through tests/numerics.py (fp32 reference, 2x PyTorch's
low-precision error, relative floor); every gradient output is NaN-poisoned."""
import dataclasses
import itertools
import math

import pytest
import torch

import flashjit
from flashjit import BwdConfig, BwdSm90Config, flash_attn_kvpacked_func, flash_attn_qkvpacked_func, interface, jit
from flashjit.configs.bwd_sm90 import WGMMA_ARCH
from flashjit.configs.common import HEAD_DIMS
from flashjit.dispatch import default_bwd_config
from flashjit.reference import philox_keep_mask
from numerics import (after_a_late_write, assert_all_close, captured_and_replayed, mask_mismatch, poisoned_like,
                      reference_and_low)

pytestmark = pytest.mark.gpu
GRADS = ("dq", "dk", "dv")


def _arch() -> str:
    return jit.arch_for(torch.cuda.current_device())


def _skip_unless_buildable(config: BwdConfig | BwdSm90Config) -> None:
    if config.family.arch not in (None, _arch()):
        pytest.skip(f"the {config.family.name} backward is built for {config.family.arch} only (this GPU: {_arch()})")
    if config.smem_bytes > interface._smem_limit(torch.cuda.current_device())[0]:
        pytest.skip(f"{config.name} needs more shared memory per block than this GPU has")


def _inputs(b, sq, sk, h, hk, d, dtype=torch.bfloat16):
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    return q, k, v


def _poisoned(q, k, v, memory_format=torch.contiguous_format) -> dict:
    return dict(dq=poisoned_like(q, memory_format), dk=poisoned_like(k, memory_format),
                dv=poisoned_like(v, memory_format))


def _odd_scale(d: int) -> float:
    return 1.37 / math.sqrt(d)


def _check_backward(q, k, v, dout, config=None, deterministic=False, **kwargs):
    """forward + backward (low-level API, poisoned outputs) against the reference: out and grads."""
    out, lse = flashjit.forward(q, k, v, return_lse=True, out=poisoned_like(q), **kwargs)
    grads = flashjit.backward(dout, q, k, v, out, lse, config=config, deterministic=deterministic,
                              **_poisoned(q, k, v), **kwargs)
    ref, low = reference_and_low(q, k, v, dout, **{key: val for key, val in kwargs.items() if key != "philox"})
    assert_all_close(("out", *GRADS), (out, *grads), ref, low)
    return grads


# ---- packed and strided layouts ------------------------------------------------------------------
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("layout", ["qkvpacked", "kvpacked"])
def test_packed_autograd_matches_reference(layout, deterministic, monkeypatch):
    """flash_attn_qkvpacked_func / flash_attn_kvpacked_func (strided views of one tensor, no copy):
    output and the packed gradients against the fp32 reference, both dQ paths, GQA for kvpacked."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    d, scale = 64, _odd_scale(64)
    kwargs = dict(causal=True, softmax_scale=scale, deterministic=deterministic)
    if layout == "qkvpacked":
        qkv = torch.randn(2, 333, 3, 4, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dout = torch.randn(2, 333, 4, d, device="cuda", dtype=torch.bfloat16)
        out = flash_attn_qkvpacked_func(qkv, **kwargs)
        out.backward(dout)
        q, k, v = qkv.detach().unbind(2)
        grads = qkv.grad.unbind(2)
    else:
        q = torch.randn(2, 190, 4, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        kv = torch.randn(2, 257, 2, 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dout = torch.randn(2, 190, 4, d, device="cuda", dtype=torch.bfloat16)
        out = flash_attn_kvpacked_func(q, kv, **kwargs)
        out.backward(dout)
        grads = (q.grad, *kv.grad.unbind(2))
        q, (k, v) = q.detach(), kv.detach().unbind(2)
    ref, low = reference_and_low(q, k, v, dout, causal=True, softmax_scale=scale)
    assert_all_close(("out", *GRADS), (out.detach(), *grads), ref, low)


def _misaligned(shape, dtype=torch.bfloat16):
    """A view whose base is 8 bytes past a 16-byte boundary (the interface copies it once)."""
    base = torch.randn(math.prod(shape) + 4, device="cuda", dtype=dtype)
    return base[4:].view(shape)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("layout", ["packed", "transposed", "strided_dout_out", "dout_last_dim_strided",
                                    "misaligned"])
def test_strided_backward_matches_reference(layout, deterministic):
    """The low-level backward on non-contiguous inputs and outputs, against the fp32 reference:
    - packed: q/k/v are slices of one qkv tensor and dq/dk/dv slices of one poisoned packed gradient;
    - transposed: q/k/v, out, dout and dq/dk/dv all head-major ([B, H, S, D] memory);
    - strided_dout_out: dout every other head of a wider tensor, out in rows padded to D + 16;
    - dout_last_dim_strided: dout with a non-unit last stride (the interface copies it);
    - misaligned: q and dout 8 bytes off 16-byte alignment (copied once)."""
    b, sq, sk, h, hk, d = 2, 190, 257, 4, 2, 64
    scale = _odd_scale(d)
    kwargs = dict(causal=True, softmax_scale=scale)
    memory_format = torch.contiguous_format
    if layout == "packed":
        sq = sk = 211
        hk = h
        q, k, v = torch.randn(b, sq, 3, h, d, device="cuda", dtype=torch.bfloat16).unbind(2)
    elif layout == "transposed":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _inputs(b, sq, sk, h, hk, d))
        memory_format = torch.preserve_format
    elif layout == "misaligned":
        q, (k, v) = _misaligned((b, sq, h, d)), _inputs(b, sq, sk, h, hk, d)[1:]
    else:
        q, k, v = _inputs(b, sq, sk, h, hk, d)
    if layout == "transposed":
        dout = torch.randn(b, h, sq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    elif layout == "strided_dout_out":
        dout = torch.randn(b, sq, 2 * h, d, device="cuda", dtype=torch.bfloat16)[:, :, ::2]
    elif layout == "dout_last_dim_strided":
        dout = torch.randn(b, sq, d, h, device="cuda", dtype=torch.bfloat16).transpose(2, 3)
        assert dout.stride(-1) != 1
    elif layout == "misaligned":
        dout = _misaligned((b, sq, h, d))
    else:
        dout = torch.randn_like(q)
    out = poisoned_like(q, memory_format)
    if layout == "strided_dout_out":
        out = torch.full((b, sq, h, d + 16), float("nan"), device="cuda", dtype=torch.bfloat16)[..., :d]
    out, lse = flashjit.forward(q, k, v, return_lse=True, out=out, **kwargs)
    if layout == "packed":
        packed = torch.full((b, sq, 3, h, d), float("nan"), device="cuda", dtype=torch.bfloat16)
        outputs = dict(zip(GRADS, packed.unbind(2)))
    else:
        outputs = _poisoned(q, k, v, memory_format)
    if layout == "transposed":
        assert outputs["dq"].stride() == q.stride() and out.stride() == q.stride()
    grads = flashjit.backward(dout, q, k, v, out, lse, deterministic=deterministic, **outputs, **kwargs)
    assert all(g is outputs[name] for name, g in zip(GRADS, grads)), "backward must write into the given outputs"
    ref, low = reference_and_low(q, k, v, dout, **kwargs)
    assert_all_close(("out", *GRADS), (out, *grads), ref, low)
    if layout == "packed":
        assert not packed.isnan().any()


# ---- the launch stream ---------------------------------------------------------------------------
def test_backward_of_broadcast_inputs_and_gradient():
    """k/v broadcast over the batch by expand and a dout broadcast over the rows (the gradient of a mean
    over positions): zero strides, which a TMA map cannot address. The dispatcher's backward reads them
    another way (on sm_90a the Hopper kernel copying with cp.async instead of its TMA producer) and
    matches the reference; a TMA-fed config given explicitly is a ValueError naming the fix."""
    q = torch.randn(2, 70, 4, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 90, 2, 128, device="cuda", dtype=torch.bfloat16).expand(2, -1, -1, -1) for _ in range(2))
    dout = torch.randn(2, 1, 4, 128, device="cuda", dtype=torch.bfloat16).expand(-1, 70, -1, -1)
    _check_backward(q, k, v, dout, causal=True, softmax_scale=_odd_scale(128))
    config = default_bwd_config("bf16", 128, True, wgmma=True)
    if _arch() != WGMMA_ARCH:
        return
    assert config.tma
    out, lse = flashjit.forward(q, k, v, causal=True, return_lse=True)
    with pytest.raises(ValueError, match="cannot address .*tma=False"):
        flashjit.backward(dout, q, k, v, out, lse, causal=True, config=config)


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_runs_on_the_current_stream(deterministic):
    """Every backward kernel must run on torch's current stream: a side stream sleeps, then
    overwrites dout, then backward is called under it. On the right stream the kernels read the new
    dout; launched on another stream they run at once, read the old one and fail the comparison."""
    q, k, v = _inputs(2, 300, 257, 4, 2, 128)
    dout, new_dout = torch.randn_like(q), torch.randn_like(q)
    out, lse = flashjit.forward(q, k, v, causal=True, return_lse=True)
    flashjit.backward(dout, q, k, v, out, lse, causal=True, deterministic=deterministic)  # compiled and loaded
    grads = _poisoned(q, k, v)
    run = lambda: flashjit.backward(dout, q, k, v, out, lse, causal=True,  # noqa: E731
                                    deterministic=deterministic, **grads)
    after_a_late_write(dout, new_dout, run)
    ref, low = reference_and_low(q, k, v, new_dout, causal=True)
    assert_all_close(GRADS, tuple(grads.values()), ref[1:], low[1:])
    captured_and_replayed(run, grads.values())
    assert_all_close(GRADS, tuple(grads.values()), ref[1:], low[1:])


# ---- the dropout mask, read exactly from dQ and dV -----------------------------------------------
def _backward_keep_masks(b, sq, sk, h, d, p, philox, deterministic=False, config=None, scale=0.5):
    """The keep masks [B, H, Sq, Sk] the backward kernels used, read exactly from dQ and dV.

    Inputs: q = 0 (every score 0, so P = 1/Sk given lse = log Sk), v = all ones, out = 0 (so D = rowsum(dO o
    out) = 0), dO one-hot per query for one chunk of d queries (dO_i = e_(i - q0), 0 elsewhere), k
    one-hot per key for one chunk of d keys (k_j = e_(j - k0), 0 elsewhere). Then, Z being the mask:
    - dV_j = sum_i P_ij Z_ij dO_i / (1 - p), so dv[b, j, h, c] = Z_(q0 + c) j / (Sk (1 - p));
    - dP_ij = dO_i . v_j = 1 in the chunk, dS_ij = P_ij (Z_ij dP_ij / (1 - p) - D_i) = Z_ij / (Sk (1 - p)), and
      dQ_i = scale sum_j dS_ij k_j, so dq[b, i, h, c] = scale Z_i (k0 + c) / (Sk (1 - p));
    - dK = scale dS^T Q = 0.
    Dropped entries are masked with a bitwise AND, so they give exact zeros (sums of zeros), kept ones
    a positive value: each output element is one keep bit. One backward call per (query chunk, key
    chunk); dV is read on each query chunk's first call."""
    f16 = dict(device="cuda", dtype=torch.float16)
    q, v, out = torch.zeros(b, sq, h, d, **f16), torch.ones(b, sk, h, d, **f16), torch.zeros(b, sq, h, d, **f16)
    lse = torch.full((b, h, sq), math.log(sk), device="cuda", dtype=torch.float32)
    from_dq = torch.empty(b, h, sq, sk, dtype=torch.bool, device="cuda")
    from_dv = torch.empty_like(from_dq)
    kept = scale / (sk * (1 - p))
    for q0, k0 in itertools.product(range(0, sq, d), range(0, sk, d)):
        nq, nk = min(d, sq - q0), min(d, sk - k0)
        dout, k = torch.zeros(b, sq, h, d, **f16), torch.zeros(b, sk, h, d, **f16)
        rows, keys = torch.arange(q0, q0 + nq, device="cuda"), torch.arange(k0, k0 + nk, device="cuda")
        dout[:, rows, :, rows - q0] = 1
        k[:, keys, :, keys - k0] = 1
        dq, dk, dv = flashjit.backward(dout, q, k, v, out, lse, softmax_scale=scale, dropout_p=p, philox=philox,
                                       deterministic=deterministic, config=config, **_poisoned(q, k, v))
        assert torch.equal(dk, torch.zeros_like(dk)), "dK must be exactly 0 (q = 0)"
        dq = dq.double()
        assert torch.isfinite(dq).all(), "dq: unwritten (NaN) elements"
        outside = torch.ones(sq, dtype=torch.bool, device="cuda")
        outside[q0:q0 + nq] = False
        assert not dq[:, outside].any() and not dq[..., nk:].any(), "dq must be exactly 0 outside the chunks"
        chunk = dq[:, q0:q0 + nq, :, :nk].permute(0, 2, 1, 3)  # [B, H, nq, nk]
        assert ((chunk[chunk != 0] - kept).abs() <= 0.01 * kept).all(), "dq: kept entries off scale / (Sk (1 - p))"
        from_dq[:, :, q0:q0 + nq, k0:k0 + nk] = chunk != 0
        if k0 == 0:
            dv = dv.double()
            assert torch.isfinite(dv).all(), "dv: unwritten (NaN) elements"
            assert not dv[..., nq:].any(), "dv must be exactly 0 past the query chunk"
            chunk = dv[..., :nq].permute(0, 2, 3, 1)  # [B, Sk, H, nq] -> [B, H, nq, Sk]
            assert ((chunk[chunk != 0] - kept / scale).abs() <= 0.01 * kept / scale).all(), \
                "dv: kept entries off 1 / (Sk (1 - p))"
            from_dv[:, :, q0:q0 + nq] = chunk != 0
    return from_dq, from_dv


BWD_MASK_CASES = [  # (Sq, Sk, d, deterministic, explicit config): every kernel that applies the mask
    (300, 256, 256, True, None), (150, 100, 64, True, None), (200, 150, 128, True, None),
    (150, 100, 64, False, BwdConfig("fp16", 64, 8, 128, 1, 16, dropout=True)),
    (200, 150, 128, False, BwdConfig("fp16", 128, 8, 64, 2, 32, dropout=True)),
    (150, 100, 64, False, BwdConfig("fp16", 64, 4, 32, 1, 16, dropout=True)),
    (100, 130, 96, True, BwdConfig("fp16", 96, 4, 32, 2, 16, True, dropout=True)),
    (300, 200, 256, False, BwdConfig("fp16", 256, 8, 64, 4, 32, dropout=True)),
    (300, 100, 64, False, BwdSm90Config("fp16", 64, 128, dropout=True)),
    (200, 150, 128, False, BwdSm90Config("fp16", 128, 64, dropout=True)),
    (300, 100, 64, False, BwdSm90Config("fp16", 64, 128, dropout=True, tma=True)),
    (200, 150, 128, False, BwdSm90Config("fp16", 128, 64, dropout=True, tma=True)),
    # the wide kernel: warpgroup 0 sign-codes P^T, warpgroup 1 reads Z from the sign
    (300, 200, 256, False, BwdSm90Config("fp16", 256, 64, dropout=True, tma=True)),
    (130, 190, 192, False, BwdSm90Config("fp16", 192, 64, dropout=True, tma=True)),
]


@pytest.mark.parametrize("p", [0.17, 0.333])  # not multiples of 1/256
@pytest.mark.parametrize("sq, sk, d, deterministic, config", BWD_MASK_CASES,
                         ids=lambda x: x.name if isinstance(x, (BwdConfig, BwdSm90Config)) else str(x))
def test_backward_dropout_mask_is_philox_keep_mask_bit_for_bit(sq, sk, d, deterministic, config, p):
    """The mask each backward kernel regenerates (dK/dV kernel with keys as rows: read through dV;
    the dQ path, atomic or the deterministic kernel with queries as rows: read through dQ) equals
    reference.philox_keep_mask bit for bit (torch.equal), Philox offsets past 2**32, two batches
    and heads."""
    if config is not None:
        config = config.validate()
        _skip_unless_buildable(config)
    b, h = 2, 2
    philox = (torch.randint(0, 2**63 - 1, ()).item(), 2**32 * torch.randint(1, 2**31, ()).item() + 777)
    from_dq, from_dv = _backward_keep_masks(b, sq, sk, h, d, p, philox, deterministic, config)
    want = philox_keep_mask(*philox, interface.dropout_threshold(p), b, h, sq, sk, "cuda")
    assert torch.equal(from_dv, want), mask_mismatch("backward mask read through dV", from_dv, want)
    assert torch.equal(from_dq, want), mask_mismatch("backward mask read through dQ", from_dq, want)


# ---- the kernels A100 (163 KiB of shared memory per block) and RTX (99 KiB) users get ----------
SMEM_LIMITS = {"A100": 166912, "RTX": 101376}


def _other_gpu_configs() -> list:
    """The dispatcher's backward configs (wgmma=False) for those limits: every head dim, causal or
    not, both dQ modes; one entry per distinct config not already in test_backward_build_set's list."""
    tested = set(flashjit.get_kernels_to_build(arch=WGMMA_ARCH))
    configs = {}
    for (gpu, limit), d, causal, det in itertools.product(SMEM_LIMITS.items(), HEAD_DIMS, (False, True),
                                                          (False, True)):
        try:
            cfg = default_bwd_config("bf16", d, causal, deterministic=det, smem_limit=limit, wgmma=False)
        except ValueError:  # d_head 256 on 99 KiB: no backward fits (the dispatcher says so)
            continue
        if cfg not in tested:
            configs.setdefault(cfg, f"{gpu}-{cfg.name}")
    return sorted(configs.items(), key=lambda item: item[1])


@pytest.mark.parametrize("config, label", _other_gpu_configs(), ids=[label for _, label in _other_gpu_configs()])
def test_a100_and_rtx_default_backward_configs(config, label):
    """The backward kernels A100 and RTX users get by default, against the reference (odd lengths,
    GQA, Sq < Sk and Sq > Sk)."""
    _skip_unless_buildable(config)
    for shape in ((2, 150, 211, 4, 2), (1, 77, 40, 2, 1)):
        q, k, v = _inputs(*shape, config.d_head)
        _check_backward(q, k, v, torch.randn_like(q), config=config, causal=config.causal)


# ---- odd shapes through every kernel variant (scripts/sanitize.py runs these) --------------------
ODD = [  # (B, Sq, Sk, H, H_k, d, causal, variant); single-key problems (dq = 0 exactly): test_parity.py
    (1, 1, 3, 1, 1, 64, False, "atomic"), (2, 17, 33, 3, 1, 64, True, "deterministic"),
    (1, 33, 17, 2, 2, 96, True, "atomic"), (1, 70, 45, 2, 1, 128, False, "wgmma"),
    (1, 45, 130, 2, 2, 64, True, "wgmma"), (1, 40, 71, 2, 1, 256, True, "atomic"),
    (1, 50, 37, 2, 2, 128, False, "dropout"), (1, 37, 50, 2, 1, 160, True, "features"),
    (1, 29, 90, 2, 2, 64, False, "features"),
    # Sq >> Sk, causal: whole dQ CTAs (128 rows) see no key block
    (1, 300, 20, 2, 1, 128, True, "deterministic"), (1, 300, 20, 2, 1, 64, True, "deterministic"),
    # the wgmma kernel fed by cp.async from every thread (BwdSm90Config(tma=False)) instead of the
    # dispatcher's producer warpgroup; and every score feature but dropout on the dispatcher's
    (1, 70, 45, 2, 1, 128, False, "wgmma_cp"), (1, 45, 130, 2, 2, 64, True, "wgmma_cp"),
    (1, 300, 20, 2, 1, 64, True, "wgmma_cp"), (1, 37, 50, 2, 1, 80, True, "features_wgmma"),
    # the wide wgmma kernel (d_head 129-256, CTAs of 64 keys), explicitly: partial key and query blocks,
    # Sq >> Sk causal (rows that see no key, CTAs with no step), GQA
    (1, 70, 45, 2, 1, 256, False, "wgmma_wide"), (1, 45, 130, 2, 2, 160, True, "wgmma_wide"),
    (1, 300, 20, 2, 1, 192, True, "wgmma_wide"),
    # whole 64-key CTAs, GQA 2:1: the epilogue stores every row each warpgroup staged (racecheck's case)
    (1, 70, 128, 2, 1, 256, False, "wgmma_wide"),
]


@pytest.mark.parametrize("shape", ODD, ids=str)
def test_odd_shape_backward(shape):
    """Small odd shapes through the atomic (sm_80 kernel), deterministic and wgmma backward, dropout
    and window+softcap+ALiBi, against the reference with poisoned outputs. Small enough for
    compute-sanitizer (scripts/sanitize.py)."""
    b, sq, sk, h, hk, d, causal, variant = shape
    kwargs = dict(causal=causal, softmax_scale=_odd_scale(d))
    config = None
    if variant in ("atomic", "deterministic", "wgmma", "wgmma_cp"):
        config = default_bwd_config("bf16", d, causal, deterministic=variant == "deterministic",
                                    wgmma=variant.startswith("wgmma"))
        assert isinstance(config, BwdSm90Config) == variant.startswith("wgmma")
        assert not isinstance(config, BwdSm90Config) or config.tma, "the dispatcher's Hopper backward is TMA-fed"
        if variant == "wgmma_cp":
            config = dataclasses.replace(config, tma=False)
        _skip_unless_buildable(config)
    elif variant == "wgmma_wide":
        config = BwdSm90Config("bf16", d, 64, causal, tma=True).validate()
        _skip_unless_buildable(config)
    elif variant == "features_wgmma":  # every score feature but dropout, on the dispatcher's Hopper kernel
        kwargs.update(window_size=(20, 7), softcap=3.0, alibi_slopes=torch.rand(h, device="cuda") * 0.3)
        config = default_bwd_config("bf16", d, causal, local=True, softcap=True, alibi=True, wgmma=True)
        _skip_unless_buildable(config)
    elif variant == "dropout":
        philox = (torch.randint(0, 2**63 - 1, ()).item(), 2**32 + torch.randint(0, 2**32, ()).item())
        kwargs.update(dropout_p=0.17, philox=philox)
    else:
        kwargs.update(window_size=(20, 7), softcap=3.0, alibi_slopes=torch.rand(h, device="cuda") * 0.3)
    q, k, v = _inputs(b, sq, sk, h, hk, d)
    if variant == "dropout":
        mask = philox_keep_mask(*kwargs["philox"], interface.dropout_threshold(0.17), b, h, sq, sk, "cuda")
        out, lse = flashjit.forward(q, k, v, return_lse=True, out=poisoned_like(q), **kwargs)
        dout = torch.randn_like(q)
        grads = flashjit.backward(dout, q, k, v, out, lse, **_poisoned(q, k, v), **kwargs)
        kwargs.pop("philox")
        ref, low = reference_and_low(q, k, v, dout, dropout_mask=mask, **kwargs)
        assert_all_close(("out", *GRADS), (out, *grads), ref, low)
    else:
        _check_backward(q, k, v, torch.randn_like(q), config=config, **kwargs)


# ---- the deterministic dQ kernel: CTAs whose rows see no key -------------------------------------
@pytest.mark.parametrize("d", [64, 128])
def test_deterministic_dq_of_rows_that_see_no_key(d):
    """Causal with Sq >> Sk: most dQ CTAs see no key block, skip the loop (and its barriers) and
    store zeros through the shared-memory tile their Q copies were landing in. dQ there must be
    exactly 0, every run (a barrier weaker than the CTA's lets another group's late copy of Q overwrite
    the zeros: a race, so several runs with many such CTAs). scripts/sanitize.py's racecheck sees it
    deterministically."""
    b, sq, sk, h = 2, 2048, 64, 8
    config = default_bwd_config("bf16", d, True, deterministic=True)
    _skip_unless_buildable(config)
    q, k, v = _inputs(b, sq, sk, h, h, d)
    dout = torch.randn_like(q)
    out, lse = flashjit.forward(q, k, v, causal=True, return_lse=True)
    empty = sq - sk  # rows 0 .. Sq - Sk - 1 see no key (bottom-right aligned causal mask)
    for _ in range(5):
        dq, dk, dv = flashjit.backward(dout, q, k, v, out, lse, causal=True, config=config, **_poisoned(q, k, v))
        assert torch.equal(dq[:, :empty], torch.zeros_like(dq[:, :empty])), \
            f"dQ of rows that see no key must be exactly 0: {int((dq[:, :empty] != 0).sum())} elements are not"
    ref, low = reference_and_low(q[:, empty:], k, v, dout[:, empty:], causal=True)
    assert_all_close(GRADS, (dq[:, empty:], dk, dv), ref[1:], low[1:])


# ---- GQA: one dK/dV CTA per query head (BwdSm90Config.head_split) ---------------------------------
HEAD_SPLIT = [  # (B, Sq, Sk, H, H_k, d, causal, features)
    (2, 77, 300, 8, 2, 128, True, ""),  # keys past the last 128-key block, rows of partial blocks
    (1, 300, 77, 6, 2, 64, True, ""),  # Sq > Sk causal: rows that see no key, CTAs with no step
    (1, 130, 257, 4, 1, 80, False, "dropout"),  # d 80 in the 128 tile; the mask is the query head's
    (2, 300, 190, 4, 2, 64, True, "dropout"),  # 128-query steps through both heads; rows with no key
    (2, 65, 129, 4, 2, 64, True, "window+alibi"),  # per-head slopes: each CTA its own head's
    (1, 200, 200, 4, 4, 128, False, ""),  # no GQA: split anyway (one writer per sum) when asked
]


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("shape", HEAD_SPLIT, ids=str)
def test_gqa_head_split_matches_reference(shape, split, tma):
    """The wgmma backward with one dK/dV CTA per query head (dK, dV added to fp32 sums by bulk
    reductions, then rounded) and with one per key/value head (the group summed in registers): both
    against the fp32 reference, poisoned outputs; and the two agree within rounding. tma: both fed
    by the producer warpgroup (BwdSm90Config.tma) instead of cp.async."""
    b, sq, sk, h, hk, d, causal, features = shape
    kwargs = dict(causal=causal, softmax_scale=_odd_scale(d))
    if "window" in features:
        kwargs.update(window_size=(40, 9), alibi_slopes=torch.rand(h, device="cuda") * 0.3)
    mask = None
    if "dropout" in features:
        kwargs.update(dropout_p=0.17, philox=(torch.randint(0, 2**62, ()).item(), 12345))
        mask = philox_keep_mask(*kwargs["philox"], interface.dropout_threshold(0.17), b, h, sq, sk, "cuda")
    config = default_bwd_config("bf16", d, causal, local="window" in features, alibi="window" in features,
                                dropout="dropout" in features, wgmma=True)
    assert isinstance(config, BwdSm90Config)
    _skip_unless_buildable(config)
    q, k, v = _inputs(b, sq, sk, h, hk, d)
    dout = torch.randn_like(q)
    out, lse = flashjit.forward(q, k, v, return_lse=True, **kwargs)
    configs = [dataclasses.replace(config, head_split=mode, tma=tma) for mode in (split, not split)]
    grads = [flashjit.backward(dout, q, k, v, out, lse, config=c, **_poisoned(q, k, v), **kwargs) for c in configs]
    ref, low = reference_and_low(q, k, v, dout, dropout_mask=mask,
                                 **{key: val for key, val in kwargs.items() if key != "philox"})
    assert_all_close(GRADS, grads[0], ref[1:], low[1:])
    for name, a, c in zip(GRADS, *grads):  # fp32 sums in another order, rounded once
        torch.testing.assert_close(a.float(), c.float(), atol=2e-2, rtol=2e-2, msg=lambda m: f"{name}: {m}")


# ---- the wide wgmma backward (d_head 129-256: BwdSm90Config's kWide path, CTAs of 64 keys) --------
WIDE = [  # (B, Sq, Sk, H, H_k, d, causal, features, dtype)
    (2, 300, 300, 2, 2, 256, False, "", "bf16"),
    (1, 200, 333, 3, 1, 192, True, "", "fp16"),  # GQA 3:1, Sq < Sk causal, partial key block
    (1, 333, 130, 2, 2, 160, True, "", "bf16"),  # d 160 in the 192 tile; Sq > Sk causal: rows with no key
    (2, 129, 257, 4, 2, 256, True, "", "fp16"),  # GQA, one key past the last 64-key block
    (1, 100, 100, 2, 1, 224, False, "", "bf16"),  # d 224 in the 256 tile
    (1, 1, 70, 2, 2, 256, False, "", "bf16"),  # a single query row
    (1, 257, 190, 2, 2, 192, False, "window+alibi", "bf16"),
    (1, 150, 211, 2, 2, 256, True, "softcap", "fp16"),
    (1, 190, 150, 2, 2, 192, False, "dropout", "bf16"),
    (1, 211, 150, 4, 2, 256, True, "window+softcap+alibi+dropout", "bf16"),
]


def _wide_case(shape):
    """(config, q, k, v, kwargs, dropout mask or None) of a WIDE shape (or any (B, Sq, Sk, H, H_k, d, causal,
    features, dtype) shape: the TMA-fed kernel with 64-query steps, narrow below d 129)."""
    b, sq, sk, h, hk, d, causal, features, dtype = shape
    kwargs = dict(causal=causal, softmax_scale=_odd_scale(d))
    if "window" in features:
        kwargs.update(window_size=(60, 11))
    if "alibi" in features:
        kwargs.update(alibi_slopes=torch.rand(h, device="cuda") * 0.3)
    if "softcap" in features:
        kwargs.update(softcap=3.0)
    mask = None
    if "dropout" in features:
        kwargs.update(dropout_p=0.17, philox=(torch.randint(0, 2**62, ()).item(), 2**32 + 4321))
        mask = philox_keep_mask(*kwargs["philox"], interface.dropout_threshold(0.17), b, h, sq, sk, "cuda")
    config = BwdSm90Config(dtype, d, 64, causal, "window" in features, "softcap" in features, "alibi" in features,
                           "dropout" in features, tma=True).validate()
    _skip_unless_buildable(config)
    q, k, v = _inputs(b, sq, sk, h, hk, d, dtype=getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype]))
    return config, q, k, v, kwargs, mask


def _wide_check(config, q, k, v, kwargs, mask, head_split=False, dout=None):
    """forward, then the backward of `config` (head_split set as given) against the reference: the grads."""
    dout = torch.randn_like(q) if dout is None else dout
    out, lse = flashjit.forward(q, k, v, return_lse=True, **kwargs)
    config = dataclasses.replace(config, head_split=head_split)
    grads = flashjit.backward(dout, q, k, v, out, lse, config=config, **_poisoned(q, k, v), **kwargs)
    ref, low = reference_and_low(q, k, v, dout, dropout_mask=mask,
                                 **{key: val for key, val in kwargs.items() if key != "philox"})
    assert_all_close(GRADS, grads, ref[1:], low[1:])
    return grads


@pytest.mark.parametrize("shape", WIDE, ids=str)
def test_wide_backward_matches_reference(shape):
    """The wide wgmma backward (two consumer warpgroups splitting each step by product, P^T handed over
    in fp32, or in 16 bits in the 256 tile; dQ staged per warp in shared memory and added by bulk
    reductions) against the fp32 reference with poisoned outputs: d 160/192/224/256, bf16 and fp16, odd lengths (partial 64-key and 64-query blocks), Sq != Sk,
    causal rows that see no key, GQA, window, ALiBi, softcap and dropout (the forward's Philox mask)."""
    _wide_check(*_wide_case(shape))


# Dropout with score features in the narrow TMA kernel: its producer warps make the masks, and at its
# 64-query steps (d 65-128) dQ goes before dK with dropout too, but not with a window and ALiBi together.
NARROW_DROPOUT_FEATURES = [  # (B, Sq, Sk, H, H_k, d, causal, features, dtype)
    (1, 211, 150, 4, 2, 96, True, "window+softcap+dropout", "bf16"),  # dQ first; rows with no key
    (2, 130, 257, 4, 1, 128, False, "softcap+alibi+dropout", "fp16"),  # dQ first; keys past the last block
    (1, 150, 211, 2, 2, 80, True, "window+alibi+dropout", "bf16"),  # dK first (window and ALiBi)
]


@pytest.mark.parametrize("shape", NARROW_DROPOUT_FEATURES, ids=str)
def test_narrow_tma_dropout_with_features_matches_reference(shape):
    """The narrow TMA backward with dropout and a window, softcap or ALiBi (the dropout tests above run it
    without features) against the fp32 reference with the forward's Philox mask, poisoned outputs."""
    _wide_check(*_wide_case(shape))


@pytest.mark.parametrize("shape", [WIDE[1], WIDE[3], WIDE[9]], ids=str)
def test_wide_gqa_head_split_matches_reference(shape):
    """The wide kernel with one dK/dV CTA per query head (dK, dV staged over the Q / dO stages and added
    to fp32 sums by bulk reductions, then rounded) against the reference, and against one CTA per kv head
    within rounding."""
    case = _wide_case(shape)
    dout = torch.randn_like(case[1])
    split = _wide_check(*case, head_split=True, dout=dout)
    whole = _wide_check(*case, head_split=False, dout=dout)
    for name, a, c in zip(GRADS, split, whole):  # fp32 sums in another order, rounded once
        torch.testing.assert_close(a.float(), c.float(), atol=2e-2, rtol=2e-2, msg=lambda m: f"{name}: {m}")


def test_wide_backward_of_broadcast_inputs_falls_back():
    """Zero strides (k/v expanded over the batch) at d 256: TMA cannot address them and the wide kernel
    has no cp.async feed, so the dispatcher runs the sm_80 family; an explicit wide config is refused."""
    q = torch.randn(2, 70, 4, 256, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 90, 2, 256, device="cuda", dtype=torch.bfloat16).expand(2, -1, -1, -1) for _ in range(2))
    dout = torch.randn_like(q)
    _check_backward(q, k, v, dout, causal=True, softmax_scale=_odd_scale(256))
    if _arch() != WGMMA_ARCH:
        return
    out, lse = flashjit.forward(q, k, v, causal=True, return_lse=True)
    with pytest.raises(ValueError, match="cannot address .*config=None"):  # no tma=False twin to suggest
        flashjit.backward(dout, q, k, v, out, lse, causal=True, config=BwdSm90Config("bf16", 256, 64, True, tma=True))

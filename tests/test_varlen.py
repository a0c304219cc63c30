"""Variable-length batches (flashjit/varlen.py): flash_attn_varlen_func and its packed forms.

GPU: every sequence of a packed batch against the fp32 reference of that sequence alone (forward, lse
and gradients, tests/numerics.py's tolerance, NaN-poisoned outputs), over lengths that include 0 and 1
and Sq != Sk per sequence: causal, windows, softcap, ALiBi [H] and [B, H], learnable sinks, GQA/MQA,
head dims 32-256 and 59 (padded), fp16/bf16, both dQ paths and the wgmma backward; dropout against the
reference given the kernels' mask; bit-for-bit equality with dense per-sequence calls of the same
config; determinism; rows outside every sequence and bytes around the outputs untouched, also with
offsets that break the contract. CPU: the argument checks and the reference backend."""
import dataclasses
import itertools
import logging
import math

import pytest
import torch

from flashjit import interface
from flashjit.configs.bwd_sm90 import WGMMA_ARCH
from flashjit.dispatch import default_bwd_config, default_config
from flashjit.reference import attention_reference, philox_keep_mask
from flashjit.varlen import (flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func,
                             varlen_backward, varlen_forward)
from numerics import assert_all_close, assert_close, assert_lse_close, poisoned_like, reference_and_low

gpu = pytest.mark.gpu
GRADS = ("dq", "dk", "dv")

# (lengths of the queries, of the keys) per sequence: an empty query sequence with keys, a one-token
# query with no keys (its row sees nothing), Sq > Sk (causal rows that see no key), Sq < Sk, several
# blocks, a one-token decode-like sequence.
LENS = ([37, 0, 1, 200, 64, 129, 1], [50, 17, 0, 150, 64, 300, 33])


def _odd_scale(d: int) -> float:
    return 1.37 / math.sqrt(d)


def _cu(lens, device) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)


def _batch(lens_q, lens_k, h, hk, d, dtype=torch.bfloat16, device="cuda"):
    """q [total_q, h, d], k/v [total_k, hk, d] and the cu_seqlens / max_seqlen arguments."""
    q = torch.randn(sum(lens_q), h, d, device=device, dtype=dtype)
    k = torch.randn(sum(lens_k), hk, d, device=device, dtype=dtype)
    v = torch.randn(sum(lens_k), hk, d, device=device, dtype=dtype)
    return q, k, v, _cu(lens_q, device), _cu(lens_k, device), max(lens_q), max(lens_k)


def _spans(lens):
    starts = [0, *itertools.accumulate(lens)]
    return [slice(a, b) for a, b in zip(starts, starts[1:])]


def _per_sequence(q, k, v, dout, lens_q, lens_k, alibi_slopes=None, dropout_mask=None, learnable_sink=None, **kwargs):
    """(ref, low) in the packed layout from numerics.reference_and_low on each sequence alone: each a
    tuple (out, dq, dk, dv[, dsink]) with dout, else (out, lse [H, total_q])."""
    refs, lows = [], []
    for b, (rows, keys) in enumerate(zip(_spans(lens_q), _spans(lens_k))):
        extra = dict(kwargs)
        if alibi_slopes is not None:
            extra["alibi_slopes"] = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
        if dropout_mask is not None:
            extra["dropout_mask"] = dropout_mask[b:b + 1, :, :rows.stop - rows.start, :keys.stop - keys.start]
        if learnable_sink is not None:
            extra["learnable_sink"] = learnable_sink
        ref, low = reference_and_low(q[rows][None], k[keys][None], v[keys][None],
                                     None if dout is None else dout[rows][None], **extra)
        refs.append(ref)
        lows.append(low)

    def packed(results):
        if dout is None:
            return torch.cat([r[0][0] for r in results]), torch.cat([r[1][0] for r in results], dim=1)
        out = tuple(torch.cat([r[i][0] for r in results]) for i in range(4))
        if learnable_sink is None:
            return out
        return out + (sum(r[4] if r[4] is not None else torch.zeros_like(learnable_sink) for r in results),)
    return packed(refs), packed(lows)


def _poisoned(q, k, v) -> dict:
    return dict(dq=poisoned_like(q), dk=poisoned_like(k), dv=poisoned_like(v))


def _arch() -> str:
    from flashjit import jit
    return jit.arch_for(torch.cuda.current_device())


# ---- forward and backward against the reference, feature by feature --------------------------------
CASES = [  # (d, dtype, causal, h, hk, deterministic, features)
    (64, torch.bfloat16, False, 4, 2, False, {}),
    (64, torch.float16, True, 4, 1, False, {}),
    (64, torch.bfloat16, True, 4, 2, True, {}),
    (128, torch.bfloat16, True, 4, 2, False, {}),
    (128, torch.float16, False, 2, 2, True, dict(window_size=(40, 17))),
    (128, torch.bfloat16, True, 4, 2, False, dict(window_size=(25, -1), alibi_slopes="heads")),
    (80, torch.bfloat16, True, 4, 2, False, dict(softcap=4.0)),
    (96, torch.float16, False, 4, 4, False, dict(alibi_slopes="batch_heads")),
    (256, torch.bfloat16, False, 2, 1, False, dict(alibi_slopes="heads")),
    (256, torch.float16, True, 2, 2, True, {}),
    (59, torch.bfloat16, True, 4, 2, False, {}),
    (32, torch.float16, True, 2, 1, False, dict(window_size=(33, 5), softcap=3.0, alibi_slopes="heads")),
    (128, torch.bfloat16, False, 4, 2, False, dict(learnable_sink=True)),
    (64, torch.float16, True, 4, 2, True, dict(learnable_sink=True, window_size=(20, -1))),
]


def _features(features: dict, batch: int, h: int) -> dict:
    kwargs = dict(features)
    if kwargs.get("alibi_slopes") == "heads":
        kwargs["alibi_slopes"] = torch.rand(h, device="cuda") * 0.3
    elif kwargs.get("alibi_slopes") == "batch_heads":
        kwargs["alibi_slopes"] = torch.rand(batch, h, device="cuda") * 0.3
    if kwargs.get("learnable_sink"):
        kwargs["learnable_sink"] = torch.randn(h, device="cuda")
    return kwargs


@gpu
@pytest.mark.parametrize("d, dtype, causal, h, hk, deterministic, features", CASES, ids=str)
def test_forward_backward_match_each_sequence_alone(d, dtype, causal, h, hk, deterministic, features):
    """varlen_forward / varlen_backward (NaN-poisoned outputs) against each sequence's own fp32
    reference: out, lse [H, total_q] (+inf exactly for rows that see no key), dq, dk, dv (dk/dv of a
    sequence with no queries exactly 0) and the sink's gradient."""
    lens_q, lens_k = LENS
    q, k, v, cu_q, cu_k, max_q, max_k = _batch(lens_q, lens_k, h, hk, d, dtype)
    dout = torch.randn_like(q)
    kwargs = dict(_features(features, len(lens_q), h), causal=causal, softmax_scale=_odd_scale(d))
    out, lse = varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, out=poisoned_like(q), **kwargs)
    grads = varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, deterministic=deterministic,
                            **_poisoned(q, k, v), **kwargs)
    assert lse.shape == (h, q.shape[0]) and lse.dtype == torch.float32
    ref_kwargs = dict(kwargs, window_size=kwargs.get("window_size", (-1, -1)))
    (ref_out, ref_lse), (low_out, low_lse) = _per_sequence(q, k, v, None, lens_q, lens_k, **ref_kwargs)
    assert_close("out", out, ref_out, low_out)
    assert_lse_close(lse, ref_lse, low_lse)
    ref, low = _per_sequence(q, k, v, dout, lens_q, lens_k, **ref_kwargs)
    names = ("out", *GRADS, "dsink")[:len(ref)]
    assert_all_close(names, (out, *grads), ref, low)
    empty_q = _spans(lens_k)[lens_q.index(0)]
    assert not grads[1][empty_q].any() and not grads[2][empty_q].any(), "dk/dv of a sequence with no queries"


@gpu
@pytest.mark.parametrize("d, causal, deterministic, window", [(64, False, False, (-1, -1)),
                                                              (128, True, True, (-1, -1)),
                                                              (64, False, False, (30, 10)),
                                                              (96, True, False, (-1, -1))], ids=str)
def test_dropout_matches_reference_with_the_kernels_mask(d, causal, deterministic, window):
    """Dropout numbers (row, col, b * H + h) within each sequence: the reference given
    philox_keep_mask of a dense [B, H, max_seqlen_q, max_seqlen_k] call, sliced per sequence, matches
    forward and gradients (the atomic, deterministic and wgmma backward)."""
    lens_q, lens_k = LENS
    h, hk, p = 4, 2, 0.17
    q, k, v, cu_q, cu_k, max_q, max_k = _batch(lens_q, lens_k, h, hk, d)
    dout = torch.randn_like(q)
    philox = (torch.randint(0, 2**62, ()).item(), torch.randint(2**32, 2**52, ()).item())
    kwargs = dict(causal=causal, softmax_scale=_odd_scale(d), window_size=window, dropout_p=p)
    out, lse = varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, philox=philox, out=poisoned_like(q), **kwargs)
    grads = varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, philox=philox,
                            deterministic=deterministic, **_poisoned(q, k, v), **kwargs)
    mask = philox_keep_mask(*philox, interface.dropout_threshold(p), len(lens_q), h, max_q, max_k, "cuda")
    ref, low = _per_sequence(q, k, v, dout, lens_q, lens_k, dropout_mask=mask, **kwargs)
    assert_all_close(("out", *GRADS), (out, *grads), ref, low)


@gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_flash_attn_varlen_func_autograd(deterministic, monkeypatch):
    """The public function with autograd (GQA, causal, ALiBi [B, H], a sink with its gradient): out and
    return_attn_probs' softmax_lse [H, total_q] (S_dmask empty without dropout, as flash-attn's) and the
    gradients of q, k, v and the sink against the reference; with dropout, S_dmask [B, H, max_q, max_k]
    holds each sequence's probabilities (negated where dropped), zero past it."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    lens_q, lens_k = LENS
    h, hk, d = 4, 2, 64
    q, k, v, cu_q, cu_k, max_q, max_k = _batch(lens_q, lens_k, h, hk, d)
    slopes = torch.rand(len(lens_q), h, device="cuda") * 0.3
    sink = torch.randn(h, device="cuda", requires_grad=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dout = torch.randn_like(q)
    out, lse, probs = flash_attn_varlen_func(*leaves, cu_q, cu_k, max_q, max_k, causal=True, alibi_slopes=slopes,
                                             deterministic=deterministic, return_attn_probs=True,
                                             learnable_sink=sink)
    out.backward(dout)
    assert lse.shape == (h, q.shape[0]) and probs.numel() == 0 and probs.dtype == q.dtype
    ref, low = _per_sequence(q, k, v, dout, lens_q, lens_k, causal=True, alibi_slopes=slopes, learnable_sink=sink)
    assert_all_close(("out", *GRADS, "dsink"), (out, *(t.grad for t in leaves), sink.grad), ref, low)
    (_, ref_lse), (_, low_lse) = _per_sequence(q, k, v, None, lens_q, lens_k, causal=True, alibi_slopes=slopes,
                                               learnable_sink=sink)
    assert_lse_close(lse, ref_lse, low_lse)
    _, _, probs = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.25, causal=True,
                                         alibi_slopes=slopes, return_attn_probs=True, learnable_sink=sink)
    assert probs.shape == (len(lens_q), h, max_q, max_k) and (probs < 0).any()
    for b, (rows, keys) in enumerate(zip(_spans(lens_q), _spans(lens_k))):
        sq, sk = rows.stop - rows.start, keys.stop - keys.start
        _, _, want = attention_reference(q[rows][None], k[keys][None], v[keys][None], causal=True,
                                         alibi_slopes=slopes[b], return_probs=True, learnable_sink=sink)
        torch.testing.assert_close(probs[b, :, :sq, :sk].abs(), want[0].to(probs.dtype), atol=2e-3, rtol=0)
        assert not probs[b, :, sq:].any() and not probs[b, :, :, sk:].any(), "S_dmask is zero past each sequence"


@gpu
@pytest.mark.parametrize("layout", ["qkvpacked", "kvpacked"])
def test_packed_forms_equal_the_unpacked_call(layout, monkeypatch):
    """flash_attn_varlen_qkvpacked_func / _kvpacked_func (strided views, no copy) give the unpacked
    call's out and gradients bit for bit (deterministic backward)."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    lens = [33, 1, 0, 190, 64]
    h, d = 4, 64
    cu = _cu(lens, "cuda")
    if layout == "qkvpacked":
        packed = torch.randn(sum(lens), 3, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = flash_attn_varlen_qkvpacked_func(packed, cu, max(lens), causal=True, deterministic=True)
        q, k, v = (t.detach().clone().requires_grad_() for t in packed.unbind(1))
        cu_q = cu_k = cu
        max_q = max_k = max(lens)
    else:
        lens_k = [50, 7, 3, 100, 64]
        q = torch.randn(sum(lens), h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        packed = torch.randn(sum(lens_k), 2, 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cu_q, cu_k, max_q, max_k = cu, _cu(lens_k, "cuda"), max(lens), max(lens_k)
        out = flash_attn_varlen_kvpacked_func(q, packed, cu_q, cu_k, max_q, max_k, causal=True, deterministic=True)
        k, v = (t.detach().clone().requires_grad_() for t in packed.unbind(1))
        q = q.detach().clone().requires_grad_()
    dout = torch.randn_like(out)
    out.backward(dout)
    unpacked = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, deterministic=True)
    unpacked.backward(dout)
    assert torch.equal(out, unpacked)
    grads = torch.stack([q.grad, k.grad, v.grad], 1) if layout == "qkvpacked" else torch.stack([k.grad, v.grad], 1)
    assert torch.equal(packed.grad, grads)


# ---- the same kernels as dense calls --------------------------------------------------------------
# The forward kernels a varlen batch can run: the sm_80 family (every arch), the Hopper family's default
# and its other tile walk (persistent or one CTA per tile; sm_90a only).
FORWARD_FAMILIES = ["sm80", "sm90", "sm90-other-walk"]


def _forward_config(family: str, d: int, causal: bool, max_q: int, mods) -> object:
    if family == "sm80":
        return default_config("bf16", d, causal, max_q, 160 * 1024, *mods.flags)
    if _arch() != WGMMA_ARCH:
        pytest.skip("the Hopper forward runs on sm_90a")
    # (the dispatcher gives a short query block the sm_80 kernel; these tests want the Hopper one)
    config = default_config("bf16", d, causal, max(max_q, 128), 227 * 1024, *mods.flags, arch=WGMMA_ARCH)
    if family == "sm90-no-overlap":  # (cross_tile and half blocks live in the overlapped loop: they go too)
        return dataclasses.replace(config, overlap=False, pingpong=False, cross_tile=False, half_blocks=False)
    if family == "sm90":
        return config
    return config.one_cta_per_tile() if config.persistent else dataclasses.replace(config, persistent=True)


@gpu
@pytest.mark.parametrize("family", FORWARD_FAMILIES)
@pytest.mark.parametrize("d, causal, features", [(128, True, {}), (64, False, dict(window_size=(30, 5))),
                                                 (96, True, dict(alibi_slopes="batch_heads", softcap=2.0))], ids=str)
def test_equal_bit_for_bit_to_dense_calls_of_each_sequence(d, causal, features, family):
    """With one explicit config, a varlen batch computes exactly what a dense call on each sequence
    alone computes: out, lse, and (deterministic backward; and the wgmma kernel's dk, dv) gradients."""
    lens_q, lens_k = LENS
    h, hk = 4, 2
    q, k, v, cu_q, cu_k, max_q, max_k = _batch(lens_q, lens_k, h, hk, d)
    dout = torch.randn_like(q)
    kwargs = dict(_features(features, len(lens_q), h), causal=causal, softmax_scale=_odd_scale(d))
    slopes = kwargs.pop("alibi_slopes", None)
    mods = interface.score_mods(q[None], causal, kwargs.get("window_size", (-1, -1)), kwargs.get("softcap", 0.0),
                                None if slopes is None else slopes[0])
    fwd = _forward_config(family, d, causal, max_q, mods)
    bwd_configs = [default_bwd_config("bf16", d, causal, *mods.flags, deterministic=True)]
    if _arch() == WGMMA_ARCH and d in (64, 128) and family == "sm80":
        bwd_configs.append(default_bwd_config("bf16", d, causal, *mods.flags, wgmma=True))
    out, lse = varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, config=fwd, alibi_slopes=slopes, **kwargs)
    for config in bwd_configs:
        grads = varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, config=config,
                                alibi_slopes=slopes, **kwargs)
        for b, (rows, keys) in enumerate(zip(_spans(lens_q), _spans(lens_k))):
            one = dict(kwargs, alibi_slopes=None if slopes is None else slopes[b])
            qb, kb, vb = q[rows][None], k[keys][None], v[keys][None]
            out_b, lse_b = interface.forward(qb, kb, vb, config=fwd, return_lse=True, **one)
            assert torch.equal(out[rows], out_b[0]), f"out of sequence {b}"
            assert torch.equal(lse[:, rows], lse_b[0]), f"lse of sequence {b}"
            dq_b, dk_b, dv_b = interface.backward(dout[rows][None], qb, kb, vb, out_b, lse_b, config=config, **one)
            assert torch.equal(grads[1][keys], dk_b[0]) and torch.equal(grads[2][keys], dv_b[0]), \
                f"dk/dv of sequence {b} ({config.name})"
            if config.deterministic:
                assert torch.equal(grads[0][rows], dq_b[0]), f"dq of sequence {b} ({config.name})"


@gpu
def test_deterministic_backward_is_bit_identical_run_to_run():
    lens_q, lens_k = [300, 5, 129, 0, 77], [310, 200, 129, 40, 1]
    q, k, v, cu_q, cu_k, max_q, max_k = _batch(lens_q, lens_k, 8, 2, 128)
    dout = torch.randn_like(q)
    out, lse = varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
    first = varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal=True, deterministic=True)
    for _ in range(3):
        again = varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal=True, deterministic=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


# ---- bounds: rows outside every sequence, offsets that break the contract -----------------------------
def _guarded(like: torch.Tensor, guard: int = 64):
    """A NaN-filled buffer with `guard` rows before and after a view shaped like `like`."""
    buf = torch.full((like.shape[0] + 2 * guard, *like.shape[1:]), float("nan"), dtype=like.dtype, device=like.device)
    return buf, buf[guard:guard + like.shape[0]]


@gpu
@pytest.mark.parametrize("family", FORWARD_FAMILIES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_rows_outside_the_sequences_and_around_the_outputs_are_untouched(deterministic, family):
    """cu_seqlens ending before the tensors' last rows (as flash-attn allows) and max_seqlen larger
    than any sequence: the rows past the last sequence stay as they were (NaN; dq's are 0 on the atomic
    path, whose conversion walks every row), and so do guard rows around every output; the sequences'
    own rows match the reference. 130 query rows: the Hopper forward's last tile of that sequence ends
    past it, where the next rows are outside every sequence."""
    lens_q, lens_k = [40, 0, 130], [70, 20, 129]
    h, hk, d = 4, 2, 128
    q, k, v, _, _, _, _ = _batch(lens_q + [25], lens_k + [9], h, hk, d)
    cu_q, cu_k = _cu(lens_q, "cuda"), _cu(lens_k, "cuda")  # the last 25 query / 9 key rows are in no sequence
    dout = torch.randn_like(q)
    bufs = [_guarded(t) for t in (q, q, k, v)]
    config = _forward_config(family, d, True, 1000, interface.score_mods(q[None], True, (-1, -1), 0.0, None))
    out, lse = varlen_forward(q, k, v, cu_q, cu_k, 1000, 1000, causal=True, out=bufs[0][1], config=config)
    varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 1000, 1000, causal=True, deterministic=deterministic,
                    dq=bufs[1][1], dk=bufs[2][1], dv=bufs[3][1])
    n_q, n_k = sum(lens_q), sum(lens_k)
    for (buf, view), n, name in zip(bufs, (n_q, n_q, n_k, n_k), ("out", "dq", "dk", "dv")):
        assert buf[:64].isnan().all() and buf[64 + view.shape[0]:].isnan().all(), f"{name}: guard rows written"
        if name == "dq" and not deterministic:  # the atomic path converts every row of its zeroed fp32 sums
            assert not view[n:].any(), "dq: rows outside every sequence are 0 on the atomic path"
        else:
            assert view[n:].isnan().all(), f"{name}: rows outside every sequence written"
        assert not view[:n].isnan().any(), f"{name}: rows of the sequences left unwritten"
    ref, low = _per_sequence(q[:n_q], k[:n_k], v[:n_k], dout[:n_q], lens_q, lens_k, causal=True)
    assert_all_close(("out", *GRADS), (out[:n_q], bufs[1][1][:n_q], bufs[2][1][:n_k], bufs[3][1][:n_k]), ref, low)


@gpu
@pytest.mark.parametrize("family", [*FORWARD_FAMILIES, "sm90-no-overlap"])
@pytest.mark.parametrize("d, causal, softcap", [(64, True, 0.0), (128, False, 0.0), (256, True, 5.0)])
def test_non_finite_keys_of_other_sequences_do_not_leak(d, causal, softcap, family):
    """A sequence's last key block reads past its keys (a tile is whole blocks): into the next
    sequence's rows and rows in no sequence. Those hold NaN / inf here (an uninitialised tail; another
    sequence's overflow): every sequence's output must still be its own, finite, as flash-attn's."""
    lens_q, lens_k = [77, 130, 5], [70, 129, 33]
    h, hk = 4, 2
    q, k, v, _, _, _, _ = _batch(lens_q, lens_k + [40], h, hk, d)
    cu_q, cu_k = _cu(lens_q, "cuda"), _cu(lens_k, "cuda")  # the last 40 key rows are in no sequence
    n_k = sum(lens_k)
    k[n_k:], v[n_k:] = float("nan"), float("nan")
    k[n_k - 5:n_k], v[n_k - 5:n_k] = float("inf"), float("-inf")  # the last sequence's last keys
    cut = slice(0, len(lens_q) - 1)  # the sequences whose keys are all finite
    config = _forward_config(family, d, causal, max(lens_q),
                             interface.score_mods(q[None], causal, (-1, -1), softcap, None))
    out, lse = varlen_forward(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, softcap=softcap,
                              config=config)
    n_q = sum(lens_q[cut])
    assert out[:n_q].isfinite().all(), "another sequence's NaN/inf leaked into out"
    (ref, ref_lse), (low, low_lse) = _per_sequence(q[:n_q], k[:sum(lens_k[cut])], v[:sum(lens_k[cut])], None,
                                                   lens_q[cut], lens_k[cut], causal=causal, softcap=softcap)
    assert_close("out", out[:n_q], ref, low)
    # lse is +inf exactly on rows that see no key (causal with more queries than keys), as flash-attn's
    assert_lse_close(lse[:, :n_q], ref_lse, low_lse)


@gpu
@pytest.mark.parametrize("family", FORWARD_FAMILIES)
@pytest.mark.parametrize("offsets_q, offsets_k", [([0, 50, 20, 10**6], [0, 5, 2**31 - 1, -7]),
                                                  ([-100, 3, 2, 1], [0, 0, 0, 10**9])], ids=str)
def test_offsets_that_break_the_contract_stay_in_bounds(offsets_q, offsets_k, family):
    """cu_seqlens that are not monotonic or leave the tensors (not checked on the host: that needs a
    device sync) give wrong sequences but no access outside q, k, v and the outputs: the kernels clamp
    every offset. Guard rows around each output stay NaN and the device stays usable."""
    h, d = 4, 64
    q = torch.randn(60, h, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(40, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu_q, cu_k = (torch.tensor(o, dtype=torch.int32, device="cuda") for o in (offsets_q, offsets_k))
    bufs = [_guarded(t) for t in (q, q, k, v)]
    config = _forward_config(family, d, True, 60, interface.score_mods(q[None], True, (-1, -1), 0.0, None))
    for det in (False, True):
        out, lse = varlen_forward(q, k, v, cu_q, cu_k, 60, 40, causal=True, out=bufs[0][1], config=config)
        varlen_backward(torch.randn_like(q), q, k, v, out, lse, cu_q, cu_k, 60, 40, causal=True, deterministic=det,
                        dq=bufs[1][1], dk=bufs[2][1], dv=bufs[3][1])
        torch.cuda.synchronize()
    for (buf, view), name in zip(bufs, ("out", "dq", "dk", "dv")):
        assert buf[:64].isnan().all() and buf[64 + view.shape[0]:].isnan().all(), f"{name}: guard rows written"
    lens = [20, 0, 17]  # and a valid call afterwards is right
    q, k, v, cu_q, cu_k, max_q, max_k = _batch(lens, lens, h, h, d)
    out, _ = varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k)
    (ref, _), (low, _) = _per_sequence(q, k, v, None, lens, lens)
    assert_close("out", out, ref, low)


# ---- dispatch and device-side argument checks -----------------------------------------------------------
@gpu
def test_forward_dispatch_names_the_kernel_and_falls_back_where_tma_cannot_address(caplog):
    """The dispatcher picks the dense call's family for the arch (the Hopper one on sm_90a) and logs it;
    k broadcast with expand (a zero stride TMA cannot describe) runs the sm_80 family, and an explicit
    Hopper config is then refused, naming the fix."""
    from flashjit import FwdSm90Config
    lens = [100, 3]
    q, k, v, cu_q, cu_k, max_q, max_k = _batch(lens, lens, 2, 2, 128)
    with caplog.at_level(logging.DEBUG, logger="flashjit"):
        out, _ = varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k)
    lines = [r.getMessage() for r in caplog.records if "varlen forward" in r.getMessage()]
    hopper = _arch() == WGMMA_ARCH
    assert lines and ("fwd_sm90_bf16_d128" if hopper else "fwd_bf16_d128") in lines[-1]
    k1, v1 = k[:, :1].expand(-1, 2, -1), v[:, :1].expand(-1, 2, -1)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="flashjit"):
        broadcast, _ = varlen_forward(q, k1, v1, cu_q, cu_k, max_q, max_k)
    assert torch.equal(broadcast, varlen_forward(q, k1.contiguous(), v1.contiguous(), cu_q, cu_k, max_q, max_k,
                                                 config=default_config("bf16", 128, False, max_q, 160 * 1024))[0])
    if hopper:
        assert any("TMA cannot address" in r.getMessage() for r in caplog.records)
        with pytest.raises(ValueError, match="TMA"):
            varlen_forward(q, k1, v1, cu_q, cu_k, max_q, max_k, config=FwdSm90Config("bf16", 128))


@gpu
def test_device_checks_name_the_argument():
    lens = [10, 20]
    q, k, v, cu_q, cu_k, max_q, max_k = _batch(lens, lens, 2, 2, 64)
    with pytest.raises(ValueError, match="cu_seqlens_k must be on q's device"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k.cpu(), max_q, max_k)
    with pytest.raises(ValueError, match="lse must be the forward's"):
        varlen_backward(q, q, k, v, q, torch.zeros(2, 3, device="cuda"), cu_q, cu_k, max_q, max_k)


# ---- CPU: argument errors and the reference backend -----------------------------------------------------
def _cpu_batch(lens_q=(3, 0, 5), lens_k=(4, 2, 5), h=2, hk=1, d=8, dtype=torch.float64):
    return _batch(list(lens_q), list(lens_k), h, hk, d, dtype, device="cpu")


@pytest.mark.parametrize("change, error, match", [
    (dict(cu_seqlens_q="int64"), ValueError, "cu_seqlens_q must have dtype torch.int32"),
    (dict(cu_seqlens_k="2d"), ValueError, "cu_seqlens_k must be 1-D"),
    (dict(cu_seqlens_k="short"), ValueError, "batch \\+ 1 entries"),
    (dict(cu_seqlens_q="list"), TypeError, "cu_seqlens_q must be a torch.Tensor"),
    (dict(max_seqlen_q="tensor2"), TypeError, "max_seqlen_q must be an int or a one-element integer tensor"),  # 1 element: taken
    (dict(max_seqlen_k=2.5), TypeError, "max_seqlen_k must be a Python int"),
    (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be >= 0"),
    (dict(max_seqlen_q=0), ValueError, "max_seqlen_q is 0 but q has 8 rows"),
    (dict(q="4d"), ValueError, "q must have 3 dims \\[total_q, heads, head_dim\\].*flash_attn_func"),
    (dict(v="short"), ValueError, "k and v must have the same shape"),
    (dict(k="heads3", v="heads3"), ValueError, "divisible by the number of key/value heads"),
    (dict(q="int"), ValueError, "q must be float16, bfloat16, float32 or float64"),
    (dict(alibi_slopes="wrong"), ValueError, "alibi_slopes must be a float32 tensor of shape \\(2,\\) or \\(3, 2\\)"),
    (dict(cu_seqlens_q="decreasing"), ValueError, "cu_seqlens_q must be non-decreasing from 0 to 8"),
    (dict(cu_seqlens_k="total"), ValueError, "cu_seqlens_k must be non-decreasing from 0 to 11"),
    (dict(max_seqlen_k=3), ValueError, "max_seqlen_k=3 is less than the longest sequence"),
    (dict(block_table="given"), ValueError, "with block_table, k must be a tensor of 4 dims"),  # packed k, not pages
    (dict(dropout_p=1.5), ValueError, "dropout_p"),
], ids=str)
def test_argument_errors_name_the_argument(change, error, match, monkeypatch):
    """Every check runs before anything is launched and names the argument (the reference backend runs
    the kernels' checks on CPU, plus those of the offsets' values, which it reads on the host)."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    q, k, v, cu_q, cu_k, max_q, max_k = _cpu_batch()
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)
    variants = {"int64": lambda t: t.long(), "2d": lambda t: t[None], "short": lambda t: t[:-1],
                "list": lambda t: t.tolist(), "tensor2": lambda t: torch.tensor([t, t]), "4d": lambda t: t[None],
                "heads3": lambda t: t.expand(-1, 3, -1), "int": lambda t: t.long(),
                "decreasing": lambda t: torch.tensor([0, 5, 3, 8], dtype=torch.int32),
                "total": lambda t: torch.tensor([0, 4, 6, 12], dtype=torch.int32)}
    kwargs = {}
    for name, how in change.items():
        if name in args:
            args[name] = variants[how](args[name]) if isinstance(how, str) else how
        elif name == "alibi_slopes":
            kwargs[name] = torch.ones(4, dtype=torch.float32)
        elif name == "block_table":
            kwargs[name] = torch.zeros(3, 1, dtype=torch.int32)
        else:
            kwargs[name] = how
    with pytest.raises(error, match=match):
        flash_attn_varlen_func(*args.values(), **kwargs)


def test_jit_backend_on_cpu_names_the_switch(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    q, k, v, cu_q, cu_k, max_q, max_k = _cpu_batch(dtype=torch.float16)
    with pytest.raises(ValueError, match="FLASHJIT_BACKEND=reference"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)
    k_cache, v_cache = (t[:, None].expand(-1, 16, -1, -1) for t in (k, v))  # pages of 16 rows
    with pytest.raises(ValueError, match="FLASHJIT_BACKEND=reference"):
        flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max_q, max_k,
                               block_table=torch.zeros(len(cu_q) - 1, 1, dtype=torch.int32))


@pytest.mark.parametrize("kwargs", [dict(causal=True), dict(window_size=(2, 1), softcap=1.5),
                                    dict(causal=True, alibi_slopes="batch_heads"), dict(learnable_sink=True)], ids=str)
def test_reference_backend_is_the_dense_reference_per_sequence(kwargs, monkeypatch):
    """FLASHJIT_BACKEND=reference on CPU (float64): out, softmax_lse [H, total_q] and S_dmask [B, H,
    max_q, max_k] of each sequence are those of attention_reference on it alone; gradients flow to q,
    k, v (and the sink) through the packed tensors; the packed forms agree."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    lens_q, lens_k = [3, 0, 5, 1], [4, 2, 5, 0]
    h, hk, d = 2, 1, 8
    q, k, v, cu_q, cu_k, max_q, max_k = _batch(lens_q, lens_k, h, hk, d, torch.float64, device="cpu")
    kwargs = dict(kwargs)
    if kwargs.get("alibi_slopes") == "batch_heads":
        kwargs["alibi_slopes"] = torch.rand(len(lens_q), h, dtype=torch.float32)
    if kwargs.get("learnable_sink"):
        kwargs["learnable_sink"] = torch.randn(h, dtype=torch.float64, requires_grad=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse, empty = flash_attn_varlen_func(*leaves, cu_q, cu_k, max_q, max_k, return_attn_probs=True, **kwargs)
    assert out.shape == q.shape and lse.shape == (h, q.shape[0]) and empty.numel() == 0  # no dropout: as flash-attn
    with torch.no_grad():
        _, _, probs = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.5, return_attn_probs=True,
                                             **kwargs)
    assert probs.shape == (4, h, max_q, max_k) and (probs < 0).any()
    out.sum().backward()
    for b, (rows, keys) in enumerate(zip(_spans(lens_q), _spans(lens_k))):
        one = dict(kwargs, window_size=kwargs.get("window_size", (-1, -1)))
        if one.get("alibi_slopes") is not None:
            one["alibi_slopes"] = one["alibi_slopes"][b]
        o, l, p = attention_reference(q[rows][None], k[keys][None], v[keys][None], compute_dtype=torch.float64,
                                      return_probs=True, **one)
        torch.testing.assert_close(out[rows], o[0])
        torch.testing.assert_close(lse[:, rows], l[0])
        torch.testing.assert_close(probs[b, :, :rows.stop - rows.start, :keys.stop - keys.start].abs(), p[0])
        assert not probs[b, :, rows.stop - rows.start:].any() and not probs[b, :, :, keys.stop - keys.start:].any()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    assert not leaves[1].grad[_spans(lens_k)[1]].any(), "keys of a sequence with no queries get no gradient"
    if kwargs.get("learnable_sink") is not None:
        assert kwargs["learnable_sink"].grad is not None
    if hk == 1 and kwargs.get("learnable_sink") is None:
        kv = torch.stack([k, v], 1)
        torch.testing.assert_close(flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max_q, max_k, **kwargs), out)


def test_reference_backend_gradients_are_exact(monkeypatch):
    """Autograd through the per-sequence reference agrees with finite differences (float64)."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    q, k, v, cu_q, cu_k, max_q, max_k = _batch([3, 0, 2], [2, 3, 4], 2, 2, 4, torch.float64, device="cpu")
    leaves = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True), leaves)


def test_qkvpacked_reference_shape_check(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    with pytest.raises(ValueError, match="qkv must have shape \\[total, 3, heads, head_dim\\]"):
        flash_attn_varlen_qkvpacked_func(torch.zeros(4, 2, 2, 8), _cu([4], "cpu"), 4)
    with pytest.raises(ValueError, match="kv must have shape \\[total_k, 2, heads_k, head_dim\\]"):
        flash_attn_varlen_kvpacked_func(torch.zeros(4, 2, 8), torch.zeros(4, 3, 2, 8), _cu([4], "cpu"),
                                        _cu([4], "cpu"), 4, 4)


def test_params_structs_end_with_the_varlen_fields():
    """flashjit/launch.py mirrors kernels/common/params.cuh: VarlenParams after the sizes and score
    values in both structs (a dense caller's positional construction leaves it null), two pointers and
    two int32 (24 bytes); the forward's followed only by CacheParams and the tile walk, the backward's by
    dkv_accum."""
    from flashjit.launch import BwdParams, FwdParams

    for struct in (FwdParams, BwdParams):
        names = [name for name, _ in struct._fields_]
        end = names.index("total_k") + 1
        assert names[end - 4:end] == ["cu_seqlens_q", "cu_seqlens_k", "total_q", "total_k"]
        assert names[end:] == (["dkv_accum"] if struct is BwdParams
                               else [n for n, _ in __import__("flashjit.launch").launch._CACHE] + ["tile_walk", "tile_walk_grid"])
        assert struct.cu_seqlens_q.offset == struct.sink.offset + 8
        assert struct.total_k.offset + 4 == struct.cu_seqlens_q.offset + 24
    assert BwdParams.dkv_accum.offset == BwdParams.total_k.offset + 4  # VarlenParams is 24 bytes: no padding
    assert __import__("ctypes").sizeof(BwdParams) == BwdParams.dkv_accum.offset + 8
    assert not BwdParams().dkv_accum, "a positional construction leaves dkv_accum null"
    assert not FwdParams().cu_seqlens_q, "a dense call leaves the varlen fields null"


@pytest.mark.compile
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_varlen_default_kernels_compile_with_the_params_struct(arch):
    """What a varlen call dispatches to (the forward and backward the dense dispatcher picks: the Hopper
    families on sm_90a) builds, and its library's params struct is launch.py's size (the
    CompiledKernel load checks it)."""
    from flashjit import jit
    from flashjit.launch import CompiledKernel

    fwd = default_config("bf16", 128, True, 1000, 227 * 1024, arch=arch)
    bwd = default_bwd_config("bf16", 128, True, wgmma=arch == WGMMA_ARCH)
    for config in (fwd, bwd):
        assert config.family.arch in (None, arch)
        CompiledKernel(jit.ensure_built(config, arch), config)


@gpu
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("d, causal", [(64, True), (128, False)])
def test_gqa_head_split_of_a_varlen_batch(d, causal, split, tma):
    """varlen_backward on the wgmma kernel with one dK/dV CTA per query head (fp32 sums over k's
    packed rows, a sequence with no keys and one with no queries) and with one per key/value head,
    against each sequence's own fp32 reference; fed by cp.async or by the producer warpgroup (tma:
    its maps over the packed rows, a tile's rows past its sequence the next one's)."""
    from flashjit import BwdSm90Config, jit
    from flashjit.dispatch import default_bwd_config

    config = default_bwd_config("bf16", d, causal, wgmma=True)
    if jit.arch_for(torch.cuda.current_device()) != "sm_90a" or not isinstance(config, BwdSm90Config):
        pytest.skip("head_split is the wgmma backward's (sm_90a)")
    config = dataclasses.replace(config, head_split=split, tma=tma)
    lens_q, lens_k = LENS
    q, k, v, cu_q, cu_k, max_q, max_k = _batch(lens_q, lens_k, 6, 2, d)
    dout = torch.randn_like(q)
    kwargs = dict(causal=causal, softmax_scale=_odd_scale(d))
    out, lse = varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    grads = varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, config=config, **_poisoned(q, k, v),
                            **kwargs)
    ref, low = _per_sequence(q, k, v, dout, lens_q, lens_k, window_size=(-1, -1), **kwargs)
    assert_all_close(("out", *GRADS), (out, *grads), ref, low)


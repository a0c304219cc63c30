"""PyTorch reference attention: the ground truth for tests and the FLASHJIT_BACKEND=reference path.

Runs on any device. Same layout as the kernels: q [B, Sq, H, D], k [B, Sk, H_k, D], v [B, Sk, H_k, D_v]
(D_v may differ from D, as in MLA; callers check shapes with interface.check_qkv(..., reference=True)).
"""
from __future__ import annotations

import math

import torch
from einops import repeat


def visible_mask(seqlen_q: int, seqlen_k: int, device, causal: bool = False,
                 window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """[Sq, Sk] bool, True where key j is visible to query i. With d = Sk - Sq (flash-attn's
    bottom-right alignment): causal keeps j <= i + d; a window (left, right) keeps
    i + d - left <= j <= i + d + right, -1 meaning unbounded on that side."""
    rows = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    cols = torch.arange(seqlen_k, device=device)[None, :]
    left, right = window_size
    if causal:
        right = 0
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        visible &= cols <= rows + right
    if left >= 0:
        visible &= cols >= rows - left
    return visible


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                        softmax_scale: float | None = None, compute_dtype: torch.dtype | None = torch.float32,
                        window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                        alibi_slopes: torch.Tensor | None = None, dropout_p: float = 0.0,
                        dropout_mask: torch.Tensor | None = None, return_probs: bool = False,
                        learnable_sink: torch.Tensor | None = None):
    """(out [B, Sq, H, D_v] in `compute_dtype`, lse [B, H, Sq] fp32), computed in `compute_dtype` (None: q's
    own dtype, which is what "PyTorch's low-precision math" means in the tests' tolerance rule).
    Rows that see no key at all get out = 0 and lse = +inf, as the kernels produce.

    scores = scale * q.k (default scale 1/sqrt(D), q's head dim); softcap: softcap * tanh(scores /
    softcap); ALiBi (slopes [H] or [B, H]): scores - slope * |i + Sk - Sq - j|; masked by
    `visible_mask`; P = softmax(scores); out = P v (D_v wide); dropout keeps
    each P entry with probability 1 - dropout_p (mask [B, H, Sq, Sk] bool, drawn from torch's RNG when
    not given) and rescales by 1 / (1 - dropout_p). lse is that of the scores before dropout.
    learnable_sink [H]: a logit per query head that joins every row's softmax as one more key without
    a value (its probability is in no output); lse includes it, so a row that sees no key has lse =
    its sink and out = 0.
    Differentiable: autograd through it is the reference backward. With return_probs, a third value
    is P with dropped entries negated (flash-attn's S_dmask encoding)."""
    heads, heads_k = q.shape[2], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dtype = compute_dtype or q.dtype
    qc, kc, vc = (t.to(dtype) for t in (q, k, v))
    if heads != heads_k:  # GQA/MQA: query head h reads key/value head h // (H / H_k)
        kc = repeat(kc, "b s hk d -> b s (hk g) d", g=heads // heads_k)
        vc = repeat(vc, "b s hk d -> b s (hk g) d", g=heads // heads_k)
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    scores = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi_slopes is not None:
        rows = torch.arange(seqlen_q, device=q.device)[:, None] + (seqlen_k - seqlen_q)
        distance = (rows - torch.arange(seqlen_k, device=q.device)[None, :]).abs().to(dtype)
        slopes = alibi_slopes.to(dtype).reshape(-1 if alibi_slopes.dim() == 2 else 1, heads, 1, 1)
        scores = scores - slopes * distance
    if causal or window_size != (-1, -1):
        visible = visible_mask(seqlen_q, seqlen_k, q.device, causal, tuple(window_size))
        scores = scores.masked_fill(~visible, float("-inf"))
    if learnable_sink is not None:  # one more column, then dropped: it is in every denominator only
        sink = learnable_sink.to(dtype).reshape(1, heads, 1, 1).expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, sink], dim=-1)
    lse = torch.logsumexp(scores.float(), dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows: NaN -> 0
    if learnable_sink is not None:
        probs = probs[..., :-1]
    kept = probs
    if dropout_p > 0:
        if dropout_mask is None:
            dropout_mask = torch.rand(probs.shape, device=q.device) >= dropout_p
        kept = probs.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", kept, vc)
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    if return_probs:
        encoded = probs if dropout_mask is None else torch.where(dropout_mask, probs, -probs)
        return out, lse, encoded
    return out, lse


_U32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * m for uint32 values held in int64, without overflow."""
    a_hi, a_lo, m_hi, m_lo = a >> 16, a & 0xFFFF, m >> 16, m & 0xFFFF
    mid = a_hi * m_lo + a_lo * m_hi
    low = a_lo * m_lo + ((mid & 0xFFFF) << 16)
    return (a_hi * m_hi + (mid >> 16) + (low >> 32)) & _U32, low & _U32


PHILOX_ROUNDS = 7  # kernels/common/dropout.cuh:kPhiloxRounds (FlashAttention-2's Philox4x32-7)


def philox4x32(key: tuple[int, int], counter: list[torch.Tensor], rounds: int = PHILOX_ROUNDS) -> list[torch.Tensor]:
    """Philox4x32-`rounds` on int64 tensors of uint32 words: kernels/common/dropout.cuh in PyTorch."""
    k0, k1 = key
    c0, c1, c2, c3 = counter
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, 0xD2511F53)
        hi1, lo1 = _mulhilo(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _U32, (k1 + 0xBB67AE85) & _U32
    return [c0, c1, c2, c3]


def philox_keep_mask(seed: int, offset: int, threshold: int, batch: int, heads: int, seqlen_q: int, seqlen_k: int,
                     device) -> torch.Tensor:
    """The JIT kernels' dropout keep mask [B, H, Sq, Sk] (bool) for one (seed, offset): element
    (i, j) of head bh keeps iff byte (j & 1) * 8 + ((i >> 3) & 3) * 2 + ((j >> 3) & 1) of
    Philox(counter = ((i >> 5) * 8 + (i & 7), 4 (j >> 4) + ((j >> 1) & 3), bh, offset)) is >= threshold
    (kernels/common/dropout.cuh)."""
    key = (seed & _U32, ((seed >> 32) ^ (offset >> 32)) & _U32)
    rows, groups = ((seqlen_q + 31) // 32) * 8, ((seqlen_k + 15) // 16) * 4
    shape = (batch * heads, rows, groups)
    bh = torch.arange(batch * heads, device=device)[:, None, None].expand(shape)
    c0 = torch.arange(rows, device=device)[None, :, None].expand(shape)
    c1 = torch.arange(groups, device=device)[None, None, :].expand(shape)
    words = philox4x32(key, [c0, c1, bh, torch.full(shape, offset & _U32, device=device)])
    shifts = torch.arange(4, device=device) * 8
    random_bytes = torch.stack([(w[..., None] >> shifts) & 0xFF for w in words], dim=-2).flatten(-2)  # [.., 16]
    i, j = torch.arange(seqlen_q, device=device), torch.arange(seqlen_k, device=device)
    row, group = ((i >> 5) * 8 + (i & 7))[:, None], ((j >> 4) * 4 + ((j >> 1) & 3))[None, :]
    byte = ((i >> 3) & 3)[:, None] * 2 + ((j & 1) * 8 + ((j >> 3) & 1))[None, :]
    keep = random_bytes[:, row, group, byte] >= threshold
    return keep.reshape(batch, heads, seqlen_q, seqlen_k)

"""PyTorch reference attention: the ground truth for tests and the FLASHJIT_BACKEND=reference path.

Runs on any device. Same layout as the kernels: q [B, Sq, H, D], k/v [B, Sk, H_k, D].
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
                        dropout_mask: torch.Tensor | None = None, return_probs: bool = False):
    """(out [B, Sq, H, D] in `compute_dtype`, lse [B, H, Sq] fp32), computed in `compute_dtype` (None: q's
    own dtype, which is what "PyTorch's low-precision math" means in the tests' tolerance rule).
    Rows that see no key at all get out = 0 and lse = +inf, as the kernels produce.

    scores = scale * q.k; softcap: softcap * tanh(scores / softcap); ALiBi (slopes [H] or [B, H]):
    scores - slope * |i + Sk - Sq - j|; masked by `visible_mask`; P = softmax(scores); dropout keeps
    each P entry with probability 1 - dropout_p (mask [B, H, Sq, Sk] bool, drawn from torch's RNG when
    not given) and rescales by 1 / (1 - dropout_p). lse is that of the scores before dropout.
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
    lse = torch.logsumexp(scores.float(), dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows: NaN -> 0
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

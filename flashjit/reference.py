"""PyTorch reference attention: the ground truth for tests and the FLASHJIT_BACKEND=reference path.

Runs on any device. Same layout as the kernels: q [B, Sq, H, D], k/v [B, Sk, H_k, D].
"""
from __future__ import annotations

import math

import torch
from einops import rearrange, repeat


def causal_mask(seqlen_q: int, seqlen_k: int, device) -> torch.Tensor:
    """[Sq, Sk] bool, True where key j is visible to query i: j <= i + Sk - Sq (bottom-right
    aligned, flash-attn's convention when Sq != Sk)."""
    rows = torch.arange(seqlen_q, device=device)[:, None]
    cols = torch.arange(seqlen_k, device=device)[None, :]
    return cols <= rows + (seqlen_k - seqlen_q)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                        softmax_scale: float | None = None, compute_dtype: torch.dtype | None = torch.float32
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Sq, H, D] in `compute_dtype`, lse [B, H, Sq] fp32), computed in `compute_dtype` (None: q's
    own dtype, which is what "PyTorch's low-precision math" means in the tests' tolerance rule).
    Rows that see no key at all get out = 0 and lse = +inf, as the kernels produce."""
    heads, heads_k = q.shape[2], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dtype = compute_dtype or q.dtype
    qc, kc, vc = (t.to(dtype) for t in (q, k, v))
    if heads != heads_k:  # GQA/MQA: query head h reads key/value head h // (H / H_k)
        kc = repeat(kc, "b s hk d -> b s (hk g) d", g=heads // heads_k)
        vc = repeat(vc, "b s hk d -> b s (hk g) d", g=heads // heads_k)
    scores = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * scale
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[1], k.shape[1], q.device), float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows: NaN -> 0
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vc)
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    return out, lse

"""flash-attn 2.x's functional API on flashjit: `from flashjit import flash_attn_func`.

Same signatures, defaults, layouts (q [B, S, H, D], k/v [B, S, H_k, D]) and return values as
flash_attn.flash_attn_func / flash_attn_qkvpacked_func / flash_attn_kvpacked_func, with autograd.
flash_attn_func also takes v with a smaller head dim than q/k (v [B, S, H_k, D_v], D_v <= D, as
DeepSeek's MLA uses: out is then [B, S, H, D_v]).

Two backends, chosen by FLASHJIT_BACKEND: 'jit' (the compiled kernels, the default when CUDA is
available) and 'reference' (PyTorch + einops on any device, autograd through plain tensor ops).
The JIT backend implements every parameter in the kernels: causal or not, any softmax scale, sliding
windows, softcap, ALiBi and dropout (Philox RNG seeded from torch's CUDA generator, p rounded to a
multiple of 1/256), GQA/MQA and odd lengths, forward and backward, for head dims up to 256 (and a
value head dim D_v up to q/k's).
"""
from __future__ import annotations

import logging

import torch

from . import interface, native
from .reference import attention_reference, philox_keep_mask

log = logging.getLogger("flashjit")
BACKENDS, backend = interface.BACKENDS, interface.backend  # (where flashjit.flash_api.backend was)


# ---- flash-attn's leniencies, applied by every flash-attn-compatible function (varlen, kvcache too) ----

def no_s_dmask(q: torch.Tensor) -> torch.Tensor:
    """return_attn_probs' S_dmask without dropout: flash-attn returns one only with dropout, and an
    empty tensor of q's dtype otherwise (code asks for return_attn_probs to get the lse)."""
    return q.new_empty((0,))


def causal_window(window_size) -> tuple:
    """flash-attn's convention: causal is a window whose right edge is 0. ValueError naming
    window_size unless it is a pair (its values are checked by interface.score_mods)."""
    try:
        left, _ = window_size
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair of ints (negative: unbounded), got {window_size!r}") from None
    return left, 0


class _JitAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes, dropout_p, philox,
                deterministic, learnable_sink):
        out, lse = interface.forward(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=True,
                                     window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                                     dropout_p=dropout_p, philox=philox, learnable_sink=learnable_sink)
        ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, learnable_sink)
        # The backward regenerates the dropout mask from the same (seed, offset).
        ctx.args = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                        dropout_p=dropout_p, philox=philox, deterministic=deterministic)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zeros for lse's (never read) gradient; out's is always given
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, alibi_slopes, learnable_sink = ctx.saved_tensors
        # The backward kernels need no sink (the lse includes it); pass it only for its gradient.
        wants_dsink = learnable_sink is not None and ctx.needs_input_grad[11]
        grads = interface.backward(dout, q, k, v, out, lse, alibi_slopes=alibi_slopes,
                                   learnable_sink=learnable_sink if wants_dsink else None, **ctx.args)
        return (*grads[:3], None, None, None, None, None, None, None, None, grads[3] if wants_dsink else None)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, learnable_sink=None):
    """Attention over q [B, Sq, H, D], k [B, Sk, H_k, D], v [B, Sk, H_k, D_v] (H divisible by H_k;
    D_v <= D, usually equal), as flash-attn. The default softmax_scale is 1/sqrt(D) (q's head dim).

    Returns out [B, Sq, H, D_v]; with return_attn_probs, (out, softmax_lse [B, H, Sq], S_dmask) where,
    with dropout, S_dmask [B, H, Sq, Sk] holds the attention probabilities (negated where dropout
    dropped them; for testing only: it is quadratic in memory), and without dropout it is empty, as
    flash-attn's (code asks for return_attn_probs to get the lse). deterministic=True makes the backward
    bit-identical run to run (no atomics; slower), as in flash-attn. learnable_sink [H] (keyword, as
    FlashAttention-4 names it): gpt-oss-style sink logits, one per query head, in every row's softmax
    denominator (not its numerator); differentiable (its gradient is fp32 math, returned in its dtype);
    softmax_lse then includes it."""
    if causal:
        window_size = causal_window(window_size)
    if torch.compiler.is_compiling():  # a custom op: dynamo cannot trace the launch (flashjit/ops.py)
        return _compiled(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, learnable_sink)
    if backend() == "reference":
        q, k, v = interface.contiguous_last_dim(q, k, v)
        interface.check_qkv(q, k, v, reference=True)  # the kernels' checks and messages (fp32 and CPU allowed)
        interface.dropout_threshold(dropout_p)
        interface.softmax_scale_or_default(q, softmax_scale)
        interface.score_mods(q, causal, window_size, softcap, alibi_slopes,  # the same argument checks
                             learnable_sink=learnable_sink)
        result = attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                     compute_dtype=torch.promote_types(q.dtype, torch.float32),
                                     window_size=tuple(window_size), softcap=softcap, alibi_slopes=alibi_slopes,
                                     dropout_p=dropout_p, return_probs=return_attn_probs and dropout_p > 0,
                                     learnable_sink=learnable_sink)
        out = result[0].to(q.dtype)
        if not return_attn_probs:
            return out
        # lse detached: the kernels' autograd marks it non-differentiable, so a loss that reads it gets the same
        # gradients (none through the lse) on either backend.
        return out, result[1].detach(), result[2] if dropout_p > 0 else no_s_dmask(q)

    if not (return_attn_probs and dropout_p):
        # The checks run inside interface.forward, whose launch plan makes a repeated call cheap (a
        # shape's first call checks); without dropout, return_attn_probs is out, lse and flash-attn's
        # empty S_dmask, so asking for the lse this way costs nothing more.
        if not (torch.is_grad_enabled() and (
                getattr(q, "requires_grad", False) or getattr(k, "requires_grad", False)
                or getattr(v, "requires_grad", False) or getattr(learnable_sink, "requires_grad", False))):
            # No gradient wanted: an autograd.Function would only add its own cost.
            result = interface.forward(q, k, v, causal=bool(causal), softmax_scale=softmax_scale,
                                       window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                                       dropout_p=dropout_p, learnable_sink=learnable_sink, return_lse=return_attn_probs)
            return (*result, no_s_dmask(q)) if return_attn_probs else result
        philox = None
        if interface.dropout_threshold(dropout_p):  # inputs checked before the generator advances
            interface.check_qkv(*interface.contiguous_last_dim(q, k, v))
            philox = interface.philox_state(q.get_device())
        elif alibi_slopes is None and learnable_sink is None:
            # A shape seen before: its launch plan and autograd node in C++ (flashjit/native.py).
            result = native.attn(q, k, v, bool(causal), softmax_scale, window_size, softcap, bool(deterministic))
            if result is not None:
                return (*result, no_s_dmask(q)) if return_attn_probs else result[0]
        out, lse = _JitAttention.apply(q, k, v, softmax_scale, bool(causal), window_size, softcap, alibi_slopes,
                                       dropout_p, philox, bool(deterministic), learnable_sink)
        return (out, lse, no_s_dmask(q)) if return_attn_probs else out

    # return_attn_probs with dropout: S_dmask recomputed for inspection, as flash-attn's tests use it.
    q, k, v = interface.contiguous_last_dim(q, k, v)
    interface.check_qkv(q, k, v)  # device and shape errors first, naming the argument
    interface.dropout_threshold(dropout_p)
    window_size = tuple(window_size)
    interface.score_mods(q, causal, window_size, softcap, alibi_slopes, learnable_sink=learnable_sink)
    philox = interface.philox_state(q.get_device())
    out, lse = _JitAttention.apply(q, k, v, softmax_scale, bool(causal), window_size, softcap, alibi_slopes,
                                   dropout_p, philox, bool(deterministic), learnable_sink)
    with torch.no_grad():
        mask = philox_keep_mask(*philox, interface.dropout_threshold(dropout_p), q.shape[0], q.shape[2],
                                q.shape[1], k.shape[1], q.device)
        _, _, probs = attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                          window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                                          dropout_p=dropout_p, dropout_mask=mask, return_probs=True,
                                          learnable_sink=learnable_sink)
    return out, lse, probs


def _compiled(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
              return_attn_probs, learnable_sink):
    """flash_attn_func inside torch.compile: the custom op, whose own checks run when it runs."""
    from . import ops

    if return_attn_probs and dropout_p:
        raise ValueError("return_attn_probs=True with dropout is not supported under torch.compile (S_dmask "
                         "materialises [B, H, Sq, Sk] for tests); call flash_attn_func eagerly for it")
    if isinstance(softmax_scale, torch.Tensor):  # NumPy scalars arrive as tensors under dynamo too
        raise ValueError("softmax_scale must be a Python float (or None) under torch.compile, got a tensor or NumPy "
                         "scalar; pass float(softmax_scale)")
    q, k, v = interface.contiguous_last_dim(q, k, v)
    left, right = window_size
    out, lse = ops.fwd(q, k, v, alibi_slopes, learnable_sink, softmax_scale, bool(causal), int(left), int(right),
                       float(softcap), float(dropout_p), bool(deterministic))[:2]
    return (out, lse, no_s_dmask(q)) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                              learnable_sink=None):
    """qkv [B, S, 3, H, D]: the three slices are passed as strided views, without copies."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape [batch, seqlen, 3, heads, head_dim], got "
                         f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, learnable_sink=learnable_sink)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                             learnable_sink=None):
    """q [B, Sq, H, D], kv [B, Sk, 2, H_k, D]."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"kv must have shape [batch, seqlen, 2, heads_k, head_dim], got "
                         f"{tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__}")
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, learnable_sink=learnable_sink)

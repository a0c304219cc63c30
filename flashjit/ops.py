"""flash_attn_func's forward and backward as torch.library custom ops, for torch.compile.

Dynamo cannot trace a ctypes launch, logging or kernel selection; it can trace a custom op whose
shapes a fake implementation gives. So under torch.compile, flash_api calls `flashjit::fwd` (with
autograd registered to `flashjit::bwd`), and everything else (checks, dispatch, plans, logging)
runs inside the op, at run time. Eager calls do not come here: flash_api's own path is cheaper
than the custom-op dispatcher.

The ops run on any device: the JIT kernels (CUDA tensors), or the PyTorch reference when
FLASHJIT_BACKEND=reference, so a CPU machine compiles and runs the same graph.

Dropout: the forward draws the Philox (seed, offset) at run time and returns it as a CPU int64
tensor [2] that the backward reads, as flash-attn's ops return rng_state. A CPU output keeps
inductor's CUDA graphs (mode="reduce-overhead") off for graphs with dropout, which is what keeps
them correct: a replayed graph would repeat the seed its capture drew. Without dropout that
output is an empty CUDA tensor and CUDA graphs apply.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import interface
from .reference import attention_reference, philox_keep_mask


def _on_reference() -> bool:
    return interface.backend() == "reference"


def _rng_state(q: Tensor, dropout_p: float) -> Tensor:
    """The Philox (seed, offset) of a dropout call as a CPU int64 [2], or an empty tensor on q's device."""
    if dropout_p <= 0:
        return torch.empty(0, dtype=torch.int64, device=q.device)
    if q.is_cuda:
        seed, offset = interface.philox_state(q.get_device())
    else:  # the reference on the CPU: a seed from torch's CPU generator (torch.manual_seed reproduces it)
        seed, offset = int(torch.randint(0, 2**62, (1,)).item()), 0
    # int64 holds the same 64 bits (a CUDA seed may exceed 2**63); the kernels' uint64 params and
    # philox_keep_mask read them back as unsigned
    return torch.tensor([x - (1 << 64) if x >= 1 << 63 else x for x in (seed, offset)], dtype=torch.int64)


def _philox(rng_state: Tensor, dropout_p: float):
    """The (seed, offset) of _rng_state as unsigned ints, or None without dropout."""
    return tuple(x & ((1 << 64) - 1) for x in rng_state.tolist()) if dropout_p > 0 else None


def _reference(q, k, v, alibi_slopes, learnable_sink, softmax_scale, causal, window, softcap, dropout_p, rng_state):
    """(out in q's dtype, lse) of the reference, with the dropout mask the kernels' Philox stream gives."""
    mask = None
    if dropout_p > 0:
        seed, offset = _philox(rng_state, dropout_p)
        mask = philox_keep_mask(seed, offset, interface.dropout_threshold(dropout_p), q.shape[0], q.shape[2],
                                q.shape[1], k.shape[1], q.device)
    out, lse = attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                   compute_dtype=torch.promote_types(q.dtype, torch.float32), window_size=window,
                                   softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p, dropout_mask=mask,
                                   learnable_sink=learnable_sink)
    return out.to(q.dtype), lse


@torch.library.custom_op("flashjit::fwd", mutates_args=())
def fwd(q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Optional[Tensor], learnable_sink: Optional[Tensor],
        softmax_scale: Optional[float], causal: bool, window_left: int, window_right: int, softcap: float,
        dropout_p: float, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(out [B, Sq, H, D_v] contiguous, lse [B, H, Sq] fp32, rng_state). deterministic is the backward's."""
    rng_state = _rng_state(q, dropout_p)
    window = (window_left, window_right)
    if _on_reference():
        interface.check_qkv(q, k, v, reference=True)  # the kernels' checks and messages, as flash_attn_func's
        out, lse = _reference(q, k, v, alibi_slopes, learnable_sink, softmax_scale, causal, window, softcap,
                              dropout_p, rng_state)
    else:
        out, lse = interface.forward(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=True,
                                     window_size=window, softcap=softcap, alibi_slopes=alibi_slopes,
                                     dropout_p=dropout_p, philox=_philox(rng_state, dropout_p),
                                     learnable_sink=learnable_sink)
    return out.contiguous(), lse, rng_state  # contiguous: odd head dims return views of a padded result


@fwd.register_fake
def _fwd_fake(q, k, v, alibi_slopes, learnable_sink, softmax_scale, causal, window_left, window_right, softcap,
              dropout_p, deterministic):
    batch, seqlen_q, heads, _ = q.shape
    rng_state = (torch.empty(2, dtype=torch.int64, device="cpu") if dropout_p > 0
                 else torch.empty(0, dtype=torch.int64, device=q.device))
    return (q.new_empty(interface.out_shape(q, v)), q.new_empty((batch, heads, seqlen_q), dtype=torch.float32),
            rng_state)


@torch.library.custom_op("flashjit::bwd", mutates_args=())
def bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, rng_state: Tensor,
        alibi_slopes: Optional[Tensor], learnable_sink: Optional[Tensor], softmax_scale: Optional[float],
        causal: bool, window_left: int, window_right: int, softcap: float, dropout_p: float,
        deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dsink): contiguous, shaped like q, k, v and the sink (dsink is empty without one;
    pass the sink only when its gradient is wanted: the kernels never read it)."""
    window = (window_left, window_right)
    if _on_reference():  # the reference's own autograd, on its recomputed forward
        # torch.func.vjp, not torch.autograd.grad: an op's body runs below the autograd dispatch key,
        # which functorch's transforms re-enable for their own graph.
        def recompute(q, k, v, *sink):
            return _reference(q, k, v, alibi_slopes, *sink or (None,), softmax_scale, causal, window, softcap,
                              dropout_p, rng_state)[0]

        _, vjp = torch.func.vjp(recompute, q, k, v, *(() if learnable_sink is None else (learnable_sink,)))
        grads = vjp(dout)
    else:
        philox = _philox(rng_state, dropout_p)
        grads = interface.backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale,
                                   window_size=window, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                                   philox=philox, deterministic=deterministic, learnable_sink=learnable_sink)
    dsink = grads[3] if learnable_sink is not None else q.new_empty(0, dtype=torch.float32)
    return grads[0].contiguous(), grads[1].contiguous(), grads[2].contiguous(), dsink


def _grads_like(q, k, v, learnable_sink):
    """The fake (dq, dk, dv, dsink) of a backward op."""
    dsink = torch.empty_like(learnable_sink) if learnable_sink is not None else q.new_empty(0, dtype=torch.float32)
    return (*(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)), dsink)


@bwd.register_fake
def _bwd_fake(dout, q, k, v, out, lse, rng_state, alibi_slopes, learnable_sink, *args):
    return _grads_like(q, k, v, learnable_sink)


def _setup_context(ctx, inputs, output):
    q, k, v, alibi_slopes, learnable_sink, *flags = inputs
    out, lse, rng_state = output
    ctx.mark_non_differentiable(lse, rng_state)  # as the eager call's: no gradient flows back through the lse
    ctx.save_for_backward(q, k, v, out, lse, rng_state, alibi_slopes, learnable_sink)
    ctx.flags = flags  # softmax_scale, causal, window_left, window_right, softcap, dropout_p, deterministic


def _backward(ctx, dout, _dlse, _drng):
    q, k, v, out, lse, rng_state, alibi_slopes, learnable_sink = ctx.saved_tensors
    wants_dsink = learnable_sink is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dsink = bwd(dout, q, k, v, out, lse, rng_state, alibi_slopes,
                            learnable_sink if wants_dsink else None, *ctx.flags)
    return dq, dk, dv, None, dsink if wants_dsink else None, *(None,) * 7


fwd.register_autograd(_backward, setup_context=_setup_context)

"""flashjit as the kernel behind PyTorch SDPA's flash backend (opt-in, PyTorch 2.14's registry).

    import flashjit.sdpa
    flashjit.sdpa.activate()      # F.scaled_dot_product_attention's flash backend now runs flashjit
    flashjit.sdpa.deactivate()    # PyTorch's own flash kernel again

activate() registers "flashjit" with torch.nn.attention's flash-attention registry (as PyTorch's own
FA3/FA4 adapters in torch/nn/attention/_fa3.py and _fa4.py do) and activates it; the registry then
knows it (`current_flash_attention_impl()` is "flashjit", activating "FA4" replaces it), and
`torch.nn.attention.activate_flash_attention_impl("flashjit")` works too once this module is imported.

What is replaced, for CUDA tensors: the two dense ops SDPA's flash backend calls,
  aten::_scaled_dot_product_flash_attention           q/k/v [B, H, S, D] -> (out, logsumexp [B, H, Sq] fp32,
      cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused, debug_attn_mask)
  aten::_scaled_dot_product_flash_attention_backward  -> (dq, dk, dv)
(autograd pairs them: derivatives.yaml calls the backward with the forward's rng_state/unused as
philox_seed/philox_offset). flashjit gets transposed views [B, S, H, D] of the same memory, no copies;
its out and grads come back as [B, H, S, D] views of [B, S, H, D] memory, the layout PyTorch's flash
kernel returns. The ragged ops (aten::_flash_attention_forward/_backward: nested tensors and
torch.nn.attention.varlen) keep PyTorch's kernel: flashjit has no varlen kernel behind them yet.

Semantics matched:
- is_causal: on this op it means bottom-right alignment when Sq != Sk, which is flashjit's (and
  flash-attn 2's). F.scaled_dot_product_attention never sends is_causal with Sq != Sk to the flash
  backend (sdp_utils' check_flash_causal_non_square_seqlens); causal_lower_right(...) biases do, and
  mean exactly that.
- scale (None: 1/sqrt(D) of the q the op receives, as PyTorch), GQA (k/v with H_k heads, as SDPA
  passes them with enable_gqa=True; dk/dv summed per key head), deterministic backward when
  torch.use_deterministic_algorithms(True) (as the FA4 adapter does).
- dropout_p: flashjit's Philox (seed, offset) is drawn from torch's CUDA generator and returned in
  rng_state ([2] uint64: seed, offset, as PyTorch's kernel packs them), and the backward regenerates
  the same mask from it. That tensor is on the CPU: the backward reads it without a device sync, and
  a CPU tensor keeps CUDA graphs (torch.compile's "reduce-overhead") off graphs with dropout, whose
  replays would repeat the captured seed. Without dropout, rng_state/unused are empty CUDA tensors,
  as the FA4 adapter returns.
- Anything flashjit refuses (it raises ValueError before launching: dtype, head dim, shapes), a value
  head dim other than query's (SDPA sends the flash backend none: sdp_utils' check_head_dim_size_flash
  wants equal head dims, and the op's meta function shapes out like query; flash_attn_func takes
  them), and return_debug_mask=True, runs PyTorch's original kernel instead (torch.library.get_kernel,
  taken before flashjit overrides it), with a DEBUG line on the "flashjit" logger. A backward whose
  forward ran on PyTorch's kernel with dropout (its rng_state is a CUDA tensor) also runs PyTorch's
  backward, which alone can regenerate that mask. Keep flashjit active from a dropout forward to its
  backward: PyTorch's backward cannot regenerate flashjit's mask.
"""
from __future__ import annotations

import functools
import logging

import torch

from . import interface

log = logging.getLogger("flashjit")

NAME = "flashjit"
FORWARD_OP = "_scaled_dot_product_flash_attention"
BACKWARD_OP = "_scaled_dot_product_flash_attention_backward"
_REGISTRY_FUNCTIONS = ("register_flash_attention_impl", "activate_flash_attention_impl",
                       "restore_flash_attention_impl", "current_flash_attention_impl")
_U64 = (1 << 64) - 1


def _registry():
    """torch.nn.attention, checked for the flash-attention registry (PyTorch 2.14 has it)."""
    import torch.nn.attention as attention

    missing = [name for name in _REGISTRY_FUNCTIONS if not hasattr(attention, name)]
    if missing:
        raise RuntimeError(
            f"flashjit.sdpa needs PyTorch's flash-attention registry in torch.nn.attention ({', '.join(missing)} "
            f"missing in torch {torch.__version__}); it is written against PyTorch 2.14, which has it: "
            "upgrade torch (pip install -U torch), or call flashjit.flash_attn_func directly instead of SDPA")
    return attention


def activate() -> None:
    """Make SDPA's flash backend (F.scaled_dot_product_attention under SDPBackend.FLASH_ATTENTION,
    and every model that calls it) run flashjit's kernels, forward and backward. Idempotent; replaces
    another activated impl (e.g. FA4) as torch's registry does."""
    attention = _registry()
    if attention.current_flash_attention_impl() == NAME:
        return
    attention.register_flash_attention_impl(NAME, register_fn=_register)
    attention.activate_flash_attention_impl(NAME)
    log.info("SDPA's flash backend now runs flashjit (flashjit.sdpa.deactivate() restores PyTorch's kernel)")


def deactivate() -> None:
    """Give SDPA's flash backend PyTorch's own kernel back. Idempotent; leaves another impl alone."""
    attention = _registry()
    if attention.current_flash_attention_impl() == NAME:
        attention.restore_flash_attention_impl()


def is_active() -> bool:
    import torch.nn.attention as attention

    current = getattr(attention, "current_flash_attention_impl", None)
    return current is not None and current() == NAME


class _Handle:
    """What torch's registry keeps while flashjit is active; remove() drops the overrides."""

    def __init__(self, library):
        self.library = library

    def remove(self) -> None:
        library, self.library = self.library, None
        if library is not None:
            library._destroy()  # deregister now, not whenever the Library is collected


def _original_kernel(op: str, dispatch_key: str):
    """The kernel registered now (PyTorch's own: the registry restores it before calling us), to
    run what flashjit cannot; None on a torch without torch.library.get_kernel or without one."""
    get_kernel = getattr(torch.library, "get_kernel", None)
    try:
        return get_kernel(f"aten::{op}", dispatch_key) if get_kernel else None
    except RuntimeError:
        return None


def _register(dispatch_key: str = "CUDA") -> _Handle:
    """Override both ops for `dispatch_key` (tests use CPU, where the ops have no kernel)."""
    library = torch.library.Library("aten", "IMPL", dispatch_key)
    for op, impl in ((FORWARD_OP, _forward), (BACKWARD_OP, _backward)):
        original = _original_kernel(op, dispatch_key)  # before our impl replaces it
        library.impl(op, functools.partial(impl, original), dispatch_key, with_keyset=True)
    return _Handle(library)


def _fallback(original, op: str, why: str, keyset, *args, **kwargs):
    if original is None:
        raise RuntimeError(f"flashjit SDPA {op}: {why}, and PyTorch's original kernel is not available "
                           f"(torch {torch.__version__} has no torch.library.get_kernel); flashjit.sdpa.deactivate() "
                           "runs PyTorch's kernel")
    log.debug("flashjit SDPA %s: %s; PyTorch's flash kernel runs this call", op, why)
    return original.call_boxed(keyset, *args, **kwargs)


def _pack_philox(seed: int, offset: int) -> torch.Tensor:
    # uint64 from Python ints goes through int64: store the same 64 bits (seeds may exceed 2**63)
    words = [x - (1 << 64) if x >= 1 << 63 else x for x in (seed & _U64, offset & _U64)]
    return torch.tensor(words, dtype=torch.int64).view(torch.uint64)


def _unpack_philox(rng_state: torch.Tensor) -> tuple[int, int]:
    seed, offset = rng_state.view(torch.int64).tolist()
    return seed & _U64, offset & _U64


def _forward(original, keyset, query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *,
             scale=None):
    """aten::_scaled_dot_product_flash_attention on flashjit. query [B, H, Sq, D], key/value [B, H_k, Sk, D]."""
    args = (keyset, query, key, value, dropout_p, is_causal, return_debug_mask)
    if return_debug_mask:  # flashjit does not write PyTorch's debug mask layout
        return _fallback(original, FORWARD_OP, "return_debug_mask=True", *args, scale=scale)
    if value.shape[-1] != query.shape[-1]:  # the op's out is shaped like query (module docstring)
        return _fallback(original, FORWARD_OP, "value's head dim differs from query's", *args, scale=scale)
    if dropout_p > 0 and query.is_cuda and torch.cuda.is_current_stream_capturing():
        # flashjit draws its seed on the host: a captured graph would replay one mask forever. PyTorch's
        # kernel keeps its RNG state on the device, graph-safe (and its backward follows, by rng_state).
        return _fallback(original, FORWARD_OP, "dropout inside CUDA graph capture", *args, scale=scale)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    philox = interface.philox_state(q.get_device()) if dropout_p > 0 else None
    out = _laid_out_like(query)
    try:
        out, lse = interface.forward(q, k, v, causal=is_causal, softmax_scale=scale, return_lse=True,
                                     dropout_p=dropout_p, philox=philox, out=out)
    except ValueError as exc:  # flashjit's refusals come before any launch
        return _fallback(original, FORWARD_OP, str(exc), *args, scale=scale)
    if philox is None:
        rng_state = torch.empty((2,), dtype=torch.uint64, device=query.device)
    else:  # on the CPU: this device is what tells the backward that flashjit drew it
        rng_state = _pack_philox(*philox)
    unused = torch.empty((), dtype=torch.uint64, device=query.device)
    debug_mask = torch.empty(0, dtype=query.dtype, device=query.device)
    return (_relaid(out, query), lse, None, None, query.shape[2], key.shape[2], rng_state, unused, debug_mask)


def _backward(original, keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
              dropout_p, is_causal, philox_seed, philox_offset, *, scale=None):
    """aten::_scaled_dot_product_flash_attention_backward on flashjit -> (dq, dk, dv), [B, H, S, D] views."""
    args = (keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
            is_causal, philox_seed, philox_offset)
    if value.shape[-1] != query.shape[-1]:  # its forward ran on PyTorch's kernel too
        return _fallback(original, BACKWARD_OP, "value's head dim differs from query's", *args, scale=scale)
    philox = None
    if dropout_p > 0:
        if philox_seed.device.type != "cpu":  # PyTorch's forward drew this mask: only its backward knows it
            return _fallback(original, BACKWARD_OP, "the forward ran on PyTorch's kernel with dropout", *args,
                             scale=scale)
        philox = _unpack_philox(philox_seed)
    dout, q, k, v, o = (t.transpose(1, 2) for t in (grad_out, query, key, value, out))
    try:
        dq, dk, dv = (_laid_out_like(t) for t in (query, key, value))
        grads = interface.backward(dout, q, k, v, o, logsumexp, causal=is_causal, softmax_scale=scale,
                                   dropout_p=dropout_p, philox=philox, dq=dq, dk=dk, dv=dv,
                                   deterministic=torch.are_deterministic_algorithms_enabled())
    except ValueError as exc:
        if philox is not None:  # PyTorch's backward cannot regenerate flashjit's dropout mask
            raise RuntimeError(f"flashjit SDPA backward with dropout: {exc}") from exc
        return _fallback(original, BACKWARD_OP, str(exc), *args, scale=scale)
    return tuple(_relaid(g, t) for g, t in zip(grads[:3], (query, key, value)))


def _laid_out_like(t: torch.Tensor):
    """The output buffer (flash layout, a [B, S, H, D] view) for a result shaped like t [B, H, S, D]: laid
    out like t, as PyTorch's kernels and their meta functions (which torch.compile trusts) lay out
    results; None where flashjit's own [B, S, H, D]-contiguous allocation already is, or where the
    kernel cannot write the layout directly (head dims that are not a multiple of 8: see _relaid)."""
    if t.transpose(1, 2).is_contiguous() or t.shape[-1] % 8:  # the common case first: no allocation to compare
        return None
    want = torch.empty_like(t).transpose(1, 2)
    return None if want.is_contiguous() else want


def _relaid(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """result (flash layout) as a [B, H, S, D] view laid out like `like` (copied only when it is not)."""
    result = result.transpose(1, 2)
    if _same_layout(result, like):
        return result
    want = torch.empty_like(like)
    return result if _same_layout(result, want) else want.copy_(result)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides where they matter: a size-1 dim's stride is never used (and PyTorch's layout
    checks ignore it), so a decoding query [B, H, 1, D] needs no copy for it."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


try:  # known to torch's registry on import (not activated: users opt in)
    _registry().register_flash_attention_impl(NAME, register_fn=_register)
except RuntimeError:  # an older torch: activate() says what is needed
    pass

"""flash-attn's padding helpers (flash_attn.bert_padding, 2.7+ signatures and return values; also
unpad_input_for_concatenated_sequences and index_first_axis_residual).

A padded batch hidden_states [B, S, ...] with attention_mask [B, S] (1/True: a real token) becomes
the packed tokens [total, ...] that varlen attention takes, and back:

    x, indices, cu_seqlens, max_seqlen, seqused = unpad_input(hidden_states, attention_mask)
    ...                                  # cu_seqlens [B + 1] int32: where each sequence starts in x
    hidden_states = pad_input(x, indices, B, S)     # padding positions are zeros

Both directions are a gather and a scatter of whole rows along the first axis (the indices are
unique), with autograd: the backward of a gather is the scatter of the gradient, and vice versa.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _row_index(indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    # gather/scatter want an index shaped like the [n, features] rows; a broadcast view costs no memory
    return indices[:, None].expand(-1, rows.shape[1])


def _gather_rows(flat: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return flat.gather(0, _row_index(indices, flat))


def _scatter_rows(rows: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    out = torch.zeros(first_axis_dim, rows.shape[1], dtype=rows.dtype, device=rows.device)
    return out.scatter_(0, _row_index(indices, rows), rows)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[N, ...] as [N, prod(...)]: spelled out, since reshape(N, -1) is ambiguous when N = 0."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


class _IndexFirstAxis(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, indices):
        ctx.save_for_backward(indices)
        ctx.first_axis_dim = input.shape[0]
        return _gather_rows(_flat(input), indices).reshape(indices.shape[0], *input.shape[1:])

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        grad = _scatter_rows(_flat(grad_output), indices, ctx.first_axis_dim)
        return grad.reshape(ctx.first_axis_dim, *grad_output.shape[1:]), None


class _IndexPutFirstAxis(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, first_axis_dim):
        ctx.save_for_backward(indices)
        out = _scatter_rows(_flat(values), indices, first_axis_dim)
        return out.reshape(first_axis_dim, *values.shape[1:])

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        grad = _gather_rows(_flat(grad_output), indices)
        return grad.reshape(indices.shape[0], *grad_output.shape[1:]), None, None


class _IndexFirstAxisResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, indices):
        ctx.save_for_backward(indices)
        return input[indices], input.detach()

    @staticmethod
    def backward(ctx, grad_output, grad_residual):
        (indices,) = ctx.saved_tensors
        index = indices.reshape(-1, *(1,) * (grad_output.dim() - 1)).expand_as(grad_output)
        # the rows' gradient added into the residual's (cloned: flash-attn adds in place into an incoming grad)
        return grad_residual.clone().scatter_add_(0, index, grad_output), None


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """input[indices] for input [N, ...] and int64 indices [n] (unique): [n, ...], differentiable in input."""
    return _IndexFirstAxis.apply(input, indices)


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    """Zeros [first_axis_dim, ...] with rows `indices` (unique) set to values [n, ...]; differentiable in values."""
    return _IndexPutFirstAxis.apply(values, indices, first_axis_dim)


def index_first_axis_residual(input: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input[indices], input detached), as flash-attn's (its BERT keeps the full input as a residual):
    the gradient reaching input is the residual's with the selected rows' gradient added at indices."""
    return _IndexFirstAxisResidual.apply(input, indices)


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask: torch.Tensor | None = None):
    """hidden_states [B, S, ...], attention_mask [B, S] (bool or int, 1: a real token), unused_mask
    [B, S] (optional, 1: a slot that is allocated but unused; it is kept in the packed tokens but not
    counted in seqused). Returns, as flash-attn 2.7+:
      hidden_states [total, ...]  the kept tokens (attention_mask + unused_mask), batch-major
      indices [total] int64       their positions in the flattened [B * S] input
      cu_seqlens [B + 1] int32    cumulative kept tokens per sequence, from 0
      max_seqlen_in_batch int     the longest sequence (a Python int: this syncs with the device)
      seqused [B] int32           tokens per sequence in attention_mask alone"""
    kept = attention_mask + unused_mask if unused_mask is not None else attention_mask
    seqlens = kept.sum(dim=-1, dtype=torch.int32)
    seqused = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(kept.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen_in_batch = int(seqlens.max().item()) if seqlens.numel() else 0
    packed = index_first_axis(hidden_states.reshape(-1, *hidden_states.shape[2:]), indices)
    return packed, indices, cu_seqlens, max_seqlen_in_batch, seqused


def unpad_input_for_concatenated_sequences(hidden_states: torch.Tensor, attention_mask_in_length: torch.Tensor):
    """Several short samples packed into each row, as flash-attn's: attention_mask_in_length [B, S] (int)
    lists row b's sample lengths, then zeros (e.g. [2, 3, 0, 0, 0, 0]: tokens 0-1 and 2-4 are two
    samples, token 5 padding); the samples must fill each row from its start. Returns 4 values:
      hidden_states [total, ...]  the samples' tokens, batch-major
      indices [total] int64       their positions in the flattened [B * S] input
      cu_seqlens [n + 1] int32    cumulative lengths of the n samples (not of the B rows), from 0
      max_seqlen_in_batch int     the longest sample (a Python int: this syncs with the device)"""
    length = attention_mask_in_length.sum(dim=-1)
    seqlen = attention_mask_in_length.shape[-1]
    kept = torch.arange(seqlen, device=length.device, dtype=length.dtype)[None, :] < length[:, None]
    seqlens = attention_mask_in_length.flatten()
    seqlens = seqlens[torch.nonzero(seqlens, as_tuple=False).flatten()]
    indices = torch.nonzero(kept.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    packed = index_first_axis(hidden_states.reshape(-1, *hidden_states.shape[2:]), indices)
    return packed, indices, cu_seqlens, max_seqlen_in_batch


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse of unpad_input: hidden_states [total, ...] -> [batch, seqlen, ...], zeros where no
    index points."""
    return index_put_first_axis(hidden_states, indices, batch * seqlen).reshape(batch, seqlen,
                                                                                 *hidden_states.shape[1:])

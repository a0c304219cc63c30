"""flashjit.bert_padding: flash-attn 2.7+'s unpad_input / pad_input / index_first_axis /
index_put_first_axis, their return values and their gradients (CPU)."""
from __future__ import annotations

import pytest
import torch

import flashjit
from flashjit.bert_padding import index_first_axis, index_put_first_axis, pad_input, unpad_input


def _mask(lengths, seqlen, dtype=torch.bool):
    return (torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]).to(dtype)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.int64])
def test_unpad_input_returns_flash_attns_five_values(mask_dtype):
    hidden = torch.randn(3, 5, 2, 4)  # [B, S, H, D]
    mask = _mask([5, 2, 0], 5, mask_dtype)
    packed, indices, cu_seqlens, max_seqlen, seqused = unpad_input(hidden, mask)
    assert indices.tolist() == [0, 1, 2, 3, 4, 5, 6] and indices.dtype == torch.int64
    assert cu_seqlens.tolist() == [0, 5, 7, 7] and cu_seqlens.dtype == torch.int32
    assert max_seqlen == 5 and type(max_seqlen) is int
    assert seqused.tolist() == [5, 2, 0] and seqused.dtype == torch.int32
    assert torch.equal(packed, torch.cat([hidden[0], hidden[1, :2]]))


def test_unused_mask_slots_are_packed_but_not_counted_as_used():
    hidden = torch.randn(2, 4, 3)
    mask, unused = _mask([2, 1], 4), torch.tensor([[False, False, True, False], [False, True, True, False]])
    packed, indices, cu_seqlens, max_seqlen, seqused = unpad_input(hidden, mask, unused)
    assert indices.tolist() == [0, 1, 2, 4, 5, 6]
    assert cu_seqlens.tolist() == [0, 3, 6] and max_seqlen == 3 and seqused.tolist() == [2, 1]
    assert torch.equal(packed, hidden.reshape(8, 3)[indices])


def test_pad_input_inverts_unpad_input_with_zeros_in_the_padding():
    hidden = torch.randn(4, 7, 3, 8)
    mask = _mask([7, 3, 1, 5], 7)
    packed, indices, *_ = unpad_input(hidden, mask)
    padded = pad_input(packed, indices, 4, 7)
    assert padded.shape == hidden.shape
    assert torch.equal(padded[mask], hidden[mask]) and not padded[~mask].any()


def test_gradients_flow_through_both_directions():
    hidden = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    mask = _mask([6, 4, 2], 6)
    packed, indices, *_ = unpad_input(hidden, mask)
    weights = torch.randn_like(packed)
    (packed * weights).sum().backward()
    expected = torch.zeros(18, 5, dtype=torch.float64)
    expected[indices] = weights
    assert torch.equal(hidden.grad, expected.reshape(3, 6, 5))  # padding positions get exactly 0

    values = torch.randn(len(indices), 5, dtype=torch.float64, requires_grad=True)
    out = pad_input(values, indices, 3, 6)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    assert torch.equal(values.grad, upstream.reshape(18, 5)[indices])


def test_index_helpers_match_indexing_and_pass_gradcheck():
    x = torch.randn(9, 2, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([7, 0, 4, 5])
    assert torch.equal(index_first_axis(x, idx), x[idx])
    put = index_put_first_axis(x[:4], idx, 12)
    assert put.shape == (12, 2, 3) and torch.equal(put[idx], x[:4]) and put.abs().sum(dim=(1, 2)).count_nonzero() == 4
    assert torch.autograd.gradcheck(lambda t: index_first_axis(t, idx), (x,))
    assert torch.autograd.gradcheck(lambda t: index_put_first_axis(t, idx, 12), (x[:4].detach().requires_grad_(),))


def test_exported_from_flashjit():
    assert flashjit.unpad_input is unpad_input and flashjit.pad_input is pad_input


def test_no_tokens_at_all():
    """An all-padding mask: zero packed rows, and pad_input/backward still work (reshape(0, -1) would not)."""
    x = torch.randn(2, 5, 3, requires_grad=True)
    packed, indices, cu_seqlens, max_seqlen, _ = unpad_input(x, torch.zeros(2, 5, dtype=torch.int32))
    assert packed.shape == (0, 3) and cu_seqlens.tolist() == [0, 0, 0] and max_seqlen == 0
    padded = pad_input(packed, indices, 2, 5)
    padded.sum().backward()
    assert padded.shape == (2, 5, 3) and not padded.any() and not x.grad.any()
    assert index_first_axis(torch.randn(0, 4), torch.zeros(0, dtype=torch.long)).shape == (0, 4)


def test_unpad_input_for_concatenated_sequences_as_flash_attn():
    """flash-attn's docstring example: rows holding several samples, attention_mask_in_length listing
    their lengths; cu_seqlens counts samples, not rows. Four return values."""
    from flashjit.bert_padding import unpad_input_for_concatenated_sequences

    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    hidden = torch.randn(3, 6, 2, 4, dtype=torch.float64, requires_grad=True)
    result = unpad_input_for_concatenated_sequences(hidden, lengths)
    assert len(result) == 4
    packed, indices, cu_seqlens, max_seqlen = result
    assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17] and indices.dtype == torch.int64
    assert cu_seqlens.tolist() == [0, 2, 5, 8, 10, 16] and cu_seqlens.dtype == torch.int32
    assert max_seqlen == 6 and type(max_seqlen) is int
    assert torch.equal(packed, hidden.detach().reshape(18, 2, 4)[indices])
    packed.sum().backward()
    assert hidden.grad.reshape(18, 8).sum(-1).ne(0).nonzero().flatten().tolist() == indices.tolist()


def test_index_first_axis_residual_adds_the_rows_gradient_to_the_residuals():
    """flash-attn's index_first_axis_residual: (input[indices], input detached); input's gradient is the
    residual's plus the selected rows' at their indices."""
    from flashjit.bert_padding import index_first_axis_residual

    x = torch.randn(7, 2, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([5, 1, 2])
    rows, residual = index_first_axis_residual(x, idx)
    assert torch.equal(rows, x[idx]) and torch.equal(residual, x)
    w_rows, w_res = torch.randn_like(rows), torch.randn_like(residual)
    ((rows * w_rows).sum() + (residual * w_res).sum()).backward()
    expected = w_res.clone()
    expected[idx] += w_rows
    torch.testing.assert_close(x.grad, expected)
    assert torch.autograd.gradcheck(lambda t: index_first_axis_residual(t, idx), (x.detach().requires_grad_(),))


def test_index_first_axis_residual_takes_an_expanded_incoming_gradient():
    """residual.sum() hands backward an expanded (stride-0) gradient: adding the rows into it in place
    (flash-attn's scatter_add_) would raise; the gradient is still the residual's plus the rows'."""
    from flashjit.bert_padding import index_first_axis_residual

    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([4, 0])
    rows, residual = index_first_axis_residual(x, idx)
    (rows.sum() + residual.sum()).backward()
    expected = torch.ones(5, 3, dtype=torch.float64)
    expected[idx] += 1
    torch.testing.assert_close(x.grad, expected)

"""One tolerance rule for every numerical GPU test (DESIGN.md, "Testing and measuring").

A kernel's result is compared with an fp32/fp64 reference, and its error is allowed to be at most
`factor` (2) times the error of PyTorch computing the same thing in the inputs' low precision, plus a
floor relative to the reference's own magnitude (so a tensor of small values is judged against its
own scale, never an absolute tolerance that all-zero gradients would pass). Both the maximum and the
mean error are checked: a few bad rows of small values cannot hide under a large maximum elsewhere.
"""
from __future__ import annotations

import torch


def errors(actual: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = (actual.double() - ref.double()).abs()
    return diff.max().item(), diff.mean().item()


def assert_close(name: str, actual: torch.Tensor, ref: torch.Tensor, low: torch.Tensor, factor: float = 2.0,
                 floor: float = 1e-3, atol: float = 0.0) -> None:
    """`actual` (the kernel's) against `ref` (high precision), given `low` (PyTorch's low-precision
    result for the same inputs). floor is relative to ref's largest magnitude (and, for the mean,
    its mean magnitude). atol: an absolute allowance for results that are exactly 0 in exact
    arithmetic while the kernel's algorithm is not (e.g. dq where every row sees one key: FlashAttention's
    D = rowsum(dO o O) uses the rounded O), derived from the problem's scale by the caller."""
    assert actual.shape == ref.shape == low.shape, f"{name}: shapes {actual.shape}, {ref.shape}, {low.shape}"
    assert torch.isfinite(ref).all(), f"{name}: the reference itself is not finite"
    assert torch.isfinite(low).all(), f"{name}: PyTorch's low-precision baseline is not finite"
    assert torch.isfinite(actual).all(), f"{name}: {int((~torch.isfinite(actual)).sum())} non-finite (unwritten or " \
                                         f"NaN-poisoned) elements"
    if ref.numel() == 0:
        return
    scale_max, scale_mean = ref.double().abs().max().item(), ref.double().abs().mean().item()
    err_max, err_mean = errors(actual, ref)
    low_max, low_mean = errors(low, ref)
    bound_max = factor * low_max + floor * scale_max + atol
    bound_mean = factor * low_mean + floor * scale_mean + atol
    assert err_max <= bound_max, (f"{name}: max error {err_max:.3e} > {factor} x PyTorch low-precision "
                                  f"{low_max:.3e} + floor {floor * scale_max:.1e} (|ref| max {scale_max:.3e})")
    assert err_mean <= bound_mean, (f"{name}: mean error {err_mean:.3e} > {factor} x PyTorch low-precision "
                                    f"{low_mean:.3e} + floor {floor * scale_mean:.1e} (|ref| mean {scale_mean:.3e})")


def poisoned_like(t: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
    """An output buffer full of NaN: every element a kernel fails to write shows up."""
    return torch.full_like(t, float("nan"), memory_format=memory_format)

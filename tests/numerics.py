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


# ---- helpers for the GPU tests (added for issue 19) ----------------------------------------------

def reference_and_low(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor | None = None,
                      **kwargs):
    """(ref, low) for attention_reference(q, k, v, **kwargs): ref computed in fp32 from fp32 copies of
    the inputs (its gradients are fp32 too, never rounded to the inputs' dtype), low in the inputs'
    own precision (PyTorch's low-precision math: the baseline of assert_close). Each is a tuple
    (out, lse) without dout, else (out, dq, dk, dv) from autograd with dout (dout.float() for ref),
    and dsink last when kwargs has a learnable_sink."""
    from flashjit.reference import attention_reference

    results = []
    sink = kwargs.pop("learnable_sink", None)
    for dtype, compute in ((torch.float32, torch.float32), (q.dtype, None)):
        leaves = [t.detach().to(dtype).requires_grad_(dout is not None) for t in (q, k, v)]
        if sink is not None:
            leaves.append(sink.detach().to(dtype).requires_grad_(dout is not None))
            kwargs["learnable_sink"] = leaves[3]
        out, lse = attention_reference(*leaves[:3], compute_dtype=compute, **kwargs)
        if dout is None:
            results.append((out.detach(), lse.detach()))
        else:
            out.backward(dout.to(dtype if compute is None else torch.float32))
            results.append((out.detach(), *(t.grad for t in leaves)))
    return results[0], results[1]


def assert_all_close(names, actual, ref, low, **kwargs) -> None:
    """assert_close over parallel sequences (e.g. out, dq, dk, dv)."""
    assert len(names) == len(actual) == len(ref) == len(low)
    for name, a, r, lo in zip(names, actual, ref, low):
        assert_close(name, a, r, lo, **kwargs)


def assert_lse_close(lse: torch.Tensor, ref_lse: torch.Tensor, low_lse: torch.Tensor,
                     sums_rounding: float = 0.0) -> None:
    """The kernel's log-sum-exp: +inf exactly where the reference's is (rows that see no key), and
    elsewhere within 2x the error of PyTorch's low-precision scores and within 2e-3 + 1e-4 |lse|
    (the kernel computes it in fp32: its own, tighter tolerance), plus sums_rounding where the kernel's
    row sums are of rounded values (FwdSm90Config.mma_sums)."""
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse must be +inf exactly for rows that see no key"
    assert torch.equal(lse[~finite], ref_lse[~finite]), "lse of rows that see no key must be +inf"
    assert_close("lse", lse[finite], ref_lse[finite], low_lse[finite])
    err = (lse[finite].double() - ref_lse[finite].double()).abs()
    atol = 2e-3 + sums_rounding
    bound = atol + 1e-4 * ref_lse[finite].double().abs()
    assert bool((err <= bound).all()), f"lse: max error {err.max().item():.3e} beyond {atol:.3g} + 1e-4 |lse|"


def forward_keep_mask(run, batch: int, seqlen_q: int, seqlen_k: int, heads: int, d: int, dropout_p: float,
                      heads_k: int | None = None, dtype=torch.float16, before_each=None,
                      causal: bool = False) -> torch.Tensor:
    """The dropout keep mask [B, H, Sq, Sk] (bool) that a forward kernel used, read exactly from its
    output: run(q, k, v) -> out is called with q = 0 (every score 0, so P = 1/Sk: non-causal, no
    window) and one-hot values, v[j] = e_(j - c0) for the keys of one chunk of d keys (0 elsewhere),
    so out[b, i, h, j - c0] = Z_ij / (Sk (1 - p)): exactly 0 where dropped (the kernels mask with a
    bitwise AND), and fp16(fp32(1 / (1 - p)) / Sk) where kept (checked within one fp16 ulp: a kept
    entry scaled by 256 / (256 - threshold) instead of flash-attn's 1 / (1 - p) fails). One call per
    chunk of d keys; before_each() runs before each call (e.g. to reset torch's generator offset). With
    `causal` (run makes a bottom-right causal call) row i sees n_i = i + 1 + Sk - Sq keys, so its kept
    entries are fp16(fp32(1 / (1 - p)) / n_i) and the entries it cannot see read as dropped."""
    heads_k = heads if heads_k is None else heads_k
    q = torch.zeros(batch, seqlen_q, heads, d, device="cuda", dtype=dtype)
    # k is irrelevant (q = 0), and drawn on the CPU so that torch's CUDA generator, which dropout
    # draws its (seed, offset) from, is not advanced between a caller's reading it and the call.
    k = torch.randn(batch, seqlen_k, heads_k, d, generator=torch.Generator().manual_seed(seqlen_k)).to("cuda", dtype)
    mask = torch.empty(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool, device="cuda")
    seen = torch.full((seqlen_q, 1), seqlen_k, dtype=torch.float32)  # keys a row sees
    if causal:
        seen = (torch.arange(seqlen_q, dtype=torch.float32) + 1 + seqlen_k - seqlen_q).clamp(1, seqlen_k)[:, None]
    kept_value = (torch.tensor(1.0 / (1.0 - dropout_p), dtype=torch.float32) / seen).to(dtype).double().to("cuda")
    ulp = 2.0 ** (-10 if dtype == torch.float16 else -7)
    for c0 in range(0, seqlen_k, d):
        n = min(d, seqlen_k - c0)
        v = torch.zeros(batch, seqlen_k, heads_k, d, device="cuda", dtype=dtype)
        keys = torch.arange(c0, c0 + n, device="cuda")
        v[:, keys, :, keys - c0] = 1
        if before_each is not None:
            before_each()
        out = run(q, k, v).double()
        assert torch.isfinite(out).all(), "dropout readout: non-finite output"
        assert not out[..., n:].any(), "dropout readout: columns past the chunk must be exactly 0"
        chunk = out[..., :n].permute(0, 2, 1, 3)  # [B, H, Sq, n]
        kept = chunk != 0
        want = kept_value.expand(seqlen_q, n).expand_as(chunk)
        bad = (chunk[kept] - want[kept]).abs() > ulp * want[kept]
        assert not bad.any(), (f"dropout readout: {int(bad.sum())} kept entries differ from fp16(1/((1-p) n_i)) "
                               f"(n_i: the keys row i sees), e.g. {chunk[kept][bad][:4].tolist()} against "
                               f"{want[kept][bad][:4].tolist()}")
        mask[..., c0:c0 + n] = kept
    return mask


def mask_mismatch(name: str, got: torch.Tensor, want: torch.Tensor) -> str:
    """A message locating the first entries where two keep masks [B, H, Sq, Sk] differ."""
    diff = (got != want).nonzero()
    return f"{name}: {diff.shape[0]} of {got.numel()} keep bits differ, first [b, h, i, j]: {diff[:5].tolist()}"


def after_a_late_write(dst: torch.Tensor, src: torch.Tensor, fn):
    """fn() called under a side stream on which dst.copy_(src) lands only after ~0.1 s of GPU sleep:
    a kernel launched on the current stream reads src's values; one launched on another (non-legacy)
    stream runs at once and reads dst's old values."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        dst.copy_(src)
        result = fn()
    torch.cuda.synchronize()
    return result


def captured_and_replayed(fn, outputs) -> None:
    """Capture fn() in a CUDA graph with `outputs` NaN-poisoned, check that the capture ran nothing,
    then replay it. A launch on the legacy default stream, which the late-write check above cannot
    see (that stream waits for every blocking stream), is an error under capture or runs outside
    the graph."""
    for t in outputs:
        t.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    assert all(t.isnan().all() for t in outputs), "the capture ran the kernels instead of recording them"
    graph.replay()
    torch.cuda.synchronize()

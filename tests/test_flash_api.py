"""flash_attn_func and friends: gradients of the JIT backward against the fp32 reference, GQA,
determinism, the reference backend's features (window, softcap, ALiBi, dropout) with autograd, the
backend switch, every backward tiling (block sizes, split head dim, both dQ paths) and a training step."""
import math

import pytest
import torch

import flashjit
from flashjit import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from flashjit.reference import attention_reference

gpu = pytest.mark.gpu
DTYPES = [torch.float16, torch.bfloat16]


def _qkv(b, sq, sk, h, hk, d, dtype, device, grad=True):
    mk = lambda s, n: torch.randn(b, s, n, d, device=device, dtype=dtype, requires_grad=grad)  # noqa: E731
    return mk(sq, h), mk(sk, hk), mk(sk, hk)


def _grads(fn, q, k, v, dout):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(dout)
    return out, q.grad.clone(), k.grad.clone(), v.grad.clone()


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 17, 17, 3, 1, 64), (1, 300, 190, 4, 2, 128), (2, 129, 257, 2, 2, 32),
                                   (1, 1, 65, 4, 4, 96), (1, 200, 77, 6, 2, 128), (3, 64, 64, 2, 1, 64),
                                   (1, 77, 300, 4, 2, 256), (2, 100, 33, 2, 1, 160), (1, 129, 200, 2, 2, 192)],
                         ids=str)
def test_jit_gradients_match_reference(shape, causal, dtype, monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    b, sq, sk, h, hk, d = shape
    q, k, v = _qkv(b, sq, sk, h, hk, d, dtype, "cuda")
    dout = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    ours = _grads(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), q, k, v, dout)
    ref = _grads(lambda q, k, v: attention_reference(q, k, v, causal=causal)[0], q, k, v, dout.float())
    low = _grads(lambda q, k, v: attention_reference(q, k, v, causal=causal, compute_dtype=None)[0], q, k, v, dout)
    for name, a, r, lo in zip(("out", "dq", "dk", "dv"), ours, ref, low):
        assert torch.isfinite(a).all(), name
        err, low_err = (a.float() - r.float()).abs().max().item(), (lo.float() - r.float()).abs().max().item()
        assert err <= 2 * low_err + 2e-3, f"{name}: {err:.3e} vs PyTorch low-precision {low_err:.3e}"


@gpu
@pytest.mark.parametrize("config", [c for c in flashjit.get_kernels_to_build(arch="sm_90a")
                                    if isinstance(c, flashjit.BwdConfig)], ids=lambda c: c.name)
def test_backward_build_set(config):
    if config.wgmma and _device_arch() != "sm_90a":
        pytest.skip("the wgmma backward needs sm_90a")
    dtype = torch.bfloat16 if config.dtype == "bf16" else torch.float16
    q, k, v = _qkv(2, 150, 211, 4, 2, config.d_head, dtype, "cuda", grad=False)
    out, lse = flashjit.forward(q, k, v, causal=config.causal, return_lse=True)
    dout = torch.randn_like(q)
    dq, dk, dv = flashjit.backward(dout, q, k, v, out, lse, causal=config.causal, config=config)
    ref = [t.detach().requires_grad_() for t in (q, k, v)]
    attention_reference(*ref, causal=config.causal)[0].backward(dout.float())
    for name, ours, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref):
        scale = r.grad.abs().max().item()
        assert (ours.float() - r.grad).abs().max().item() <= 0.02 * scale + 1e-3, name


@gpu
def test_backward_is_deterministic_and_packed_views_work(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    qkv = torch.randn(2, 333, 3, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(2, 333, 4, 64, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(3):
        qkv.grad = None
        flash_attn_qkvpacked_func(qkv, causal=True, deterministic=True).backward(dout)
        grads.append(qkv.grad.clone())
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[1], grads[2])
    q, kv = qkv[:, :, 0].detach(), qkv[:, :, 1:].detach()
    assert torch.equal(flash_attn_kvpacked_func(q, kv, causal=True), flash_attn_qkvpacked_func(qkv.detach(), causal=True))


@gpu
def test_backward_takes_an_explicit_config_that_matches_the_call():
    q, k, v = _qkv(1, 100, 100, 2, 2, 64, torch.bfloat16, "cuda", grad=False)
    out, lse = flashjit.forward(q, k, v, causal=True, return_lse=True)
    dout = torch.randn_like(q)
    default = flashjit.backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    explicit = flashjit.backward(dout, q, k, v, out, lse, causal=True,
                                 config=flashjit.BwdConfig("bf16", 64, 4, 64, deterministic=True, causal=True))
    for a, b in zip(default, explicit):  # different tilings of the same sums: equal up to rounding
        assert (a.float() - b.float()).abs().max().item() <= 0.02 * b.float().abs().max().item() + 1e-3
    with pytest.raises(ValueError, match=r"causal=False \(the call needs True\)"):
        flashjit.backward(dout, q, k, v, out, lse, causal=True, config=flashjit.BwdConfig("bf16", 64, causal=False))


FEATURES = [  # (kwargs, causal); slopes are made on the GPU in the test
    (dict(window_size=(40, 17)), False), (dict(window_size=(25, -1)), True), (dict(window_size=(-1, 30)), False),
    (dict(softcap=3.0), False), (dict(softcap=5.0), True), (dict(alibi_slopes="heads"), False),
    (dict(alibi_slopes="batch_heads"), True), (dict(window_size=(33, 5), softcap=4.0, alibi_slopes="heads"), False),
]


@gpu
@pytest.mark.parametrize("dtype, deterministic", [(torch.float16, False), (torch.bfloat16, False),
                                                  (torch.bfloat16, True)], ids=str)
@pytest.mark.parametrize("kwargs, causal", FEATURES, ids=str)
def test_jit_window_softcap_alibi_match_reference(kwargs, causal, dtype, deterministic, monkeypatch):
    """Forward and gradients of the in-kernel sliding window, softcap and ALiBi (with GQA, Sq != Sk),
    through both dQ paths (atomic and deterministic)."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    b, sq, sk, h, hk, d = 2, 190, 257, 4, 2, 64
    kwargs = dict(kwargs)
    if kwargs.get("alibi_slopes") == "heads":
        kwargs["alibi_slopes"] = torch.rand(h, device="cuda") * 0.3
    elif kwargs.get("alibi_slopes") == "batch_heads":
        kwargs["alibi_slopes"] = torch.rand(b, h, device="cuda") * 0.3
    q, k, v = _qkv(b, sq, sk, h, hk, d, dtype, "cuda")
    dout = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    ref_kwargs = dict(kwargs, causal=causal, window_size=kwargs.get("window_size", (-1, -1)))
    ours = _grads(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, deterministic=deterministic, **kwargs),
                  q, k, v, dout)
    ref = _grads(lambda q, k, v: attention_reference(q, k, v, **ref_kwargs)[0], q, k, v, dout.float())
    low = _grads(lambda q, k, v: attention_reference(q, k, v, compute_dtype=None, **ref_kwargs)[0], q, k, v, dout)
    for name, a, r, lo in zip(("out", "dq", "dk", "dv"), ours, ref, low):
        assert torch.isfinite(a).all(), name
        err, low_err = (a.float() - r.float()).abs().max().item(), (lo.float() - r.float()).abs().max().item()
        assert err <= 2 * low_err + 2e-3, f"{name}: {err:.3e} vs PyTorch low-precision {low_err:.3e}"


# Explicit backward configs beyond the dispatcher's defaults: (n_warps, block_m, d_split, group_rows,
# deterministic, d_head). Every tiling family: 32-query steps, split head dims below 128 (where they
# are optional), 32-row groups, both dQ paths with a split, and the wide head dims on other tilings.
TILINGS = [(4, 32, 1, 16, False, 64), (8, 128, 2, 16, False, 128), (8, 64, 2, 16, True, 64),
           (4, 32, 2, 16, True, 96), (4, 32, 2, 16, False, 256), (8, 32, 2, 16, False, 192),
           (4, 64, 2, 16, False, 160), (4, 32, 2, 16, True, 256), (8, 64, 2, 32, False, 128),
           (8, 64, 2, 32, True, 96), (8, 64, 4, 32, False, 256), (8, 64, 4, 32, True, 192),
           (4, 64, 1, 32, False, 32)]
# The Hopper kernel (kernels/bwd_sm90.cuh): its two shapes.
WGMMA_TILINGS = [(8, 128, 1, 16, False, 64, True), (8, 64, 1, 16, False, 128, True)]


def _device_arch():
    from flashjit import jit
    return jit.arch_for(torch.cuda.current_device())


@gpu
@pytest.mark.parametrize("tiling, features", [
    *((t, f) for t in TILINGS for f in ("plain", "causal", "window_softcap_alibi", "dropout")),
    *((t, f) for t in WGMMA_TILINGS for f in ("plain", "causal", "window_softcap_alibi", "dropout")
      if not (f == "window_softcap_alibi" and t[5] == 64))], ids=str)
def test_backward_tilings_match_reference(tiling, features):
    """Each tiling holds the score and dropout-mask fragments in its own layout (32-query spans
    split over warps, 16- or 32-row groups, both dQ kernels, warpgroup MMAs): gradients against
    the fp32 reference, with dropout given the kernels' own mask."""
    from flashjit import interface
    from flashjit.config import WGMMA_ARCH
    from flashjit.reference import philox_keep_mask

    n_warps, block_m, d_split, group_rows, deterministic, d, *wgmma = tiling
    if wgmma and _device_arch() != WGMMA_ARCH:
        pytest.skip(f"the wgmma backward needs {WGMMA_ARCH}")
    b, sq, sk, h, hk = 2, 150, 211, 4, 2
    mods, causal = features == "window_softcap_alibi", features == "causal"
    kwargs = dict(window_size=(70, 9), softcap=4.0, alibi_slopes=torch.rand(h, device="cuda") * 0.3) if mods else {}
    ref_kwargs = dict(window_size=kwargs.get("window_size", (-1, -1)), softcap=kwargs.get("softcap", 0.0),
                      alibi_slopes=kwargs.get("alibi_slopes"), causal=causal)
    if features == "dropout":
        philox = (torch.randint(0, 2**62, ()).item(), 4 * torch.randint(0, 2**30, ()).item())
        kwargs = dict(dropout_p=0.17, philox=philox)
        threshold = interface.dropout_threshold(0.17)
        ref_kwargs.update(dropout_p=threshold / 256,
                          dropout_mask=philox_keep_mask(*philox, threshold, b, h, sq, sk, "cuda"))
    q, k, v = _qkv(b, sq, sk, h, hk, d, torch.bfloat16, "cuda", grad=False)
    dout = torch.randn_like(q)
    out, lse = interface.forward(q, k, v, return_lse=True, causal=causal, **kwargs)
    config = flashjit.BwdConfig("bf16", d, n_warps, block_m, d_split, group_rows, deterministic, causal,
                                local=mods, softcap=mods, alibi=mods, dropout=features == "dropout",
                                wgmma=bool(wgmma)).validate()
    grads = interface.backward(dout, q, k, v, out, lse, causal=causal, config=config, **kwargs)
    ref = [t.detach().requires_grad_() for t in (q, k, v)]
    ref_out = attention_reference(*ref, **ref_kwargs)[0]
    ref_out.backward(dout.float())
    for name, ours, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *(t.grad for t in ref))):
        assert torch.isfinite(ours).all(), name
        scale = r.abs().max().item()
        assert (ours.float() - r).abs().max().item() <= 0.02 * scale + 1e-3, name


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal, shape, deterministic", [
    (False, (2, 190, 257, 4, 2, 64), False), (True, (1, 300, 200, 2, 1, 128), False),
    (False, (2, 77, 65, 2, 2, 96), False), (True, (2, 190, 257, 4, 2, 64), True),
    (True, (1, 150, 211, 4, 2, 256), False), (False, (2, 100, 90, 2, 1, 192), True)], ids=str)
def test_jit_dropout_matches_reference_with_the_same_mask(shape, causal, deterministic, dtype):
    """Forward and gradients with in-kernel dropout equal the reference given the kernels' own mask
    (regenerated in PyTorch from the same Philox seed and offset): the forward and backward kernels
    and reference.philox_keep_mask agree bit for bit on which entries are dropped."""
    from flashjit import interface
    from flashjit.reference import philox_keep_mask

    b, sq, sk, h, hk, d = shape
    p = 0.17
    q, k, v = _qkv(b, sq, sk, h, hk, d, dtype, "cuda", grad=False)
    dout = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    philox = (torch.randint(0, 2**62, ()).item(), 4 * torch.randint(0, 2**30, ()).item())
    out, lse = interface.forward(q, k, v, causal=causal, return_lse=True, dropout_p=p, philox=philox)
    grads = interface.backward(dout, q, k, v, out, lse, causal=causal, dropout_p=p, philox=philox,
                               deterministic=deterministic)
    threshold = interface.dropout_threshold(p)
    mask = philox_keep_mask(*philox, threshold, b, h, sq, sk, "cuda")
    assert abs(mask.float().mean().item() - (1 - threshold / 256)) < 0.02
    ref_args = dict(causal=causal, dropout_p=p, dropout_mask=mask)  # flash-attn's scale: 1 / (1 - p)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = attention_reference(*leaves, **ref_args)[0]
    ref_out.backward(dout.float())
    low_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    low_out = attention_reference(*low_leaves, compute_dtype=None, **ref_args)[0]
    low_out.backward(dout)
    for name, a, r, lo in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *(t.grad for t in leaves)),
                              (low_out, *(t.grad for t in low_leaves))):
        err, low_err = (a.float() - r.float()).abs().max().item(), (lo.float() - r.float()).abs().max().item()
        assert err <= 2 * low_err + 2e-3, f"{name}: {err:.3e} vs PyTorch low-precision {low_err:.3e}"


@gpu
def test_jit_dropout_seed_fraction_and_expectation(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    q, k, v = _qkv(2, 128, 128, 2, 2, 64, torch.bfloat16, "cuda", grad=False)
    torch.manual_seed(3)
    a = flash_attn_func(q, k, v, dropout_p=0.25)
    b = flash_attn_func(q, k, v, dropout_p=0.25)
    torch.manual_seed(3)
    assert torch.equal(a, flash_attn_func(q, k, v, dropout_p=0.25))  # torch.manual_seed reproduces it
    assert not torch.equal(a, b)  # and consecutive calls draw new masks
    _, _, probs = flash_attn_func(q, k, v, dropout_p=0.25, return_attn_probs=True)
    assert abs((probs >= 0).float().mean().item() - 0.75) < 0.01
    mean = torch.stack([flash_attn_func(q, k, v, dropout_p=0.25).float() for _ in range(300)]).mean(0)
    assert (mean - flash_attn_func(q, k, v).float()).abs().mean().item() < 0.01  # E[out] = out without dropout


def test_jit_backend_on_cpu_names_the_switch(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    q, k, v = _qkv(1, 8, 8, 2, 2, 64, torch.float16, "cpu", grad=False)
    with pytest.raises(ValueError, match="FLASHJIT_BACKEND=reference"):
        flash_attn_func(q, k, v)


def test_unknown_backend(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "triton")
    q, k, v = _qkv(1, 8, 8, 2, 2, 64, torch.float16, "cpu", grad=False)
    with pytest.raises(ValueError, match="FLASHJIT_BACKEND"):
        flash_attn_func(q, k, v)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dropout_p=1.0), "dropout_p"), (dict(softmax_scale=-1.0), "softmax_scale"),
    (dict(window_size=(-2, 0)), "window_size"), (dict(softcap=-1.0), "softcap"),
    (dict(alibi_slopes=torch.ones(3)), "alibi_slopes"),
])
def test_reference_backend_rejects_bad_arguments(kwargs, match, monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    q, k, v = _qkv(1, 8, 8, 2, 2, 64, torch.float32, "cpu", grad=False)
    with pytest.raises(ValueError, match=match):
        flash_attn_func(q, k, v, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(causal=True), dict(window_size=(3, 2)), dict(softcap=2.0),
                                    dict(alibi_slopes=torch.tensor([0.5, 0.25], dtype=torch.float32)),
                                    dict(causal=True, window_size=(4, -1), softcap=1.5)], ids=str)
def test_reference_backend_features_have_exact_gradients(kwargs, monkeypatch):
    """The reference backend on CPU: autograd gradients agree with finite differences (float64)."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    q, k, v = (torch.randn(1, n, 2, 8, dtype=torch.float64, requires_grad=True) for n in (5, 7, 7))

    def fn(q, k, v):
        return attention_reference(q, k, v, compute_dtype=torch.float64, **{
            **kwargs, "window_size": kwargs.get("window_size", (-1, -1)),
            "causal": kwargs.get("causal", False)})[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))
    out = flash_attn_func(q, k, v, **kwargs)
    assert torch.allclose(out, fn(q, k, v))


def test_reference_window_matches_an_explicit_mask():
    q = torch.randn(1, 6, 1, 8, dtype=torch.float64)
    k, v = torch.randn(1, 9, 1, 8, dtype=torch.float64), torch.randn(1, 9, 1, 8, dtype=torch.float64)
    out, _ = attention_reference(q, k, v, compute_dtype=torch.float64, window_size=(1, 2))
    d = 9 - 6
    for i in range(6):
        keys = [j for j in range(9) if i + d - 1 <= j <= i + d + 2]
        s = torch.stack([q[0, i, 0] @ k[0, j, 0] for j in keys]) / math.sqrt(8)
        expected = (torch.softmax(s, 0)[:, None] * v[0, keys, 0]).sum(0)
        assert torch.allclose(out[0, i, 0], expected)


def test_reference_dropout_fraction_expectation_and_seed(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    q, k, v = _qkv(2, 64, 64, 2, 2, 16, torch.float32, "cpu", grad=False)
    p = 0.3
    torch.manual_seed(1)
    _, _, probs = flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True)
    kept = (probs >= 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.02
    torch.manual_seed(1)
    a = flash_attn_func(q, k, v, dropout_p=p)
    torch.manual_seed(1)
    assert torch.equal(a, flash_attn_func(q, k, v, dropout_p=p))  # torch.manual_seed reproduces it
    mean = torch.stack([flash_attn_func(q, k, v, dropout_p=p) for _ in range(400)]).mean(0)
    exact = flash_attn_func(q, k, v)
    assert (mean - exact).abs().mean().item() < 0.02  # E[dropout(P) / (1 - p)] = P


class FlashSelfAttention(torch.nn.Module):
    """The seed's module: nn.Linear qkv -> flash_attn_qkvpacked_func -> out_proj."""

    def __init__(self, hidden, heads, causal=True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.out_proj = torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        b, s, hidden = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.heads, hidden // self.heads)
        return self.out_proj(flash_attn_qkvpacked_func(qkv, causal=self.causal).reshape(b, s, hidden))


@gpu
def test_training_step_matches_reference_backend(monkeypatch):
    torch.manual_seed(0)
    model = FlashSelfAttention(256, 4).cuda().to(torch.bfloat16)
    x = torch.randn(2, 200, 256, device="cuda", dtype=torch.bfloat16)
    target = torch.randn_like(x)
    results = {}
    for name in ("jit", "reference"):
        monkeypatch.setenv("FLASHJIT_BACKEND", name)
        model.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), target.float())
        loss.backward()
        results[name] = (loss.item(), [p.grad.float().clone() for p in model.parameters()])
    assert abs(results["jit"][0] - results["reference"][0]) < 1e-2
    for g_jit, g_ref in zip(results["jit"][1], results["reference"][1]):
        assert torch.allclose(g_jit, g_ref, atol=2e-2, rtol=5e-2), (g_jit - g_ref).abs().max()


@gpu
def test_backward_logs_its_dispatch(caplog, monkeypatch):
    """DEBUG logging names the backward kernel each call dispatched to, and the arch that chose it."""
    import logging

    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    q, k, v = _qkv(1, 130, 130, 2, 2, 128, torch.bfloat16, "cuda", grad=True)
    with caplog.at_level(logging.DEBUG, logger="flashjit"):
        flashjit.flash_attn_func(q, k, v, causal=True).sum().backward()
    arch = _device_arch()
    line = next(r.getMessage() for r in caplog.records if "backward [B=1, Sq=130" in r.getMessage())
    assert f"on {arch}" in line and "bwd_bf16_d128_" in line
    assert line.split(" dispatched to ")[1].split()[0].endswith("_wgmma") == (arch == "sm_90a")

"""flashjit.sdpa: flashjit behind SDPA's flash backend (torch.nn.attention's flash-attention registry).

CPU tier: the missing-registry message, activate/deactivate bookkeeping in torch's registry and the
dispatcher, and the op glue (layouts, arguments, rng_state, fallbacks) with the two ops registered
for the CPU key over a fake flashjit. GPU tier: F.scaled_dot_product_attention under
SDPBackend.FLASH_ATTENTION against the fp32 reference, forward and backward, with flashjit's calls
counted; deactivate() gives PyTorch's kernel back."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from flashjit import interface, sdpa

attention = pytest.importorskip("torch.nn.attention")
HAS_REGISTRY = all(hasattr(attention, name) for name in sdpa._REGISTRY_FUNCTIONS)
needs_registry = pytest.mark.skipif(not HAS_REGISTRY, reason=f"torch {torch.__version__} has no flash-attention "
                                    "registry in torch.nn.attention")


@pytest.fixture
def restored():
    """Whatever a test activates, the process leaves it with PyTorch's own kernel."""
    yield
    if HAS_REGISTRY and attention.current_flash_attention_impl() is not None:
        attention.restore_flash_attention_impl()


def _cuda_kernel_of(op: str) -> str:
    """The line of the dispatcher's table that says who serves `op` on CUDA; "" where nobody does (a
    CPU-only build of torch registers no CUDA kernel of its own, yet activate() still registers one)."""
    table = torch._C._dispatch_dump(f"aten::{op}")
    return next((line for line in table.splitlines() if line.startswith("CUDA:")), "")


# ---- CPU: registry and bookkeeping ---------------------------------------------------------------

def test_a_torch_without_the_registry_gets_a_message_naming_the_version(monkeypatch):
    monkeypatch.delattr(attention, "restore_flash_attention_impl", raising=False)
    with pytest.raises(RuntimeError) as info:
        sdpa.activate()
    message = str(info.value)
    assert "PyTorch 2.14" in message and torch.__version__ in message and "restore_flash_attention_impl" in message


def test_nothing_is_activated_or_imported_by_import_flashjit():
    code = ("import sys, flashjit; assert 'torch' not in sys.modules and 'flashjit.sdpa' not in sys.modules; "
            "import flashjit.sdpa, torch.nn.attention as a; assert a.current_flash_attention_impl() is None; "
            "assert 'flashjit' in a.list_flash_attention_impls(); print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@needs_registry
def test_activate_and_deactivate_swap_the_cuda_kernels_idempotently(restored):
    stock = {op: _cuda_kernel_of(op) for op in (sdpa.FORWARD_OP, sdpa.BACKWARD_OP)}
    assert all("sdpa.py" not in line for line in stock.values())
    for _ in range(2):  # idempotent: a second activate() changes nothing
        sdpa.activate()
        assert attention.current_flash_attention_impl() == "flashjit" and sdpa.is_active()
        for op in stock:
            assert "flashjit/sdpa.py" in _cuda_kernel_of(op).replace("\\", "/")
    for _ in range(2):
        sdpa.deactivate()
        assert attention.current_flash_attention_impl() is None and not sdpa.is_active()
        assert {op: _cuda_kernel_of(op) for op in stock} == stock
    attention.activate_flash_attention_impl("flashjit")  # torch's own call works the same
    assert "flashjit/sdpa.py" in _cuda_kernel_of(sdpa.FORWARD_OP).replace("\\", "/")


@needs_registry
def test_deactivate_leaves_another_impl_alone(restored, monkeypatch):
    removed = []

    class Handle:
        def remove(self):
            removed.append(True)

    attention.register_flash_attention_impl("other", register_fn=Handle)
    attention.activate_flash_attention_impl("other")
    sdpa.deactivate()
    assert attention.current_flash_attention_impl() == "other" and not removed
    sdpa.activate()  # replaces it, as the registry does between impls
    assert attention.current_flash_attention_impl() == "flashjit" and removed == [True]


@pytest.mark.parametrize("seed", [0, 12345, 2**63 + 5, 2**64 - 1])
def test_philox_state_round_trips_through_rng_state(seed):
    packed = sdpa._pack_philox(seed, 2**40 + 3)
    assert packed.dtype == torch.uint64 and packed.shape == (2,) and packed.device.type == "cpu"
    assert sdpa._unpack_philox(packed) == (seed, 2**40 + 3)


# ---- CPU: the op glue over a fake flashjit ---------------------------------------------------------

class FakeFlashjit:
    """Stands in for interface.forward/backward/philox_state and records what the glue passes."""

    def __init__(self):
        self.calls = []

    def philox_state(self, device_index):
        return 2**63 + 11, 4096

    def forward(self, q, k, v, causal=False, softmax_scale=None, return_lse=False, dropout_p=0.0, philox=None,
                out=None):
        self.calls.append(("forward", q, k, v, dict(causal=causal, scale=softmax_scale, p=dropout_p, philox=philox)))
        if out is None:  # like the kernels: a fresh [B, Sq, H, D]-contiguous output
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        return out.copy_(q * 2), torch.full((q.shape[0], q.shape[2], q.shape[1]), 0.5)

    def backward(self, dout, q, k, v, out, lse, causal=False, softmax_scale=None, dropout_p=0.0, philox=None,
                 deterministic=False, dq=None, dk=None, dv=None):
        self.calls.append(("backward", dout, q, k, v, out, dict(causal=causal, scale=softmax_scale, p=dropout_p,
                                                                  philox=philox, deterministic=deterministic)))
        grads = []
        for given, like, value in ((dq, q, 3 * dout), (dk, k, 4 * k), (dv, v, 5 * v)):
            given = torch.empty_like(like, memory_format=torch.contiguous_format) if given is None else given
            grads.append(given.copy_(value))
        return tuple(grads)


@pytest.fixture
def on_cpu(monkeypatch):
    """The two ops registered for the CPU key (where they have no kernel of their own) over a fake."""
    fake = FakeFlashjit()
    for name in ("forward", "backward", "philox_state"):
        monkeypatch.setattr(interface, name, getattr(fake, name))
    handle = sdpa._register("CPU")
    yield fake
    handle.remove()


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("heads_k, sq, sk, causal, p", [(4, 5, 5, False, 0.0), (2, 3, 9, True, 0.0),
                                                        (1, 6, 6, True, 0.25)])
def test_op_glue_passes_views_arguments_and_philox(on_cpu, heads_k, sq, sk, causal, p, layout):
    b, h, d = 2, 4, 8

    def make(*shape):  # [B, H, S, D], contiguous or a transposed [B, S, H, D] (as models project it)
        t = torch.randn(*shape) if layout == "bhsd" else torch.randn(shape[0], shape[2], shape[1], d).transpose(1, 2)
        return t.requires_grad_()

    q = make(b, h, sq, d)
    k, v = (make(b, heads_k, sk, d) for _ in range(2))
    result = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, p, causal, scale=0.3)
    out, lse, cum_q, cum_k, max_q, max_k, rng_state, unused, debug_mask = result
    name, fq, fk, fv, args = on_cpu.calls[0]
    assert name == "forward" and args == dict(causal=causal, scale=0.3, p=p,
                                              philox=(2**63 + 11, 4096) if p else None)
    for given, seen in ((q, fq), (k, fk), (v, fv)):  # [B, S, H, D] views of the caller's memory: no copies
        assert seen.data_ptr() == given.data_ptr() and seen.shape == given.transpose(1, 2).shape
    # Laid out like q, as PyTorch's kernel and meta function (which torch.compile trusts) lay it out.
    assert out.shape == q.shape and sdpa._same_layout(out, q)
    torch.testing.assert_close(out, q.detach() * 2)
    assert lse.shape == (b, h, sq) and cum_q is None and cum_k is None and (max_q, max_k) == (sq, sk)
    assert unused.shape == () and debug_mask.numel() == 0
    if p:
        assert rng_state.device.type == "cpu" and sdpa._unpack_philox(rng_state) == (2**63 + 11, 4096)

    dout = torch.randn_like(out)
    out.backward(dout)  # autograd: derivatives.yaml calls the backward op with this forward's outputs
    name, bdout, bq, bk, bv, bout, bargs = on_cpu.calls[1]
    assert name == "backward" and bargs == dict(causal=causal, scale=0.3, p=p, philox=args["philox"],
                                                deterministic=False)
    assert bq.data_ptr() == q.data_ptr() and bout.data_ptr() == out.data_ptr() and bdout.shape == fq.shape
    torch.testing.assert_close(q.grad, 3 * dout)
    torch.testing.assert_close(k.grad, 4 * k.detach())
    assert k.grad.shape == (b, heads_k, sk, d)
    assert all(sdpa._same_layout(t.grad, t) for t in (q, k, v))  # gradients laid out like their inputs too


class FakeOriginal:
    """PyTorch's kernel as torch.library.get_kernel gives it: call_boxed(keyset, *args, **kwargs)."""

    def __init__(self):
        self.calls = []

    def call_boxed(self, keyset, *args, **kwargs):
        self.calls.append((keyset, args, kwargs))
        return "original"


def test_what_flashjit_refuses_runs_the_original_kernel(monkeypatch):
    fake, original = FakeFlashjit(), FakeOriginal()
    monkeypatch.setattr(interface, "philox_state", fake.philox_state)
    q = torch.randn(1, 2, 3, 8)
    # return_debug_mask: PyTorch's debug layout, which flashjit does not write
    assert sdpa._forward(original, "keys", q, q, q, 0.1, False, True, scale=None) == "original"
    assert original.calls[-1] == ("keys", (q, q, q, 0.1, False, True), {"scale": None})

    def refuse(*args, **kwargs):
        raise ValueError("head_dim 300 is not supported")

    monkeypatch.setattr(interface, "forward", refuse)
    monkeypatch.setattr(interface, "backward", refuse)
    assert sdpa._forward(original, "keys", q, q, q, 0.0, True, False, scale=0.5) == "original"
    lse, seed = torch.zeros(1, 2, 3), torch.empty(2, dtype=torch.uint64)
    assert sdpa._backward(original, "keys", q, q, q, q, q, lse, None, None, 3, 3, 0.0, True, seed, seed,
                          scale=None) == "original"
    # with flashjit's dropout, PyTorch's backward cannot regenerate the mask: a clear error instead
    with pytest.raises(RuntimeError, match="dropout: head_dim 300"):
        sdpa._backward(original, "keys", q, q, q, q, q, lse, None, None, 3, 3, 0.1, True,
                       sdpa._pack_philox(1, 2), seed, scale=None)
    # a dropout forward that PyTorch's kernel ran (its rng_state lives on the device): its backward too
    on_device = torch.empty(2, dtype=torch.uint64, device="meta")
    n = len(original.calls)
    assert sdpa._backward(original, "keys", q, q, q, q, q, lse, None, None, 3, 3, 0.1, False, on_device, seed,
                          scale=None) == "original"
    assert len(original.calls) == n + 1


def test_without_an_original_kernel_the_refusal_says_how_to_get_pytorchs():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(RuntimeError, match="deactivate"):
        sdpa._forward(None, "keys", q, q, q, 0.0, False, True)


# ---- GPU: the real kernels behind F.scaled_dot_product_attention -----------------------------------

class Counted:
    def __init__(self, monkeypatch):
        self.forward = self.backward = 0
        real_forward, real_backward = interface.forward, interface.backward

        def forward(*args, **kwargs):
            self.forward += 1
            return real_forward(*args, **kwargs)

        def backward(*args, **kwargs):
            self.backward += 1
            return real_backward(*args, **kwargs)

        monkeypatch.setattr(interface, "forward", forward)
        monkeypatch.setattr(interface, "backward", backward)


@pytest.fixture
def active(restored, monkeypatch):
    if not HAS_REGISTRY:
        pytest.skip(f"torch {torch.__version__} has no flash-attention registry")
    counted = Counted(monkeypatch)
    sdpa.activate()
    yield counted
    sdpa.deactivate()


def _flash_sdpa(q, k, v, **kwargs):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _check_against_reference(q, k, v, out, dout, causal, scale=None, dropout_mask=None, dropout_p=0.0):
    """out and the grads of q, k, v ([B, H, S, D]) against the fp32 reference on [B, S, H, D] views."""
    from numerics import assert_all_close, reference_and_low

    ref, low = reference_and_low(*(t.detach().transpose(1, 2) for t in (q, k, v)), dout.transpose(1, 2),
                                 causal=causal, softmax_scale=scale, dropout_p=dropout_p, dropout_mask=dropout_mask)
    actual = [t.transpose(1, 2) for t in (out.detach(), q.grad, k.grad, v.grad)]
    assert_all_close(("out", "dq", "dk", "dv"), actual, ref, low)


CASES = [  # batch, heads, heads_k, seqlen_q, seqlen_k, head_dim
    (2, 4, 4, 128, 128, 64),
    (1, 8, 2, 77, 77, 128),      # GQA: enable_gqa=True passes k/v with 2 heads to the flash op
    (2, 3, 3, 64, 200, 96),      # Sq != Sk (not causal: SDPA sends causal only for Sq == Sk)
    (1, 2, 2, 17, 17, 40),       # an odd length, a head dim SDPA pads to 40 (a multiple of 8 already)
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b, h, hk, sq, sk, d", CASES)
def test_sdpa_flash_backend_runs_flashjit_and_matches_the_reference(active, b, h, hk, sq, sk, d, causal, dtype):
    if causal and sq != sk:
        pytest.skip("SDPA never sends is_causal with Sq != Sk to the flash backend (see the causal_lower_right test)")
    q = torch.randn(b, h, sq, d, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, hk, sk, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    out = _flash_sdpa(q, k, v, is_causal=causal, enable_gqa=hk != h)
    dout = torch.randn_like(out)
    out.backward(dout)
    assert (active.forward, active.backward) == (1, 1), "flashjit did not run behind SDPA's flash backend"
    _check_against_reference(q, k, v, out, dout, causal)


@pytest.mark.gpu
def test_a_scale_reaches_the_kernel(active):
    q, k, v = (torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = _flash_sdpa(q, k, v, scale=0.05)
    dout = torch.randn_like(out)
    out.backward(dout)
    assert (active.forward, active.backward) == (1, 1)
    _check_against_reference(q, k, v, out, dout, False, scale=0.05)


@pytest.mark.gpu
def test_causal_lower_right_is_flashjits_bottom_right_mask(active):
    """torch.nn.attention.bias.causal_lower_right with Sq < Sk calls the flash op with is_causal=True,
    which there means bottom-right alignment: flashjit's (and flash-attn 2's) causal mask."""
    from torch.nn.attention.bias import causal_lower_right

    q = torch.randn(2, 4, 50, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 4, 130, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    out = _flash_sdpa(q, k, v, attn_mask=causal_lower_right(50, 130))
    dout = torch.randn_like(out)
    out.backward(dout)
    assert (active.forward, active.backward) == (1, 1)
    _check_against_reference(q, k, v, out, dout, True)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_backward_regenerates_the_forwards_mask(active, causal):
    """The op's rng_state is flashjit's Philox (seed, offset): the forward and the backward match the
    reference run with reference.philox_keep_mask of it."""
    from flashjit.reference import philox_keep_mask

    b, h, s, d, p = 2, 4, 96, 64, 0.2
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    out, *_, rng_state, _unused, _debug = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, p, causal)
    dout = torch.randn_like(out)
    out.backward(dout)
    assert (active.forward, active.backward) == (1, 1)
    mask = philox_keep_mask(*sdpa._unpack_philox(rng_state), interface.dropout_threshold(p), b, h, s, s, "cuda")
    _check_against_reference(q, k, v, out, dout, causal, dropout_mask=mask, dropout_p=p)


@pytest.mark.gpu
def test_dropout_through_sdpa_is_reproducible_from_the_seed(active):
    q, k, v = (torch.randn(1, 4, 80, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, 4, 80, 64, device="cuda", dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        out = _flash_sdpa(q, k, v, dropout_p=0.3)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        runs.append((out, *grads))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    torch.manual_seed(8)
    assert not torch.equal(_flash_sdpa(q, k, v, dropout_p=0.3), runs[0][0])


@pytest.mark.gpu
def test_debug_mask_calls_run_pytorchs_kernel_forward_and_backward(active):
    q, k, v = (torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    out, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.1, False, True)
    out.sum().backward()  # PyTorch's rng_state (on the device) sends the backward to PyTorch's kernel too
    assert (active.forward, active.backward) == (0, 0)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.gpu
def test_deactivate_gives_pytorchs_kernel_back(active):
    sdpa.deactivate()
    q, k, v = (torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = _flash_sdpa(q, k, v, is_causal=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    assert (active.forward, active.backward) == (0, 0)
    _check_against_reference(q, k, v, out, dout, True)


@pytest.mark.gpu
def test_torch_compile_runs_flashjit_behind_sdpa(active):
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    compiled = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), fullgraph=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = compiled(q, k, v)
    dout = torch.randn_like(out)
    out.backward(dout)
    assert active.forward >= 1 and active.backward >= 1
    _check_against_reference(q, k, v, out, dout, True)

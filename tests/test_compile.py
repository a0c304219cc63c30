"""torch.compile, CUDA graphs and the eager fast path of flash_attn_func.

CPU tests run the custom ops (flashjit/ops.py) on the reference backend, so CI compiles and runs
the same graphs a GPU would; GPU tests run them on the kernels.
"""
from __future__ import annotations

import pytest
import torch

import flashjit
from flashjit import flash_attn_func, interface, ops

CASES = [  # (Sq, Sk, H, H_k, d, flash_attn_func keywords)
    (37, 37, 4, 4, 64, dict(causal=True)),
    (20, 45, 6, 2, 32, dict(window_size=(7, 3), softcap=5.0)),
    (33, 17, 4, 1, 40, dict(causal=True, softmax_scale=0.3)),
]


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    _reset()
    yield
    torch._dynamo.reset()


def _reset():
    """A fresh dynamo: no cached graphs, counters at zero."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def _inputs(batch, sq, sk, heads, heads_k, d, device, dtype, sink=False):
    q = torch.randn(batch, sq, heads, d, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(batch, sk, heads_k, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    learnable_sink = torch.randn(heads, device=device, dtype=torch.float32, requires_grad=True) if sink else None
    return q, k, v, learnable_sink


def _run(fn, q, k, v, learnable_sink, kwargs, grad_out):
    """out and the gradients of every input that has one, from fresh leaves."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (q, k, v, learnable_sink)]
    extra = {} if learnable_sink is None else dict(learnable_sink=leaves[3])
    out = fn(*leaves[:3], **kwargs, **extra)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves if t is not None]


def _graph_breaks_and_graphs():
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_fullgraph_compile_matches_eager_on_the_reference(reference_backend, case):
    """fullgraph=True traces flash_attn_func (forward and backward) with no graph break; the compiled
    graph's ops give what eager flash_attn_func gives."""
    sq, sk, heads, heads_k, d, kwargs = CASES[case]
    q, k, v, sink = _inputs(2, sq, sk, heads, heads_k, d, "cpu", torch.float32, sink=case == 1)
    grad_out = torch.randn(2, sq, heads, d)
    compiled = torch.compile(flash_attn_func, fullgraph=True)
    got = _run(compiled, q, k, v, sink, kwargs, grad_out)
    want = _run(flash_attn_func, q, k, v, sink, kwargs, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert _graph_breaks_and_graphs()[0] == 0


def test_dynamic_shapes_compile_once(reference_backend):
    """dynamic=True: new sequence lengths and batch sizes reuse the one graph (no recompile)."""
    compiled = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, causal=True), fullgraph=True, dynamic=True)
    torch._dynamo.config.error_on_recompile = True
    try:
        for batch, seqlen in ((2, 16), (4, 41), (5, 100)):  # (no size 1 or size equal to heads: specialised)
            q, k, v, _ = _inputs(batch, seqlen, seqlen, 3, 3, 32, "cpu", torch.float32)
            out = compiled(q, k, v)
            out.sum().backward()
            torch.testing.assert_close(out, flash_attn_func(q, k, v, causal=True), atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert _graph_breaks_and_graphs() == (0, 1)


def test_compiled_dropout_regenerates_the_forwards_mask(reference_backend):
    """Dropout under compile: the forward's (seed, offset) travels to the backward, so the gradients are
    those of the mask the forward applied (compared with the op called eagerly from the same seed)."""
    q, k, v, _ = _inputs(1, 24, 24, 2, 2, 32, "cpu", torch.float32)
    grad_out = torch.randn(1, 24, 2, 32)
    kwargs = dict(dropout_p=0.3, causal=True)
    torch.manual_seed(7)
    got = _run(torch.compile(flash_attn_func, fullgraph=True), q, k, v, None, kwargs, grad_out)

    def eager_op(q, k, v, dropout_p, causal):
        return ops.fwd(q, k, v, None, None, None, causal, -1, 0, 0.0, dropout_p, False)[0]

    torch.manual_seed(7)
    want = _run(eager_op, q, k, v, None, kwargs, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    plain = flash_attn_func(q, k, v, causal=True)
    assert (got[0] - plain).abs().max() > 0.1  # dropout happened


def test_return_attn_probs_under_compile_gives_the_lse_and_refuses_only_s_dmask(reference_backend):
    """Without dropout S_dmask is empty (flash-attn's), so code that asks for the lse this way compiles;
    with dropout it would materialise [B, H, Sq, Sk] and is refused with a message."""
    q, k, v, _ = _inputs(1, 8, 8, 1, 1, 16, "cpu", torch.float32)
    out, lse, s_dmask = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, causal=True, return_attn_probs=True),
                                      fullgraph=True)(q, k, v)
    want_out, want_lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    assert s_dmask.numel() == 0 and s_dmask.dtype == q.dtype
    assert out.requires_grad and not lse.requires_grad  # as the kernels' eager call: no gradient through the lse
    with pytest.raises(Exception, match="return_attn_probs=True with dropout is not supported under torch.compile"):
        torch.compile(lambda q, k, v: flash_attn_func(q, k, v, dropout_p=0.1, return_attn_probs=True),
                      fullgraph=True)(q, k, v)


def test_strided_last_dim_under_compile_is_copied_as_eager(reference_backend):
    q, k, v, _ = _inputs(1, 8, 8, 1, 1, 16, "cpu", torch.float32)
    strided = [t.transpose(-1, -3).contiguous().transpose(-1, -3) for t in (q, k, v)]  # same values, stride(-1) != 1
    assert all(t.stride(-1) != 1 for t in strided)
    got = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, causal=True), fullgraph=True)(*strided)
    torch.testing.assert_close(got, flash_attn_func(q, k, v, causal=True))


def test_opcheck_of_the_forward_op(reference_backend):
    """torch.library.opcheck: schema, fake (meta) shapes and strides, autograd registration and AOT
    dispatch of flashjit::fwd agree with its real outputs (flashjit::bwd: on the GPU, below; its reference
    body's torch.func.vjp cannot run on opcheck's tensor wrappers)."""
    q, k, v, sink = _inputs(2, 19, 11, 4, 2, 24, "cpu", torch.float32, sink=True)
    torch.library.opcheck(ops.fwd, (q, k, v, None, sink, None, True, -1, 0, 0.0, 0.0, False))


# ---- GPU: the kernels under compile, CUDA graphs, the launch plan ----

def _gpu_inputs(sq=300, sk=300, heads=4, heads_k=2, d=64, dtype=torch.bfloat16, batch=2):
    return _inputs(batch, sq, sk, heads, heads_k, d, "cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", [dict(causal=True), dict(window_size=(64, 8), softcap=20.0), dict()],
                         ids=["causal", "window-softcap", "plain"])
def test_fullgraph_compile_on_the_kernels(kwargs):
    _reset()
    q, k, v, _ = _gpu_inputs()
    grad_out = torch.randn_like(q)
    got = _run(torch.compile(flash_attn_func, fullgraph=True), q, k, v, None, kwargs, grad_out)
    want = _run(flash_attn_func, q, k, v, None, kwargs, grad_out)
    for g, w in zip(got, want):  # the same kernels: equal up to dQ's atomic summation order
        torch.testing.assert_close(g, w, atol=2e-2, rtol=0)
    assert _graph_breaks_and_graphs()[0] == 0


@pytest.mark.gpu
def test_dynamic_compile_on_the_kernels_does_not_recompile():
    _reset()
    compiled = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, causal=True), fullgraph=True, dynamic=True)
    torch._dynamo.config.error_on_recompile = True
    try:
        for seqlen in (128, 257, 1000):
            q, k, v, _ = _gpu_inputs(seqlen, seqlen)
            out = compiled(q, k, v)
            out.sum().backward()
            torch.testing.assert_close(out, flash_attn_func(q, k, v, causal=True), atol=0, rtol=0)
    finally:
        torch._dynamo.config.error_on_recompile = False


@pytest.mark.gpu
def test_reduce_overhead_mode_replays_on_new_inputs():
    """mode="reduce-overhead": inductor captures the graph in a CUDA graph and replays it; every step's
    fresh inputs give that step's own result (forward and gradients). The grid is this test's alone, so the
    causal tile walk flashjit keeps on the device for it (interface._walk) is made inside the graph tree's
    warm-up, where every allocation of the thread goes to the graph's pool: kept there, it failed the tree's
    check of the pool (as transformers' static-cache generate, which compiles so, did)."""
    from flashjit import interface

    _reset()
    walks_before = set(interface._walks)
    compiled = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, causal=True), mode="reduce-overhead",
                             fullgraph=True)
    for _ in range(4):  # warm-up, record, then replays
        q, k, v, _ = _gpu_inputs(264, 264, heads=6, heads_k=2, batch=3)
        grad_out = torch.randn_like(q)
        got = _run(compiled, q, k, v, None, {}, grad_out)
        want = _run(lambda q, k, v: flash_attn_func(q, k, v, causal=True), q, k, v, None, {}, grad_out)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=2e-2, rtol=0)
    made = [walk for key, walk in interface._walks.items() if key not in walks_before and walk is not None]
    assert made, "no tile walk was made for this grid: the test no longer covers the walk's allocation"


@pytest.mark.gpu
def test_cuda_graph_capture_replays_on_new_inputs():
    """flash_attn_func (eager, the launch-plan path) captured in a torch.cuda.CUDAGraph: replays read
    the static inputs' new contents."""
    q, k, v = (t.detach() for t in _gpu_inputs(200, 333)[:3])
    static = [t.clone() for t in (q, k, v)]
    flash_attn_func(*static, causal=True)  # compile and plan outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        flash_attn_func(*static, causal=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = flash_attn_func(*static, causal=True)
    for _ in range(2):
        fresh = [torch.randn_like(t) for t in static]
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        torch.testing.assert_close(static_out, flash_attn_func(*fresh, causal=True), atol=0, rtol=0)


@pytest.mark.gpu
def test_launch_plan_is_reused_and_checks_still_run():
    """The second call of a shape uses the plan made by the first (no config choice), gives the same
    result, and a call that differs in anything the plan depends on does not use it."""
    q, k, v = (t.detach() for t in _gpu_inputs(100, 150)[:3])
    first = flashjit.forward(q, k, v, causal=True)
    plans = [key for key in interface._plans if key[0] == q.shape and key[4] == k.shape]
    assert plans, "the first call made no plan"
    calls = []
    original = interface.resolve_config
    interface.resolve_config = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    try:
        torch.testing.assert_close(flashjit.forward(q, k, v, causal=True), first, atol=0, rtol=0)
        assert not calls, "the planned call chose a config again"
        flashjit.forward(q, k, v, causal=False)  # another key: the full path
        assert calls
        calls.clear()
        misaligned = torch.empty(q.numel() + 1, dtype=q.dtype, device=q.device)[1:].view(q.shape).copy_(q)
        torch.testing.assert_close(flashjit.forward(misaligned, k, v, causal=True), first, atol=0, rtol=0)
        assert calls, "a misaligned input used the plan"
    finally:
        interface.resolve_config = original
    with pytest.raises(ValueError, match="dropout_p must be in"):
        flash_attn_func(q, k, v, dropout_p=1.5)


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", [dict(causal=True, deterministic=True),
                                    dict(dropout_p=0.2, philox=(7, 64), window_size=(40, 3), deterministic=True),
                                    dict(causal=True)], ids=["causal", "dropout-window", "atomic"])
def test_backward_plan_is_reused_and_checks_still_run(kwargs):
    """A repeated backward uses the plan its first call made (no config choice) and computes the same
    gradients (bit for bit where deterministic; the atomic path to fp32 rounding); a call with a
    misaligned input, a caller's dq or another flag takes the full path."""
    q, k, v = (t.detach() for t in _gpu_inputs(100, 150)[:3])
    fwd_kwargs = {name: value for name, value in kwargs.items() if name != "deterministic"}
    out, lse = flashjit.forward(q, k, v, return_lse=True, **fwd_kwargs)
    dout = torch.randn_like(out)
    first = flashjit.backward(dout, q, k, v, out, lse, **kwargs)
    calls = []
    original = interface.bwd_config
    interface.bwd_config = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    exact = dict(atol=0, rtol=0) if kwargs.get("deterministic") else dict(atol=2e-2, rtol=0)
    try:
        again = flashjit.backward(dout, q, k, v, out, lse, **kwargs)
        assert not calls, "the planned call chose a config again"
        for name, a, b in zip(("dq", "dk", "dv"), again, first):
            torch.testing.assert_close(a, b, **exact, msg=name)
        misaligned = torch.empty(dout.numel() + 1, dtype=dout.dtype, device=dout.device)[1:].view(dout.shape)
        torch.testing.assert_close(flashjit.backward(misaligned.copy_(dout), q, k, v, out, lse, **kwargs)[2], first[2],
                                   **exact)
        assert calls, "a misaligned input used the plan"
        calls.clear()
        dq = torch.full_like(q, float("nan"))
        flashjit.backward(dout, q, k, v, out, lse, dq=dq, **kwargs)
        assert calls and not dq.isnan().any(), "a caller's dq used the plan or was not written"
        calls.clear()
        flashjit.backward(dout, q, k, v, out, lse, **dict(kwargs, softcap=5.0))
        assert calls, "another softcap used the plan"
    finally:
        interface.bwd_config = original


@pytest.mark.gpu
def test_opcheck_of_the_ops_on_the_kernels():
    q, k, v, _ = _gpu_inputs(77, 130, d=64)
    sink = torch.randn(q.shape[2], device="cuda", requires_grad=True)
    torch.library.opcheck(ops.fwd, (q, k, v, None, sink, None, True, -1, 0, 0.0, 0.0, False))
    out, lse, rng = ops.fwd(q, k, v, None, sink, None, True, -1, 0, 0.0, 0.0, True)
    # The backward op's inputs detached: it has no autograd formula of its own (no double backward).
    torch.library.opcheck(ops.bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(),
                                    lse.detach(), rng,
                                    None, sink.detach(), None, True, -1, 0, 0.0, 0.0, True))


def _varlen_inputs(lengths_q, lengths_k, heads, heads_k, d, device, dtype):
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device=device)
                  for n in (lengths_q, lengths_k))
    q = torch.randn(sum(lengths_q), heads, d, device=device, dtype=dtype)
    k, v = (torch.randn(sum(lengths_k), heads_k, d, device=device, dtype=dtype) for _ in range(2))
    return q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k)


def _varlen_case(device, dtype, compiled_kwargs, **kwargs):
    """out and gradients of flash_attn_varlen_func compiled (fullgraph) and eager, from the same leaves."""
    q, k, v, cu_q, cu_k, max_q, max_k = _varlen_inputs([5, 0, 17, 9], [7, 3, 17, 20], 4, 2, 32, device, dtype)
    grad_out = torch.randn_like(q)

    def call(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, cu_q, cu_k, max_q, max_k, **kwargs)
        out.backward(grad_out)
        return [out.detach()] + [t.grad for t in leaves]

    return (call(torch.compile(flashjit.flash_attn_varlen_func, fullgraph=True, **compiled_kwargs)),
            call(flashjit.flash_attn_varlen_func))


def test_varlen_fullgraph_compile_matches_eager_on_the_reference(reference_backend):
    got, want = _varlen_case("cpu", torch.float32, {}, causal=True, softcap=4.0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert _graph_breaks_and_graphs()[0] == 0


def test_varlen_return_attn_probs_under_compile_gives_the_lse_and_refuses_only_s_dmask(reference_backend):
    """As flash_attn_func's: without dropout the compiled varlen call returns the lse and an empty S_dmask."""
    q, k, v, cu_q, cu_k, max_q, max_k = _varlen_inputs([5, 0, 17, 9], [7, 3, 17, 20], 4, 2, 32, "cpu", torch.float32)
    args = (q.requires_grad_(), k, v, cu_q, cu_k, max_q, max_k)
    call = lambda *a, **kw: flashjit.flash_attn_varlen_func(*a, causal=True, return_attn_probs=True, **kw)  # noqa: E731
    out, lse, s_dmask = torch.compile(call, fullgraph=True)(*args)
    want_out, want_lse, _ = call(*args)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    assert lse.shape == (4, q.shape[0]) and s_dmask.numel() == 0 and s_dmask.dtype == q.dtype
    assert out.requires_grad and not lse.requires_grad  # as the kernels' eager call: no gradient through the lse
    with pytest.raises(Exception, match="return_attn_probs=True with dropout is not supported under torch.compile"):
        torch.compile(lambda *a: call(*a, dropout_p=0.1), fullgraph=True)(*args)


@pytest.mark.gpu
def test_varlen_fullgraph_compile_on_the_kernels():
    _reset()
    got, want = _varlen_case("cuda", torch.bfloat16, {}, causal=True, window_size=(16, 0))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-2, rtol=0)
    assert _graph_breaks_and_graphs()[0] == 0


def test_dropout_seed_above_2_63_under_compile(reference_backend):
    """torch.manual_seed(-1) makes the seed 2**64 - 1: the op's rng_state keeps its 64 bits."""
    torch.manual_seed(-1)
    q, k, v, _ = _inputs(1, 8, 8, 2, 2, 16, "cpu", torch.float32)
    out = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, dropout_p=0.2), fullgraph=True)(q, k, v)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()

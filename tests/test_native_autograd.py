"""flash_attn_func's C++ autograd node (flashjit/native.py, flashjit/csrc/autograd_node.cpp).

compile tier (nvcc and a CUDA build of torch, no GPU: CI): the extension builds into the cache once,
whole, and a second build() finds it; its autograd wiring, on CPU tensors with a stand-in kernel (a C
callback that writes out and lse through the params' pointers, as a kernel library's flashjit_run
does): the outputs, the graph, what the backward is handed, and the refusals (an input changed in
place, an unaligned input, a failed launch). gpu tier: flash_attn_func takes the node from a shape's
second call on and matches the autograd.Function path bit for bit, forward and backward."""
import ctypes
import hashlib
import sys

import pytest
import torch

import flashjit
from flashjit import cache, interface, native, toolchain

B, S, H, D = 2, 5, 3, 8
_RUN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_loaded = {}


@pytest.fixture
def node():
    """The extension, built into this session's cache once (~45 s), loaded once; afterwards native's
    and interface's state is as it was and the extension's backward hook is native's own."""
    if "node" not in _loaded:
        _loaded["node"] = native.load(native.build())
    saved = native._state, interface.native_node
    yield _loaded["node"]
    _loaded["node"].set_backward(native._backward)
    native._state, interface.native_node = saved


def _stand_in(status=0):
    """A kernel library's flashjit_run for CPU fp32 tensors: params hold the q, k, v, o, lse pointers at
    bytes 0-39; out = 2 q, lse = 1.5 (or the launch fails with `status`)."""
    def run(params, _stream):
        q, _, _, o, lse = (ctypes.c_uint64 * 5).from_address(params)
        if status:
            return status
        n = B * S * H * D
        ctypes.memmove(o, q, 4 * n)
        out = (ctypes.c_float * n).from_address(o)
        for i in range(n):
            out[i] *= 2
        if lse:  # a plan without lse leaves the params' pointer null
            lse_values = (ctypes.c_float * (B * H * S)).from_address(lse)
            for i in range(B * H * S):
                lse_values[i] = 1.5
        return 0
    callback = _RUN(run)
    return callback, ctypes.cast(callback, ctypes.c_void_p).value


def _plan(node, entry_point, lse=True):
    return node.Plan(bytes(48), [0, 8, 16, 24, 32], entry_point, [B, S, H, D], [B, H, S] if lse else [])


def _attn(node, q, k, v, plan, softmax_scale=None, deterministic=True):
    return node.attn(q, k, v, plan, True, softmax_scale, -1, 0, 0.0, deterministic)


def _qkv(grad=True):
    return [torch.randn(B, S, H, D, requires_grad=grad) for _ in range(3)]


@pytest.mark.compile
@pytest.mark.heavy  # (its fixture builds the node)
def test_the_extension_builds_once_into_the_cache(node, capfd):
    library = native.build()  # the fixture built it: found, verified, not compiled again
    assert "compiling" not in capfd.readouterr().err
    assert library.parent.parent.name == native.ARCH_DIR and library.parent.name.startswith(native.NAME)
    manifest = cache.Entry(library.parent).manifest()
    assert manifest["source"] == hashlib.sha256(native.SOURCE.read_bytes()).hexdigest()
    assert set(manifest["binaries"]) == {cache.LIBRARY}


@pytest.mark.compile
def test_the_node_runs_the_plan_and_hands_the_backward_its_inputs(node):
    callback, entry_point = _stand_in()
    seen = {}

    def backward(dout, q, k, v, out, lse, causal, scale, left, right, softcap, deterministic):
        seen.update(out=out, lse=lse, flags=(causal, scale, left, right, softcap, deterministic))
        return 2 * dout, torch.zeros_like(k), torch.ones_like(v)
    node.set_backward(backward)
    q, k, v = _qkv()
    out, lse = _attn(node, q, k, v, _plan(node, entry_point))
    assert torch.equal(out, 2 * q.detach()) and torch.equal(lse, torch.full((B, H, S), 1.5))
    assert out.grad_fn is not None and not lse.requires_grad
    out.backward(torch.ones_like(out))
    assert torch.equal(q.grad, torch.full_like(q, 2.0)) and not k.grad.any() and torch.equal(v.grad, torch.ones_like(v))
    assert seen["flags"] == (True, None, -1, 0, 0.0, True)  # None: the default scale
    assert torch.equal(seen["out"], out.detach()) and torch.equal(seen["lse"], lse)

    out, _ = _attn(node, *_qkv(), _plan(node, entry_point), softmax_scale=0.25, deterministic=False)
    out.sum().backward()
    assert seen["flags"][1] == 0.25 and seen["flags"][5] is False
    with torch.no_grad():
        out, _ = _attn(node, *_qkv(), _plan(node, entry_point))
    assert out.grad_fn is None and not out.requires_grad
    q = _qkv()[0]  # the plain launch (interface._Plan.launch's): no graph, and no lse where the plan has none
    out, lse = node.launch(q, q, q, _plan(node, entry_point, lse=False))
    assert torch.equal(out, 2 * q.detach()) and lse is None and out.grad_fn is None
    del callback


@pytest.mark.compile
def test_the_node_refuses_what_the_python_path_refuses(node):
    callback, entry_point = _stand_in()
    plan = _plan(node, entry_point)
    _, k, v = _qkv()
    unaligned = torch.randn(B * S * H * D + 1)[1:].view(B, S, H, D)
    assert _attn(node, unaligned, k, v, plan) is None  # the caller takes the Python path, which copies
    assert node.launch(unaligned, k, v, plan) is None
    x = torch.randn(B, S, H, D, requires_grad=True) * 1
    out, _ = _attn(node, x, k, v, plan)
    x.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    # A failed launch comes back as its CUDA error, never as an exception (native.py raises it with the
    # library's message: test_a_failed_launch_raises_the_kernels_error).
    failing, failing_point = _stand_in(status=700)
    assert _attn(node, *_qkv(), _plan(node, failing_point)) == 700
    assert node.launch(*_qkv(grad=False), _plan(node, failing_point)) == 700
    assert _attn(node, *_qkv(), _plan(node, entry_point, lse=False)) is None  # the backward needs the lse
    del callback, failing


@pytest.mark.compile
def test_python_exceptions_inside_the_node_leave_as_themselves(node):
    """A saved-tensor hook that raises during the node's save_for_backward: its exception, not a
    message (torch.utils.checkpoint's non-reentrant early stop is one); and non-reentrant checkpointing
    of the node runs forward and backward."""
    callback, entry_point = _stand_in()
    plan = _plan(node, entry_point)

    class Stop(Exception):
        pass

    def pack(t):
        raise Stop("pack hook")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), pytest.raises(Stop, match="pack hook"):
        _attn(node, *_qkv(), plan)
    node.set_backward(lambda dout, q, k, v, *rest: (2 * dout, torch.zeros_like(k), torch.zeros_like(v)))
    q, k, v = _qkv()
    out = torch.utils.checkpoint.checkpoint(lambda q, k, v: _attn(node, q, k, v, plan)[0], q, k, v,
                                            use_reentrant=False)
    out.backward(torch.ones_like(out))
    assert torch.equal(out, 2 * q.detach()) and torch.equal(q.grad, torch.full_like(q, 2.0))
    del callback


@pytest.mark.compile
def test_a_failed_launch_raises_the_kernels_error(node, monkeypatch):
    """The extension returns its failures (a launch's CUDA error, an allocation's message) and never
    throws them; native.attn and interface._Plan.launch raise them (interface._Plan.checked): the
    kernel's RuntimeError as the ctypes path words it, or the allocation's error."""
    failing, failing_point = _stand_in(status=700)
    working, working_point = _stand_in()

    class Kernel:
        @staticmethod
        def launch_error(err):
            return RuntimeError(f"flashjit kernel stand-in failed to launch: CUDA error {err} (stand-in)")

    class Plan:
        kernel, dropout, checked = Kernel, False, interface._Plan.checked

        def __init__(self, plan):
            self.plan = plan

        def usable(self, q, k, v):
            return True

        def native_plan(self, _node):
            return self.plan
    monkeypatch.setattr(interface, "_plan_key", lambda *args: "key")
    monkeypatch.setitem(interface._plans, "key", Plan(_plan(node, failing_point)))
    native.use(node)
    with pytest.raises(RuntimeError, match=r"stand-in failed to launch: CUDA error 700 \(stand-in\)"):
        native.attn(*_qkv(), True, None, (-1, 0), 0.0, True)
    with pytest.raises(RuntimeError, match=r"stand-in failed to launch: CUDA error 700"):
        interface._Plan.launch(Plan(_plan(node, failing_point)), *_qkv(grad=False), None)
    # An output the extension cannot allocate (at::empty throws a c10::Error inside it): its message.
    impossible = node.Plan(bytes(48), [0, 8, 16, 24, 32], working_point, [B, -1, H, D], [B, H, S])
    message = node.attn(*_qkv(), impossible, True, None, -1, 0, 0.0, True)
    assert message.startswith("RuntimeError: ") and "negative dimension" in message
    monkeypatch.setitem(interface._plans, "key", Plan(impossible))
    with pytest.raises(RuntimeError, match="negative dimension"):
        native.attn(*_qkv(), True, None, (-1, 0), 0.0, True)
    with pytest.raises(torch.OutOfMemoryError, match="no memory"):
        interface._Plan.checked(Plan(impossible), "OutOfMemoryError: no memory")
    del failing, working


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", [dict(causal=True), dict(window_size=(37, 11), softcap=5.0, softmax_scale=0.1)],
                         ids=["causal", "window,softcap,scale"])
def test_flash_attn_func_takes_the_node_and_matches_the_autograd_function(node, kwargs, monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    q = torch.randn(2, 300, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 257, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    dout = torch.randn(2, 300, 4, 128, device="cuda", dtype=torch.bfloat16)

    def step():
        for t in (q, k, v):
            t.grad = None
        out, lse, _ = flashjit.flash_attn_func(q, k, v, deterministic=True, return_attn_probs=True, **kwargs)
        out.backward(dout)
        return out, lse, q.grad, k.grad, v.grad
    native.use(None)
    python_path = step()  # also the shape's first call: it makes the launch plan
    assert type(python_path[0].grad_fn).__name__ == "_JitAttentionBackward"
    native.use(node)
    through_node = step()
    assert type(through_node[0].grad_fn).__name__ != "_JitAttentionBackward"
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), through_node, python_path):
        assert torch.equal(a, b), name
    # Without grad, a planned forward launches through the extension too (interface._Plan.launch).
    plain = [t.detach() for t in (q, k, v)]
    native.use(None)
    by_ctypes = flashjit.forward(*plain, return_lse=True, **kwargs)
    native.use(node)
    by_node = flashjit.forward(*plain, return_lse=True, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(by_node, by_ctypes))


@pytest.mark.compile
def test_auto_loads_the_cached_node_or_builds_it_in_a_process_of_its_own(node, monkeypatch, tmp_path):
    """FLASHJIT_NATIVE_AUTOGRAD=auto (the default): the cached extension is loaded at once, with no
    build; without one a build process starts and module() says None until it has exited; a failed
    build leaves its output in a marker beside the entry, and a later process does not build again;
    with no toolkit or FLASHJIT_DISABLE_JIT nothing starts."""
    monkeypatch.setattr(interface, "native_node", None)
    monkeypatch.setenv("FLASHJIT_NATIVE_AUTOGRAD", "auto")
    monkeypatch.setattr(native, "load", lambda library: node)  # loaded once by the fixture
    started = []
    real_popen = native.subprocess.Popen
    monkeypatch.setattr(native.subprocess, "Popen",
                        lambda *args, **kwargs: started.append(args) or real_popen(*args, **kwargs))

    monkeypatch.setattr(native, "_state", None)
    assert native.module() is node and native._state == "ready" and not started  # the session cache has it

    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(tmp_path / "cache"))  # nothing cached here
    monkeypatch.setattr(interface, "native_node", None)
    failing_build = (sys.executable, "-c", "print('no compiler here'); raise SystemExit(3)")
    monkeypatch.setattr(native, "BUILD_COMMAND", failing_build)
    monkeypatch.setattr(native, "_state", None)
    assert native.module() is None and native._state == "building" and len(started) == 1
    native._builder[0].wait()
    assert native.module() is None and native._state == "failed" and native._builder is None
    marker = native._failure_marker(native._entry(toolchain.find_toolkit())[0])
    assert "no compiler here" in marker.read_text()
    monkeypatch.setattr(native, "_state", None)  # a later process: the marker stops it
    assert native.module() is None and native._state == "off" and len(started) == 1

    marker.unlink()
    monkeypatch.setenv("FLASHJIT_DISABLE_JIT", "1")
    monkeypatch.setattr(native, "_state", None)
    assert native.module() is None and native._state == "off" and len(started) == 1
    monkeypatch.delenv("FLASHJIT_DISABLE_JIT")

    def no_toolkit():
        raise toolchain.ToolchainError("no nvcc here")
    monkeypatch.setattr(native.toolchain, "find_toolkit", no_toolkit)
    monkeypatch.setattr(native, "_state", None)
    assert native.module() is None and native._state == "off" and len(started) == 1


@pytest.mark.compile
def test_the_switch_and_never_compiling_without_the_jit(private_cache, monkeypatch):
    """FLASHJIT_NATIVE_AUTOGRAD=0: never looked for. With FLASHJIT_DISABLE_JIT and nothing cached, the
    node is off (flash_attn_func keeps the autograd.Function) and nothing was compiled or written."""
    monkeypatch.setattr(interface, "native_node", None)
    monkeypatch.setattr(native, "_state", None)
    monkeypatch.setenv("FLASHJIT_NATIVE_AUTOGRAD", "0")
    assert native.module() is None and native._state == "off"
    monkeypatch.setattr(native, "_state", None)
    monkeypatch.setenv("FLASHJIT_NATIVE_AUTOGRAD", "1")  # inline: the answer is there on return
    monkeypatch.setenv("FLASHJIT_DISABLE_JIT", "1")
    assert native.module() is None and native._state == "off"
    assert not (private_cache / "v1" / native.ARCH_DIR).exists()

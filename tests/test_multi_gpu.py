"""More than one GPU: tensors on a device other than the current one (the kernels run on the tensors'
device, whose current stream and generator they use, and leave the current device as it was), and a
two-process DDP training step (torchrun, one GPU a rank) over one cold kernel cache, which compiles
each kernel once. Every test needs two CUDA GPUs and skips with that reason otherwise."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashjit
from numerics import assert_all_close, assert_close, assert_lse_close, reference_and_low

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2,
                                 reason=f"needs two CUDA GPUs ({torch.cuda.device_count()} visible)")]
# Kept in every process started here (device/KINDS.md: NVLink multicast can take a shared host's GPUs
# out of service).
NO_MULTICAST = dict(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")


def _qkv(device, b=2, sq=300, sk=257, h=4, hk=2, d=128, dtype=torch.bfloat16, grad=True):
    mk = lambda s, n: torch.randn(b, s, n, d, device=device, dtype=dtype, requires_grad=grad)  # noqa: E731
    return mk(sq, h), mk(sk, hk), mk(sk, hk)


@pytest.mark.parametrize("current, there", [(0, 1), (1, 0)])
def test_flash_attn_func_runs_on_the_tensors_device(current, there, monkeypatch):
    """Forward and backward of tensors on cuda:`there` while cuda:`current` is the current device:
    results on the tensors' device, right against the fp32 reference, and the current device as it was."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "jit")
    with torch.cuda.device(current):
        q, k, v = _qkv(f"cuda:{there}")
        dout = torch.randn_like(q)
        out = flashjit.flash_attn_func(q, k, v, causal=True)
        out.backward(dout)
        assert torch.cuda.current_device() == current
    assert out.device == q.grad.device == k.grad.device == q.device
    ref, low = reference_and_low(q, k, v, dout, causal=True)
    assert_all_close(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), ref, low)


def test_low_level_varlen_and_kvcache_run_on_the_tensors_device():
    """flashjit.forward with lse, flash_attn_varlen_func and flash_attn_with_kvcache on cuda:1 while
    cuda:0 is current."""
    with torch.cuda.device(0):
        q, k, v = _qkv("cuda:1", grad=False)
        out, lse = flashjit.forward(q, k, v, causal=True, return_lse=True)
        (ref, ref_lse), (low, low_lse) = reference_and_low(q, k, v, causal=True)
        assert_close("out", out, ref, low)
        assert_lse_close(lse, ref_lse, low_lse)

        lens = [77, 300, 1]
        cu = torch.tensor([0, 77, 377, 378], device="cuda:1", dtype=torch.int32)
        qs, ks, vs = (torch.randn(378, n, 64, device="cuda:1", dtype=torch.float16) for n in (4, 2, 2))
        out = flashjit.flash_attn_varlen_func(qs, ks, vs, cu, cu, max(lens), max(lens), causal=True)
        assert out.device == qs.device
        for start, n in zip(cu.tolist(), lens):
            part = slice(start, start + n)
            (ref, _), (low, _) = reference_and_low(qs[None, part], ks[None, part], vs[None, part], causal=True)
            assert_close(f"varlen sequence of {n}", out[None, part], ref, low)

        k_cache, v_cache = (torch.randn(3, 512, 2, 128, device="cuda:1", dtype=torch.bfloat16) for _ in range(2))
        seqlens = torch.tensor([5, 512, 300], device="cuda:1", dtype=torch.int32)
        q1 = torch.randn(3, 1, 8, 128, device="cuda:1", dtype=torch.bfloat16)
        out = flashjit.flash_attn_with_kvcache(q1, k_cache, v_cache, cache_seqlens=seqlens)
        assert out.device == q1.device
        for b, n in enumerate(seqlens.tolist()):
            (ref, _), (low, _) = reference_and_low(q1[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n])
            assert_close(f"decode over {n} cached keys", out[b:b + 1], ref, low)
        assert torch.cuda.current_device() == 0


def test_tensors_on_two_devices_are_refused():
    q, _, _ = _qkv("cuda:0", grad=False)
    _, k, v = _qkv("cuda:1", grad=False)
    with pytest.raises(ValueError, match="one device"):
        flashjit.flash_attn_func(q, k, v)


def test_ddp_step_on_two_gpus_compiles_each_kernel_once(tmp_path):
    """torchrun, two ranks on two GPUs, one cold cache: the DDP step's gradients match a reference step
    (tests/ddp_worker.py), and each kernel the step needs is compiled once, by one of the ranks."""
    env = dict(os.environ, FLASHJIT_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO), **NO_MULTICAST)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "tests" / "ddp_worker.py")],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "rank 0 ok" in output and "rank 1 ok" in output, output[-4000:]
    compiled = re.findall(r"compiling kernel (\S+)", output)
    assert compiled, "the cache was cold: the step must have compiled its kernels"
    assert len(compiled) == len(set(compiled)), f"a kernel compiled twice: {sorted(compiled)}"

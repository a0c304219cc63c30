"""dQ's error against a float64 reference, cuDNN's and FlashAttention-2's backward (SDPA) beside flashjit's.

cuDNN's d256 bprop kernel adds half the dQ bytes ours does (ncu's L2 reduction sectors): were that dQ added in
16 bits, its error would grow with the number of key blocks, which this shows (max and RMS relative error at
1k and 8k keys). It does not (docs/perf-log.md, fifty-ninth session): cuDNN adds fp32 dQ once per 128 keys.

    python docs/experiments/dq_accuracy.py   (a GPU with SDPA's cuDNN and flash backends)
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashjit


def grads(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    fn(q, k, v).backward(do)
    return q.grad, k.grad, v.grad


def main():
    torch.manual_seed(0)
    for d in (128, 256):
        for s in (1024, 8192):
            for causal in (False, True):
                b, h = 1, 8
                q, k, v, do = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
                def sdpa(q, k, v):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                ref = grads(sdpa, *(t.double() for t in (q, k, v)), do.double())
                row = []
                for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
                    with sdpa_kernel(backend):
                        row.append((name, grads(sdpa, q, k, v, do)))
                g = grads(lambda q, k, v: flashjit.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                                 causal=causal).transpose(1, 2), q, k, v, do)
                row.append(("flashjit", g))
                out = []
                for name, g in row:
                    # max: the worst element (the output's bf16 rounding dominates); rms: the whole tensor's
                    # error, where an accumulation's precision shows
                    mx = [((a.double() - r).abs().max() / r.abs().max()).item() for a, r in zip(g, ref)]
                    rms = [((a.double() - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt()).item() for a, r in zip(g, ref)]
                    out.append(f"{name} dq {mx[0]:.2e}/{rms[0]:.2e} dk {mx[1]:.2e}/{rms[1]:.2e} dv {mx[2]:.2e}/{rms[2]:.2e}")
                print(f"d{d} S={s} causal={int(causal)} (max/rms): " + " | ".join(out), flush=True)


if __name__ == "__main__":
    main()

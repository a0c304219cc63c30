"""An example attention call: flashjit's kernel on a CUDA GPU, checked against the PyTorch reference.
Without a GPU it says so and runs the reference backend instead."""
import warnings

# torch warns at import where NumPy is absent or mismatched ("Failed to initialize NumPy"); nothing here
# uses NumPy, so a first run in a fresh environment should not greet the user with that warning.
warnings.filterwarnings("ignore", message=".*(Failed to initialize NumPy|compiled using NumPy)")

import torch  # noqa: E402  (after the filter)

import flashjit  # noqa: E402

torch.manual_seed(0)
batch, seqlen, heads, d_head = 2, 1024, 16, 128
if torch.cuda.is_available():
    q, k, v = (torch.randn(batch, seqlen, heads, d_head, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, ms = flashjit.forward_timed(q, k, v, causal=True)  # the first call compiles (once per machine)
    out, ms = flashjit.forward_timed(q, k, v, causal=True)
    ref, _ = flashjit.attention_reference(q, k, v, causal=True)
    tflops = 4 * batch * heads * seqlen * seqlen * d_head / 2 / (ms * 1e-3) / 1e12
    print(f"{torch.cuda.get_device_name()}: out {tuple(out.shape)} {out.dtype}, {ms:.3f} ms ({tflops:.0f} TFLOP/s), "
          f"max |out - fp32 reference| = {(out.float() - ref).abs().max().item():.2e}")
else:
    print("No CUDA GPU is visible: flashjit's JIT kernels cannot run here, so this runs the PyTorch "
          "reference backend (FLASHJIT_BACKEND=reference, the default without CUDA) on the CPU instead.")
    q, k, v = (torch.randn(batch, 256, heads, d_head, dtype=torch.bfloat16) for _ in range(3))
    out, lse, _ = flashjit.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    print(f"reference backend (CPU): out {tuple(out.shape)} {out.dtype}, softmax_lse {tuple(lse.shape)}, "
          f"mean {out.float().mean().item():+.4f}")

// The plain parameter structs passed from Python (ctypes, flashjit/launch.py mirrors their memory
// layout field by field; flashjit_params_size() lets Python check that the two agree).
#pragma once
#include <cstdint>

namespace flashjit {

// The tile width a head dim runs in: the next multiple of 32 up to 192, else 256 (flashjit/configs/common.py:
// head_dim_tile). Columns past the real head dim are zero in shared memory and never read from or
// written to global memory, so q/k/v need no padded copy.
constexpr int head_dim_tile(int d) { return d <= 192 ? (d + 31) / 32 * 32 : 256; }

// A [B, S, H, D] tensor with a contiguous last dim; strides in elements.
struct TensorRef {
  void* data;
  int64_t batch_stride, row_stride, head_stride;

  // Row `row` of head `h` of batch `b`.
  template <typename T>
  __device__ __forceinline__ T* at(int b, int h, int row) const {
    return static_cast<T*>(data) + b * batch_stride + h * head_stride + int64_t(row) * row_stride;
  }
};

// Score modifiers and dropout; each is read only by kernels built with the matching feature
// (common/score_mod.cuh, common/dropout.cuh).
struct ScoreParams {
  int32_t window_left, window_right;  // local: key j visible to query i iff i+d-left <= j <= i+d+right; -1 unbounded
  float softcap;                      // scores become softcap * tanh(scores / softcap)
  const float* alibi_slopes;          // [H] or [B, H] fp32: scores -= slope * |i + d - j|
  int64_t alibi_batch_stride;         // 0 for [H]
  uint64_t philox_seed, philox_offset; // dropout RNG state (common/dropout.cuh)
  int32_t dropout_threshold;           // drop iff random byte < threshold (p * 256, rounded)
  float dropout_scale;                 // 1 / (1 - p), p as requested (flash-attn's scale)
  const float* sink;                   // [H] fp32 learnable sink logits (forward kernels built with sinks)
};

// q: [B, Sq, H, D], k/v: [B, Sk, H_k, D], o: [B, Sq, H, D].
// lse: [B, H, Sq] fp32, contiguous, or null when the caller does not want it.
struct FwdParams {
  TensorRef q, k, v, o;
  float* lse;
  int32_t batch, seqlen_q, seqlen_k, heads, heads_k;
  float softmax_scale;
  ScoreParams mods;
};

// Backward: dout/dq like q, dk/dv like k; lse and dvec (rowsum(dO * O), computed by the first
// backward kernel) are [B, H, Sq] fp32, contiguous; dq_accum (the non-deterministic path's dQ
// sums) is B * H * Sq * D fp32, contiguous ([B, H, Sq, D], or the tiling of bwd_sm90.cuh's Config),
// or null for deterministic kernels.
struct BwdParams {
  TensorRef q, k, v, o, dout, dq, dk, dv;
  const float* lse;
  float* dvec;
  float* dq_accum;
  int32_t batch, seqlen_q, seqlen_k, heads, heads_k;
  float softmax_scale;
  ScoreParams mods;
};

}  // namespace flashjit

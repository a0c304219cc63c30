// Which keys a query sees, and what its raw score q.k becomes before the softmax: one definition
// for the forward and both backward kernels. With d = Sk - Sq (flash-attn's bottom-right alignment):
//   visible(i, j): j < Sk, and (causal) j <= i + d, and (local) i + d - left <= j <= i + d + right
//   scaled(s):     scale * s, or softcap * tanh(scale * s / softcap); ALiBi then subtracts slope * |i + d - j|
#pragma once
#include <cstdint>
#include "params.cuh"

namespace flashjit {

#ifdef __CUDACC__  // device code (the launcher's host-only build skips it: common/launch.cuh)
template <bool kCausal, bool kLocal_, bool kSoftcap_, bool kAlibi_>
struct ScoreMod {
  static constexpr bool kLocal = kLocal_, kSoftcap = kSoftcap_, kAlibi = kAlibi_;
  // Scores need transforming before the softmax (else the scale folds into the exp2 argument).
  static constexpr bool kTransforms = kSoftcap_ || kAlibi_;
  int diag, seqlen_k, left, right;
  float scale, cap, slope;

  __device__ __forceinline__ ScoreMod(const ScoreParams& m, int seqlen_q, int seqlen_k_, float scale_, int b, int h)
      : diag(seqlen_k_ - seqlen_q), seqlen_k(seqlen_k_), left(m.window_left), right(kCausal ? 0 : m.window_right),
        scale(scale_), cap(m.softcap), slope(0.f) {
    if (kAlibi_) slope = m.alibi_slopes[b * m.alibi_batch_stride + h];
  }

  __device__ __forceinline__ bool visible(int i, int j) const {
    if (j >= seqlen_k) return false;
    if (kCausal && j > i + diag) return false;
    if (kLocal && ((right >= 0 && j > i + diag + right) || (left >= 0 && j < i + diag - left))) return false;
    return true;
  }

  // Any key of [col0, col0 + cols) invisible to some query of [row0, row0 + rows)? (Else the
  // per-element mask can be skipped for the whole block.)
  __device__ __forceinline__ bool block_needs_mask(int row0, int rows, int col0, int cols) const {
    if (col0 + cols > seqlen_k) return true;
    if ((kCausal || (kLocal && right >= 0)) && col0 + cols - 1 > row0 + diag + (kCausal ? 0 : right)) return true;
    if (kLocal && left >= 0 && col0 < row0 + rows - 1 + diag - left) return true;
    return false;
  }

  // The keys j0 + c that query i sees, as a range of c: visible(i, j0 + c) iff lo <= c <= hi. For kernels
  // whose rows are queries (the forwards' masked blocks): one range a row, then a compare an element
  // against a compile-time c, where visible() had the column's sum and two compares an element. Bounds
  // as key_range's (windows clamped to 2^30; exact while |i + diag - j0| < 2^30).
  struct QueryRange {
    int lo, hi;
    __device__ __forceinline__ bool visible(int c) const { return c >= lo && c <= hi; }
  };
  __device__ __forceinline__ QueryRange query_range(int i, int j0) const {
    constexpr int kFar = 1 << 30;
    const int x0 = i + diag - j0;  // key j0 + c is visible iff (causal) c <= x0, c <= x0 + right, c >= x0 - left
    int lo = -kFar, hi = seqlen_k - 1 - j0;
    if (kCausal) hi = min(hi, x0);
    if (kLocal && right >= 0) hi = min(hi, x0 + min(right, kFar));
    if (kLocal && left >= 0) lo = x0 - min(left, kFar);
    return {lo, hi};
  }

  // The queries i0 + c, c in [0, kCols), that key j sees, as a range of c: visible(i0 + c, j) iff
  // lo <= c <= hi. x0 = i0 + diag - j, scaled_at's x at c = 0. For kernels whose rows are keys (the
  // dK/dV kernels): two compares an element instead of visible()'s conditions, which the compiler
  // evaluated ahead and held, a register an element. In 32 bits: windows past 2^30 are clamped to
  // 2^30 (as unbounded as the larger ones while |x0| < 2^30, i.e. sequences under 2^29), so nothing
  // overflows where visible()'s sums i + diag +- window might.
  struct KeyRange {
    int lo, hi, x0;
    __device__ __forceinline__ bool visible(int c) const { return c >= lo && c <= hi; }
  };
  template <int kCols>
  __device__ __forceinline__ KeyRange key_range(int i0, int j) const {
    constexpr int kFar = 1 << 30;
    const int x0 = i0 + diag - j;  // x = i + diag - j is visible iff (causal) x >= 0, x >= -right, x <= left
    int lo = kCausal ? -x0 : 0, hi = kCols - 1;
    if (kLocal && right >= 0) lo = max(lo, -min(right, kFar) - x0);
    if (kLocal && left >= 0) hi = min(hi, min(left, kFar) - x0);
    if (j >= seqlen_k) lo = kCols;
    return {lo, hi, x0};
  }

  // The score in softmax units; `grad` gets d scaled / d (scale * s) (1 - tanh^2 with softcap, else 1).
  __device__ __forceinline__ float scaled(float s, int i, int j, float& grad) const {
    const float t = capped(s, grad);
    return kAlibi_ ? t - slope * fabsf(float(i + diag - j)) : t;
  }
  // The same from x = i + diag - j (ALiBi's distance is |x|). scaled() does not call it: computing x
  // before the softcap moved the sm_80 kernels' schedules (+-16 instructions).
  __device__ __forceinline__ float scaled_at(float s, int x, float& grad) const {
    const float t = capped(s, grad);
    return kAlibi_ ? t - slope * fabsf(float(x)) : t;
  }
  // s * scale through the softcap (grad: its chain-rule factor), before ALiBi.
  __device__ __forceinline__ float capped(float s, float& grad) const {
    float t = s * scale;
    grad = 1.f;
    if (kSoftcap) {
      const float th = tanhf(t / cap);
      t = cap * th;
      grad = 1.f - th * th;
    }
    return t;
  }
};

// A learnable sink (gpt-oss; FlashAttention-4's learnable_sink): one more logit per query head, in
// natural-log units like the scaled scores, that joins every row's softmax denominator but not its
// numerator. Folds it into a finished row's max m_nat (natural-log units, -inf if the row saw no key)
// and sum of exp(score - m_nat); returns the factor the row's unnormalised output takes (0 when the
// row saw no key: its output stays 0 and its lse becomes the sink's logit).
__device__ __forceinline__ float fold_sink(float sink, float& m_nat, float& sum) {
  const float m_new = fmaxf(m_nat, sink);
  const float corr = m_nat == -INFINITY ? 0.f : __expf(m_nat - m_new);
  sum = sum * corr + __expf(sink - m_new);
  m_nat = m_new;
  return corr;
}

#else
template <bool kCausal, bool kLocal_, bool kSoftcap_, bool kAlibi_>
struct ScoreMod;  // named by the configs
#endif  // __CUDACC__

}  // namespace flashjit

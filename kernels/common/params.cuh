// The plain parameter struct passed from Python (ctypes, flashjit/launch.py mirrors it field by
// field; flashjit_fwd_params_size() lets Python check that the two agree).
#pragma once
#include <cstdint>

namespace flashjit {

// q: [B, Sq, H, D], k/v: [B, Sk, H_k, D], o: [B, Sq, H, D]; strides in elements, last dim contiguous.
// lse: [B, H, Sq] fp32, contiguous, or null when the caller does not want it.
struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int32_t batch, seqlen_q, seqlen_k, heads, heads_k;
  float softmax_scale;
};

// Backward: dout/dq like q, dk/dv like k; lse and dvec (rowsum(dO * O), computed by the first
// backward kernel) are [B, H, Sq] fp32, contiguous.
struct BwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* o;
  const void* dout;
  const float* lse;
  float* dvec;
  void* dq;
  void* dk;
  void* dv;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;
  int32_t batch, seqlen_q, seqlen_k, heads, heads_k;
  float softmax_scale;
};

}  // namespace flashjit

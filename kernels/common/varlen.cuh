// One sequence of a batch as a CTA sees it: where its rows start in the packed tensors and how many
// there are, and where its row statistics (lse, dvec, dq_accum) live. Dense calls and variable-length
// batches (params.cuh: VarlenParams) differ only here; read once per CTA, as FlashAttention-3's
// SeqlenInfo.
//
//   dense:  q_start = k_start = 0, len_q/len_k = the params' seqlen_q/seqlen_k,
//           statistics plane b * H + h of seqlen_q rows            ([B, H, Sq])
//   varlen: q_start = cu_seqlens_q[b], len_q = cu_seqlens_q[b + 1] - q_start (k alike, clamped),
//           statistics plane h of total_q rows, from row q_start   ([H, total_q])
//
// Row i of head h of the sequence is then q.at(b, h, q_start + i) (varlen TensorRefs have batch
// stride 0) and its statistic is stat_row(h, i).
#pragma once
#include <cstdint>
#include "params.cuh"

namespace flashjit {

template <class P>
__host__ __device__ __forceinline__ bool is_varlen(const P& p) {
  return p.varlen.cu_seqlens_q != nullptr;
}

// Rows of a buffer of planes of rows, one plane per (batch, head) when dense and per head when varlen
// (`heads` planes of `plane_rows`), for kernels that walk every row.
template <class P>
__host__ __device__ __forceinline__ int64_t plane_buffer_rows(const P& p, int heads, int plane_rows) {
  return int64_t(is_varlen(p) ? heads : p.batch * heads) * plane_rows;
}

// The statistics (bwd_sm80.cuh's dvec and dQ conversion kernels): planes of the query rows.
template <class P>
__host__ __device__ __forceinline__ int stat_plane_rows(const P& p) {
  return is_varlen(p) ? p.varlen.total_q : p.seqlen_q;
}
template <class P>
__host__ __device__ __forceinline__ int64_t stat_rows(const P& p) {
  return plane_buffer_rows(p, p.heads, stat_plane_rows(p));
}

// bwd_sm90.cuh's dK/dV sums: planes of the key rows, per (batch, kv head) or per kv head.
template <class P>
__host__ __device__ __forceinline__ int key_plane_rows(const P& p) {
  return is_varlen(p) ? p.varlen.total_k : p.seqlen_k;
}
template <class P>
__host__ __device__ __forceinline__ int64_t key_rows(const P& p) {
  return plane_buffer_rows(p, p.heads_k, key_plane_rows(p));
}

#ifdef __CUDACC__  // device code (the launcher's host-only build skips it: common/launch.cuh)
struct Seq {
  int q_start, k_start;   // first row of the sequence in q/o and in k/v
  int len_q, len_k;       // its query and key counts
  int plane0, plane_rows; // its statistics: row i of head h at (plane0 + h) * plane_rows + q_start + i

  template <class P>
  __device__ __forceinline__ Seq(const P& p, int b) {
    if (!is_varlen(p)) {  // uniform across the grid: no divergence, one predicate
      q_start = k_start = 0;
      len_q = p.seqlen_q, len_k = p.seqlen_k;
      plane0 = b * p.heads, plane_rows = p.seqlen_q;
    } else {
      q_start = bounded(p.varlen.cu_seqlens_q, b, p.varlen.total_q, len_q);
      k_start = bounded(p.varlen.cu_seqlens_k, b, p.varlen.total_k, len_k);
      plane0 = 0, plane_rows = p.varlen.total_q;
    }
  }

  __device__ __forceinline__ int64_t stat_row(int h, int i) const {
    return int64_t(plane0 + h) * plane_rows + q_start + i;
  }

  // [cu[b], cu[b + 1]) clamped into [0, total] and to a non-negative length: offsets that break
  // the contract (not checked on the host: that would need a device sync) give wrong sequences,
  // never an access outside the tensors. The outer max makes both provably non-negative to the
  // compiler, which then widens row indices without sign extensions (fewer address instructions
  // in the backward's step loop).
  __device__ __forceinline__ static int bounded(const int32_t* cu, int b, int total, int& len) {
    const int start = max(min(cu[b], total), 0);
    len = max(min(cu[b + 1], total), start) - start;  // in [0, total - start]: no overflow whatever cu holds
    return start;
  }
};
#endif  // __CUDACC__

}  // namespace flashjit

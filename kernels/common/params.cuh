// The plain parameter structs passed from Python (ctypes, flashjit/launch.py mirrors their memory
// layout field by field; flashjit_params_size() lets Python check that the two agree).
#pragma once
#include <cstdint>

namespace flashjit {

// The tile width a head dim runs in: the next multiple of 32 up to 192, else 256 (flashjit/configs/common.py:
// head_dim_tile). Columns past the real head dim are zero in shared memory and never read from or
// written to global memory, so q/k/v need no padded copy.
constexpr int head_dim_tile(int d) { return d <= 192 ? (d + 31) / 32 * 32 : 256; }

// A compile-time int as a value: lets one generic lambda serve tiles of different widths.
template <int N>
struct Int {
  static constexpr int value = N;
};

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

// Variable-length batches (flash_attn_varlen_func): all null / 0 for a dense call. The batch's B
// sequences are packed along the rows: q/o are [total_q, H, D], k/v [total_k, H_k, D], passed as
// TensorRefs with batch_stride 0, and sequence b owns rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of
// q/o and [cu_seqlens_k[b], cu_seqlens_k[b + 1]) of k/v. The params' seqlen_q / seqlen_k are then the
// longest sequence's (they size the grid; a tile past its own sequence's end is skipped), and all
// of a sequence's masks (causal bottom-right, window, ALiBi distances) and its dropout numbering
// (row, column, b * H + h) are those of a dense call of its own lengths.
// Row statistics (lse, dvec, dq_accum) are planes of rows, one per (batch, head) when dense: plane
// b * H + h of Sq rows; varlen, one per head: plane h of total_q rows ([H, total_q], flash-attn's
// varlen softmax_lse layout), sequence b's rows from cu_seqlens_q[b] (common/varlen.cuh: Seq).
// A runtime null check rather than a template flag: one uniform branch a CTA, and no kernel twice.
struct VarlenParams {
  const int32_t* cu_seqlens_q;  // [B + 1] int32, non-decreasing from 0 to total_q, or null (dense)
  const int32_t* cu_seqlens_k;  // [B + 1] int32, non-decreasing from 0 to total_k (read iff cu_seqlens_q is set)
  // Rows of q/o and of k/v. The kernels clamp every cu_seqlens value to [previous, total]: whatever
  // the (unchecked, device-resident) offsets hold, no row outside the tensors is read or written.
  // total_q also sizes the backward's row kernels (dvec, the dQ conversion): H * total_q rows.
  int32_t total_q, total_k;
};

// Attention over a KV cache (flash_attn_with_kvcache; read only by forward kernels built with kvcache,
// flashjit/kvattn.py): per batch entry b the valid keys are cache slots [leftpad_k[b], seqused_k[b]) of
// cache row batch_idx[b] (dense [B_c, S_cache, H_k, D]: k/v batch stride is a cache row's), or, paged,
// logical slots of block_table[b] (k/v [num_pages, page_size, H_k, D]: batch stride is a page's; slot s
// lives in page block_table[b][s / page_size] at row s % page_size). seqlen_k is then the slots a row
// can hold (S_cache, or table_stride * page_size). The kernels clamp every index they read to those
// bounds (batch_idx and table entries to [0, num_rows)), so unchecked device-resident values give wrong
// results, never an access outside the tensors. Masks count keys from the first valid slot (causal is
// bottom-right on the len = seqused - leftpad valid keys).
// Appending (new_rows > 0): k_new/v_new [B, new_rows, H_k, D] are first copied into the cache at slots
// [seqused_k[b], seqused_k[b] + new_rows) of entry b (a kernel of their own, before the attention, on the
// same stream), and the valid slots end at seqused_k[b] + new_rows.
// Split-KV: with num_splits > 1 the CTAs of gridDim.y split each row's key blocks evenly; each writes
// its normalised partial O and its lse (-inf: no key) to o_accum / lse_accum, and a combine kernel
// weighs them into o and lse (folding in the learnable sink, if any).
constexpr int kPageMultiple = 16;  // page sizes are multiples of this (flashjit/configs/fwd_sm80.py: PAGE_MULTIPLE)
struct CacheParams {
  const int32_t* seqused_k;    // [B] one past the last valid slot (before an append), or null: seqlen_k
                               // (required with new_rows > 0)
  const int32_t* leftpad_k;    // [B] first valid slot, or null: 0
  const int32_t* batch_idx;    // [B] the cache row of batch entry b (dense caches), or null: b
  const int32_t* block_table;  // [B, table_stride] pages, or null: a dense cache
  int32_t table_stride, page_size;
  int32_t num_rows;            // pages (paged) or cache rows (dense): what batch_idx / table entries index
  int32_t num_splits;          // 0 or 1: no split
  float* o_accum;              // [num_splits, B, H, Sq, d_head] fp32
  float* lse_accum;            // [num_splits, B, H, Sq] fp32
  TensorRef k_new, v_new;      // [B, new_rows, H_k, D]: appended first (null data when new_rows = 0)
  int32_t new_rows;
};

// q: [B, Sq, H, D], k/v: [B, Sk, H_k, D], o: [B, Sq, H, D] (varlen: see VarlenParams).
// lse: [B, H, Sq] fp32, contiguous (varlen [H, total_q]), or null when the caller does not want it.
struct FwdParams {
  TensorRef q, k, v, o;
  float* lse;
  int32_t batch, seqlen_q, seqlen_k, heads, heads_k;
  float softmax_scale;
  ScoreParams mods;
  VarlenParams varlen;  // after the sizes, so a dense caller's positional initialisation leaves it null
  CacheParams cache;    // likewise: null unless the kernel is a kvcache one
  // fwd_sm90.cuh's persistent causal kernels: each CTA's tiles (dispatch.causal_walk) for a grid of
  // tile_walk_grid CTAs, or null: their static walk.
  const int32_t* tile_walk;
  int32_t tile_walk_grid;
};

// Backward: dout/dq like q, dk/dv like k; lse and dvec (rowsum(dO * O), computed by the first
// backward kernel) are [B, H, Sq] fp32, contiguous (varlen [H, total_q]); dq_accum (the
// non-deterministic path's dQ sums) is B * H * Sq * D fp32, contiguous ([B, H, Sq, D], varlen
// [H, total_q, D], or the tiling of bwd_sm90.cuh's Config), or null for deterministic kernels.
// dkv_accum (bwd_sm90.cuh's kHeadSplit kernels, null for the others): zeroed fp32 sums of dK then
// dV, each in dq_accum's tiling over k's rows (key_rows: B * H_k * Sk, varlen H_k * total_k).
struct BwdParams {
  TensorRef q, k, v, o, dout, dq, dk, dv;
  const float* lse;
  float* dvec;
  float* dq_accum;
  int32_t batch, seqlen_q, seqlen_k, heads, heads_k;
  float softmax_scale;
  ScoreParams mods;
  VarlenParams varlen;  // as in FwdParams
  float* dkv_accum;     // last: a positional initialisation without it leaves it null
};

}  // namespace flashjit

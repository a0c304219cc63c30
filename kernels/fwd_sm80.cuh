// FlashAttention-2 style forward pass for sm_80 and newer (mma.sync m16n8k16, ldmatrix, cp.async).
//
//   O[b, i, h, :] = sum_j softmax_j(scale * Q[b, i, h, :] . K[b, j, h_k, :]) V[b, j, h_k, :]
//   lse[b, h, i]  = log sum_j exp(scale * Q . K)          (natural log; +inf for fully masked rows)
//
// q: [B, Sq, H, D], k: [B, Sk, H_k, D], v: [B, Sk, H_k, D_v] with h_k = h / (H / H_k) and D_v <= D
// (MLA-style value heads; usually D_v = D), o: [B, Sq, H, D_v]; or a
// variable-length batch packed along the rows (common/params.cuh: VarlenParams), each sequence
// computed as a dense call of its own lengths; or, built with kvcache, queries over a (paged) KV cache
// with per-entry lengths, the key range optionally split across CTAs (common/params.cuh: CacheParams).
// One CTA owns B_r query rows of one (batch, head); each warp owns B_r / n_warps of them and walks
// all key blocks of B_c rows, keeping its O rows and softmax statistics in registers.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "common/params.cuh"
#include "common/ptx.cuh"
#include "common/score_mod.cuh"
#include "common/dropout.cuh"
#include "common/fragments.cuh"
#include "common/smem_tile.cuh"
#include "common/varlen.cuh"
#include "common/launch.cuh"

namespace flashjit::fwd {

// One template parameter per KernelConfig field (flashjit/configs/fwd_sm80.py), in the same order.
template <bool kBf16_, int kDHead_, int kBr_, int kBc_, int kWarps_, bool kAsync_, bool kEager_, bool kSwizzle_,
          int kDepthQ_, int kDepthK_, int kDepthV_, bool kDoubleBuffer_, bool kOptSoftmax_, bool kCausal_,
          bool kLocal_, bool kSoftcap_, bool kAlibi_, bool kDropout_, bool kSink_, bool kKvCache_, int kDHeadV_>
struct Config {
  static constexpr bool kBf16 = kBf16_, kAsync = kAsync_, kEager = kEager_, kSwizzle = kSwizzle_;
  static constexpr bool kDoubleBuffer = kDoubleBuffer_, kOptSoftmax = kOptSoftmax_, kCausal = kCausal_;
  using Mod = ScoreMod<kCausal_, kLocal_, kSoftcap_, kAlibi_>;
  static constexpr bool kDropout = kDropout_, kSink = kSink_, kKvCache = kKvCache_;
  // kDHead: the real head dim (a multiple of 8); kD: the tile width it runs in (zero columns past kDHead).
  static constexpr int kDHead = kDHead_, kD = head_dim_tile(kDHead_), kBr = kBr_, kBc = kBc_, kWarps = kWarps_;
  // The value head dim (of V and O; kDHeadV_ == 0: kDHead) and its tile.
  static constexpr int kDHeadV = kDHeadV_ == 0 ? kDHead_ : kDHeadV_, kDV = head_dim_tile(kDHeadV);
  static constexpr int kDepthQ = kDepthQ_, kDepthK = kDepthK_, kDepthV = kDepthV_;

  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = kBr / kWarps;
  static constexpr int kM = kWarpRows / 16;  // 16-row MMA tiles per warp
  // The matrix products cover the real head dims rounded up to 16, not the whole tiles: at d_head 80
  // (tile 96) that is 5 k-tiles of QK^T and 10 n-tiles of PV instead of 6 and 12.
  static constexpr int kDMma = (kDHead + 15) / 16 * 16, kDMmaV = (kDHeadV + 15) / 16 * 16;
  static constexpr int kKtD = kDMma / 16;    // k-tiles of QK^T (over the head dim)
  static constexpr int kNtD = kDMmaV / 8;    // n-tiles of PV (over the value head dim)
  static constexpr int kNtC = kBc / 8;       // n-tiles of QK^T (over keys)
  static constexpr int kKtC = kBc / 16;      // k-tiles of PV (over keys)
  // kvcache: a paged cache's table entries of two key blocks (fetch_pages), each kPageEntries ints
  static constexpr int kPageEntries = kBc / kPageMultiple + 1;  // the most pages kBc slots can touch
  static constexpr int kSmemBytes = ((kBr + kBc) * kD + kBc * kDV) * 2 + (kKvCache ? 2 * kPageEntries * 4 : 0);

  // Chunk sizes (k-tiles loaded into registers at once) and whether each operand double-buffers.
  static constexpr int kChunkQ = kDepthQ == 0 ? kKtD : kDepthQ;
  static constexpr int kChunkK = kDepthK == 0 ? kKtD : kDepthK;
  static constexpr int kChunkV = kDepthV == 0 ? kKtC : kDepthV;
  static constexpr bool kDbQ = kDoubleBuffer && kDepthQ > 0 && kDepthQ < kKtD;
  static constexpr bool kDbK = kDoubleBuffer && kDepthK > 0 && kDepthK < kKtD;
  static constexpr bool kDbV = kDoubleBuffer && kDepthV > 0 && kDepthV < kKtC;

  // Mirrors KernelConfig.register_estimate().
  static constexpr int kRegQ = kChunkQ * kM * 4 * (kDbQ ? 2 : 1);
  static constexpr int kRegK = kChunkK * kNtC * 2 * (kDbK ? 2 : 1);
  static constexpr int kRegV = kChunkV * kNtD * 2 * (kDbV ? 2 : 1);
  static constexpr int kRegO = kM * kNtD * 4, kRegS = kM * kNtC * 4;
  static constexpr int kRegQK = kRegO + kRegS + kRegQ + kRegK;
  static constexpr int kRegPV = kRegO + kRegS / 2 + kRegV + (kDepthQ == 0 ? kRegQ : 0);
  static constexpr int kRegEstimate = (kRegQK > kRegPV ? kRegQK : kRegPV) + 8;

  static constexpr bool depth_ok(int depth, int tiles) {
    return depth == 0 || ((depth & (depth - 1)) == 0 && tiles % depth == 0);
  }
  static_assert(kDHead % 8 == 0 && kDHead >= 8 && kDHead <= 256, "d_head must be a multiple of 8 from 8 to 256");
  static_assert(kDHeadV_ == 0 || (kDHeadV_ % 8 == 0 && kDHeadV_ >= 8 && kDHeadV_ <= kDHead_),
                "d_v must be 0 (the same as d_head) or a multiple of 8 from 8 to d_head");
  static_assert(!(kKvCache && kDHeadV != kDHead),
                "kvcache kernels need d_v == d_head (flash_attn_with_kvcache's caches share a head dim)");
  static_assert(kBc % 32 == 0, "B_c must be a multiple of 32");
  static_assert(kWarpRows == 16 || kWarpRows == 32,
                "each warp must own 16 or 32 query rows: B_r / n_warps must be 16 or 32");
  static_assert(depth_ok(kDepthQ, kKtD) && depth_ok(kDepthK, kKtD) && depth_ok(kDepthV, kKtC),
                "a fragment depth must be 0 (whole block up front) or a power of two dividing its k-tile count");
  static_assert(!kEager || kAsync,
                "eager_load_blocks needs async_copy: synchronous loads cannot overlap the matrix multiplies");
  static_assert(!kDoubleBuffer || kDbQ || kDbK || kDbV,
                "mma_double_buffer_loads needs a fragment depth that splits its k loop (0 < depth < k-tiles) for Q, K or V");
  static_assert(!(kKvCache && kDropout), "kvcache kernels have no dropout (flash_attn_with_kvcache has none)");
  static_assert(kRegEstimate <= 255,
                "the fragments of this config need more than 255 registers per thread and would spill");
};

#ifdef __CUDACC__  // device code (the launcher's host-only build skips it: common/launch.cuh)
// Which chunk of fragments to fetch when the k loop reaches k-tile `kt`: the chunk starting at kt,
// or with double buffering the one after it (the caller fetches chunk 0 before the loop starts).
template <int kChunk, int kTiles, bool kDb>
__device__ __forceinline__ bool fetch_chunk_at(int kt, int& first) {
  if (kt % kChunk != 0) return false;
  first = kDb ? kt + kChunk : kt;
  return first < kTiles;
}

// ---- the two matrix products ------------------------------------------------------------------
// S = Q K^T for the warp's rows: s[mt][nt] holds rows (lane/4, lane/4+8), cols 2*(lane%4)+{0,1}.
template <class C>
__device__ __forceinline__ void gemm_qk(float (&s)[C::kM][C::kNtC][4], uint32_t (&qf)[C::kM][C::kKtD][4],
                                        const elem_t* sQ, const elem_t* sK, int row0, int lane) {
  uint32_t kf[C::kKtD][C::kNtC][2];
  zero(s);
#pragma unroll
  for (int kt = 0; kt < C::kKtD; ++kt) {
    int first;
    if (C::kDepthQ != 0) {  // depth 0: the whole Q block sits in registers for the CTA's lifetime
      if (C::kDbQ && kt == 0) load_a<C::kD, C::kSwizzle>(qf, sQ, row0, lane, 0, C::kChunkQ);
      if (fetch_chunk_at<C::kChunkQ, C::kKtD, C::kDbQ>(kt, first))
        load_a<C::kD, C::kSwizzle>(qf, sQ, row0, lane, first, C::kChunkQ);
    }
    if (C::kDbK && kt == 0) load_b_rows<C::kD, C::kSwizzle>(kf, sK, 0, lane, 0, C::kChunkK);
    if (fetch_chunk_at<C::kChunkK, C::kKtD, C::kDbK>(kt, first))
      load_b_rows<C::kD, C::kSwizzle>(kf, sK, 0, lane, first, C::kChunkK);
    mma_k_tile<C::kBf16>(s, qf, kf, kt);
  }
}

// O += P V, P given as A fragments (16-bit) built from the softmax'd S accumulators.
template <class C>
__device__ __forceinline__ void gemm_pv(float (&o)[C::kM][C::kNtD][4], const uint32_t (&p)[C::kM][C::kKtC][4],
                                        const elem_t* sV, int lane) {
  uint32_t vf[C::kKtC][C::kNtD][2];
#pragma unroll
  for (int kt = 0; kt < C::kKtC; ++kt) {
    int first;
    if (C::kDbV && kt == 0) load_b_cols<C::kDV, C::kSwizzle>(vf, sV, 0, lane, 0, C::kChunkV);
    if (fetch_chunk_at<C::kChunkV, C::kKtC, C::kDbV>(kt, first))
      load_b_cols<C::kDV, C::kSwizzle>(vf, sV, 0, lane, first, C::kChunkV);
    mma_k_tile<C::kBf16>(o, p, vf, kt);
  }
}

// ---- score modifiers, masking and online softmax -------------------------------------------
// Transform the raw scores into softmax units when a modifier needs it (softcap, ALiBi), and set
// invisible keys (past the end, causal, outside the window) to -inf. row0/col0: global index of the
// warp's first row and the block's first key.
template <class C>
__device__ __forceinline__ void apply_score_mod(float (&s)[C::kM][C::kNtC][4], const typename C::Mod& mod, int row0,
                                                int col0, bool need_mask, int lane) {
  const int col_t = col0 + (lane & 3) * 2;  // this thread's first column; its others are col_t + 8 nt + (e & 1)
#pragma unroll
  for (int mt = 0; mt < C::kM; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + mt * 16 + (lane >> 2) + half * 8;
      // The row's visible keys, once a row (dead without the mask), made opaque where they are made:
      // with the range's loop-invariant parts hoisted out of the key loop (or, from an opaque row, its
      // arithmetic moved), ptxas serialized the wgmmas of d64's 192-row causal kernel, or of d128's
      // causal default (C7511: registers).
      typename C::Mod::QueryRange keys = mod.query_range(row, col_t);
      asm volatile("" : "+r"(keys.lo), "+r"(keys.hi));
#pragma unroll
      for (int nt = 0; nt < C::kNtC; ++nt)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          const int c = nt * 8 + (e & 1);
          float unused_grad;
          if (C::Mod::kTransforms) s[mt][nt][e] = mod.scaled(s[mt][nt][e], row, col_t + c, unused_grad);
          if (need_mask && !keys.visible(c)) s[mt][nt][e] = -INFINITY;
        }
    }
}

// Zero the dropped entries of P (after the row sums took them: the softmax is that of all keys;
// the epilogue scales O by 1 / (1 - p)). One Philox call per (32-row span, 16-key chunk) covers
// the lane's 16 entries there (common/dropout.cuh); a 16-row warp uses half of each call.
template <class C>
__device__ __forceinline__ void apply_dropout(float (&s)[C::kM][C::kNtC][4], const Dropout& drop, int row0, int col0,
                                              int lane) {
  static_assert(C::kM <= 2, "a warp's 16 or 32 rows lie in one 32-row span (row0 is 16 kM-aligned)");
  const int row = row0 + (lane >> 2);
#pragma unroll
  for (int chunk = 0; chunk < C::kNtC / 2; ++chunk) {
    const uint4 flags = drop.keep_flags(row, col0 + chunk * 16 + (lane & 3) * 2);
#pragma unroll
    for (int mt = 0; mt < C::kM; ++mt)
#pragma unroll
      for (int nt = chunk * 2; nt < chunk * 2 + 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int half16 = C::kM == 2 ? mt : (row0 >> 4) & 1;  // of the 32-row span
          s[mt][nt][e] = Dropout::masked(s[mt][nt][e], Dropout::query_rows_mask(flags, half16, nt, e));
        }
  }
}

// Lazy rescaling (softmax_rows' kLazy): a row's max moves only when a block's is more than this far
// above it (log2 units, so P stays below 2^8), and O needs its rescale only when some row's moved.
constexpr float kLazyRescaleLog2 = 8.f;

// The online softmax of one key block, in two parts so a Hopper kernel can run the first while the
// tensor cores still add the previous block into O: softmax_rows turns S into unnormalised P against
// the new row maxima and rescales the row sums, returning each row's factor alpha; rescale_o applies
// alpha to O. Row statistics live per thread for rows lane/4 (+8); the max is reduced over the 4-lane
// quad that shares a row, the sum only at the end. With kOptSoftmax, m is kept in raw-score units
// and the scale * log2(e) is folded into one FMA per element feeding ex2.
// The Hopper forward's knobs (fwd_sm90.cuh): kLazy keeps a row's max unless the block's is more than
// kLazyRescaleLog2 above it (or the row had none: -inf), alpha then 1 (FlashAttention-4's conditional
// rescaling; the result is the same function, P up to 2^8 instead of 1); returns whether some row of
// this thread moved (always true without kLazy). kSums = false leaves l alone (the tensor cores sum
// P instead).
template <class C, bool kLazy = false, bool kSums = true>
__device__ __forceinline__ bool softmax_rows(float (&s)[C::kM][C::kNtC][4], float (&m)[C::kM][2],
                                             float (&l)[C::kM][2], float (&alpha)[C::kM][2], float scale,
                                             float scale_log2) {
  static_assert(!kLazy || C::kOptSoftmax, "lazy rescaling compares maxima kept in raw-score units");
  bool moved = !kLazy;
#pragma unroll
  for (int mt = 0; mt < C::kM; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if (!C::kOptSoftmax) {
#pragma unroll
        for (int nt = 0; nt < C::kNtC; ++nt) s[mt][nt][2 * half] *= scale, s[mt][nt][2 * half + 1] *= scale;
      }
      float mx = m[mt][half];
#pragma unroll
      for (int nt = 0; nt < C::kNtC; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * half], s[mt][nt][2 * half + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // (lazily: false while both are -inf; a row that has seen no key keeps O = 0, l = 0 either way)
      const bool up = !kLazy || (mx - m[mt][half]) * scale_log2 > kLazyRescaleLog2;
      moved |= up;
      if (!up) mx = m[mt][half];
      float sum = 0.f;
      if (C::kOptSoftmax) {
        const float m_scaled = mx == -INFINITY ? 0.f : mx * scale_log2;  // all masked so far: keep P = 0
        // A kept max's alpha is exactly 1: exp2 of m * scale_log2 - m_scaled, fused into one FMA, is 2 to
        // that product's rounding error, which l would take every step and O, not rescaled, would not.
        alpha[mt][half] = up ? fast_exp2(m[mt][half] * scale_log2 - m_scaled) : 1.f;
#pragma unroll
        for (int nt = 0; nt < C::kNtC; ++nt)
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e) {
            s[mt][nt][e] = fast_exp2(fmaf(s[mt][nt][e], scale_log2, -m_scaled));
            if (kSums) sum += s[mt][nt][e];
          }
      } else {
        const float m_use = mx == -INFINITY ? 0.f : mx;
        alpha[mt][half] = __expf(m[mt][half] - m_use);
#pragma unroll
        for (int nt = 0; nt < C::kNtC; ++nt)
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e) {
            s[mt][nt][e] = __expf(s[mt][nt][e] - m_use);
            sum += s[mt][nt][e];
          }
      }
      m[mt][half] = mx;
      if (kSums) l[mt][half] = l[mt][half] * alpha[mt][half] + sum;
    }
  return moved;
}

template <class C>
__device__ __forceinline__ void rescale_o(float (&o)[C::kM][C::kNtD][4], const float (&alpha)[C::kM][2]) {
#pragma unroll
  for (int mt = 0; mt < C::kM; ++mt)
#pragma unroll
    for (int nt = 0; nt < C::kNtD; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][nt][e] *= alpha[mt][e >> 1];
}

template <class C>
__device__ __forceinline__ void online_softmax(float (&s)[C::kM][C::kNtC][4], float (&o)[C::kM][C::kNtD][4],
                                               float (&m)[C::kM][2], float (&l)[C::kM][2], float scale,
                                               float scale_log2) {
  float alpha[C::kM][2];
  softmax_rows<C>(s, m, l, alpha, scale, scale_log2);
  rescale_o<C>(o, alpha);
}

// The sum over the 4 lanes of a quad (the lanes that share an accumulator row).
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---- a KV cache (kvcache kernels; common/params.cuh: CacheParams) --------------------------------
// The dense cache's row of batch entry b (batch_idx clamped to the rows).
__device__ __forceinline__ int cache_row(const CacheParams& c, int b) {
  return c.batch_idx != nullptr ? min(max(c.batch_idx[b], 0), c.num_rows - 1) : b;
}

// Batch entry b's keys: the valid slots [leftpad, seqused) of its cache row, every value clamped to
// what the tensors hold (capacity: the slots a row has).
__device__ __forceinline__ void cache_keys(const CacheParams& c, int b, int capacity, int& k_start, int& len_k,
                                           int& kv_b) {
  int end = capacity;
  if (c.seqused_k != nullptr) {  // clamped before adding the appended rows: no overflow whatever it holds
    const int used = min(max(c.seqused_k[b], 0), capacity);
    end = used + min(c.new_rows, capacity - used);
  }
  k_start = c.leftpad_k != nullptr ? min(max(c.leftpad_k[b], 0), end) : 0;
  len_k = end - k_start;
  kv_b = cache_row(c, b);
  if (c.block_table != nullptr) kv_b = 0;  // paged: rows come from the table (keep the unused base in the tensor)
}

// Row in_page of head h_k in the page a table entry names (entries past the pages clamped).
__device__ __forceinline__ const elem_t* page_row(const CacheParams& c, const TensorRef& t, int entry, int in_page,
                                                  int h_k) {
  return t.at<const elem_t>(min(max(entry, 0), c.num_rows - 1), h_k, in_page);
}

// Row `slot` (logical) of head h_k of a paged cache, its page read from the table in global memory
// (positions past the table's width clamped).
__device__ __forceinline__ const elem_t* paged_slot(const CacheParams& c, const int32_t* table, const TensorRef& t,
                                                    int slot, int h_k) {
  const int page_index = slot / c.page_size;
  return page_row(c, t, table[min(page_index, c.table_stride - 1)], slot - page_index * c.page_size, h_k);
}

// The table entries of the pages that slots [slot0, slot0 + kRows) touch, copied into `pages`
// (kRows / kPageMultiple + 1 ints, positions past the table's width clamped) by the first threads,
// asynchronously: issued with the previous block's copies, they let load_tile_paged find its pages in
// shared memory instead of behind a dependent global load on every copy's critical path.
template <int kRows, bool kAsync>
__device__ __forceinline__ void fetch_pages(int32_t* pages, const CacheParams& c, const int32_t* table, int slot0,
                                            int tid) {
  constexpr int kEntries = kRows / kPageMultiple + 1;
  if (tid < kEntries) {
    const int32_t* src = table + min(slot0 / c.page_size + tid, c.table_stride - 1);
    if constexpr (kAsync) cp_async_4(smem_addr(pages + tid), src);
    else pages[tid] = *src;
  }
}

// load_tile for kRows logical slots from slot0 of a paged cache, with fetch_pages' entries for them in
// `pages`. Each thread copies one chunk of kPer consecutive rows (not of every kThreads / kChunks-th
// row, as load_tile), so it looks its page up once: a tile that starts on a multiple of 16 slots (no
// left padding) then copies as load_tile does, a running pointer and no per-row test; from any other
// slot a thread checks each row for the step into the next page.
template <int kRows, int kD, bool kSwizzle, bool kAsync, int kThreads, int kCols>
__device__ __forceinline__ void load_tile_paged(elem_t* smem, const CacheParams& c, const int32_t* pages,
                                                const TensorRef& t, int h_k, int slot0, int valid_rows, int tid) {
  constexpr int kChunks = SmemLayout<kD, kSwizzle>::kChunks, kValidChunks = kCols / 8;
  const elem_t* fallback = static_cast<const elem_t*>(t.data);
  const int first = slot0 / c.page_size;  // the page pages[0] names
  if constexpr (kThreads % kChunks == 0 && (kRows * kChunks) % kThreads == 0) {
    constexpr int kPer = kRows * kChunks / kThreads;
    const int chunk = tid % kChunks, row0 = (tid / kChunks) * kPer;
    const int rows = kValidChunks == kChunks || chunk < kValidChunks ? valid_rows : 0;  // this thread's column
    int page_index = (slot0 + row0) / c.page_size, in_page = slot0 + row0 - page_index * c.page_size;
    const elem_t* src = page_row(c, t, pages[page_index - first], in_page, h_k) + chunk * 8;
    if constexpr (kPageMultiple % kPer == 0) {
      if (slot0 % kPageMultiple == 0) {  // the tile starts a 16-row group: each thread's rows share a page
#pragma unroll
        for (int it = 0; it < kPer; ++it, src += t.row_stride)
          copy_chunk<kD, kSwizzle, kAsync>(smem, fallback, src, row0 + it, chunk, row0 + it < rows);
        return;
      }
    }
    // Any start (a left-padded entry): rows may cross into the next page.
#pragma unroll
    for (int it = 0; it < kPer; ++it) {
      const int row = row0 + it;
      copy_chunk<kD, kSwizzle, kAsync>(smem, fallback, src, row, chunk, row < rows);
      if (++in_page == c.page_size) {  // the next row starts the next page
        ++page_index, in_page = 0;
        if (it + 1 < kPer && row + 1 < rows) src = page_row(c, t, pages[page_index - first], 0, h_k) + chunk * 8;
      } else {
        src += t.row_stride;
      }
    }
  } else {  // tiles whose chunks do not divide evenly among the threads: a lookup per row
    constexpr int kTotal = kRows * kChunks, kIters = (kTotal + kThreads - 1) / kThreads;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int i = it * kThreads + tid, row = i / kChunks, chunk = i % kChunks;
      if (kTotal % kThreads == 0 || i < kTotal) {
        const bool valid = row < valid_rows && (kValidChunks == kChunks || chunk < kValidChunks);
        const int page_index = (slot0 + row) / c.page_size;
        copy_chunk<kD, kSwizzle, kAsync>(
            smem, fallback,
            valid ? page_row(c, t, pages[page_index - first], slot0 + row - page_index * c.page_size, h_k) + chunk * 8
                  : fallback,
            row, chunk, valid);
      }
    }
  }
}

// Appending: one CTA a new row (b, i) copies its keys and values, all H_k heads, into slot
// seqused_k[b] + i of entry b's cache (seqused_k is required then). Slots past the capacity are
// dropped, with seqused_k clamped first (no overflow), so no value writes outside the cache; entries
// that share a cache row or page and append to one slot race, as in flash-attn (undefined contents).
template <class C>
__global__ void __launch_bounds__(128) append_kernel(const __grid_constant__ FwdParams p) {
  const CacheParams& c = p.cache;
  const int b = blockIdx.x / c.new_rows, i = blockIdx.x % c.new_rows;
  const int used = min(max(c.seqused_k[b], 0), p.seqlen_k);
  if (i >= p.seqlen_k - used) return;
  const int slot = used + i;
  constexpr int kChunks = C::kDHead / 8;  // 16-byte chunks a head
  for (int idx = threadIdx.x; idx < 2 * p.heads_k * kChunks; idx += blockDim.x) {
    const int which = idx / (p.heads_k * kChunks), h = idx / kChunks % p.heads_k, chunk = idx % kChunks;
    const TensorRef& dst = which ? p.v : p.k;
    const TensorRef& src = which ? c.v_new : c.k_new;
    elem_t* to = c.block_table != nullptr
                     ? const_cast<elem_t*>(paged_slot(c, c.block_table + int64_t(b) * c.table_stride, dst, slot, h))
                     : dst.at<elem_t>(cache_row(c, b), h, slot);
    *reinterpret_cast<uint4*>(to + chunk * 8) = *reinterpret_cast<const uint4*>(src.at<const elem_t>(b, h, i) + chunk * 8);
  }
}

// Split-KV: this CTA's rows normalised over its own key blocks, in fp32, and their lse (-inf where
// it saw no key), planes [split, b, h] of Sq rows. The learnable sink joins in the combine.
template <class C>
__device__ __forceinline__ void store_partial(const FwdParams& p, const float (&o)[C::kM][C::kNtD][4],
                                              const float (&m)[C::kM][2], const float (&l)[C::kM][2], float scale,
                                              int b, int h, int q_row0, int q_rows, int warp_row0, int lane) {
  const int64_t plane = (int64_t(blockIdx.y) * p.batch + b) * p.heads + h;
  float* o_part = p.cache.o_accum + (plane * p.seqlen_q + q_row0) * C::kDHead;
  float* lse_part = p.cache.lse_accum + plane * p.seqlen_q + q_row0;
#pragma unroll
  for (int mt = 0; mt < C::kM; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float sum = quad_sum(l[mt][half]);  // the row's sum: its 4 lanes' shares
      const int row = warp_row0 + mt * 16 + (lane >> 2) + half * 8;
      if (row >= q_rows) continue;
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
      for (int nt = 0; nt < C::kNtD; ++nt) {
        const int col = nt * 8 + (lane & 3) * 2;  // even, and d_head a multiple of 8: col + 1 too
        if (col < C::kDHead)
          *reinterpret_cast<float2*>(o_part + int64_t(row) * C::kDHead + col) =
              make_float2(o[mt][nt][2 * half] * inv, o[mt][nt][2 * half + 1] * inv);
      }
      const float m_nat = C::kOptSoftmax ? m[mt][half] * scale : m[mt][half];
      if ((lane & 3) == 0) lse_part[row] = sum > 0.f ? m_nat + logf(sum) : -INFINITY;
    }
}
#endif  // __CUDACC__

// ---- split-KV combine (common/params.cuh: CacheParams) ---------------------------------------------
// Row r = (b * H + h) * Sq + i of the output (GQA-packed calls: H = H_k, Sq = the group) is
//   lse_keys = log sum_s exp(lse_s),   o = sum_s exp(lse_s - lse_keys) o_s
// over the splits s whose lse_s is finite (a split that saw no key has lse_s = -inf and is skipped);
// lse is +inf for a row no split saw a key of; with a learnable sink, lse = logaddexp(lse_keys, sink) and
// O shrinks by exp(lse_keys - lse). o_s: o_accum [splits, rows, kDHead] fp32, lse_s: lse_accum [splits, rows].
//
// One CTA a row (several rows a CTA when a row needs fewer than 4 warps: see combine_rows_per_cta), a warp
// for each kSplitsPerWarp splits of it. A warp issues all its loads at once (its 8 splits' lse, one a
// lane, and their 16-byte pieces of o_s, kDHead / 128 per lane and split) before using any, so a row
// costs about one L2 round trip instead of one per split; then its group's max and sum-exp by shuffles,
// the row's lse from every warp's pair in shared memory, and the weighted sum of its 8 partials, which
// the row's warps add up in shared memory (one warp a row writes straight from registers).
constexpr int kMaxSplits = 128;     // flashjit/kvattn.py: MAX_SPLITS, the launcher refuses more
constexpr int kSplitsPerWarp = 8;   // the lse a warp reads in one 8-lane group (lanes j, j + 8, ... alike)
constexpr int kCombineMaxWarps = kMaxSplits / kSplitsPerWarp;

// Warps that combine one row of `splits` partials.
__host__ __device__ constexpr int combine_warps_per_row(int splits) {
  const int warps = (splits + kSplitsPerWarp - 1) / kSplitsPerWarp;
  return warps < 1 ? 1 : warps > kCombineMaxWarps ? kCombineMaxWarps : warps;
}
// Rows a CTA combines: rows of 1 or 2 warps share a CTA of 4 warps, so that many rows (a prefill chunk
// over a split cache) are not capped by the SM's CTA slots at 1-warp CTAs (32 a Hopper SM: half its warps).
__host__ __device__ constexpr int combine_rows_per_cta(int warps_per_row) {
  return warps_per_row == 1 ? 4 : warps_per_row == 2 ? 2 : 1;
}
// Dynamic shared memory of a combine CTA: each warp's weighted sum (kDHead fp32) and its (max,
// sum-exp) pair; none for 1-warp rows, which need no exchange.
template <int kDHead>
__host__ __device__ constexpr int combine_smem_bytes(int warps_per_row) {
  return warps_per_row == 1 ? 0 : combine_rows_per_cta(warps_per_row) * warps_per_row * (kDHead * 4 + 8);
}

#ifdef __CUDACC__  // device code (the launcher's host-only build skips it: common/launch.cuh)
template <class C>
__global__ void __launch_bounds__(kCombineMaxWarps * 32) combine_kernel(const __grid_constant__ FwdParams p) {
  constexpr int kPieces = (C::kDHead + 127) / 128;  // 16-byte pieces (4 fp32 columns) a lane takes of a row
  constexpr int kRowPieces = C::kDHead / 4;         // ... of which a row has (kDHead is a multiple of 8)
  static_assert(C::kDHead % 8 == 0, "the combine reads rows of d_head fp32 in 16-byte pieces");
  extern __shared__ __align__(128) unsigned char smem_raw[];

  const int splits = p.cache.num_splits;
  const int per_row = combine_warps_per_row(splits), rows_per_cta = combine_rows_per_cta(per_row);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // The CTA's row slot and the warp's place in its row (warp / per_row, without a division).
  const int slot = per_row == 1 ? warp : per_row == 2 ? warp >> 1 : 0, wr = warp - slot * per_row;
  const int64_t rows = int64_t(p.batch) * p.heads * p.seqlen_q;
  const int64_t r = int64_t(blockIdx.x) * rows_per_cta + slot;
  // A slot past the last row loads nothing and writes nothing, but takes part in the barriers.
  const bool live = r < rows;
  const int first = wr * kSplitsPerWarp, own = first + (lane & 7);  // own: the split whose lse this lane reads
  // Launched as a programmatic dependent (sm_90+): the CTA may be running before the attention kernel has
  // finished; everything above reads only the params, everything below the partials it writes.
  griddep_wait();

  // ---- every load of the warp, before any use ----
  // Each address is clamped into the buffers (a slot past the last row reads the last row, a split past
  // the count the last split, a lane past the row's end its last piece), so no load needs a predicate
  // and ptxas issues them back to back; a padding split's values weigh 0 and are skipped below.
  const int64_t row = live ? r : rows - 1;
  const float* o_row = p.cache.o_accum + row * C::kDHead;
  float4 x[kSplitsPerWarp][kPieces];
#pragma unroll
  for (int j = 0; j < kSplitsPerWarp; ++j)
#pragma unroll
    for (int c = 0; c < kPieces; ++c) {
      const int s = min(first + j, splits - 1);
      const int piece = kRowPieces % 32 == 0 ? lane + c * 32 : min(lane + c * 32, kRowPieces - 1);
      x[j][c] = __ldcs(reinterpret_cast<const float4*>(o_row + int64_t(s) * rows * C::kDHead + piece * 4));
    }
  const float lse_read = p.cache.lse_accum[int64_t(min(own, splits - 1)) * rows + row];
  const float lse_own = live && own < splits ? lse_read : -INFINITY;

  // ---- the row's lse: each warp's max and sum-exp over its splits, then over the row's warps ----
  float mx = lse_own;
#pragma unroll
  for (int d = 1; d < kSplitsPerWarp; d <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, d));
  float sum = mx == -INFINITY ? 0.f : __expf(lse_own - mx);  // an empty split: exp(-inf) = 0
#pragma unroll
  for (int d = 1; d < kSplitsPerWarp; d <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, d);
  float4* sums = reinterpret_cast<float4*>(smem_raw);  // [rows_per_cta * per_row][kRowPieces]
  float2* stats = reinterpret_cast<float2*>(sums + rows_per_cta * per_row * kRowPieces);  // [rows_per_cta * per_row]
  if (per_row > 1) {
    if (lane == 0) stats[warp] = make_float2(mx, sum);
    __syncthreads();
    float row_mx = -INFINITY;
    for (int w = 0; w < per_row; ++w) row_mx = fmaxf(row_mx, stats[slot * per_row + w].x);
    float row_sum = 0.f;
    if (row_mx != -INFINITY)
      for (int w = 0; w < per_row; ++w) {
        const float2 st = stats[slot * per_row + w];
        row_sum += st.x == -INFINITY ? 0.f : st.y * __expf(st.x - row_mx);
      }
    mx = row_mx, sum = row_sum;
  }
  const float lse_keys = mx == -INFINITY ? -INFINITY : mx + logf(sum);
  float lse = lse_keys == -INFINITY ? INFINITY : lse_keys, shrink = 1.f;
  if (C::kSink) {
    const float sink = live ? p.mods.sink[int(r / p.seqlen_q % p.heads)] : 0.f;
    lse = lse_keys == -INFINITY ? sink : fmaxf(lse_keys, sink) + log1pf(__expf(-fabsf(lse_keys - sink)));
    shrink = lse_keys == -INFINITY ? 0.f : __expf(lse_keys - lse);
  }

  // ---- this warp's weighted sum of its splits' partials ----
  const float w_own = lse_own == -INFINITY || lse_keys == -INFINITY ? 0.f : __expf(lse_own - lse_keys) * shrink;
  float4 acc[kPieces];
#pragma unroll
  for (int c = 0; c < kPieces; ++c) acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int j = 0; j < kSplitsPerWarp; ++j) {
    const float w = __shfl_sync(0xffffffffu, w_own, j);  // lane j read split first + j
    const bool use = w != 0.f;  // skipped: empty splits (and padding past the count) add nothing, NaN or not
#pragma unroll
    for (int c = 0; c < kPieces; ++c) {
      acc[c].x = use ? fmaf(w, x[j][c].x, acc[c].x) : acc[c].x;
      acc[c].y = use ? fmaf(w, x[j][c].y, acc[c].y) : acc[c].y;
      acc[c].z = use ? fmaf(w, x[j][c].z, acc[c].z) : acc[c].z;
      acc[c].w = use ? fmaf(w, x[j][c].w, acc[c].w) : acc[c].w;
    }
  }

  // ---- the row's sum over its warps, one write of o and lse ----
  if (live && wr == 0 && lane == 0 && p.lse != nullptr) p.lse[r] = lse;
  elem_t* out = nullptr;
  if (live) {
    const int i = int(r % p.seqlen_q), bh = int(r / p.seqlen_q);
    out = p.o.at<elem_t>(bh / p.heads, bh % p.heads, i);
  }
  auto store = [&](int piece, const float4& v) {  // columns [4 piece, 4 piece + 4) of the row
    *reinterpret_cast<uint2*>(out + piece * 4) = make_uint2(pack2<C::kBf16>(v.x, v.y), pack2<C::kBf16>(v.z, v.w));
  };
  if (per_row == 1) {
    if (!live) return;
#pragma unroll
    for (int c = 0; c < kPieces; ++c)
      if (kRowPieces % 32 == 0 || lane + c * 32 < kRowPieces) store(lane + c * 32, acc[c]);
    return;
  }
  float4* mine = sums + int64_t(warp) * kRowPieces;
#pragma unroll
  for (int c = 0; c < kPieces; ++c)
    if (kRowPieces % 32 == 0 || lane + c * 32 < kRowPieces) mine[lane + c * 32] = acc[c];
  __syncthreads();
  if (!live) return;
  const float4* row_sums = sums + int64_t(slot) * per_row * kRowPieces;
  for (int piece = wr * 32 + lane; piece < kRowPieces; piece += per_row * 32) {
    float4 v = row_sums[piece];
    for (int w = 1; w < per_row; ++w) {
      const float4 y = row_sums[w * kRowPieces + piece];
      v.x += y.x, v.y += y.y, v.z += y.z, v.w += y.w;
    }
    store(piece, v);
  }
}

// ---- the kernel --------------------------------------------------------------------------------
template <class C>
__global__ void __launch_bounds__(C::kThreads) fwd_kernel(const __grid_constant__ FwdParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t* sQ = reinterpret_cast<elem_t*>(smem_raw);
  elem_t* sK = sQ + C::kBr * C::kD;
  elem_t* sV = sK + C::kBc * C::kD;
  using LO = SmemLayout<C::kDV, C::kSwizzle>;  // O staged in sQ (kDV <= kD: it fits)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // 1-D grid: m-block fastest (neighbouring CTAs share K/V in L2), then head, then batch; split-KV
  // (kvcache) CTAs in gridDim.y.
  const int num_m = (p.seqlen_q + C::kBr - 1) / C::kBr;
  int m_block = blockIdx.x % num_m;
  const int bh = blockIdx.x / num_m, h = bh % p.heads, b = bh / p.heads;
  if (C::kCausal) m_block = num_m - 1 - m_block;  // longest rows first: better tail balance
  const int h_k = h / (p.heads / p.heads_k);
  const Seq seq(p, b);  // this sequence's rows (dense: the whole batch entry)
  // Its keys: rows [k_start, k_start + len_k) of k/v batch entry kv_b (a KV cache: see CacheParams).
  // A variable-length batch over a paged cache (flash_attn_varlen_func's block_table) takes each
  // sequence's key count from cu_seqlens_k, within the slots its table row holds (seqlen_k).
  int k_start = seq.k_start, len_k = seq.len_k, kv_b = b;
  if (C::kKvCache)
    cache_keys(p.cache, b, is_varlen(p) ? min(seq.len_k, p.seqlen_k) : p.seqlen_k, k_start, len_k,
               kv_b);

  const int q_row0 = m_block * C::kBr;                 // first query row of the CTA
  if (q_row0 >= seq.len_q) return;                     // varlen: past this sequence's end (the grid fits the longest)
  const int q_rows = min(C::kBr, seq.len_q - q_row0);  // valid query rows of the CTA
  const int warp_row0 = warp * C::kWarpRows;           // first row of this warp within the CTA
  // kvcache: a warp whose rows are all past the CTA's valid ones only copies tiles (a GQA-packed decode
  // tile holds H / H_k rows, so most warps have none); other kernels keep one unbranched loop.
  const bool computes = !C::kKvCache || warp_row0 < q_rows;
  const typename C::Mod mod(p.mods, seq.len_q, len_k, p.softmax_scale, b, h);
  const elem_t* gQ = p.q.at<const elem_t>(b, h, seq.q_start + q_row0);
  const elem_t* gK = p.k.at<const elem_t>(kv_b, h_k, k_start);  // paged: unused (rows come from the table)
  const elem_t* gV = p.v.at<const elem_t>(kv_b, h_k, k_start);

  // Key blocks any row of this CTA can see: [j_begin, j_end).
  int j_begin = 0, j_end = (len_k + C::kBc - 1) / C::kBc;
  if (C::kCausal || (C::Mod::kLocal && mod.right >= 0)) {
    const int last_col = q_row0 + q_rows - 1 + mod.diag + mod.right;  // rightmost visible key
    j_end = last_col < 0 ? 0 : min(j_end, last_col / C::kBc + 1);
  }
  if (C::Mod::kLocal && mod.left >= 0) j_begin = max(0, (q_row0 + mod.diag - mod.left) / C::kBc);
  const bool split = C::kKvCache && p.cache.num_splits > 1;
  if (split) {  // this CTA's share of the row's key blocks, an even cut of all of them
    const int per = ((len_k + C::kBc - 1) / C::kBc + p.cache.num_splits - 1) / p.cache.num_splits;
    j_begin = max(j_begin, int(blockIdx.y) * per), j_end = min(j_end, int(blockIdx.y + 1) * per);
  }
  // A paged cache: block j's table entries sit in sPages[j % 2], fetched with block j - 1's K copies
  // (or, for the first block, before Q's) and read by both of block j's tiles.
  const bool paged = C::kKvCache && p.cache.block_table != nullptr;
  int32_t* sPages = reinterpret_cast<int32_t*>(sV + C::kBc * C::kDV);
  auto fetch_pages_of = [&](int block) {
    if constexpr (C::kKvCache)
      if (paged && block < j_end)
        fetch_pages<C::kBc, C::kAsync>(sPages + (block & 1) * C::kPageEntries, p.cache,
                                       p.cache.block_table + int64_t(b) * p.cache.table_stride,
                                       k_start + block * C::kBc, tid);
  };
  // Block `block` of K (kW = kD, kCols = kDHead) or V (kDV, kDHeadV) into its tile.
  auto load_kv = [&](auto width, auto cols, elem_t* dst, const elem_t* src, const TensorRef& t, int block) {
    constexpr int kW = decltype(width)::value, kCols = decltype(cols)::value;
    if constexpr (C::kKvCache) {
      if (paged) {
        load_tile_paged<C::kBc, kW, C::kSwizzle, C::kAsync, C::kThreads, kCols>(
            dst, p.cache, sPages + (block & 1) * C::kPageEntries, t, h_k, k_start + block * C::kBc,
            len_k - block * C::kBc, tid);
        return;
      }
    }
    load_tile<C::kBc, kW, C::kSwizzle, C::kAsync, C::kThreads, kCols>(
        dst, src + int64_t(block) * C::kBc * t.row_stride, t.row_stride, len_k - block * C::kBc, tid);
  };
  auto load_k = [&](int block) { load_kv(Int<C::kD>(), Int<C::kDHead>(), sK, gK, p.k, block); };
  auto load_v = [&](int block) { load_kv(Int<C::kDV>(), Int<C::kDHeadV>(), sV, gV, p.v, block); };

  float o[C::kM][C::kNtD][4];
  float m[C::kM][2], l[C::kM][2];
  uint32_t qf[C::kM][C::kKtD][4];
#pragma unroll
  for (int mt = 0; mt < C::kM; ++mt) {
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
#pragma unroll
    for (int nt = 0; nt < C::kNtD; ++nt) o[mt][nt][0] = o[mt][nt][1] = o[mt][nt][2] = o[mt][nt][3] = 0.f;
  }
  // Transformed scores are already in softmax units; otherwise the scale folds into the exp2 argument.
  const float scale = C::Mod::kTransforms ? 1.f : p.softmax_scale, scale_log2 = scale * 1.4426950408889634f;

  if (paged) {  // the first block's pages in a group of their own, so K_0 waits for them and not for Q
    fetch_pages_of(j_begin);
    if (C::kAsync) cp_async_commit();
  }
  load_tile<C::kBr, C::kD, C::kSwizzle, C::kAsync, C::kThreads, C::kDHead>(sQ, gQ, p.q.row_stride, q_rows, tid);
  if (C::kEager) {
    cp_async_commit();
    if (paged) cp_async_wait<1>(), __syncthreads();  // the pages' group, issued before Q's, has landed
    if (j_begin < j_end) load_k(j_begin), fetch_pages_of(j_begin + 1);
    cp_async_commit();
  } else if (paged) {
    if (C::kAsync) cp_async_commit(), cp_async_wait<0>();
    __syncthreads();
  }

  for (int j = j_begin; j < j_end; ++j) {
    if (C::kEager) {
      cp_async_wait<0>();  // K_j (and at j == 0, Q) has landed
      __syncthreads();     // ... for every thread; and every warp is done reading V_{j-1}
      load_v(j);  // V_j streams in under QK^T and the softmax
      cp_async_commit();
    } else {
      __syncthreads();  // every warp is done with K_{j-1}, V_{j-1} (and block j - 1's pages)
      load_k(j);
      load_v(j);
      fetch_pages_of(j + 1);
      if (C::kAsync) cp_async_commit(), cp_async_wait<0>();
      __syncthreads();
    }
    uint32_t pf[C::kM][C::kKtC][4];
    if (computes) {
      if (C::kDepthQ == 0 && j == j_begin) load_a<C::kD, C::kSwizzle>(qf, sQ, warp_row0, lane, 0, C::kKtD);
      float s[C::kM][C::kNtC][4];
      gemm_qk<C>(s, qf, sQ, sK, warp_row0, lane);
      const int col0 = j * C::kBc;
      const bool need_mask = mod.block_needs_mask(q_row0 + warp_row0, C::kWarpRows, col0, C::kBc);
      if (need_mask || C::Mod::kTransforms) apply_score_mod<C>(s, mod, q_row0 + warp_row0, col0, need_mask, lane);
      online_softmax<C>(s, o, m, l, scale, scale_log2);
      if (C::kDropout) apply_dropout<C>(s, Dropout(p.mods, bh), q_row0 + warp_row0, col0, lane);
      acc_to_a<C::kBf16>(s, pf);
    }

    if (C::kEager) {
      cp_async_wait<0>();  // V_j has landed
      __syncthreads();     // ... for every thread; and every warp is done reading K_j (and V_j's pages)
      if (j + 1 < j_end) load_k(j + 1), fetch_pages_of(j + 2);  // K_{j+1} streams in under PV
      cp_async_commit();
    }
    if (computes) gemm_pv<C>(o, pf, sV, lane);
  }

  // ---- epilogue: normalise, stage O through this warp's rows of sQ, 16-byte coalesced stores ----
  if (C::kAsync) cp_async_wait<0>();
  if (split) {  // a partial for the combine kernel instead
    store_partial<C>(p, o, m, l, scale, b, h, q_row0, q_rows, warp_row0, lane);
    // The combine (a programmatic dependent launch on sm_90+) may start once every CTA is here; it
    // reads the partials only after griddep_wait, which waits for this whole grid and its writes.
    griddep_launch_dependents();
    return;
  }
  __syncthreads();  // sQ's copies (possibly issued by other threads) are complete before reuse
  const Seq tail(p, b);
  float* lse = p.lse + tail.stat_row(h, 0);  // unused when p.lse is null
#pragma unroll
  for (int mt = 0; mt < C::kM; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float sum = quad_sum(l[mt][half]);  // the row's sum: its 4 lanes' shares (fold_sink updates it)
      float m_nat = C::kOptSoftmax ? m[mt][half] * scale : m[mt][half];  // natural-log units
      const float corr = C::kSink ? fold_sink(p.mods.sink[h], m_nat, sum) : 1.f;
      // Dropped entries still count in the softmax denominator; kept ones are scaled by 1 / (1 - p).
      const float inv = sum > 0.f ? (C::kDropout ? p.mods.dropout_scale : 1.f) * corr / sum : 0.f;
      const int row = warp_row0 + mt * 16 + (lane >> 2) + half * 8;
#pragma unroll
      for (int nt = 0; nt < C::kNtD; ++nt) {
        const uint32_t packed = pack2<C::kBf16>(o[mt][nt][2 * half] * inv, o[mt][nt][2 * half + 1] * inv);
        *reinterpret_cast<uint32_t*>(sQ + LO::offset(row, nt) + (lane & 3) * 2) = packed;
      }
      if (p.lse != nullptr && (lane & 3) == 0 && q_row0 + row < tail.len_q)
        lse[q_row0 + row] = sum > 0.f ? m_nat + logf(sum) : INFINITY;
    }
  __syncwarp();
  elem_t* gO = p.o.at<elem_t>(b, h, tail.q_start + q_row0);
#pragma unroll
  for (int i = lane; i < C::kWarpRows * LO::kChunks; i += 32) {
    const int row = warp_row0 + i / LO::kChunks, chunk = i % LO::kChunks;
    if (row < tail.len_q - q_row0 && chunk < C::kDHeadV / 8)
      *reinterpret_cast<uint4*>(gO + int64_t(row) * p.o.row_stride + chunk * 8) =
          *reinterpret_cast<const uint4*>(sQ + LO::offset(row, chunk));
  }
}
#endif  // __CUDACC__

// Whether every arch this TU is built for has programmatic dependent launch (sm_90+). A kernel library is
// built for one arch (flashjit/toolchain.py: gencode_flags); nvcc names it in __CUDA_ARCH_LIST__, and the
// launcher's host compiler is given the same (flashjit/jit.py: host_flags), so the two agree on it.
#if defined(__CUDA_ARCH_LIST__)
inline constexpr int kBuiltArchs[] = {__CUDA_ARCH_LIST__};
#else
inline constexpr int kBuiltArchs[] = {0};  // an nvcc too old to say: plain launches
#endif
constexpr bool built_for_programmatic_launch() {
  for (int arch : kBuiltArchs)
    if (arch < 900) return false;
  return true;
}

// The split-KV combine, after the attention kernel on the same stream. On sm_90+ a programmatic dependent
// launch (cudaLaunchAttributeProgrammaticStreamSerialization): its CTAs are scheduled as the attention
// kernel's last CTAs finish (each calls griddep_launch_dependents after its partials' stores) and wait in
// griddep_wait for the whole grid, instead of starting only after the kernel boundary. Stream capture
// records it as a programmatic edge, so a CUDA graph replays the same overlap. sm_80: a plain launch.
template <class C>
cudaError_t launch_combine(const FwdParams& p, unsigned blocks, int threads, int smem_bytes, cudaStream_t stream) {
  if constexpr (built_for_programmatic_launch()) {
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(blocks);
    config.blockDim = dim3(unsigned(threads));
    config.dynamicSmemBytes = size_t(smem_bytes);
    config.stream = stream;
    config.attrs = attribute;
    config.numAttrs = 1;
    const void* kernel = FLASHJIT_KERNEL(combine_kernel, C);
    if (kernel == nullptr) return missing_kernel();
    void* args[] = {const_cast<FwdParams*>(&p)};
    return cudaLaunchKernelExC(&config, kernel, args);
  } else {
    return launch_kernel(FLASHJIT_KERNEL(combine_kernel, C), blocks, unsigned(threads), size_t(smem_bytes), stream, p);
  }
}

template <class C>
cudaError_t launch(const FwdParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0 || p.seqlen_q == 0) return cudaSuccess;
  const int64_t blocks = int64_t((p.seqlen_q + C::kBr - 1) / C::kBr) * p.heads * p.batch;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const void* kernel = FLASHJIT_KERNEL(fwd_kernel, C);
  static bool opted_in[64] = {};
  if (const cudaError_t err = opt_in_smem(kernel, C::kSmemBytes, &opted_in); err != cudaSuccess) return err;
  const int splits = C::kKvCache && p.cache.num_splits > 1 ? p.cache.num_splits : 1;
  if (splits > kMaxSplits) return cudaErrorInvalidValue;
  // The combine's grid (rows_per_cta rows a CTA), checked before anything is launched.
  const int64_t rows = int64_t(p.batch) * p.heads * p.seqlen_q;
  const int per_row = combine_warps_per_row(splits), rows_per_cta = combine_rows_per_cta(per_row);
  const int64_t combine_blocks = (rows + rows_per_cta - 1) / rows_per_cta;
  if (splits > 1 && combine_blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if constexpr (C::kKvCache) {
    if (p.cache.new_rows > 0) {
      const cudaError_t err = launch_kernel(FLASHJIT_KERNEL(append_kernel, C), unsigned(p.batch * p.cache.new_rows),
                                            128, 0, stream, p);
      if (err != cudaSuccess) return err;
    }
  }
  const cudaError_t err = launch_kernel(kernel, dim3(unsigned(blocks), unsigned(splits)), C::kThreads,
                                        C::kSmemBytes, stream, p);
  if constexpr (C::kKvCache) {
    if (splits > 1) {
      if (err != cudaSuccess) return err;
      return launch_combine<C>(p, unsigned(combine_blocks), rows_per_cta * per_row * 32,
                               combine_smem_bytes<C::kDHead>(per_row), stream);
    }
  }
  return err;
}

}  // namespace flashjit::fwd

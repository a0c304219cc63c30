// FlashAttention-2 style backward pass for sm_80 and newer.
//
// With P_ij = exp(scale * q_i . k_j - lse_i) (the forward's probabilities, recomputed) and
// D_i = dO_i . O_i:
//   dV_j = sum_i P_ij dO_i      dP_ij = dO_i . v_j      dS_ij = P_ij (dP_ij - D_i)
//   dK_j = scale sum_i dS_ij q_i                       dQ_i = scale sum_j dS_ij k_j
//
// q, k: head dim D; v, o, dO (and dV): D_v <= D (MLA-style value heads; usually D_v = D).
//
// 1. dvec_kernel: D = rowsum(dO * O)                          [B, H, Sq] fp32 (varlen: [H, total_q])
// 2. dkdv_kernel: one CTA per (key block, kv head, batch); walks every query block of every query
//    head of its GQA group, so dK/dV are summed over the group in registers. Works on S^T = K Q^T so
//    each warp owns 16 key rows of the accumulators.
//    A group of d_split warps owns group_rows (16 or 32) accumulator rows, each warp d_head /
//    d_split of the columns. Split (d_split > 1), each warp computes the scores for its share of the
//    block's queries only (nothing is computed twice), stages its P^T and dS^T in shared memory,
//    and after a barrier among the group reads the whole rows back as the A operand of its dV and dK
//    products. That fits head dims above 128, whose 16-row dK + dV would need 256+ registers, and
//    with 32-row groups gives FlashAttention-2's squarer warp tiles (18% fewer ldmatrix at d128).
//    The dQ kernel splits its keys the same way.
// Then dQ, one of two ways (the kDeterministic template parameter):
// 3a. fast (default, flash-attn's deterministic=False): dkdv_kernel also stages dS in shared memory,
//     multiplies it by K and adds the block's dQ into an fp32 buffer with atomics (5 products per
//     block pair); dq_convert_kernel scales and rounds it. The order of the atomic adds varies, so
//     dQ can differ in the last bits run to run.
// 3b. deterministic: dq_kernel, one CTA per (query block, head, batch), walks the key blocks and
//     recomputes P and dP (7 products per block pair, but every output has exactly one writer, so
//     gradients are bit-identical run to run).
// 4. dkv_convert_kernel (bwd_sm90.cuh's one dK/dV CTA per query head only): dK, dV rounded from
//    their fp32 sums, a lane group per key row (row_lanes, as the D kernel and dQ conversion).
// Variable-length batches (common/params.cuh: VarlenParams): every CTA finds its sequence's rows with
// common/varlen.cuh's Seq and exits when its block starts past the sequence's end; the row kernels
// (1, 3a) walk H * total_q rows, which need no sequence bounds at all.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "common/dropout.cuh"
#include "common/grid_order.cuh"
#include "common/fragments.cuh"
#include "common/params.cuh"
#include "common/ptx.cuh"
#include "common/score_mod.cuh"
#include "common/smem_tile.cuh"
#include "common/varlen.cuh"
#include "common/launch.cuh"

namespace flashjit::bwd {

// One template parameter per BwdConfig field (flashjit/configs/bwd_sm80.py), in the same order.
template <bool kBf16_, int kDHead_, int kWarps_, int kBlockM_, int kDSplit_, int kGroupRows_, bool kDeterministic_,
          bool kCausal_, bool kLocal_, bool kSoftcap_, bool kAlibi_, bool kDropout_, int kDHeadV_>
struct Config {
  static constexpr bool kBf16 = kBf16_, kCausal = kCausal_, kSwizzle = true, kDeterministic = kDeterministic_;
  using Mod = ScoreMod<kCausal_, kLocal_, kSoftcap_, kAlibi_>;
  static constexpr bool kDropout = kDropout_;
  // 1 / (1 - p): the kernels accumulate gradients of the unscaled P o Z and apply it once at the end.
  __device__ __forceinline__ static float dropout_scale(const BwdParams& p) {
    return kDropout ? p.mods.dropout_scale : 1.f;
  }
  // kDHead: the real head dim (a multiple of 8); kD: the tile width it runs in (zero columns past
  // kDHead; dq_accum rows are kD wide).
  static constexpr int kDHead = kDHead_, kD = head_dim_tile(kDHead_), kWarps = kWarps_, kThreads = kWarps * 32;
  // The value head dim (v, o, dO, dV; kDHeadV_ == 0: kDHead) and its tile.
  static constexpr int kDHeadV = kDHeadV_ == 0 ? kDHead_ : kDHeadV_, kDV = head_dim_tile(kDHeadV);
  static constexpr bool kDqTiled = false;  // dq_accum is [B, H, Sq, kD] (bwd_sm90.cuh tiles it)
  static constexpr int kCtaThreads = kThreads;  // all compute (bwd_sm90.cuh's TMA kernel has a producer more)
  static constexpr bool kHeadSplit = false;  // one dK/dV CTA per GQA group (bwd_sm90.cuh's Config can split it)
  // kDSplit warps (a group) share kGroupRows accumulator rows (kRT m-tiles), each owning kD / kDSplit
  // of the columns.
  static constexpr int kDSplit = kDSplit_, kGroups = kWarps / kDSplit, kGroupRows = kGroupRows_;
  static constexpr int kRT = kGroupRows / 16;
  static constexpr bool kSplit = kDSplit > 1;
  // Keys per dK/dV CTA (kGroupRows per group); also the rows and the key step of the dQ kernel.
  static constexpr int kBlockN = kGroupRows * kGroups;
  static constexpr int kBlockM = kBlockM_;  // queries per dK/dV step
  static constexpr int kNtD = kD / 8, kKtM = kBlockM / 16, kNtM = kBlockM / 8;
  static constexpr int kKtN = kBlockN / 16, kNtN = kBlockN / 8;
  static constexpr int kNtDW = kNtD / kDSplit;                      // dK (dQ) accumulator n-tiles per warp
  static constexpr int kNtDWV = kDV / 8 / kDSplit;                  // dV accumulator n-tiles per warp
  static constexpr int kMW = kBlockM / kDSplit, kNtMW = kMW / 8;    // queries per warp in the dK/dV scores
  static constexpr int kNW = kBlockN / kDSplit, kNtNW = kNW / 8;    // keys per warp in the dQ kernel's scores
  static constexpr int kTileN = kBlockN * kD, kTileM = kBlockM * kD, kScoreTile = kBlockN * kBlockM;
  static constexpr int kTileNV = kBlockN * kDV, kTileMV = kBlockM * kDV;  // V, dO
  // dK/dV kernel: K, V, two stages of (Q, dO, lse, D); dS^T (two stages for the fused dQ product,
  // else one when split) and P^T when split.
  static constexpr int kDsStages = kDeterministic ? (kSplit ? 1 : 0) : 2;
  static constexpr int kDkdvSmem = (kTileN + kTileNV + 2 * (kTileM + kTileMV)) * 2 + 2 * 2 * kBlockM * 4 +
                                   (kDsStages + (kSplit ? 1 : 0)) * kScoreTile * 2;
  // dQ kernel: Q, dO, two stages of (K, V) and, when split, dS.
  static constexpr int kDqSmem = 3 * (kTileN + kTileNV) * 2 + (kSplit ? kBlockN * kBlockN * 2 : 0);
  static constexpr int kSmemBytes = kDeterministic && kDqSmem > kDkdvSmem ? kDqSmem : kDkdvSmem;
  // The fused dQ product tiles [kBlockM, kD] over the warps as kDqWM x kDqWD tiles of kDqMT m-tiles
  // x kDqNT n-tiles: two m-tiles where that divides evenly, so each loaded fragment feeds two MMAs.
  static constexpr int dq_m_tiles() {
    for (int mt : {2, 4, 1}) {
      const int wm = kBlockM / (16 * mt);
      if (wm < 1 || kBlockM % (16 * mt) != 0 || kWarps % wm != 0) continue;
      const int wd = kWarps / wm;
      if (kNtD % wd == 0 && (kNtD / wd) % 2 == 0) return mt;
    }
    return 0;
  }
  static constexpr int kDqMT = dq_m_tiles(), kDqWM = kDqMT ? kBlockM / (16 * kDqMT) : 1;
  static constexpr int kDqWD = kWarps / kDqWM, kDqNT = kNtD / kDqWD;
  // Accumulators + operands: dK, dV, S^T, dP^T in the dK/dV kernel; dQ, S, dP in the dQ kernel.
  static constexpr int kDkdvRegs = kRT * ((kNtDW + kNtDWV) * 4 + 2 * kNtMW * 4) + 32;
  static constexpr int kDqRegs = kRT * (kNtDW * 4 + 2 * kNtNW * 4) + 32;
  static constexpr int kRegEstimate = kDeterministic && kDqRegs > kDkdvRegs ? kDqRegs : kDkdvRegs;
  static_assert(kDHead % 8 == 0 && kDHead >= 8 && kDHead <= 256, "d_head must be a multiple of 8 from 8 to 256");
  static_assert(kDHeadV_ == 0 || (kDHeadV_ % 8 == 0 && kDHeadV_ >= 8 && kDHeadV_ <= kDHead_),
                "d_v must be 0 (the same as d_head) or a multiple of 8 from 8 to d_head");
  static_assert(kWarps == 4 || kWarps == 8, "the backward pass runs 4 or 8 warps");
  static_assert(kBlockM == 32 || kBlockM == 64 || kBlockM == 128, "block_m must be 32, 64 or 128");
  static_assert(kDSplit == 1 || kDSplit == 2 || kDSplit == 4, "d_split must be 1, 2 or 4");
  static_assert(kGroupRows == 16 || kGroupRows == 32, "group_rows must be 16 or 32");
  static_assert(kNtDW % 2 == 0 && kNtDWV % 2 == 0, "each warp's share of the head dim must be whole 16-column pairs");
  static_assert(kMW % 16 == 0 && kNW % 16 == 0, "each warp's share of a score block must be whole 16-wide k-tiles");
  static_assert(2 * kBlockM >= kBlockN,
                "dK/dV are staged through the Q / dO tiles: 2 * block_m must be at least the block's group_rows * n_warps / d_split keys");
  static_assert(kDeterministic || kDqMT > 0, "no warp tiling of the fused dQ product");
  static_assert(kRegEstimate <= 255, "the backward accumulators of this config need more than 255 registers");
};

// ---- 1. D = rowsum(dO * O), a lane group per row; the fast path also zeroes the row's fp32 dQ ----
// Row `row` of the statistics (planes of rows, i fastest: common/varlen.cuh) as (plane, b, h, i):
// dense [B, H, Sq], plane b * H + h; varlen [H, total_q], plane h, b = 0 and i the packed row (the
// TensorRefs' batch stride is 0), so q.at(b, h, i) addresses the row either way.
// bwd_sm90.cuh's dK/dV sums walk k's rows the same way (heads_k planes of key rows).
#ifdef __CUDACC__  // device code (the launcher's host-only build skips it: common/launch.cuh)
struct RowIndex {
  int plane, b, h, i;
  __device__ __forceinline__ RowIndex(int64_t row, int heads, int rows)
      : plane(int(row / rows)), b(plane / heads), h(plane % heads), i(int(row % rows)) {}
};
#endif  // __CUDACC__

// The row kernels (D, the dQ and dK/dV conversions) give a row to a group of lanes: the fewest (a power
// of two) that cover its columns 8 a lane, so that a warp has 32 / row_lanes rows in flight instead of
// one row with most lanes idle (d64: 8 lanes a row, 4 rows a warp). 128-thread blocks.
__host__ __device__ constexpr int row_lanes(int cols) {
  return cols <= 8 ? 1 : cols <= 16 ? 2 : cols <= 32 ? 4 : cols <= 64 ? 8 : cols <= 128 ? 16 : 32;
}
#ifdef __CUDACC__  // device code (the launcher's host-only build skips it: common/launch.cuh)
template <int kCols>
__device__ __forceinline__ int64_t lane_group_row() {
  constexpr int kLanes = row_lanes(kCols);
  return (int64_t(blockIdx.x) * 4 + (threadIdx.x >> 5)) * (32 / kLanes) + (threadIdx.x & 31) / kLanes;
}
#endif  // __CUDACC__

template <int kCols>
inline unsigned row_kernel_blocks(int64_t rows) {
  constexpr int64_t kRowsPerBlock = 4 * (32 / row_lanes(kCols));
  return unsigned((rows + kRowsPerBlock - 1) / kRowsPerBlock);
}

#ifdef __CUDACC__  // device code (the launcher's host-only build skips it: common/launch.cuh)
template <class C>
__global__ void __launch_bounds__(128) dvec_kernel(const __grid_constant__ BwdParams p) {
  constexpr int kLanes = row_lanes(C::kDHeadV);
  const int sub = threadIdx.x % kLanes;  // this lane's place in its row's group
  const int64_t row = lane_group_row<C::kDHeadV>();
  // Rows past the end keep their lanes to the shuffles below (a lane that left would break them).
  const bool valid = row < stat_rows(p);
  float sum = 0.f;
  if (valid) {
    const RowIndex at(row, p.heads, stat_plane_rows(p));
    if (sub < C::kDHeadV / 8) {
      const uint4 o = *reinterpret_cast<const uint4*>(p.o.at<const elem_t>(at.b, at.h, at.i) + sub * 8);
      const uint4 d = *reinterpret_cast<const uint4*>(p.dout.at<const elem_t>(at.b, at.h, at.i) + sub * 8);
      const uint32_t ow[4] = {o.x, o.y, o.z, o.w}, dw[4] = {d.x, d.y, d.z, d.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        float o0, o1, d0, d1;
        unpack2<C::kBf16>(ow[w], o0, o1);
        unpack2<C::kBf16>(dw[w], d0, d1);
        sum = fmaf(o0, d0, fmaf(o1, d1, sum));
      }
    }
    if (!C::kDeterministic)
      for (int c = sub; c < C::kD / 4; c += kLanes)
        reinterpret_cast<float4*>(p.dq_accum + row * C::kD)[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (valid && sub == 0) p.dvec[row] = C::kDropout ? sum / p.mods.dropout_scale : sum;  // D (1 - p): see dkdv_kernel
}

// The steps of a dK/dV CTA: one per (query head h0 .. h0 + heads - 1, query block that sees any key
// of [key0, key0 + keys)), the head outermost: the GQA group of a kv head, or one query head of it.
// A step's (head, first row) is advanced by increments: no division per step. The window does not
// depend on the head, so one ScoreMod (head h0) bounds the query blocks for every head.
template <class C>
struct QuerySteps {
  struct Pos {
    int h, row0;
  };
  int h0, row_begin, row_end, count;

  __device__ __forceinline__ QuerySteps(const BwdParams& p, const Seq& seq, int b, int h0_, int heads, int key0,
                                        int keys)
      : h0(h0_) {
    const typename C::Mod bounds(p.mods, seq.len_q, seq.len_k, p.softmax_scale, b, h0);
    int first_m = 0, end_m = (seq.len_q + C::kBlockM - 1) / C::kBlockM;
    if (C::kCausal || (C::Mod::kLocal && bounds.right >= 0))
      first_m = max(0, (key0 - bounds.diag - bounds.right) / C::kBlockM);
    if (C::Mod::kLocal && bounds.left >= 0) {
      const int last_row = key0 + keys - 1 - bounds.diag + bounds.left;  // last query that sees a key here
      end_m = last_row < 0 ? 0 : min(end_m, last_row / C::kBlockM + 1);
    }
    row_begin = first_m * C::kBlockM, row_end = end_m * C::kBlockM, count = heads * max(0, end_m - first_m);
  }
  __device__ __forceinline__ Pos first() const { return {h0, row_begin}; }
  __device__ __forceinline__ Pos next(Pos s) const {
    s.row0 += C::kBlockM;
    if (s.row0 >= row_end) s.row0 = row_begin, ++s.h;
    return s;
  }
};

// Copy kRows rows of head h (of batch b) starting at row0 between global memory and a tile: of q/k
// (kValue false: kDHead columns in a kD tile) or of v/o/dO (kValue: kDHeadV in kDV).
template <class C, int kRows, bool kValue = false>
__device__ __forceinline__ void load_rows(elem_t* tile, const TensorRef& t, int b, int h, int row0, int rows, int tid) {
  constexpr int kW = kValue ? C::kDV : C::kD, kCols = kValue ? C::kDHeadV : C::kDHead;
  load_tile<kRows, kW, C::kSwizzle, true, C::kThreads, kCols>(tile, t.at<const elem_t>(b, h, row0), t.row_stride, rows,
                                                              tid);
}
// kThreads: the threads sharing the rows (tid among them).
template <class C, int kRows, bool kValue = false, int kThreads = C::kThreads>
__device__ __forceinline__ void store_rows(const TensorRef& t, int b, int h, int row0, const elem_t* tile, int rows,
                                           int tid) {
  constexpr int kW = kValue ? C::kDV : C::kD, kCols = kValue ? C::kDHeadV : C::kDHead;
  store_tile<kRows, kW, C::kSwizzle, kThreads, kCols>(t.at<elem_t>(b, h, row0), t.row_stride, tile, rows, tid);
}

// Stage one query block's lse (in log2 units, +inf past the end: P = 0 there) and D in shared memory.
// stat0: the statistic of the head's row 0 (Seq::stat_row(h, 0)); len_q: the sequence's queries.
// Plain loads: staging these through cp.async with the block's Q and dO measured 2-5% slower.
// kThreads: the threads sharing the rows (tid among them).
template <class C, int kThreads = C::kThreads>
__device__ __forceinline__ void load_row_stats(float* s_lse, float* s_dvec, const BwdParams& p, int64_t stat0,
                                               int len_q, int row0, int tid) {
  for (int r = tid; r < C::kBlockM; r += kThreads) {
    const bool valid = row0 + r < len_q;
    s_lse[r] = valid ? p.lse[stat0 + row0 + r] * 1.4426950408889634f : INFINITY;
    s_dvec[r] = valid ? p.dvec[stat0 + row0 + r] : 0.f;
  }
}

// P = exp(scaled(s) - lse) for a visible key, else 0; `grad` gets the softcap chain-rule factor
// (d scaled / d (scale * s)); the final scale is applied when dK and dQ are written.
template <class C>
__device__ __forceinline__ float probability(const typename C::Mod& mod, float s, int i, int j, float lse2,
                                             float scale_log2, float& grad) {
  grad = 1.f;
  if (!mod.visible(i, j)) return 0.f;
  const float t = C::Mod::kTransforms ? mod.scaled(s, i, j, grad) * 1.4426950408889634f : s * scale_log2;
  return fast_exp2(t - lse2);
}

// probability() for query column c of a key's range r (ScoreMod::key_range): the same arithmetic.
template <class C>
__device__ __forceinline__ float probability_in(const typename C::Mod& mod, const typename C::Mod::KeyRange& r, int c,
                                                float s, float lse2, float scale_log2, float& grad) {
  grad = 1.f;
  if (!r.visible(c)) return 0.f;
  const float t = C::Mod::kTransforms ? mod.scaled_at(s, r.x0 + c, grad) * 1.4426950408889634f : s * scale_log2;
  return fast_exp2(t - lse2);
}

// acc = A(kMT * 16 rows of tile_a from a_row0) x B^T(kNT * 8 rows of tile_b from b_row0), k over a
// head dim of tile width kW (kD: q/k, kDV: v/dO).
template <class C, int kW, int kMT, int kNT>
__device__ __forceinline__ void gemm_rows_rows(float (&acc)[kMT][kNT][4], const elem_t* tile_a, int a_row0,
                                               const elem_t* tile_b, int b_row0, int lane) {
  constexpr int kKt = kW / 16;
  zero(acc);
#pragma unroll
  for (int kt = 0; kt < kKt; ++kt) {
    uint32_t a[kMT][kKt][4], b[kKt][kNT][2];
    load_a<kW, C::kSwizzle>(a, tile_a, a_row0, lane, kt, 1);
    load_b_rows<kW, C::kSwizzle>(b, tile_b, b_row0, lane, kt, 1);
    mma_k_tile<C::kBf16>(acc, a, b, kt);
  }
}

// acc += A (16-bit fragments, k over kKT * 16 rows of the tile) x tile (rows = k, kW wide), n over
// kNT n-tiles of the head dim from n-tile nt0.
template <class C, int kW, int kMT, int kKT, int kNT>
__device__ __forceinline__ void gemm_frag_cols(float (&acc)[kMT][kNT][4], const uint32_t (&a)[kMT][kKT][4],
                                               const elem_t* tile, int nt0, int lane) {
#pragma unroll
  for (int kt = 0; kt < kKT; ++kt) {
    uint32_t b[kKT][kNT][2];
    load_b_cols<kW, C::kSwizzle>(b, tile, 0, lane, kt, 1, nt0);
    mma_k_tile<C::kBf16>(acc, a, b, kt);
  }
}

// The kDSplit warps of row group g share their staged score rows: a barrier among them when split,
// else the warp only waits for its own lanes.
template <class C>
__device__ __forceinline__ void group_sync(int g) {
  if constexpr (C::kSplit) named_barrier_sync(1 + g, 32 * C::kDSplit);
  else __syncwarp();
}

// acc += staged score rows [row0, row0 + 16 kMT) (k over all kScoreCols columns) x tile (rows = k,
// kW wide), into this warp's kNT n-tiles from nt0: the second half of a split product, after group_sync.
template <class C, int kScoreCols, int kW, int kMT, int kNT>
__device__ __forceinline__ void gemm_staged_cols(float (&acc)[kMT][kNT][4], const elem_t* scores, int row0,
                                                 const elem_t* tile, int nt0, int lane) {
  constexpr int kKT = kScoreCols / 16;
#pragma unroll
  for (int kt = 0; kt < kKT; ++kt) {
    uint32_t a[kMT][kKT][4], b[kKT][kNT][2];
    load_a<kScoreCols, C::kSwizzle>(a, scores, row0, lane, kt, 1);
    load_b_cols<kW, C::kSwizzle>(b, tile, 0, lane, kt, 1, nt0);
    mma_k_tile<C::kBf16>(acc, a, b, kt);
  }
}

// Fast path: dQ[row0 .., :] += dS K for this CTA's keys, from dS^T staged in sdS ([kBlockN keys,
// kBlockM queries]); each warp adds its kDqMT x kDqNT tiles into the fp32 buffer with atomics.
// stat0, len_q: as load_row_stats (dq_accum's rows are the statistics' rows, kD floats each).
template <class C>
__device__ __forceinline__ void accumulate_dq(const BwdParams& p, const elem_t* sdS, const elem_t* sK, int64_t stat0,
                                              int len_q, int row0, int warp, int lane) {
  const int wm = warp / C::kDqWD, wd = warp % C::kDqWD;
  float dq[C::kDqMT][C::kDqNT][4];
  zero(dq);
#pragma unroll
  for (int kt = 0; kt < C::kKtN; ++kt) {
    uint32_t a[C::kDqMT][C::kKtN][4], b[C::kKtN][C::kDqNT][2];
    load_a_trans<C::kBlockM, C::kSwizzle>(a, sdS, wm * C::kDqMT * 16, lane, kt, 1);
    load_b_cols<C::kD, C::kSwizzle>(b, sK, 0, lane, kt, 1, wd * C::kDqNT);
    mma_k_tile<C::kBf16>(dq, a, b, kt);
  }
#pragma unroll
  for (int mt = 0; mt < C::kDqMT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + (wm * C::kDqMT + mt) * 16 + (lane >> 2) + half * 8;
      if (row >= len_q) continue;
      float* dst = p.dq_accum + (stat0 + row) * C::kD + wd * C::kDqNT * 8 + (lane & 3) * 2;
#pragma unroll
      for (int nt = 0; nt < C::kDqNT; ++nt) red_add_f32x2(dst + nt * 8, dq[mt][nt][2 * half], dq[mt][nt][2 * half + 1]);
    }
}

// ---- 2. dK, dV (and, on the fast path, dQ) ------------------------------------------------------
template <class C>
__global__ void __launch_bounds__(C::kThreads) dkdv_kernel(const __grid_constant__ BwdParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t* sK = reinterpret_cast<elem_t*>(smem_raw);
  elem_t* sV = sK + C::kTileN;
  elem_t* sQ2 = sV + C::kTileNV;       // two stages of Q
  elem_t* sdO2 = sQ2 + 2 * C::kTileM;  // two stages of dO
  float* s_lse2 = reinterpret_cast<float*>(sdO2 + 2 * C::kTileMV);
  float* s_dvec2 = s_lse2 + 2 * C::kBlockM;
  elem_t* sdS2 = reinterpret_cast<elem_t*>(s_dvec2 + 2 * C::kBlockM);  // kDsStages of dS^T [kBlockN, kBlockM]
  elem_t* sP = sdS2 + C::kDsStages * C::kScoreTile;                     // split: P^T [kBlockN, kBlockM]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // This warp's kGroupRows key rows (group g, from r0) and, when split, its share of the queries
  // (score products) and of the head dim (accumulators).
  const int g = warp / C::kDSplit, part = warp % C::kDSplit, q0 = part * C::kMW, r0 = g * C::kGroupRows;
  const int num_n = (p.seqlen_k + C::kBlockN - 1) / C::kBlockN;
  // causal: common/grid_order.cuh's order (key block 0, the longest, first in a row)
  const GridPos at = C::kCausal ? longest_first(blockIdx.x, p.batch * p.heads_k, num_n)
                                : GridPos{int(blockIdx.x) / num_n, int(blockIdx.x) % num_n};
  const int n_block = at.block, bh_k = at.row;
  const int h_k = bh_k % p.heads_k, b = bh_k / p.heads_k, group = p.heads / p.heads_k;
  const Seq seq(p, b);
  const int key0 = n_block * C::kBlockN;
  if (key0 >= seq.len_k) return;  // varlen: past this sequence's keys (the grid fits the longest)
  const int keys = min(C::kBlockN, seq.len_k - key0);
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;

  load_rows<C, C::kBlockN>(sK, p.k, b, h_k, seq.k_start + key0, keys, tid);
  load_rows<C, C::kBlockN, true>(sV, p.v, b, h_k, seq.k_start + key0, keys, tid);
  cp_async_commit();

  float dk[C::kRT][C::kNtDW][4], dv[C::kRT][C::kNtDWV][4];
  zero(dk);
  zero(dv);
  const int my_key0 = key0 + r0 + (lane >> 2);  // key of m-tile mt, row half h: my_key0 + 16 mt + 8 h

  // One step per (query head of the group, query block), software-pipelined over two buffers: the
  // copy of step + 1 is in flight while step computes. One barrier per step: it publishes this
  // step's copy and the previous step's dS^T, and retires every read of the buffers the next copy
  // and this step's dS^T overwrite (both last read in step - 1). The fast path's dQ product for a
  // step runs at the start of the next one, so it needs no barrier of its own.
  const QuerySteps<C> schedule(p, seq, b, h_k * group, group, key0, keys);
  using StepPos = typename QuerySteps<C>::Pos;
  const int steps = schedule.count;
  auto stage = [&](StepPos s, int buf) {
    const int rows = min(C::kBlockM, seq.len_q - s.row0);
    load_rows<C, C::kBlockM>(sQ2 + buf * C::kTileM, p.q, b, s.h, seq.q_start + s.row0, rows, tid);
    load_rows<C, C::kBlockM, true>(sdO2 + buf * C::kTileMV, p.dout, b, s.h, seq.q_start + s.row0, rows, tid);
    load_row_stats<C>(s_lse2 + buf * C::kBlockM, s_dvec2 + buf * C::kBlockM, p, seq.stat_row(s.h, 0), seq.len_q,
                      s.row0, tid);
  };
  auto dq_of = [&](StepPos s, int buf) {  // fast path: dQ of a step from its dS^T
    accumulate_dq<C>(p, sdS2 + buf * C::kBlockN * C::kBlockM, sK, seq.stat_row(s.h, 0), seq.len_q, s.row0, warp,
                     lane);
  };
  StepPos cur = schedule.first(), prev = cur;
  if (steps > 0) stage(cur, 0);
  cp_async_commit();
  for (int step = 0; step < steps; ++step) {
    cp_async_wait<0>();  // K, V and this step's block have landed (for this thread)
    __syncthreads();
    const StepPos next = schedule.next(cur);
    if (step + 1 < steps) stage(next, (step + 1) & 1);
    cp_async_commit();
    if (!C::kDeterministic && step > 0) dq_of(prev, (step - 1) & 1);
    const int h = cur.h, row0 = cur.row0, buf = step & 1;
    const int64_t bh = int64_t(b) * p.heads + h;
    const typename C::Mod mod(p.mods, seq.len_q, seq.len_k, p.softmax_scale, b, h);
    const Dropout drop(p.mods, int(bh));
    const elem_t* sQ = sQ2 + buf * C::kTileM;
    const elem_t* sdO = sdO2 + buf * C::kTileMV;
    const float* s_lse = s_lse2 + buf * C::kBlockM;
    const float* s_dvec = s_dvec2 + buf * C::kBlockM;

    // P^T: rows = this warp's kGroupRows keys, cols = its kMW queries of the block (from q0).
    float pt[C::kRT][C::kNtMW][4], grad[C::kRT][C::kNtMW][4];  // grad: used (and kept) only with softcap
    gemm_rows_rows<C, C::kD>(pt, sK, r0, sQ, q0, lane);
    const auto query = [&](int nt, int e) { return q0 + nt * 8 + (lane & 3) * 2 + (e & 1); };  // in the block
    for_each_acc<C::kRT, C::kNtMW>([&](int mt, int nt, int e) {
      const int col = query(nt, e);
      pt[mt][nt][e] = probability<C>(mod, pt[mt][nt][e], row0 + col, my_key0 + mt * 16 + (e >> 1) * 8, s_lse[col],
                                     scale_log2, grad[mt][nt][e]);
    });
    // Dropout (common/dropout.cuh): this warp's masks, rows = keys.
    const KeyRowsMask<C::kRT, C::kNtMW> keep(C::kDropout, drop, row0 + q0, my_key0, lane);
    uint32_t pa[C::kRT][C::kNtMW / 2][4];
    acc_to_a<C::kBf16>(pt, pa);
    if (C::kDropout) keep.apply(pa);  // P o Z
    if constexpr (C::kSplit) store_a<C::kBlockM, C::kSwizzle>(sP, pa, r0, lane, q0 / 8);
    else gemm_frag_cols<C, C::kDV>(dv, pa, sdO, 0, lane);  // dV += (P o Z)^T dO (times 1 / (1 - p) at the end)

    float dpt[C::kRT][C::kNtMW][4];
    gemm_rows_rows<C, C::kDV>(dpt, sV, r0, sdO, q0, lane);  // dP^T = V dO^T
    for_each_acc<C::kRT, C::kNtMW>([&](int mt, int nt, int e) {
      // dS^T / rp, rp = 1 / (1 - p): dS = P o (Z o dP rp - D), and s_dvec holds D / rp.
      float dp = dpt[mt][nt][e];
      if (C::kDropout) dp = Dropout::masked(dp, keep.keep(mt, nt, e));
      dpt[mt][nt][e] = pt[mt][nt][e] * (dp - s_dvec[query(nt, e)]);
      if (C::Mod::kSoftcap) dpt[mt][nt][e] *= grad[mt][nt][e];
    });
    uint32_t dsa[C::kRT][C::kNtMW / 2][4];
    acc_to_a<C::kBf16>(dpt, dsa);
    elem_t* sdS = sdS2 + (C::kDsStages == 2 ? buf : 0) * C::kScoreTile;
    if constexpr (C::kSplit) {  // every share of the group's P^T and dS^T rows, then this warp's columns
      store_a<C::kBlockM, C::kSwizzle>(sdS, dsa, r0, lane, q0 / 8);
      group_sync<C>(g);
      gemm_staged_cols<C, C::kBlockM, C::kDV>(dv, sP, r0, sdO, part * C::kNtDWV, lane);
      gemm_staged_cols<C, C::kBlockM, C::kD>(dk, sdS, r0, sQ, part * C::kNtDW, lane);
    } else {
      gemm_frag_cols<C, C::kD>(dk, dsa, sQ, 0, lane);  // dK += dS^T Q
      if constexpr (!C::kDeterministic) store_a<C::kBlockM, C::kSwizzle>(sdS, dsa, r0, lane);
    }
    prev = cur;
    cur = next;
  }
  cp_async_wait<0>();
  __syncthreads();  // the last dS^T is complete; every read of the Q / dO buffers is done
  if (!C::kDeterministic && steps > 0) dq_of(prev, (steps - 1) & 1);

  // Stage through the Q / dO buffers (each warp writes its own rows and columns), then coalesced
  // stores. Both hold 2 * kBlockM >= kBlockN rows.
  store_acc<C::kD, C::kSwizzle, C::kBf16>(sQ2, dk, r0, lane, p.softmax_scale * C::dropout_scale(p), part * C::kNtDW);
  store_acc<C::kDV, C::kSwizzle, C::kBf16>(sdO2, dv, r0, lane, C::dropout_scale(p), part * C::kNtDWV);
  __syncthreads();
  store_rows<C, C::kBlockN>(p.dk, b, h_k, seq.k_start + key0, sQ2, keys, tid);
  store_rows<C, C::kBlockN, true>(p.dv, b, h_k, seq.k_start + key0, sdO2, keys, tid);
}

// ---- 3a. dQ = scale * the fp32 buffer, rounded: a lane group per row (row_lanes) --------------
// Row `at` of an fp32 buffer of planes of `rows` rows, kW wide (kTiled: bwd_sm90.cuh's layout of
// 64-column halves with 16-byte chunks swizzled, else plain rows), times s, rounded into `out`'s row:
// the first kCols columns, 8 a lane.
template <class C, int kW, int kCols, bool kTiled>
__device__ __forceinline__ void round_row(const float* accum, const RowIndex& at, int rows, const TensorRef& out,
                                          float s, int lane) {
  if (lane >= kCols / 8) return;
  float4 x, y;
  if constexpr (kTiled) {
    const int64_t half = lane / 8;
    const float4* src =
        reinterpret_cast<const float4*>(accum + ((int64_t(at.plane) * (kW / 64) + half) * rows + at.i) * 64);
    x = src[((lane % 8) * 2) ^ (at.i & 7)];
    y = src[((lane % 8) * 2 + 1) ^ (at.i & 7)];
  } else {
    const float4* src = reinterpret_cast<const float4*>(accum + (int64_t(at.plane) * rows + at.i) * kW) + lane * 2;
    x = src[0], y = src[1];
  }
  *reinterpret_cast<uint4*>(out.at<elem_t>(at.b, at.h, at.i) + lane * 8) =
      make_uint4(pack2<C::kBf16>(x.x * s, x.y * s), pack2<C::kBf16>(x.z * s, x.w * s),
                 pack2<C::kBf16>(y.x * s, y.y * s), pack2<C::kBf16>(y.z * s, y.w * s));
}

template <class C>
__global__ void __launch_bounds__(128) dq_convert_kernel(const __grid_constant__ BwdParams p) {
  const int64_t row = lane_group_row<C::kDHead>();
  const int rows = stat_plane_rows(p);
  if (row >= stat_rows(p)) return;
  round_row<C, C::kD, C::kDHead, C::kDqTiled>(p.dq_accum, RowIndex(row, p.heads, rows), rows, p.dq,
                                              p.softmax_scale * C::dropout_scale(p),
                                              threadIdx.x % row_lanes(C::kDHead));
}

// ---- 4. dK and dV from dkv_accum (bwd_sm90.cuh's kHeadSplit), already scaled -------------------
// dkv_accum: dK's sums, then dV's, each over key_rows(p) rows in dq_accum's tiling. In a varlen
// batch the packed rows outside every sequence (from cu_seqlens_k[batch]) are left as they are, as
// the one-CTA-per-group kernel leaves them.
template <class C>
__global__ void __launch_bounds__(128) dkv_convert_kernel(const __grid_constant__ BwdParams p) {
  const int64_t per = key_rows(p);
  int64_t row = lane_group_row<C::kDHead>();  // d_v <= d_head: dV rows use a part of their group
  const bool value = row >= per;
  row -= value ? per : 0;
  const int rows = key_plane_rows(p), lane = threadIdx.x % row_lanes(C::kDHead);
  if (row >= per) return;
  const RowIndex at(row, p.heads_k, rows);
  if (is_varlen(p)) {  // varlen (cu_seqlens_k is read only then)
    int len;
    const int first = Seq::bounded(p.varlen.cu_seqlens_k, 0, p.varlen.total_k, len);
    if (at.i < first || at.i >= max(min(p.varlen.cu_seqlens_k[p.batch], p.varlen.total_k), first)) return;
  }
  if (value)
    round_row<C, C::kDV, C::kDHeadV, true>(p.dkv_accum + per * C::kD, at, rows, p.dv, 1.f, lane);
  else
    round_row<C, C::kD, C::kDHead, true>(p.dkv_accum, at, rows, p.dk, 1.f, lane);
}

// ---- 3b. dQ, deterministic ----------------------------------------------------------------------
template <class C>
__global__ void __launch_bounds__(C::kThreads) dq_kernel(const __grid_constant__ BwdParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  constexpr int kRows = C::kBlockN;  // query rows per CTA and keys per step
  elem_t* sQ = reinterpret_cast<elem_t*>(smem_raw);
  elem_t* sdO = sQ + C::kTileN;
  elem_t* sK2 = sdO + C::kTileNV;      // two stages of K
  elem_t* sV2 = sK2 + 2 * C::kTileN;   // two stages of V
  elem_t* sdS = sV2 + 2 * C::kTileNV;  // split: dS [kRows queries, kRows keys]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // This warp's kGroupRows query rows (group g, from r0) and, when split, its share of each key
  // block (k0: score products) and of the head dim (accumulator).
  const int g = warp / C::kDSplit, part = warp % C::kDSplit, k0 = part * C::kNW, r0 = g * C::kGroupRows;
  const int num_m = (p.seqlen_q + kRows - 1) / kRows;
  // causal: the longest rows (the last query block) first, in common/grid_order.cuh's order
  const GridPos at = C::kCausal ? longest_first(blockIdx.x, p.batch * p.heads, num_m)
                                : GridPos{int(blockIdx.x) / num_m, int(blockIdx.x) % num_m};
  const int m_block = C::kCausal ? num_m - 1 - at.block : at.block;
  const int bh = at.row, h = bh % p.heads, b = bh / p.heads;
  const int h_k = h / (p.heads / p.heads_k);
  const Seq seq(p, b);
  const int row0 = m_block * kRows;
  if (row0 >= seq.len_q) return;  // varlen: past this sequence's end (the grid fits the longest)
  const int rows = min(kRows, seq.len_q - row0);
  const typename C::Mod mod(p.mods, seq.len_q, seq.len_k, p.softmax_scale, b, h);
  const Dropout drop(p.mods, bh);
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;

  load_rows<C, kRows>(sQ, p.q, b, h, seq.q_start + row0, rows, tid);
  load_rows<C, kRows, true>(sdO, p.dout, b, h, seq.q_start + row0, rows, tid);
  cp_async_commit();

  // This thread's rows my_row0 + 16 mt + 8 half: lse (log2 units; +inf past the end or for rows
  // that saw no key) and D.
  float lse2[C::kRT][2], dvec[C::kRT][2];
  const int my_row0 = row0 + r0 + (lane >> 2);
#pragma unroll
  for (int mt = 0; mt < C::kRT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = my_row0 + mt * 16 + half * 8;
      const bool valid = row < seq.len_q;
      lse2[mt][half] = valid ? p.lse[seq.stat_row(h, row)] * 1.4426950408889634f : INFINITY;
      dvec[mt][half] = valid ? p.dvec[seq.stat_row(h, row)] : 0.f;
    }

  // Key blocks any row of this CTA sees: [j_begin, j_end) (as in the forward pass).
  int j_begin = 0, j_end = (seq.len_k + kRows - 1) / kRows;
  if (C::kCausal || (C::Mod::kLocal && mod.right >= 0)) {
    const int last_col = row0 + rows - 1 + mod.diag + mod.right;
    j_end = last_col < 0 ? 0 : min(j_end, last_col / kRows + 1);
  }
  if (C::Mod::kLocal && mod.left >= 0) j_begin = max(0, (row0 + mod.diag - mod.left) / kRows);
  float dq[C::kRT][C::kNtDW][4];
  zero(dq);
  // Software-pipelined over two K/V buffers: block j + 1 is copied while block j computes. One
  // barrier per step publishes block j and retires every read of the buffer block j + 1 refills.
  auto stage = [&](int j) {
    const int col0 = j * kRows, cols = min(kRows, seq.len_k - col0), buf = (j - j_begin) & 1;
    load_rows<C, kRows>(sK2 + buf * C::kTileN, p.k, b, h_k, seq.k_start + col0, cols, tid);
    load_rows<C, kRows, true>(sV2 + buf * C::kTileNV, p.v, b, h_k, seq.k_start + col0, cols, tid);
  };
  if (j_begin < j_end) stage(j_begin);
  cp_async_commit();
  for (int j = j_begin; j < j_end; ++j) {
    const int col0 = j * kRows, buf = (j - j_begin) & 1;
    cp_async_wait<0>();  // Q, dO and K_j, V_j have landed (for this thread)
    __syncthreads();
    if (j + 1 < j_end) stage(j + 1);
    cp_async_commit();
    const elem_t* sK = sK2 + buf * C::kTileN;
    const elem_t* sV = sV2 + buf * C::kTileNV;

    float s[C::kRT][C::kNtNW][4];
    gemm_rows_rows<C, C::kD>(s, sQ, r0, sK, k0, lane);  // S = Q K^T (this warp's keys)
    float dp_acc[C::kRT][C::kNtNW][4];
    gemm_rows_rows<C, C::kDV>(dp_acc, sdO, r0, sV, k0, lane);  // dP = dO V^T
    // Dropout (common/dropout.cuh): one call per 16-key chunk covers this lane's entries of its
    // 32-row span there (a 16-row group uses half of each call).
    uint4 flags[C::kNtNW / 2];
    if (C::kDropout) {
#pragma unroll
      for (int chunk = 0; chunk < C::kNtNW / 2; ++chunk)
        flags[chunk] = drop.keep_flags(my_row0, col0 + k0 + chunk * 16 + (lane & 3) * 2);
    }
#pragma unroll
    for (int mt = 0; mt < C::kRT; ++mt) {
      const int i = my_row0 + mt * 16;
      const int half16 = C::kRT == 2 ? mt : (i >> 4) & 1;  // 16-row half of the span
#pragma unroll
      for (int nt = 0; nt < C::kNtNW; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int half = e >> 1, col = col0 + k0 + nt * 8 + (lane & 3) * 2 + (e & 1);
          float grad, dp = dp_acc[mt][nt][e];
          if (C::kDropout) dp = Dropout::masked(dp, Dropout::query_rows_mask(flags[nt / 2], half16, nt, e));
          const float prob = probability<C>(mod, s[mt][nt][e], i + half * 8, col, lse2[mt][half], scale_log2, grad);
          // dS / rp, rp = 1 / (1 - p) (applied when dQ is written): dvec holds D / rp.
          s[mt][nt][e] = prob * (dp - dvec[mt][half]) * grad;  // grad: softcap's chain rule, else 1
        }
    }
    uint32_t dsa[C::kRT][C::kNtNW / 2][4];
    acc_to_a<C::kBf16>(s, dsa);
    if constexpr (C::kSplit) {  // every share of the group's dS rows, then this warp's columns
      store_a<kRows, C::kSwizzle>(sdS, dsa, r0, lane, k0 / 8);
      group_sync<C>(g);
      gemm_staged_cols<C, kRows, C::kD>(dq, sdS, r0, sK, part * C::kNtDW, lane);
    } else {
      gemm_frag_cols<C, C::kD>(dq, dsa, sK, 0, lane);  // dQ += dS K
    }
  }

  cp_async_wait<0>();
  // A CTA-wide barrier, not the group's: when no key block is visible (rows that see no key) the
  // loop's barrier never ran, and Q copies issued by other groups' threads may still be landing in
  // this group's sQ rows, which are about to hold dQ.
  __syncthreads();
  store_acc<C::kD, C::kSwizzle, C::kBf16>(sQ, dq, r0, lane, p.softmax_scale * C::dropout_scale(p), part * C::kNtDW);
  __syncthreads();
  store_rows<C, kRows>(p.dq, b, h, seq.q_start + row0, sQ, rows, tid);
}
#endif  // __CUDACC__

// A kernel of C's CTAs (kCtaThreads threads, kSmemBytes of shared memory) over `blocks` CTAs, with
// its one parameter (BwdParams, or bwd_sm90.cuh's Args with TMA maps).
template <class C, class Arg>
cudaError_t launch_ctas(const void* kernel, unsigned blocks, cudaStream_t stream, const Arg& arg) {
  const cudaError_t err = opt_in_smem(kernel, C::kSmemBytes);
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, blocks, C::kCtaThreads, C::kSmemBytes, stream, arg);
}

// The D kernel, the dK/dV kernel (launch_dkdv(blocks): this file's dkdv_kernel, or bwd_sm90.cuh's),
// then dQ's conversion or kernel. Config::kHeadSplit (bwd_sm90.cuh): one dK/dV CTA per query head,
// adding to p.dkv_accum, and dK, dV converted from those fp32 sums at the end.
template <class C, class LaunchDkdv>
cudaError_t launch_with(const BwdParams& p, cudaStream_t stream, LaunchDkdv launch_dkdv) {
  if (p.batch == 0 || p.heads == 0 || p.seqlen_q == 0) return cudaSuccess;
  if (!C::kDeterministic && p.dq_accum == nullptr) return cudaErrorInvalidValue;
  if (C::kHeadSplit && p.dkv_accum == nullptr) return cudaErrorInvalidValue;
  const int64_t rows = stat_rows(p);  // of the row kernels: B * H * Sq, or H * total_q for a varlen batch
  const int64_t kv_blocks =
      int64_t((p.seqlen_k + C::kBlockN - 1) / C::kBlockN) * (C::kHeadSplit ? p.heads : p.heads_k) * p.batch;
  const int64_t q_blocks = int64_t((p.seqlen_q + C::kBlockN - 1) / C::kBlockN) * p.heads * p.batch;
  if ((rows + 3) / 4 > 0x7fffffff || kv_blocks > 0x7fffffff || q_blocks > 0x7fffffff ||
      (C::kHeadSplit && (2 * key_rows(p) + 3) / 4 > 0x7fffffff))
    return cudaErrorInvalidConfiguration;
  cudaError_t err = launch_kernel(FLASHJIT_KERNEL(dvec_kernel, C), row_kernel_blocks<C::kDHeadV>(rows), 128, 0, stream, p);
  if (err == cudaSuccess && kv_blocks > 0) err = launch_dkdv(unsigned(kv_blocks));
  if (err != cudaSuccess) return err;
  if constexpr (C::kDeterministic) {
    const void* dq = FLASHJIT_KERNEL(dq_kernel, C);
    if ((err = opt_in_smem(dq, C::kSmemBytes)) != cudaSuccess) return err;
    err = launch_kernel(dq, unsigned(q_blocks), C::kThreads, C::kSmemBytes, stream, p);
  } else {  // with Sk = 0 the buffer stays zero: dQ = 0
    err = launch_kernel(FLASHJIT_KERNEL(dq_convert_kernel, C), row_kernel_blocks<C::kDHead>(rows), 128, 0, stream, p);
  }
  if constexpr (C::kHeadSplit)
    if (err == cudaSuccess && key_rows(p) > 0)
      err = launch_kernel(FLASHJIT_KERNEL(dkv_convert_kernel, C), row_kernel_blocks<C::kDHead>(2 * key_rows(p)), 128, 0,
                          stream, p);
  return err;
}

template <class C>
cudaError_t launch(const BwdParams& p, cudaStream_t stream) {
  return launch_with<C>(p, stream,
                        [&](unsigned blocks) { return launch_ctas<C>(FLASHJIT_KERNEL(dkdv_kernel, C), blocks, stream, p); });
}

}  // namespace flashjit::bwd

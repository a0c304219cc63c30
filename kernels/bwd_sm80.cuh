// FlashAttention-2 style backward pass for sm_80 and newer, in three deterministic kernels (no
// atomics: every output element has exactly one writer, so gradients are bit-identical run to run).
//
// With P_ij = exp(scale * q_i . k_j - lse_i) (the forward's probabilities, recomputed) and
// D_i = dO_i . O_i:
//   dV_j = sum_i P_ij dO_i      dP_ij = dO_i . v_j      dS_ij = P_ij (dP_ij - D_i)
//   dK_j = scale sum_i dS_ij q_i                       dQ_i = scale sum_j dS_ij k_j
//
// 1. dvec_kernel: D = rowsum(dO * O)                          [B, H, Sq] fp32
// 2. dkdv_kernel: one CTA per (key block, kv head, batch); walks every query block of every query
//    head of its GQA group, so dK/dV are summed over the group in registers. Works on S^T = K Q^T so
//    each warp owns 16 key rows of the accumulators.
// 3. dq_kernel:   one CTA per (query block, head, batch); walks the key blocks.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "common/dropout.cuh"
#include "common/fragments.cuh"
#include "common/params.cuh"
#include "common/ptx.cuh"
#include "common/score_mod.cuh"
#include "common/smem_tile.cuh"

namespace flashjit::bwd {

// One template parameter per BwdConfig field (flashjit/config.py), in the same order.
template <bool kBf16_, int kD_, int kWarps_, bool kCausal_, bool kLocal_, bool kSoftcap_, bool kAlibi_,
          bool kDropout_>
struct Config {
  static constexpr bool kBf16 = kBf16_, kCausal = kCausal_, kSwizzle = true;
  using Mod = ScoreMod<kCausal_, kLocal_, kSoftcap_, kAlibi_>;
  static constexpr bool kDropout = kDropout_;
  static constexpr int kD = kD_, kWarps = kWarps_, kThreads = kWarps * 32;
  static constexpr int kBlock = 16 * kWarps;  // rows per CTA (each warp owns 16) and per inner step
  static constexpr int kKtD = kD / 16, kNtD = kD / 8, kKtB = kBlock / 16, kNtB = kBlock / 8;
  // dK/dV pass: K, V, and two stages of (Q, dO, lse, D); dQ pass: Q, dO and two stages of (K, V).
  static constexpr int kTile = kBlock * kD;
  static constexpr int kSmemBytes = 6 * kTile * 2 + 2 * 2 * kBlock * 4;
  static constexpr int kRegEstimate = 2 * kNtD * 4 + 2 * kNtB * 4 + 32;  // dK, dV, S^T, dP^T + operands
  static_assert(kD % 32 == 0 && kD <= 128, "the backward pass supports d_head up to 128");
  static_assert(kWarps == 4 || kWarps == 8, "the backward pass runs 4 or 8 warps");
  static_assert(kRegEstimate <= 255, "the backward accumulators of this config need more than 255 registers");
};

// ---- 1. D = rowsum(dO * O): one warp per row ----------------------------------------------
template <class C>
__global__ void __launch_bounds__(128) dvec_kernel(const __grid_constant__ BwdParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * 4 + (threadIdx.x >> 5);  // (b, h, i), i fastest
  if (row >= int64_t(p.batch) * p.heads * p.seqlen_q) return;
  const int i = int(row % p.seqlen_q), bh = int(row / p.seqlen_q), h = bh % p.heads, b = bh / p.heads;
  float sum = 0.f;
  if (lane < C::kD / 8) {
    const uint4 o = *reinterpret_cast<const uint4*>(p.o.at<const elem_t>(b, h, i) + lane * 8);
    const uint4 d = *reinterpret_cast<const uint4*>(p.dout.at<const elem_t>(b, h, i) + lane * 8);
    const uint32_t ow[4] = {o.x, o.y, o.z, o.w}, dw[4] = {d.x, d.y, d.z, d.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      float o0, o1, d0, d1;
      unpack2<C::kBf16>(ow[w], o0, o1);
      unpack2<C::kBf16>(dw[w], d0, d1);
      sum = fmaf(o0, d0, fmaf(o1, d1, sum));
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) p.dvec[row] = sum;
}

// Copy kBlock rows of head h (of batch b) starting at row0 between global memory and a tile.
template <class C>
__device__ __forceinline__ void load_rows(elem_t* tile, const TensorRef& t, int b, int h, int row0, int rows, int tid) {
  load_tile<C::kBlock, C::kD, C::kSwizzle, true, C::kThreads>(tile, t.at<const elem_t>(b, h, row0), t.row_stride,
                                                               rows, tid);
}
template <class C>
__device__ __forceinline__ void store_rows(const TensorRef& t, int b, int h, int row0, const elem_t* tile, int rows,
                                           int tid) {
  store_tile<C::kBlock, C::kD, C::kSwizzle, C::kThreads>(t.at<elem_t>(b, h, row0), t.row_stride, tile, rows, tid);
}

// Stage one query block's lse (in log2 units, +inf past the end: P = 0 there) and D in shared memory.
template <class C>
__device__ __forceinline__ void load_row_stats(float* s_lse, float* s_dvec, const BwdParams& p, int64_t bh,
                                               int row0, int tid) {
  for (int r = tid; r < C::kBlock; r += C::kThreads) {
    const bool valid = row0 + r < p.seqlen_q;
    s_lse[r] = valid ? p.lse[bh * p.seqlen_q + row0 + r] * 1.4426950408889634f : INFINITY;
    s_dvec[r] = valid ? p.dvec[bh * p.seqlen_q + row0 + r] : 0.f;
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

// acc = A(rows of tile_a, the warp's 16) x B^T(rows of tile_b), k over the head dim.
template <class C>
__device__ __forceinline__ void gemm_rows_rows(float (&acc)[1][C::kNtB][4], const elem_t* tile_a, int a_row0,
                                               const elem_t* tile_b, int lane) {
  zero(acc);
#pragma unroll
  for (int kt = 0; kt < C::kKtD; ++kt) {
    uint32_t a[1][C::kKtD][4], b[C::kKtD][C::kNtB][2];
    load_a<C::kD, C::kSwizzle>(a, tile_a, a_row0, lane, kt, 1);
    load_b_rows<C::kD, C::kSwizzle>(b, tile_b, 0, lane, kt, 1);
#pragma unroll
    for (int nt = 0; nt < C::kNtB; ++nt) mma_16816<C::kBf16>(acc[0][nt], a[0][kt], b[kt][nt]);
  }
}

// acc += A (16-bit fragments over the block's rows) x tile (rows = k), n over the head dim.
template <class C>
__device__ __forceinline__ void gemm_frag_cols(float (&acc)[1][C::kNtD][4], const uint32_t (&a)[1][C::kKtB][4],
                                               const elem_t* tile, int lane) {
#pragma unroll
  for (int kt = 0; kt < C::kKtB; ++kt) {
    uint32_t b[C::kKtB][C::kNtD][2];
    load_b_cols<C::kD, C::kSwizzle>(b, tile, 0, lane, kt, 1);
#pragma unroll
    for (int nt = 0; nt < C::kNtD; ++nt) mma_16816<C::kBf16>(acc[0][nt], a[0][kt], b[kt][nt]);
  }
}

// ---- 2. dK, dV --------------------------------------------------------------------------------
template <class C>
__global__ void __launch_bounds__(C::kThreads) dkdv_kernel(const __grid_constant__ BwdParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t* sK = reinterpret_cast<elem_t*>(smem_raw);
  elem_t* sV = sK + C::kTile;
  elem_t* sQ2 = sV + C::kTile;      // two stages of Q
  elem_t* sdO2 = sQ2 + 2 * C::kTile;  // two stages of dO
  float* s_lse2 = reinterpret_cast<float*>(sdO2 + 2 * C::kTile);
  float* s_dvec2 = s_lse2 + 2 * C::kBlock;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int num_n = (p.seqlen_k + C::kBlock - 1) / C::kBlock;
  const int n_block = blockIdx.x % num_n, bh_k = blockIdx.x / num_n;
  const int h_k = bh_k % p.heads_k, b = bh_k / p.heads_k, group = p.heads / p.heads_k;
  const int key0 = n_block * C::kBlock, keys = min(C::kBlock, p.seqlen_k - key0);
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;

  load_rows<C>(sK, p.k, b, h_k, key0, keys, tid);
  load_rows<C>(sV, p.v, b, h_k, key0, keys, tid);
  cp_async_commit();

  float dk[1][C::kNtD][4], dv[1][C::kNtD][4];
  zero(dk);
  zero(dv);
  // Query blocks that see any key of this block: [first_m, end_m). The window does not depend on
  // the head, so one ScoreMod (head 0 of the group) bounds the loop for every head.
  const typename C::Mod bounds(p.mods, p.seqlen_q, p.seqlen_k, p.softmax_scale, b, h_k * group);
  int first_m = 0, end_m = (p.seqlen_q + C::kBlock - 1) / C::kBlock;
  if (C::kCausal || (C::Mod::kLocal && bounds.right >= 0))
    first_m = max(0, (key0 - bounds.diag - bounds.right) / C::kBlock);
  if (C::Mod::kLocal && bounds.left >= 0) {
    const int last_row = key0 + keys - 1 - bounds.diag + bounds.left;  // last query that sees a key here
    end_m = last_row < 0 ? 0 : min(end_m, last_row / C::kBlock + 1);
  }
  const int my_key0 = key0 + warp * 16 + (lane >> 2);  // key of accumulator row half 0 (+8 for half 1)

  // One step per (query head of the group, query block), software-pipelined over two buffers: the
  // copy of step + 1 is in flight while step computes.
  const int blocks = max(0, end_m - first_m), steps = group * blocks;
  auto stage = [&](int step) {
    const int h = h_k * group + step / blocks, row0 = (first_m + step % blocks) * C::kBlock;
    const int rows = min(C::kBlock, p.seqlen_q - row0), buf = step & 1;
    load_rows<C>(sQ2 + buf * C::kTile, p.q, b, h, row0, rows, tid);
    load_rows<C>(sdO2 + buf * C::kTile, p.dout, b, h, row0, rows, tid);
    load_row_stats<C>(s_lse2 + buf * C::kBlock, s_dvec2 + buf * C::kBlock, p, int64_t(b) * p.heads + h, row0, tid);
  };
  if (steps > 0) stage(0);
  cp_async_commit();
  for (int step = 0; step < steps; ++step) {
    if (step + 1 < steps) stage(step + 1);  // its buffer was last read in step - 1, closed by a barrier
    cp_async_commit();
    cp_async_wait<1>();  // all but the copy just issued have landed: K, V and this step's block
    __syncthreads();
    {
      const int h = h_k * group + step / blocks, row0 = (first_m + step % blocks) * C::kBlock, buf = step & 1;
      const int64_t bh = int64_t(b) * p.heads + h;
      const typename C::Mod mod(p.mods, p.seqlen_q, p.seqlen_k, p.softmax_scale, b, h);
      const Dropout drop(p.mods, int(bh));
      const elem_t* sQ = sQ2 + buf * C::kTile;
      const elem_t* sdO = sdO2 + buf * C::kTile;
      const float* s_lse = s_lse2 + buf * C::kBlock;
      const float* s_dvec = s_dvec2 + buf * C::kBlock;

      // P^T: rows = this warp's 16 keys, cols = the block's queries.
      float pt[1][C::kNtB][4], grad[1][C::kNtB][4];  // grad: used (and kept) only with softcap
      gemm_rows_rows<C>(pt, sK, warp * 16, sQ, lane);
#pragma unroll
      for (int nt = 0; nt < C::kNtB; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nt * 8 + (lane & 3) * 2 + (e & 1);
          pt[0][nt][e] = probability<C>(mod, pt[0][nt][e], row0 + col, my_key0 + (e >> 1) * 8, s_lse[col],
                                        scale_log2, grad[0][nt][e]);
        }
      // Dropout keep bits: element (nt, e) is query row0 + 8 nt + 2 (lane % 4) + (e & 1), key my_key0 + 8 (e >> 1);
      // one Philox call per query covers both of this lane's keys.
      uint32_t keep[C::kNtB];
      if (C::kDropout) {
#pragma unroll
        for (int nt = 0; nt < C::kNtB; ++nt) {
          keep[nt] = 0;
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const uint4 flags = drop.keep_flags(row0 + nt * 8 + (lane & 3) * 2 + q, my_key0);
#pragma unroll
            for (int half = 0; half < 2; ++half)
              keep[nt] |= uint32_t(Dropout::kept(flags, my_key0 + half * 8)) << (half * 2 + q);
          }
        }
      }
      const float rp = p.mods.dropout_scale;
      auto dropped = [&](int, int nt, int e, float x) { return C::kDropout ? ((keep[nt] >> e) & 1u ? x * rp : 0.f) : x; };
      uint32_t pa[1][C::kKtB][4];
      acc_to_a<C::kBf16>(pt, pa, dropped);
      gemm_frag_cols<C>(dv, pa, sdO, lane);  // dV += (P o Z / (1 - p))^T dO

      float dpt[1][C::kNtB][4];
      gemm_rows_rows<C>(dpt, sV, warp * 16, sdO, lane);  // dP^T = V dO^T
#pragma unroll
      for (int nt = 0; nt < C::kNtB; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nt * 8 + (lane & 3) * 2 + (e & 1);
          dpt[0][nt][e] = pt[0][nt][e] * (dropped(0, nt, e, dpt[0][nt][e]) - s_dvec[col]);  // dS^T
          if (C::Mod::kSoftcap) dpt[0][nt][e] *= grad[0][nt][e];
        }
      uint32_t dsa[1][C::kKtB][4];
      acc_to_a<C::kBf16>(dpt, dsa);
      gemm_frag_cols<C>(dk, dsa, sQ, lane);  // dK += dS^T Q
    }
    __syncthreads();  // every warp is done with this buffer before step + 2 refills it
  }

  // Stage through the Q / dO buffers (each warp writes its own 16 rows), then coalesced stores.
  cp_async_wait<0>();
  __syncthreads();
  store_acc<C::kD, C::kSwizzle, C::kBf16>(sQ2, dk, warp * 16, lane, p.softmax_scale);
  store_acc<C::kD, C::kSwizzle, C::kBf16>(sdO2, dv, warp * 16, lane, 1.f);
  __syncthreads();
  store_rows<C>(p.dk, b, h_k, key0, sQ2, keys, tid);
  store_rows<C>(p.dv, b, h_k, key0, sdO2, keys, tid);
}

// ---- 3. dQ --------------------------------------------------------------------------------------
template <class C>
__global__ void __launch_bounds__(C::kThreads) dq_kernel(const __grid_constant__ BwdParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t* sQ = reinterpret_cast<elem_t*>(smem_raw);
  elem_t* sdO = sQ + C::kTile;
  elem_t* sK2 = sdO + C::kTile;       // two stages of K
  elem_t* sV2 = sK2 + 2 * C::kTile;   // two stages of V

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int num_m = (p.seqlen_q + C::kBlock - 1) / C::kBlock;
  int m_block = blockIdx.x % num_m;
  const int bh = blockIdx.x / num_m, h = bh % p.heads, b = bh / p.heads;
  if (C::kCausal) m_block = num_m - 1 - m_block;  // longest rows first
  const int h_k = h / (p.heads / p.heads_k);
  const int row0 = m_block * C::kBlock, rows = min(C::kBlock, p.seqlen_q - row0);
  const typename C::Mod mod(p.mods, p.seqlen_q, p.seqlen_k, p.softmax_scale, b, h);
  const Dropout drop(p.mods, bh);
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;

  load_rows<C>(sQ, p.q, b, h, row0, rows, tid);
  load_rows<C>(sdO, p.dout, b, h, row0, rows, tid);
  cp_async_commit();

  // This thread's two rows: lse (log2 units; +inf past the end or for rows that saw no key) and D.
  float lse2[2], dvec[2];
  const int my_row0 = row0 + warp * 16 + (lane >> 2);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = my_row0 + half * 8;
    const bool valid = row < p.seqlen_q;
    lse2[half] = valid ? p.lse[int64_t(bh) * p.seqlen_q + row] * 1.4426950408889634f : INFINITY;
    dvec[half] = valid ? p.dvec[int64_t(bh) * p.seqlen_q + row] : 0.f;
  }

  // Key blocks any row of this CTA sees: [j_begin, j_end) (as in the forward pass).
  int j_begin = 0, j_end = (p.seqlen_k + C::kBlock - 1) / C::kBlock;
  if (C::kCausal || (C::Mod::kLocal && mod.right >= 0)) {
    const int last_col = row0 + rows - 1 + mod.diag + mod.right;
    j_end = last_col < 0 ? 0 : min(j_end, last_col / C::kBlock + 1);
  }
  if (C::Mod::kLocal && mod.left >= 0) j_begin = max(0, (row0 + mod.diag - mod.left) / C::kBlock);
  float dq[1][C::kNtD][4];
  zero(dq);
  // Software-pipelined over two K/V buffers: block j + 1 is copied while block j computes.
  auto stage = [&](int j) {
    const int col0 = j * C::kBlock, cols = min(C::kBlock, p.seqlen_k - col0), buf = (j - j_begin) & 1;
    load_rows<C>(sK2 + buf * C::kTile, p.k, b, h_k, col0, cols, tid);
    load_rows<C>(sV2 + buf * C::kTile, p.v, b, h_k, col0, cols, tid);
  };
  if (j_begin < j_end) stage(j_begin);
  cp_async_commit();
  for (int j = j_begin; j < j_end; ++j) {
    const int col0 = j * C::kBlock, buf = (j - j_begin) & 1;
    if (j + 1 < j_end) stage(j + 1);  // its buffer was last read in step j - 1, closed by a barrier
    cp_async_commit();
    cp_async_wait<1>();  // all but the copy just issued have landed: Q, dO and K_j, V_j
    __syncthreads();
    const elem_t* sK = sK2 + buf * C::kTile;
    const elem_t* sV = sV2 + buf * C::kTile;

    float s[1][C::kNtB][4];
    gemm_rows_rows<C>(s, sQ, warp * 16, sK, lane);  // S = Q K^T
    float dp[1][C::kNtB][4];
    gemm_rows_rows<C>(dp, sdO, warp * 16, sV, lane);  // dP = dO V^T
    uint4 flags[2][(C::kNtB + 7) / 8];  // dropout: one Philox call per (row, 64-key chunk)
    if (C::kDropout) {
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int chunk = 0; chunk < (C::kNtB + 7) / 8; ++chunk)
          flags[half][chunk] = drop.keep_flags(my_row0 + half * 8, col0 + chunk * 64 + (lane & 3) * 2);
    }
#pragma unroll
    for (int nt = 0; nt < C::kNtB; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int half = e >> 1, col = col0 + nt * 8 + (lane & 3) * 2 + (e & 1);
        float grad, dp_kept = dp[0][nt][e];
        if (C::kDropout) dp_kept = Dropout::kept(flags[half][nt / 8], col) ? dp_kept * p.mods.dropout_scale : 0.f;
        const float prob = probability<C>(mod, s[0][nt][e], my_row0 + half * 8, col, lse2[half], scale_log2, grad);
        s[0][nt][e] = prob * (dp_kept - dvec[half]) * grad;  // dS (grad: softcap's chain rule, else 1)
      }
    uint32_t dsa[1][C::kKtB][4];
    acc_to_a<C::kBf16>(s, dsa);
    gemm_frag_cols<C>(dq, dsa, sK, lane);  // dQ += dS K
    __syncthreads();  // every warp is done with this buffer before step j + 2 refills it
  }

  cp_async_wait<0>();
  __syncwarp();  // sQ rows of this warp are read only by this warp
  store_acc<C::kD, C::kSwizzle, C::kBf16>(sQ, dq, warp * 16, lane, p.softmax_scale);
  __syncthreads();
  store_rows<C>(p.dq, b, h, row0, sQ, rows, tid);
}

template <class C, class Kernel>
cudaError_t opt_in_smem(Kernel kernel) {
  if (C::kSmemBytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
}

template <class C>
cudaError_t launch(const BwdParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0 || p.seqlen_q == 0) return cudaSuccess;
  const int64_t rows = int64_t(p.batch) * p.heads * p.seqlen_q;
  const int64_t kv_blocks = int64_t((p.seqlen_k + C::kBlock - 1) / C::kBlock) * p.heads_k * p.batch;
  const int64_t q_blocks = int64_t((p.seqlen_q + C::kBlock - 1) / C::kBlock) * p.heads * p.batch;
  if ((rows + 3) / 4 > 0x7fffffff || kv_blocks > 0x7fffffff || q_blocks > 0x7fffffff)
    return cudaErrorInvalidConfiguration;
  cudaError_t err;
  if ((err = opt_in_smem<C>(dkdv_kernel<C>)) != cudaSuccess) return err;
  if ((err = opt_in_smem<C>(dq_kernel<C>)) != cudaSuccess) return err;
  dvec_kernel<C><<<unsigned((rows + 3) / 4), 128, 0, stream>>>(p);
  if (kv_blocks > 0) dkdv_kernel<C><<<unsigned(kv_blocks), C::kThreads, C::kSmemBytes, stream>>>(p);
  dq_kernel<C><<<unsigned(q_blocks), C::kThreads, C::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace flashjit::bwd

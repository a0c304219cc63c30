// Warp-level operand fragments of mma.sync m16n8k16, loaded from a shared-memory tile whose rows
// are kD 16-bit elements long (SmemLayout<kD, kSwizzle>). Three shapes cover every product of the
// forward and backward passes:
//   load_a      A (16 x 16, row-major) from tile rows:        Q in QK^T, dO in dO V^T, K/V in the dK/dV pass
//   load_b_rows B (16 x 8) where tile rows are the n index:   K in QK^T, V in dO V^T, Q/dO in the dK/dV pass
//   load_b_cols B (16 x 8) where tile rows are the k index:   V in PV, K in dS K, Q/dO in the dK/dV pass
// Chunks of k-tiles [kt0, kt0 + count) are loaded at a time so callers can pipeline them.
#pragma once
#include <cstdint>
#include "ptx.cuh"
#include "smem_tile.cuh"

namespace flashjit {

#ifdef __CUDACC__  // device code (the launcher's host-only build skips it: common/launch.cuh)
using elem_t = uint16_t;  // fp16 or bf16 bits; only mma_16816/pack2 need to know which

// a[mt][kt]: rows row0 + 16 mt .. +15, k columns 16 kt .. +15 (one ldmatrix.x4 each).
template <int kD, bool kSwizzle, int kMT, int kKT>
__device__ __forceinline__ void load_a(uint32_t (&a)[kMT][kKT][4], const elem_t* tile, int row0, int lane, int kt0,
                                       int count) {
  using L = SmemLayout<kD, kSwizzle>;
#pragma unroll
  for (int kt = kt0; kt < kt0 + count; ++kt)
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
      ldmatrix_x4(a[mt][kt], smem_addr(tile + L::frag_offset(row0 + mt * 16, lane & 15, kt * 2, lane >> 4)));
}

// b[kt][nt] with B[k][n] = tile[row0 + n][k]: a plain ldmatrix of an 8x8 (n x k) block is already
// the col-major B fragment. One x4 = two n-tiles x both k halves.
template <int kD, bool kSwizzle, int kNT, int kKT>
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[kKT][kNT][2], const elem_t* tile, int row0, int lane,
                                            int kt0, int count) {
  using L = SmemLayout<kD, kSwizzle>;
#pragma unroll
  for (int kt = kt0; kt < kt0 + count; ++kt)
#pragma unroll
    for (int nt = 0; nt < kNT; nt += 2) {
      uint32_t r[4];
      ldmatrix_x4(r, smem_addr(tile + L::frag_offset(row0 + nt * 8, (lane >> 4) * 8 + (lane & 7), kt * 2,
                                                       (lane >> 3) & 1)));
      b[kt][nt][0] = r[0], b[kt][nt][1] = r[1], b[kt][nt + 1][0] = r[2], b[kt][nt + 1][1] = r[3];
    }
}

// b[kt][nt] with B[k][n] = tile[row0 + k][8 nt0 + n]: tile rows are the k index, so the fragment
// needs the transposing ldmatrix. One x4 = both k halves x two n-tiles. nt0 must be even.
template <int kD, bool kSwizzle, int kNT, int kKT>
__device__ __forceinline__ void load_b_cols(uint32_t (&b)[kKT][kNT][2], const elem_t* tile, int row0, int lane,
                                            int kt0, int count, int nt0 = 0) {
  using L = SmemLayout<kD, kSwizzle>;
#pragma unroll
  for (int kt = kt0; kt < kt0 + count; ++kt)
#pragma unroll
    for (int nt = 0; nt < kNT; nt += 2) {
      uint32_t r[4];
      ldmatrix_x4_trans(r, smem_addr(tile + L::frag_offset(row0 + kt * 16, ((lane >> 3) & 1) * 8 + (lane & 7),
                                                             nt0 + nt, lane >> 4)));
      b[kt][nt][0] = r[0], b[kt][nt][1] = r[1], b[kt][nt + 1][0] = r[2], b[kt][nt + 1][1] = r[3];
    }
}

// a[mt][kt] with A[m][k] = tile[16 kt + k][m0 + 16 mt + m]: tile rows are the k index (dS^T staged
// for dQ = dS K), so each 8x8 block is read transposed. m0 must be a multiple of 16.
template <int kD, bool kSwizzle, int kMT, int kKT>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[kMT][kKT][4], const elem_t* tile, int m0, int lane, int kt0,
                                             int count) {
  using L = SmemLayout<kD, kSwizzle>;
#pragma unroll
  for (int kt = kt0; kt < kt0 + count; ++kt)
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
      ldmatrix_x4_trans(a[mt][kt], smem_addr(tile + L::frag_offset(kt * 16, (lane >> 4) * 8 + (lane & 7),
                                                                   (m0 >> 3) + mt * 2, (lane >> 3) & 1)));
}

// acc[mt][nt] += a[mt][kt] x b[kt][nt] for every m- and n-tile: k-tile kt of a warp's block product.
template <bool kBf16, int kMT, int kNT, int kKTA, int kKTB>
__device__ __forceinline__ void mma_k_tile(float (&acc)[kMT][kNT][4], const uint32_t (&a)[kMT][kKTA][4],
                                           const uint32_t (&b)[kKTB][kNT][2], int kt) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) mma_16816<kBf16>(acc[mt][nt], a[mt][kt], b[kt][nt]);
}

// f(mt, nt, e) for every element of a [kMT][kNT][4] accumulator block, unrolled: element-wise passes
// over scores (row 16 mt + lane/4 + 8 (e >> 1), column 8 nt + 2 (lane%4) + (e & 1)).
template <int kMT, int kNT, class F>
__device__ __forceinline__ void for_each_acc(F f) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) f(mt, nt, e);
}

// The C fragments of n-tiles 2kt and 2kt+1 of an fp32 accumulator are exactly the A fragment of
// k-tile kt of the same matrix in 16-bit: how P (and dS) feed the next product without shared memory.
// `f(mt, nt, e, value)` may rewrite each element on the way (e.g. apply a dropout mask); kRelu packs
// negative values as 0.
struct Identity {
  __device__ __forceinline__ float operator()(int, int, int, float x) const { return x; }
};
template <bool kBf16, bool kRelu = false, int kMT, int kNT, class F = Identity>
__device__ __forceinline__ void acc_to_a(const float (&c)[kMT][kNT][4], uint32_t (&a)[kMT][kNT / 2][4], F f = F()) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int kt = 0; kt < kNT / 2; ++kt)
#pragma unroll
      for (int r = 0; r < 4; ++r) {  // r: (row half, n-tile) = (r & 1, 2 kt + r / 2)
        const int nt = 2 * kt + r / 2, e = (r & 1) * 2;
        a[mt][kt][r] = pack2<kBf16, kRelu>(f(mt, nt, e, c[mt][nt][e]), f(mt, nt, e + 1, c[mt][nt][e + 1]));
      }
}

template <int kMT, int kNT>
__device__ __forceinline__ void zero(float (&c)[kMT][kNT][4]) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) c[mt][nt][0] = c[mt][nt][1] = c[mt][nt][2] = c[mt][nt][3] = 0.f;
}

// Store an fp32 accumulator block (rows row0 + 16 mt + lane/4 (+8), cols 8 (chunk0 + nt) + 2 (lane%4))
// as 16-bit into a shared-memory tile, for a coalesced copy out.
template <int kD, bool kSwizzle, bool kBf16, int kMT, int kNT>
__device__ __forceinline__ void store_acc(elem_t* tile, const float (&c)[kMT][kNT][4], int row0, int lane,
                                          float scale, int chunk0 = 0) {
  using L = SmemLayout<kD, kSwizzle>;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + mt * 16 + (lane >> 2) + half * 8;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
        *reinterpret_cast<uint32_t*>(tile + L::offset(row, chunk0 + nt) + (lane & 3) * 2) =
            pack2<kBf16>(c[mt][nt][2 * half] * scale, c[mt][nt][2 * half + 1] * scale);
    }
}

// Store 16-bit A fragments a[mt][kt] (rows row0 + 16 mt + lane/4 (+8), cols 8 chunk0 + 16 kt +
// 2 (lane%4) (+8)) into a tile of layout L (anything with a static offset(row, 16-byte chunk)):
// the inverse of load_a. chunk0 must be even.
template <class L, int kMT, int kKT>
__device__ __forceinline__ void store_a_in(elem_t* tile, const uint32_t (&a)[kMT][kKT][4], int row0, int lane,
                                           int chunk0 = 0) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int kt = 0; kt < kKT; ++kt)
#pragma unroll
      for (int r = 0; r < 4; ++r)  // r: (row half, column half) = (r & 1, r / 2)
        *reinterpret_cast<uint32_t*>(tile + L::offset(row0 + mt * 16 + (lane >> 2) + (r & 1) * 8, chunk0 + kt * 2 + r / 2) +
                                     (lane & 3) * 2) = a[mt][kt][r];
}

template <int kD, bool kSwizzle, int kMT, int kKT>
__device__ __forceinline__ void store_a(elem_t* tile, const uint32_t (&a)[kMT][kKT][4], int row0, int lane,
                                        int chunk0 = 0) {
  store_a_in<SmemLayout<kD, kSwizzle>>(tile, a, row0, lane, chunk0);
}

#endif  // __CUDACC__

}  // namespace flashjit

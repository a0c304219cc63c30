// A [kRows, kD] 16-bit tile in shared memory, stored as rows of kD/8 16-byte chunks, and its
// global->shared copy. With kSwizzle the chunk index is XOR-ed with bits of the row so that the 8
// row addresses of one ldmatrix phase (8 consecutive rows, same logical chunk) hit 8 different
// 16-byte bank groups; without it rows that are a multiple of 128 bytes apart collide (8-way).
#pragma once
#include <cstdint>
#include "ptx.cuh"

namespace flashjit {

#ifdef __CUDACC__  // device code (the launcher's host-only build skips it: common/launch.cuh)
template <int kD, bool kSwizzle>
struct SmemLayout {
  static constexpr int kChunks = kD / 8;  // 16-byte chunks per row
  static_assert(kChunks % 4 == 0, "head dim must be a multiple of 32");

  // Offset in elements of (row, 16-byte chunk).
  __device__ __forceinline__ static int offset(int row, int chunk) {
    if constexpr (kSwizzle) {
      // Rows of a multiple of 128 bytes: all 8 rows start in bank group 0, so permute by row % 8.
      // Rows of 64 mod 128 bytes (D = 32, 96, 160): odd rows already start 4 groups over, so
      // permuting the low two chunk bits by (row / 2) % 4 completes the 8-way spread.
      if constexpr (kChunks % 8 == 0) chunk ^= (row & 7);
      else chunk ^= ((row >> 1) & 3);
    }
    return row * kD + chunk * 8;
  }

  // The same offset for a fragment address split into a compile-time part (rc: a multiple of 8
  // rows, cc: an even chunk) and a per-lane part (rl < 16 rows, cl in {0, 1}). Written so that the
  // XOR only ever sees per-lane bits: after unrolling every ldmatrix address is one of a few
  // per-lane registers plus an immediate, instead of a separately computed (and, hoisted out of
  // the key loop, separately live) register per fragment.
  __device__ __forceinline__ static int frag_offset(int rc, int rl, int cc, int cl) {
    if constexpr (!kSwizzle) {
      return (rc + rl) * kD + (cc + cl) * 8;
    } else {
      constexpr int kMask = kChunks % 8 == 0 ? 7 : 3;
      const int key = kChunks % 8 == 0 ? (rl & 7) : ((rl >> 1) & 3);
      return (rc + rl) * kD + ((cc & ~kMask) + ((cc & kMask) ^ (cl ^ key))) * 8;
    }
  }
};

// Copy rows [0, kRows) of a row-strided global tile into shared memory; rows >= valid_rows and the
// chunks past the kCols real columns (a head dim narrower than its tile) are zero-filled and never
// read from global memory.
template <int kD, bool kSwizzle, bool kAsync, typename T>
__device__ __forceinline__ void copy_chunk(T* smem, const T* gmem, const T* src, int row, int chunk, bool valid) {
  T* dst = smem + SmemLayout<kD, kSwizzle>::offset(row, chunk);
  if constexpr (kAsync) {
    cp_async_16(smem_addr(dst), valid ? src : gmem, valid);
  } else {
    const uint4 value = valid ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(dst) = value;
  }
}

template <int kRows, int kD, bool kSwizzle, bool kAsync, int kThreads, int kCols = kD, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t row_stride, int valid_rows, int tid) {
  constexpr int kChunks = SmemLayout<kD, kSwizzle>::kChunks, kValidChunks = kCols / 8;
  static_assert(kCols % 8 == 0 && kCols <= kD, "the real columns must be whole 16-byte chunks of the tile");
  constexpr int kTotal = kRows * kChunks;
  constexpr int kIters = (kTotal + kThreads - 1) / kThreads;
  if constexpr (kThreads % kChunks == 0) {
    // Each thread copies the same chunk of every kThreads / kChunks-th row. A running pointer
    // rather than base + it * step: the compiler would otherwise hoist one 64-bit address per
    // unrolled copy out of the key loop and keep them all live.
    constexpr int kRowStep = kThreads / kChunks;
    const int chunk = tid % kChunks;
    const int rows = kValidChunks == kChunks || chunk < kValidChunks ? valid_rows : 0;  // this thread's column
    int row = tid / kChunks;
    const T* src = gmem + row * row_stride + chunk * 8;
    const int64_t src_step = kRowStep * row_stride;
#pragma unroll
    for (int it = 0; it < kIters; ++it, row += kRowStep, src += src_step)
      if (kTotal % kThreads == 0 || row < kRows)
        copy_chunk<kD, kSwizzle, kAsync>(smem, gmem, src, row, chunk, row < rows);
  } else {  // tiles 96, 160, 192: rows of 12, 20 or 24 chunks do not tile the thread block evenly
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int i = it * kThreads + tid, row = i / kChunks, chunk = i % kChunks;
      if (kTotal % kThreads == 0 || i < kTotal)
        copy_chunk<kD, kSwizzle, kAsync>(smem, gmem, gmem + row * row_stride + chunk * 8, row, chunk,
                                          row < valid_rows && (kValidChunks == kChunks || chunk < kValidChunks));
    }
  }
}

// Copy rows [0, valid_rows) and the first kCols columns of a shared-memory tile to a row-strided
// global tile (16-byte stores).
template <int kRows, int kD, bool kSwizzle, int kThreads, int kCols = kD, typename T>
__device__ __forceinline__ void store_tile(T* gmem, int64_t row_stride, const T* smem, int valid_rows, int tid) {
  using L = SmemLayout<kD, kSwizzle>;
#pragma unroll
  for (int i = tid; i < kRows * L::kChunks; i += kThreads) {
    const int row = i / L::kChunks, chunk = i % L::kChunks;
    if (row < valid_rows && chunk < kCols / 8)
      *reinterpret_cast<uint4*>(gmem + row * row_stride + chunk * 8) =
          *reinterpret_cast<const uint4*>(smem + L::offset(row, chunk));
  }
}

#endif  // __CUDACC__

}  // namespace flashjit

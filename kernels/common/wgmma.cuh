// Hopper (sm_90a) warpgroup MMA: wgmma.mma_async PTX wrappers, shared-memory matrix descriptors and
// the 128-byte-swizzle tile layout they read. Like ptx.cuh, the only place that spells these out.
//
// A warpgroup (4 consecutive warps, 128 threads) computes D[64 x N] (+)= A[64 x 16] B[16 x N] per
// instruction. B always comes from shared memory (a descriptor); A from shared memory or from
// registers (the same fragment layout as mma.sync m16n8k16's A, warp w holding rows 16w..16w+15).
// The fp32 accumulator is warp w's rows in the mma.sync C layout, n-tile by n-tile: d[nt][e] is
// row 16 w + lane / 4 + 8 (e >> 1), column 8 nt + 2 (lane % 4) + (e & 1). So every element-wise
// helper of fragments.cuh works on wgmma accumulators as on one m-tile of mma.sync ones.
#pragma once
#include <cstdint>
#include "ptx.cuh"

namespace flashjit {

// ---- The tile layout: rows of 16-bit elements in 64-column blocks, 128-byte swizzle --------------
// Column block c / 64 of the tile is a [kRows x 64] array (128 bytes a row); within it the 16-byte
// chunk index is XOR-ed with row % 8. That is wgmma's canonical 128B-swizzle layout both ways:
// read with rows as M/N it is "K-major" (k along a row), with rows as K it is "MN-major". The
// hardware applies the XOR to address bits [4:6] from bits [7:9], so tiles start 1024-byte aligned.
template <int kRows, int kCols>
struct GmmaTile {
  static_assert(kCols % 64 == 0 && kRows % 8 == 0, "wgmma tiles are whole 8-row x 64-column swizzle atoms");
  static constexpr int kBlockBytes = kRows * 128, kBytes = kBlockBytes * (kCols / 64);

  // Offset in elements of (row, 16-byte chunk).
  __device__ __forceinline__ static int offset(int row, int chunk) {
    return (chunk >> 3) * (kRows * 64) + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
  }
};

#ifdef __CUDACC__  // device code (the launcher's host-only build skips it: common/launch.cuh)
// Four 8x8 16-bit matrices from registers into shared memory, ldmatrix_x4's inverse: lane i supplies
// the row address of matrix i / 8, row i % 8, and r[j] is matrix j's fragment (mma.sync's layout).
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1,%2,%3,%4};\n" ::"r"(addr), "r"(r[0]), "r"(r[1]),
               "r"(r[2]), "r"(r[3])
               : "memory");
}

// 16-bit A fragments a[mt][kt] (rows row0 + 16 mt + lane / 4 (+8), columns 16 kt + 2 (lane % 4) (+8), the
// layout of fragments.cuh's store_a_in) into tile Tile (a GmmaTile): one stmatrix an (mt, kt) where
// store_a_in makes four 4-byte stores. Conflict-free: a matrix's 8 rows of one chunk sit in 8 chunks.
template <class Tile, int kMT, int kKT, typename T>
__device__ __forceinline__ void stmatrix_a(T* tile, const uint32_t (&a)[kMT][kKT][4], int row0, int lane) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int kt = 0; kt < kKT; ++kt)
      stmatrix_x4(smem_addr(tile + Tile::offset(row0 + mt * 16 + (lane & 15), kt * 2 + (lane >> 4))), a[mt][kt]);
}

// Copy rows [0, kRows) of a row-strided global [rows x kCols] tile into a GmmaTile with cp.async;
// rows >= valid_rows and the columns past kValidCols (a head dim narrower than its tile) are
// zero-filled and never read.
template <int kRows, int kCols, int kThreads, int kValidCols = kCols, typename T>
__device__ __forceinline__ void load_gmma_tile(T* smem, const T* gmem, int64_t row_stride, int valid_rows, int tid) {
  constexpr int kChunks = kCols / 8, kRowStep = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kRows % kRowStep == 0, "the copy must tile the thread block evenly");
  static_assert(kValidCols % 8 == 0 && kValidCols <= kCols, "the real columns must be whole 16-byte chunks");
  const int chunk = tid % kChunks;
  if (kValidCols < kCols && chunk >= kValidCols / 8) valid_rows = 0;  // this thread's column is padding
  int row = tid / kChunks;
  const T* src = gmem + row * row_stride + chunk * 8;  // a running pointer: one live address, not one per copy
  const int64_t src_step = kRowStep * row_stride;
#pragma unroll
  for (int it = 0; it < kRows / kRowStep; ++it, row += kRowStep, src += src_step) {
    const bool valid = row < valid_rows;
    cp_async_16(smem_addr(smem + GmmaTile<kRows, kCols>::offset(row, chunk)), valid ? src : gmem, valid);
  }
}

// ---- Descriptors ---------------------------------------------------------------------------------
// A descriptor of a GmmaTile (128B swizzle): start address, leading and stride byte offsets, all in
// 16-byte units. K-major reads use only the stride offset (1024 B between 8-row groups); MN-major
// reads use the leading offset to step from one 64-column block to the next.
__device__ __forceinline__ uint64_t gmma_desc(uint32_t smem_byte_addr, uint32_t leading_bytes) {
  return uint64_t((smem_byte_addr & 0x3ffff) >> 4) | uint64_t(leading_bytes >> 4) << 16 |
         uint64_t(1024 >> 4) << 32 | uint64_t(1) << 62;
}
// The same descriptor moved on by `bytes` (a multiple of 16 that stays inside shared memory).
__device__ __forceinline__ uint64_t gmma_desc_add(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

// Byte offset of k-step ks (16 columns) of a K-major read of a GmmaTile<kRows, ...>: 32 bytes along
// a 128-byte row, then on to the next column block.
template <int kRows>
__device__ __forceinline__ constexpr uint32_t kmajor_step(int ks) {
  return (ks >> 2) * (kRows * 128) + (ks & 3) * 32;
}
// Byte offset of k-step ks (16 rows) of an MN-major read.
__device__ __forceinline__ constexpr uint32_t mnmajor_step(int ks) { return ks * 16 * 128; }

// ---- Synchronisation -----------------------------------------------------------------------------
// Before the first wgmma of a batch: orders earlier register writes (accumulators, A fragments).
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Wait until at most kPending committed groups are still running (groups finish in order).
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// The compiler sees a wgmma write its accumulators when it is issued; this ties every later use of
// them to a point after the wgmma_wait (no read moves above it).
template <int kNT>
__device__ __forceinline__ void wgmma_settle(float (&d)[kNT][4]) {
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[nt][e])::"memory");
}
// Shared-memory writes by threads (st.shared, cp.async) become visible to wgmma's reads (the async
// proxy) only through this fence, before the barrier that publishes them.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ---- Bulk reductions (the TMA unit adds a shared-memory buffer into global memory) --------------
// dst += src, `bytes` (a multiple of 16) of fp32, both 16-byte aligned; asynchronous: src may be
// rewritten only after bulk_wait_read, and the writes become visible to later kernels.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, const float* src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
               ::"l"(dst), "r"(smem_addr(src)), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
// Until this thread's bulk reductions have read their sources (all but kPending).
template <int kPending>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}
// Until this thread's bulk reductions are complete.
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

// ---- The MMAs ------------------------------------------------------------------------------------
// Inline assembly has no loops, so the N / 2 accumulator operands of each shape are written out:
// FJ_ACC<n> is the operand list "{%0, ..., %(n-1)}", FJ_F<n>(d) binds d[0..n-1].
#define FJ_ACC32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, "  \
  "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FJ_ACC40 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, "  \
  "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39}"
#define FJ_ACC48 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, "  \
  "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, "  \
  "%40, %41, %42, %43, %44, %45, %46, %47}"
#define FJ_ACC64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, "  \
  "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, "  \
  "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, "  \
  "%59, %60, %61, %62, %63}"
#define FJ_ACC88 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, "  \
  "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, "  \
  "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, "  \
  "%59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, "  \
  "%78, %79, %80, %81, %82, %83, %84, %85, %86, %87}"
#define FJ_ACC96 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, "  \
  "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, "  \
  "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, "  \
  "%59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, "  \
  "%78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}"
#define FJ_ACC128 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, "  \
  "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, "  \
  "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, "  \
  "%59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, "  \
  "%78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, "  \
  "%97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, "  \
  "%113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"
#define FJ_F8(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                    "+f"(d[i + 6]), "+f"(d[i + 7])
#define FJ_F16(d, i) FJ_F8(d, i), FJ_F8(d, i + 8)
#define FJ_F32(d) FJ_F16(d, 0), FJ_F16(d, 16)
#define FJ_F40(d) FJ_F32(d), FJ_F8(d, 32)
#define FJ_F48(d) FJ_F32(d), FJ_F16(d, 32)
#define FJ_F64(d) FJ_F32(d), FJ_F16(d, 32), FJ_F16(d, 48)
#define FJ_F88(d) FJ_F64(d), FJ_F16(d, 64), FJ_F8(d, 80)
#define FJ_F96(d) FJ_F64(d), FJ_F16(d, 64), FJ_F16(d, 80)
#define FJ_F128(d) FJ_F96(d), FJ_F16(d, 96), FJ_F16(d, 112)
// scale-d (accumulate or overwrite) is a predicate set from a register; scale-a/b are +1.
#define FJ_WGMMA(N, T, ACC, OPERANDS, S) \
  "{\n.reg .pred p;\nsetp.ne.b32 p, " S ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N "k16.f32." T "." T " " ACC \
  ", " OPERANDS ";\n}\n"
// One asm statement per (N, type): the type and N are part of the instruction's name.

// d (+)= A B, A and B from shared memory; kTransA / kTransB: A is M-major / B is N-major.
template <int N, bool kBf16, int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  // 80 and 176: the Hopper forward's block_n for d256 and d128 (FlashAttention-3's tiles), QK^T only.
  static_assert(N == 64 || N == 80 || N == 96 || N == 128 || N == 176 || N == 192 || N == 256,
                "wgmma_ss is written out for N = 64, 80, 96, 128, 176, 192, 256");
  float* f = &d[0][0];
  const int acc = accumulate;
  if constexpr (N == 64 && kBf16)
    asm volatile(FJ_WGMMA(64, "bf16", FJ_ACC32, "%32, %33, p, 1, 1, %35, %36", "%34")
                 : FJ_F32(f) : "l"(desc_a), "l"(desc_b), "r"(acc), "n"(kTransA), "n"(kTransB));
  else if constexpr (N == 64 && !kBf16)
    asm volatile(FJ_WGMMA(64, "f16", FJ_ACC32, "%32, %33, p, 1, 1, %35, %36", "%34")
                 : FJ_F32(f) : "l"(desc_a), "l"(desc_b), "r"(acc), "n"(kTransA), "n"(kTransB));
  else if constexpr (N == 80 && kBf16)
    asm volatile(FJ_WGMMA(80, "bf16", FJ_ACC40, "%40, %41, p, 1, 1, %43, %44", "%42")
                 : FJ_F40(f) : "l"(desc_a), "l"(desc_b), "r"(acc), "n"(kTransA), "n"(kTransB));
  else if constexpr (N == 80 && !kBf16)
    asm volatile(FJ_WGMMA(80, "f16", FJ_ACC40, "%40, %41, p, 1, 1, %43, %44", "%42")
                 : FJ_F40(f) : "l"(desc_a), "l"(desc_b), "r"(acc), "n"(kTransA), "n"(kTransB));
  else if constexpr (N == 96 && kBf16)
    asm volatile(FJ_WGMMA(96, "bf16", FJ_ACC48, "%48, %49, p, 1, 1, %51, %52", "%50")
                 : FJ_F48(f) : "l"(desc_a), "l"(desc_b), "r"(acc), "n"(kTransA), "n"(kTransB));
  else if constexpr (N == 96 && !kBf16)
    asm volatile(FJ_WGMMA(96, "f16", FJ_ACC48, "%48, %49, p, 1, 1, %51, %52", "%50")
                 : FJ_F48(f) : "l"(desc_a), "l"(desc_b), "r"(acc), "n"(kTransA), "n"(kTransB));
  else if constexpr (N == 128 && kBf16)
    asm volatile(FJ_WGMMA(128, "bf16", FJ_ACC64, "%64, %65, p, 1, 1, %67, %68", "%66")
                 : FJ_F64(f) : "l"(desc_a), "l"(desc_b), "r"(acc), "n"(kTransA), "n"(kTransB));
  else if constexpr (N == 128 && !kBf16)
    asm volatile(FJ_WGMMA(128, "f16", FJ_ACC64, "%64, %65, p, 1, 1, %67, %68", "%66")
                 : FJ_F64(f) : "l"(desc_a), "l"(desc_b), "r"(acc), "n"(kTransA), "n"(kTransB));
  else if constexpr (N == 176 && kBf16)
    asm volatile(FJ_WGMMA(176, "bf16", FJ_ACC88, "%88, %89, p, 1, 1, %91, %92", "%90")
                 : FJ_F88(f) : "l"(desc_a), "l"(desc_b), "r"(acc), "n"(kTransA), "n"(kTransB));
  else if constexpr (N == 176 && !kBf16)
    asm volatile(FJ_WGMMA(176, "f16", FJ_ACC88, "%88, %89, p, 1, 1, %91, %92", "%90")
                 : FJ_F88(f) : "l"(desc_a), "l"(desc_b), "r"(acc), "n"(kTransA), "n"(kTransB));
  else if constexpr (N == 192 && kBf16)
    asm volatile(FJ_WGMMA(192, "bf16", FJ_ACC96, "%96, %97, p, 1, 1, %99, %100", "%98")
                 : FJ_F96(f) : "l"(desc_a), "l"(desc_b), "r"(acc), "n"(kTransA), "n"(kTransB));
  else if constexpr (N == 192 && !kBf16)
    asm volatile(FJ_WGMMA(192, "f16", FJ_ACC96, "%96, %97, p, 1, 1, %99, %100", "%98")
                 : FJ_F96(f) : "l"(desc_a), "l"(desc_b), "r"(acc), "n"(kTransA), "n"(kTransB));
  else if constexpr (N == 256 && kBf16)
    asm volatile(FJ_WGMMA(256, "bf16", FJ_ACC128, "%128, %129, p, 1, 1, %131, %132", "%130")
                 : FJ_F128(f) : "l"(desc_a), "l"(desc_b), "r"(acc), "n"(kTransA), "n"(kTransB));
  else if constexpr (N == 256 && !kBf16)
    asm volatile(FJ_WGMMA(256, "f16", FJ_ACC128, "%128, %129, p, 1, 1, %131, %132", "%130")
                 : FJ_F128(f) : "l"(desc_a), "l"(desc_b), "r"(acc), "n"(kTransA), "n"(kTransB));
}

// d (+)= A B, A from registers (a: this thread's fragment of a 64 x 16 k-step), B from shared memory.
template <int N, bool kBf16, int kTransB>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b,
                                         bool accumulate) {
  // 8: the Hopper forward's row sums (P times a block of ones).
  static_assert(N == 8 || N == 64 || N == 96 || N == 128 || N == 192 || N == 256,
                "wgmma_rs is written out for N = 8, 64, 96, 128, 192, 256");
  float* f = &d[0][0];
  const int acc = accumulate;
  if constexpr (N == 8 && kBf16)
    asm volatile(FJ_WGMMA(8, "bf16", "{%0, %1, %2, %3}", "{%4, %5, %6, %7}, %8, p, 1, 1, %10", "%9")
                 : "+f"(f[0]), "+f"(f[1]), "+f"(f[2]), "+f"(f[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(acc), "n"(kTransB));
  else if constexpr (N == 8 && !kBf16)
    asm volatile(FJ_WGMMA(8, "f16", "{%0, %1, %2, %3}", "{%4, %5, %6, %7}, %8, p, 1, 1, %10", "%9")
                 : "+f"(f[0]), "+f"(f[1]), "+f"(f[2]), "+f"(f[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(acc), "n"(kTransB));
  else if constexpr (N == 64 && kBf16)
    asm volatile(FJ_WGMMA(64, "bf16", FJ_ACC32, "{%32, %33, %34, %35}, %36, p, 1, 1, %38", "%37")
                 : FJ_F32(f) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(acc), "n"(kTransB));
  else if constexpr (N == 64 && !kBf16)
    asm volatile(FJ_WGMMA(64, "f16", FJ_ACC32, "{%32, %33, %34, %35}, %36, p, 1, 1, %38", "%37")
                 : FJ_F32(f) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(acc), "n"(kTransB));
  else if constexpr (N == 96 && kBf16)
    asm volatile(FJ_WGMMA(96, "bf16", FJ_ACC48, "{%48, %49, %50, %51}, %52, p, 1, 1, %54", "%53")
                 : FJ_F48(f) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(acc), "n"(kTransB));
  else if constexpr (N == 96 && !kBf16)
    asm volatile(FJ_WGMMA(96, "f16", FJ_ACC48, "{%48, %49, %50, %51}, %52, p, 1, 1, %54", "%53")
                 : FJ_F48(f) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(acc), "n"(kTransB));
  else if constexpr (N == 128 && kBf16)
    asm volatile(FJ_WGMMA(128, "bf16", FJ_ACC64, "{%64, %65, %66, %67}, %68, p, 1, 1, %70", "%69")
                 : FJ_F64(f) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(acc), "n"(kTransB));
  else if constexpr (N == 128 && !kBf16)
    asm volatile(FJ_WGMMA(128, "f16", FJ_ACC64, "{%64, %65, %66, %67}, %68, p, 1, 1, %70", "%69")
                 : FJ_F64(f) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(acc), "n"(kTransB));
  else if constexpr (N == 192 && kBf16)
    asm volatile(FJ_WGMMA(192, "bf16", FJ_ACC96, "{%96, %97, %98, %99}, %100, p, 1, 1, %102", "%101")
                 : FJ_F96(f) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(acc), "n"(kTransB));
  else if constexpr (N == 192 && !kBf16)
    asm volatile(FJ_WGMMA(192, "f16", FJ_ACC96, "{%96, %97, %98, %99}, %100, p, 1, 1, %102", "%101")
                 : FJ_F96(f) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(acc), "n"(kTransB));
  else if constexpr (N == 256 && kBf16)
    asm volatile(FJ_WGMMA(256, "bf16", FJ_ACC128, "{%128, %129, %130, %131}, %132, p, 1, 1, %134", "%133")
                 : FJ_F128(f) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(acc), "n"(kTransB));
  else if constexpr (N == 256 && !kBf16)
    asm volatile(FJ_WGMMA(256, "f16", FJ_ACC128, "{%128, %129, %130, %131}, %132, p, 1, 1, %134", "%133")
                 : FJ_F128(f) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(acc), "n"(kTransB));
}

#undef FJ_WGMMA
#undef FJ_F128
#undef FJ_F96
#undef FJ_F88
#undef FJ_F64
#undef FJ_F48
#undef FJ_F40
#undef FJ_F32
#undef FJ_F16
#undef FJ_F8
#undef FJ_ACC128
#undef FJ_ACC96
#undef FJ_ACC88
#undef FJ_ACC64
#undef FJ_ACC48
#undef FJ_ACC40
#undef FJ_ACC32
#endif  // __CUDACC__

}  // namespace flashjit

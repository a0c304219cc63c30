// Hopper TMA (the tensor memory accelerator): tiles copied between global and shared memory by
// one thread, described by a tensor map that the host encodes per call. The only place that spells
// out cp.async.bulk.tensor PTX and the driver's encoder.
//
// flashjit's tensors are [B, S, H, D] with a contiguous last dim: a map sees them as the 4-D tensor
// (D, S, H, B), innermost first, so a box of {64 columns, rows, 1, 1} at (col, row, h, b) is one
// 64-column block of a GmmaTile (wgmma.cuh), written with the same 128-byte swizzle. Rows past S and
// columns past D read as zeros and are never written: odd shapes need no predicates. (A varlen map
// spans the packed rows of every sequence: a box reaching past its sequence reads the next one's, so
// the kernels mask or zero those rows themselves: fwd_sm90.cuh's zero_v_past_keys.)
#pragma once
#include <cstdint>
#include <cuda.h>  // CUtensorMap and its enums only: the encoder is reached through the runtime
#include <cuda_runtime.h>
#include "../params.cuh"
#include "../ptx.cuh"

namespace flashjit::sm90 {

#ifdef __CUDACC__  // device code (the launcher's host-only build skips it: common/launch.cuh)
// ---- Device side ---------------------------------------------------------------------------------
// The map lives in kernel parameter space (__grid_constant__); its generic address is what the
// instructions take.
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
// Box at (c0, c1, c2, c3) -> shared memory; its bytes count toward `bar`'s expected transaction.
__device__ __forceinline__ void tma_load_4d(void* smem, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(smem_addr(smem)), "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1),
      "r"(c2), "r"(c3)
      : "memory");
}
// The box at (c0, c1, c2, c3) into L2 only, no barrier: a later tma_load_4d of it reads L2 instead of
// DRAM. No architectural effect (a box past the tensor prefetches nothing).
__device__ __forceinline__ void tma_prefetch_l2_4d(const CUtensorMap* map, int c0, int c1, int c2, int c3) {
  asm volatile("cp.async.bulk.prefetch.tensor.4d.L2.global.tile [%0, {%1, %2, %3, %4}];\n"
               ::"l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}
// Shared memory -> the box at (c0, c1, c2, c3), clipped to the tensor. Call fence_proxy_async()
// (wgmma.cuh) after the threads' shared-memory writes and a barrier before it.
__device__ __forceinline__ void tma_store_4d(const CUtensorMap* map, const void* smem, int c0, int c1, int c2, int c3) {
  asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n"
               ::"l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(smem)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}
__device__ __forceinline__ void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Until this thread's committed stores have read their shared-memory sources (before the CTA exits
// or the buffer is reused).
__device__ __forceinline__ void tma_store_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
#endif  // __CUDACC__

// ---- Host side -----------------------------------------------------------------------------------
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's cuTensorMapEncodeTiled through the runtime, so the library links only cudart.
inline EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found;
#if CUDART_VERSION >= 12050  // the versioned lookup; the unversioned one is deprecated from 12.5 on
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                                             &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) ptr = nullptr;
    return reinterpret_cast<EncodeTiled>(ptr);
  }();
  return fn;
}

// The map of a [B, rows, H, cols] 16-bit tensor (strides in elements, the last dim contiguous) read
// or written in boxes of {64, box_rows, 1, 1} with the 128-byte swizzle. A dim of extent 1 gets a
// stride the encoder accepts (its coordinate is always 0). False if the encoder refuses.
inline bool encode_bshd(CUtensorMap* map, const TensorRef& t, bool bf16, int batch, int rows, int heads, int cols,
                        int box_rows) {
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr) return false;
  auto stride_bytes = [](int64_t stride, int extent) { return cuuint64_t(extent == 1 ? 16 : stride * 2); };
  const cuuint64_t dims[4] = {cuuint64_t(cols), cuuint64_t(rows), cuuint64_t(heads), cuuint64_t(batch)};
  const cuuint64_t strides[3] = {stride_bytes(t.row_stride, rows), stride_bytes(t.head_stride, heads),
                                 stride_bytes(t.batch_stride, batch)};
  const cuuint32_t box[4] = {64, cuuint32_t(box_rows), 1, 1}, unit[4] = {1, 1, 1, 1};
  return encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4, t.data, dims,
                strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace flashjit::sm90

// How fast the L2 takes fp32 reductions, and how ncu counts their sectors, by instruction form: the
// bulk reduction the wide backward's dQ path issues (2 KiB from shared memory, one in flight a warp,
// as wide_dq waits for the previous one's read), the same with four in flight, and per-thread
// red.global.add of 16 / 8 / 4 bytes (FlashAttention-3's hdim-256 dQ uses 16-byte atomics). Every
// form adds the same bytes to the same buffer; the question is whether the form changes the L2's
// cost a byte (ncu: lts__t_sectors_op_red.sum, L2 throughput). Build: nvcc -O3 -arch=sm_90a.
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Each warp adds 2 KiB chunks: chunk c of warp w at (w * kChunksPerWarp + c) modulo the buffer.
template <int kPending>
__global__ void bulk_kernel(float* dst, size_t floats, int chunks_per_warp) {
  __shared__ __align__(128) float stage[8][512];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = lane; i < 512; i += 32) stage[warp][i] = 1.f;
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncwarp();
  const size_t gw = size_t(blockIdx.x) * 8 + warp, chunks = floats / 512;
  for (int c = 0; c < chunks_per_warp; ++c) {
    const size_t chunk = (gw * chunks_per_warp + c) % chunks;
    if (lane == 0) {
      asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
      asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
                   ::"l"(dst + chunk * 512), "r"(smem_addr(stage[warp])), "r"(2048u) : "memory");
      asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
    }
    __syncwarp();
  }
  if (lane == 0) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

// Per-thread reductions over the same 2 KiB chunks: kVec floats a thread an instruction. kFrag: the
// wgmma accumulator's pattern (a warp instruction covers 8 rows of 256 B, 32 bytes each: lane / 4 the
// row, lane % 4 the float pair; kVec = 2 only), else 32 * kVec contiguous floats an instruction.
template <int kVec, bool kFrag>
__global__ void red_kernel(float* dst, size_t floats, int chunks_per_warp) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const size_t gw = size_t(blockIdx.x) * 8 + warp, chunks = floats / 512;
  for (int c = 0; c < chunks_per_warp; ++c) {
    float* base = dst + ((gw * chunks_per_warp + c) % chunks) * 512;
#pragma unroll
    for (int j = 0; j < 512 / (32 * kVec); ++j) {
      float* a = kFrag ? base + (lane / 4) * 64 + j * 8 + (lane % 4) * 2 : base + (j * 32 + lane) * kVec;
      if constexpr (kVec == 4)
        asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(a), "f"(1.f), "f"(1.f), "f"(1.f), "f"(1.f) : "memory");
      else if constexpr (kVec == 2)
        asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(a), "f"(1.f), "f"(1.f) : "memory");
      else
        asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(a), "f"(1.f) : "memory");
    }
  }
}

template <class F>
float time_ms(F launch) {
  cudaEvent_t a, b;
  cudaEventCreate(&a); cudaEventCreate(&b);
  launch();  // warm-up
  float best = 1e30f;
  for (int r = 0; r < 3; ++r) {
    cudaEventRecord(a); launch(); cudaEventRecord(b); cudaEventSynchronize(b);
    float ms; cudaEventElapsedTime(&ms, a, b); if (ms < best) best = ms;
  }
  return best;
}

int main(int argc, char** argv) {
  const int blocks = 132 * 4, cpw = 256;  // 4 CTAs of 8 warps an SM; 256 chunks a warp: 2 GiB added
  const double bytes = double(blocks) * 8 * cpw * 2048;
  for (size_t mib : {16, 256}) {
    const size_t floats = mib << 18;
    float* dst; cudaMalloc(&dst, floats * 4); cudaMemset(dst, 0, floats * 4);
    struct V { const char* name; void (*k)(float*, size_t, int); } vs[] = {
      {"bulk2k_1", bulk_kernel<0>}, {"bulk2k_4", bulk_kernel<3>}, {"red_v4", red_kernel<4, false>},
      {"red_v2_frag", red_kernel<2, true>}, {"red_v2", red_kernel<2, false>}, {"red_f32", red_kernel<1, false>}};
    for (auto& v : vs) {
      float ms = time_ms([&] { v.k<<<blocks, 256>>>(dst, floats, cpw); });
      printf("buffer %4zu MiB  %-12s %7.3f ms  %7.1f GB/s reduced\n", mib, v.name, ms, bytes / ms / 1e6);
    }
    cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess) { printf("error: %s\n", cudaGetErrorString(e)); return 1; }
    cudaFree(dst);
  }
  return 0;
}

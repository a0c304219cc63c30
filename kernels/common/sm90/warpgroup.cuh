// Hopper warp specialisation: register reallocation between warpgroups and named barriers that
// only some warps take part in.
#pragma once
#include <cstdint>

namespace flashjit::sm90 {

#ifdef __CUDACC__  // device code (the launcher's host-only build skips it: common/launch.cuh)
// setmaxnreg: the CTA starts with an even split of the register file; a producer warpgroup that
// only issues TMA copies gives registers back and the consumer warpgroups take them. Every warp of
// a warpgroup must execute the same one.
template <int kRegs>
__device__ __forceinline__ void warpgroup_release_registers() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg takes a multiple of 8 in [24, 256]");
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void warpgroup_claim_registers() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg takes a multiple of 8 in [24, 256]");
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// Named barriers (ids 1..15; 0 is __syncthreads): sync waits for `threads` arrivals, arrive
// counts this warp in without waiting (a signal to the warps that sync on it).
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// named_sync for a barrier whose waiting warps reach it at different instructions (two warpgroups'
// own code): bar.sync is barrier.sync.aligned, which PTX defines only when every thread waiting on
// it executes the same instruction (compute-sanitizer's synccheck reports the others as divergent).
__device__ __forceinline__ void named_sync_unaligned(int id, int threads) {
  asm volatile("barrier.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

#endif  // __CUDACC__

}  // namespace flashjit::sm90

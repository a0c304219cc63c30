// Hopper (sm_90) shared-memory barriers and the stage ring built on them; the only place that
// spells out mbarrier PTX.
//
// An mbarrier completes a phase when its expected arrivals have arrived and, for TMA copies, the
// expected bytes have landed (complete_tx). Waiters name the phase by its parity: waiting for
// parity p returns once the phase with that parity has completed. A fresh barrier is in phase 0, so
// a wait for parity 1 passes at once: that is how a producer's first pass over an empty ring
// proceeds without a consumer having released anything.
#pragma once
#include <cstdint>
#include "../ptx.cuh"

namespace flashjit::sm90 {

#ifdef __CUDACC__  // device code (the launcher's host-only build skips it: common/launch.cuh)
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals) : "memory");
}
// Makes the initialisations visible to the async proxy (TMA) and the rest of the CTA; follow with a
// CTA barrier.
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// One arrival that also announces `bytes` still to land through TMA copies signalling this barrier.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ bool mbarrier_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
               : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
  return done != 0;
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  while (!mbarrier_try_wait(bar, parity)) {
  }
}

// A ring of kStages buffers, each with a `full` barrier (the producer's TMA bytes landed) and an
// `empty` one (every consumer released it). The state is the stage index and the parity of the
// ring's current pass; a kernel never computes a phase by hand.
template <int kStages>
struct RingState {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == kStages) stage = 0, phase ^= 1;
  }
};

template <int kStages>
struct Ring {
  uint64_t full[kStages], empty[kStages];

  // One thread: `consumers` arrivals release a stage; `producers` arrivals (and the announced bytes)
  // fill one: the TMA issuer's, plus one per thread that also stores into the stage (filled()).
  __device__ __forceinline__ void init(int consumers, int producers = 1) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) mbarrier_init(&full[s], producers), mbarrier_init(&empty[s], consumers);
  }
  // Producer: wait until stage st is free (its previous pass released), announce `bytes` and return
  // the barrier the TMA copies of this stage signal.
  __device__ __forceinline__ uint64_t* acquire(RingState<kStages> st, uint32_t bytes) {
    wait_free(st);
    return fill(st, bytes);
  }
  // acquire() in two, for a stage that threads besides the TMA issuer fill too: each waits until
  // it is free; the issuer announces the bytes (one arrival) and copies; the others store and arrive.
  __device__ __forceinline__ void wait_free(RingState<kStages> st) { mbarrier_wait(&empty[st.stage], st.phase ^ 1); }
  __device__ __forceinline__ uint64_t* fill(RingState<kStages> st, uint32_t bytes) {
    mbarrier_arrive_expect_tx(&full[st.stage], bytes);
    return &full[st.stage];
  }
  __device__ __forceinline__ void filled(RingState<kStages> st) { mbarrier_arrive(&full[st.stage]); }
  // Consumer: wait until stage st's bytes have landed; release it when done reading.
  __device__ __forceinline__ void wait(RingState<kStages> st) { mbarrier_wait(&full[st.stage], st.phase); }
  __device__ __forceinline__ void release(RingState<kStages> st) { mbarrier_arrive(&empty[st.stage]); }
};

#endif  // __CUDACC__

}  // namespace flashjit::sm90

// Division by a divisor fixed for a launch, by a multiply-high, an add and a shift (Granlund and
// Montgomery's round-up method, Hacker's Delight 10-9): a launcher makes one FastDiv per divisor on the
// host, a kernel divides with it. An integer division by a run-time value compiles to ~20 instructions
// through the reciprocal unit (I2F, MUFU.RCP, F2I, two corrections); in the Hopper forward the consumers'
// exponentials keep that unit busy, and a persistent CTA's tile decode (tile -> (b, h), m-block, KV head)
// waited there: ~1600 cycles in the producer and ~900 in a consumer at every tile of d128's non-causal
// kernel (clock64 stamps, docs/perf-log.md, forty-eighth session).
// Exact for 0 <= n < 2^31 and 1 <= divisor < 2^31 (tests/test_fast_div_host.py checks it on the CPU).
#pragma once
#include <cstdint>

namespace flashjit {

struct FastDiv {
  uint32_t divisor, mul, shift;  // n / divisor = (umulhi(n, mul) + n) >> shift

  // shift = ceil(log2(divisor)), mul = floor(2^32 (2^shift - divisor) / divisor) + 1: the low 32 bits of
  // the 33-bit multiplier 2^32 + mul, whose product with n (< 2^31) adds to n without passing 32 bits.
  __host__ __device__ static FastDiv of(uint32_t d) {
    uint32_t shift = 0;
    while ((uint64_t(1) << shift) < d) ++shift;
    return {d, uint32_t((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d) / d + 1), shift};
  }

  __host__ __device__ __forceinline__ int div(int n) const {
#ifdef __CUDA_ARCH__
    const uint32_t high = __umulhi(uint32_t(n), mul);
#else
    const uint32_t high = uint32_t((uint64_t(uint32_t(n)) * mul) >> 32);
#endif
    return int((high + uint32_t(n)) >> shift);
  }
  // n % divisor, given q = div(n).
  __host__ __device__ __forceinline__ int mod(int n, int q) const { return n - q * int(divisor); }
};

}  // namespace flashjit

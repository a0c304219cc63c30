// Dropout with a counter-based RNG (Philox4x32-10), so the backward regenerates the forward's mask
// from (seed, offset) instead of storing it. The random byte of element (query i, key j) of head
// bh is byte ((j >> 3) & 7) * 2 + (j & 1) of philox(key = seed, counter = (i, 4 (j >> 6) + ((j >> 1) & 3),
// bh, offset)): one call covers the 16 keys {64c + 8n + 2t + e} that one lane of an mma.sync
// accumulator holds for a row in a 64-key chunk. Keep iff byte >= threshold (p rounded to a
// multiple of 1/256; kept values are scaled by 256 / (256 - threshold), so the expectation is exact).
// flashjit/reference.py:philox_keep_mask is the same function in PyTorch.
#pragma once
#include <cstdint>
#include "params.cuh"

namespace flashjit {

__device__ __forceinline__ uint4 philox4x32_10(uint2 key, uint4 ctr) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t lo0 = 0xD2511F53u * ctr.x, hi0 = __umulhi(0xD2511F53u, ctr.x);
    const uint32_t lo1 = 0xCD9E8D57u * ctr.z, hi1 = __umulhi(0xCD9E8D57u, ctr.z);
    ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
    key.x += 0x9E3779B9u;
    key.y += 0xBB67AE85u;
  }
  return ctr;
}

struct Dropout {
  uint2 key;
  uint32_t offset, bh, threshold4;  // threshold replicated in all four bytes
  float scale;                      // 256 / (256 - threshold)

  __device__ __forceinline__ Dropout(const ScoreParams& m, int bh_)
      : key(make_uint2(uint32_t(m.philox_seed), uint32_t(m.philox_seed >> 32) ^ uint32_t(m.philox_offset >> 32))),
        offset(uint32_t(m.philox_offset)), bh(uint32_t(bh_)), threshold4(uint32_t(m.dropout_threshold) * 0x01010101u),
        scale(m.dropout_scale) {}

  // Per-byte keep flags (0xff kept, 0 dropped) of the 16 elements covered by the call for (i, j).
  __device__ __forceinline__ uint4 keep_flags(int i, int j) const {
    const uint4 r = philox4x32_10(key, make_uint4(uint32_t(i), uint32_t((j >> 6) * 4 + ((j >> 1) & 3)), bh, offset));
    return make_uint4(__vcmpgeu4(r.x, threshold4), __vcmpgeu4(r.y, threshold4), __vcmpgeu4(r.z, threshold4),
                      __vcmpgeu4(r.w, threshold4));
  }

  // Whether key j (covered by `flags`, from keep_flags(i, j') with the same call) is kept.
  __device__ __forceinline__ static bool kept(const uint4& flags, int j) {
    const int byte = ((j >> 3) & 7) * 2 + (j & 1);
    const uint32_t word = byte < 8 ? (byte < 4 ? flags.x : flags.y) : (byte < 12 ? flags.z : flags.w);
    return (word >> ((byte & 3) * 8)) & 1u;
  }
};

}  // namespace flashjit

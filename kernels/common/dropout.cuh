// Dropout with a counter-based RNG (Philox4x32-10), so the backward regenerates the forward's mask
// from (seed, offset) instead of storing it. One call covers a 2 x 8 patch of (query, key) entries:
// queries {i, i + 8} (i & 8 == 0) x keys {32 c + 8 n + 2 t + e : n < 4, e < 2} for one t < 4, with
// counter ((i >> 4) * 8 + (i & 7), 4 c + t, bh, offset); entry (i, j) is byte
// ((i >> 3) & 1) * 8 + ((j >> 3) & 3) * 2 + (j & 1). That patch is all 16 entries one lane of an
// mma.sync accumulator holds for its two rows in a 32-key chunk (the forward and the deterministic
// dQ kernel), and 4 entries each of what two neighbouring lanes hold of S^T in the dK/dV kernel
// (which share the call with a shuffle). Keep iff byte >= threshold (p rounded to a multiple of 1/256; kept values are scaled
// by 256 / (256 - threshold), so the expectation is exact).
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

  // Per-byte keep flags (0xff kept, 0 dropped) of the 16 entries of the call covering (i, j).
  __device__ __forceinline__ uint4 keep_flags(int i, int j) const {
    const uint4 r = philox4x32_10(key, make_uint4(uint32_t((i >> 4) * 8 + (i & 7)), uint32_t((j >> 5) * 4 + ((j >> 1) & 3)),
                                                  bh, offset));
    return make_uint4(__vcmpgeu4(r.x, threshold4), __vcmpgeu4(r.y, threshold4), __vcmpgeu4(r.z, threshold4),
                      __vcmpgeu4(r.w, threshold4));
  }

  // Whether entry (i, j) is kept, given the flags of the call that covers it.
  __device__ __forceinline__ static bool kept(const uint4& flags, int i, int j) {
    const int byte = ((i >> 3) & 1) * 8 + ((j >> 3) & 3) * 2 + (j & 1);
    const uint32_t word = byte < 8 ? (byte < 4 ? flags.x : flags.y) : (byte < 12 ? flags.z : flags.w);
    return (word >> ((byte & 3) * 8)) & 1u;
  }
};

}  // namespace flashjit

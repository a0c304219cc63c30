// Dropout with a counter-based RNG (Philox4x32-10), so the backward regenerates the forward's mask
// from (seed, offset) instead of storing it.
//
// One call covers a 4 x 4 patch of (query, key) entries: queries {32 a' + 8 a + r : a < 4} (one
// residue r mod 8 of a 32-query span) x keys {16 c + 8 n + 2 t + e : n, e < 2} (one pair t of a
// 16-key chunk), with counter (8 a' + r, 4 c + t, bh, offset); entry (i, j) is byte
//   e * 8 + a * 2 + n,   with a = (i >> 3) & 3, n = (j >> 3) & 1, e = j & 1.
// Both orientations of the mma.sync accumulator hold whole calls or halves of them:
// - rows = queries (forward, deterministic dQ kernel): a lane's rows r + 8 h (+ 16 per m-tile) and
//   keys 2 t + e + 8 n are all 16 bytes of a call over two m-tiles (one m-tile: half of it);
// - rows = keys (dK/dV kernel): a lane holds keys 2 t + e + 8 n for one e (its row parity) and
//   queries of residues 2 t' and 2 t' + 1, so it uses the e-half of two calls; it computes the call
//   for the residue of its own parity and swaps the other half with the lane of the other parity.
// Every byte of every call is used once, and no entry needs more than a byte permute to become a
// mask. Keep iff byte >= threshold (p rounded to a multiple of 1/256). Kept values are scaled by
// 256 / (256 - threshold), so the expectation is exact; the kernels apply that scale once, to the
// accumulated output or gradients, and mask with a bitwise AND.
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
  uint32_t offset, bh, threshold4, low4;  // threshold in all four bytes; and its low 7 bits

  __device__ __forceinline__ Dropout(const ScoreParams& m, int bh_)
      : key(make_uint2(uint32_t(m.philox_seed), uint32_t(m.philox_seed >> 32) ^ uint32_t(m.philox_offset >> 32))),
        offset(uint32_t(m.philox_offset)), bh(uint32_t(bh_)), threshold4(uint32_t(m.dropout_threshold) * 0x01010101u),
        low4(threshold4 & 0x7f7f7f7fu) {}

  // Keep flags of the call covering query i and key j: the top bit of each byte is set iff that
  // entry is kept (the other bits are garbage; mask() reads only the top one).
  __device__ __forceinline__ uint4 keep_flags(int i, int j) const {
    const uint4 r = philox4x32_10(key, make_uint4(uint32_t((i >> 5) * 8 + (i & 7)), uint32_t((j >> 4) * 4 + ((j >> 1) & 3)),
                                                  bh, offset));
    return make_uint4(at_least(r.x), at_least(r.y), at_least(r.z), at_least(r.w));
  }

  // Per byte, top bit = (x >= threshold), unsigned, without borrows between bytes: the low 7 bits
  // compare through the top bit of (x | 0x80) - low7, then the top bits of x and the threshold decide.
  __device__ __forceinline__ uint32_t at_least(uint32_t x) const {
    const uint32_t low = (x | 0x80808080u) - low4;  // top bit: x's low 7 bits >= the threshold's
    return (x & ~threshold4) | ((x | ~threshold4) & low);
  }

  // All ones iff the entry at byte b (0..3) of a flags word is kept: the byte's top bit, replicated.
  __device__ __forceinline__ static uint32_t mask(uint32_t word, int b) {
    uint32_t m;
    asm("prmt.b32 %0, %1, 0, %2;\n" : "=r"(m) : "r"(word), "r"(0x8888u | uint32_t(b) * 0x1111u));
    return m;
  }

  // Two 16-bit masks in one word (for a packed pair): the low half from byte b of `lo`, the high
  // half from byte b of `hi`.
  __device__ __forceinline__ static uint32_t mask2(uint32_t lo, uint32_t hi, int b) {
    uint32_t m;
    asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(m) : "r"(lo), "r"(hi), "r"(0xcc88u | uint32_t(b) * 0x1111u));
    return m;
  }

  // With rows = queries: the mask of accumulator element (nt, e) (8-key n-tile nt, element e of the
  // mma.sync C fragment) in 16-row half `half16` of the call's 32-query span. Its query group is
  // a = 2 half16 + (e >> 1), its key n = nt & 1, e' = e & 1: byte e' * 8 + a * 2 + n.
  __device__ __forceinline__ static uint32_t query_rows_mask(const uint4& f, int half16, int nt, int e) {
    return mask(word(f, (e & 1) * 2 + half16), (e >> 1) * 2 + (nt & 1));
  }

  // Word w (0..3) of a call's flags.
  __device__ __forceinline__ static uint32_t word(const uint4& f, int w) {
    return w < 2 ? (w == 0 ? f.x : f.y) : (w == 2 ? f.z : f.w);
  }

  // x if kept, else 0 (bitwise; `keep` from mask()).
  __device__ __forceinline__ static float masked(float x, uint32_t keep) {
    return __uint_as_float(__float_as_uint(x) & keep);
  }
};

}  // namespace flashjit

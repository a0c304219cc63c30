// Dropout with a counter-based RNG (Philox4x32-7, as FlashAttention-2's: 7 rounds pass BigCrush and
// cost 30% less than cuRAND's 10), so the backward regenerates the forward's mask from (seed,
// offset) instead of storing it.
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
// 1 / (1 - p) for the requested p, as flash-attn does (ScoreParams::dropout_scale); the kernels apply
// that scale once, to the accumulated output or gradients, and mask with a bitwise AND (bwd_sm90.cuh's
// producer-warpgroup kernel: in P's sign bit, PackedKeyRowsMask::sign_code).
// flashjit/reference.py:philox_keep_mask is the same function in PyTorch.
#pragma once
#include <cstdint>
#include "params.cuh"

namespace flashjit {

#ifdef __CUDACC__  // device code (the launcher's host-only build skips it: common/launch.cuh)
constexpr int kPhiloxRounds = 7;  // flashjit/reference.py:PHILOX_ROUNDS

__device__ __forceinline__ uint4 philox4x32(uint2 key, uint4 ctr) {
#pragma unroll
  for (int round = 0; round < kPhiloxRounds; ++round) {
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
    return keep_flags_at(uint32_t((i >> 5) * 8 + (i & 7)), uint32_t((j >> 4) * 4 + ((j >> 1) & 3)));
  }
  // The same for the call's counter words (x, y) = (8 (i >> 5) + (i & 7), 4 (j >> 4) + ((j >> 1) & 3)), for a
  // caller that steps them itself.
  __device__ __forceinline__ uint4 keep_flags_at(uint32_t x, uint32_t y) const {
    const uint4 r = philox4x32(key, make_uint4(x, y, bh, offset));
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

// With rows = keys (the dK/dV kernels): the masks of a warp's kRT m-tiles of 16 keys (this lane's
// keys my_key0 + 16 mt + 8 h) x kNt n-tiles of 8 queries from query0 (a multiple of 16, of 32 when
// kNt >= 4). This lane's entries of m-tile mt and 32-query span are the half e = (its key parity)
// of two calls, those of query residues 2 (lane % 4) and 2 (lane % 4) + 1: it makes the call of its
// own parity's residue and swaps the other half with lane ^ 4, so each call serves 16 entries.
template <int kRT, int kNt>
struct KeyRowsMask {
  static constexpr int kSpans = (kNt + 3) / 4;
  uint32_t flags[kRT][kSpans][2][2];  // [mt][span][res][w]: word w of the half for residue + res
  int half16;                         // with one 16-query share per span: which half of it

  // With enabled == false (no dropout) nothing is computed and nothing may be read.
  __device__ __forceinline__ KeyRowsMask(bool enabled, const Dropout& drop, int query0, int my_key0, int lane)
      : half16(kNt >= 4 ? 0 : (query0 >> 4) & 1) {
    if (!enabled) return;
    const int parity = (lane >> 2) & 1;  // = my_key0 & 1
#pragma unroll
    for (int mt = 0; mt < kRT; ++mt)
#pragma unroll
      for (int span = 0; span < kSpans; ++span) {
        const uint4 f = drop.keep_flags(query0 + span * 32 + (lane & 3) * 2 + parity, my_key0 + mt * 16);
#pragma unroll
        for (int w = 0; w < 2; ++w) {
          const uint32_t mine = Dropout::word(f, 2 * parity + w), theirs = Dropout::word(f, 2 * (parity ^ 1) + w);
          const uint32_t received = __shfl_xor_sync(0xffffffffu, theirs, 4);
          flags[mt][span][0][w] = parity ? received : mine;
          flags[mt][span][1][w] = parity ? mine : received;
        }
      }
  }

  // Element (mt, nt, e) is in 8-query group a = (nt + 2 half16) & 3 of its span: word a >> 1, byte
  // (a & 1) * 2 + (e >> 1) of residue e & 1.
  __device__ __forceinline__ uint32_t word(int mt, int nt, int res) const {
    const uint32_t(&w)[2] = flags[mt][nt / 4][res];
    return kNt >= 4 ? w[(nt >> 1) & 1] : (half16 ? w[1] : w[0]);
  }
  __device__ __forceinline__ static int byte(int nt, int e) { return (nt & 1) * 2 + (e >> 1); }

  // The mask of accumulator element (mt, nt, e).
  __device__ __forceinline__ uint32_t keep(int mt, int nt, int e) const {
    return Dropout::mask(word(mt, nt, e & 1), byte(nt, e));
  }

  // x if element (mt, nt, e) is kept, else +0.
  __device__ __forceinline__ float masked(float x, int mt, int nt, int e) const {
    return Dropout::masked(x, keep(mt, nt, e));
  }

  // P o Z on 16-bit A fragments (pa[mt][kt]: n-tiles 2 kt, 2 kt + 1), a packed pair (queries of
  // residues +0, +1) at a time.
  template <int kKT>
  __device__ __forceinline__ void apply(uint32_t (&pa)[kRT][kKT][4]) const {
#pragma unroll
    for (int mt = 0; mt < kRT; ++mt)
#pragma unroll
      for (int kt = 0; kt < kKT; ++kt)
#pragma unroll
        for (int r = 0; r < 4; ++r) {  // elements (nt, e) = (2 kt + r / 2, 2 (r & 1) + {0, 1})
          const int nt = 2 * kt + r / 2, b = byte(nt, 2 * (r & 1));
          pa[mt][kt][r] &= Dropout::mask2(word(mt, nt, 0), word(mt, nt, 1), b);
        }
  }
};

// KeyRowsMask<1, kNt> (one m-tile of 16 keys) in two registers instead of kNt: the top bits of
// its 2 kNt / 4 flag words, packed per residue. bits[res] holds, at bit 8 b + k, the flag of byte b
// of the word in slot k = 2 span + w (span: 32-query span, w: its word): a single flag is one bit
// test, and a byte's flags are consecutive bits from its bit 0, which ptxas tests 7 at a time (R2P).
// The Philox calls, their bytes and which entry each decides are KeyRowsMask's; one shuffle (the
// packed half for lane ^ 4) replaces one a word. For kernels that hold a step's mask while every
// accumulator is live (bwd_sm90.cuh's producer-warpgroup kernel: 240 registers).
template <int kNt>
struct PackedKeyRowsMask {
  static constexpr int kSpans = kNt / 4;
  static_assert(kNt % 4 == 0 && 2 * kSpans <= 8, "a slot per flag word of a residue, at most 8 in 32 bits");
  uint32_t bits[2];

  // Made elsewhere (bwd_sm90.cuh's mask warps make them for every consumer lane).
  __device__ __forceinline__ explicit PackedKeyRowsMask(uint2 made) : bits{made.x, made.y} {}
  __device__ __forceinline__ PackedKeyRowsMask(bool enabled, const Dropout& drop, int query0, int my_key0, int lane) {
    if (!enabled) return;
    uint32_t half[2] = {0u, 0u};
#pragma unroll
    for (int span = 0; span < kSpans; ++span) add_call(half, span, drop.keep_flags(call_query(query0, span, lane), my_key0));
    const uint2 made = finish(half, lane);
    bits[0] = made.x, bits[1] = made.y;
  }

  // The constructor in parts, for a caller that orders the calls itself (bwd_sm90.cuh's producer
  // warps, one call at a time in 24 registers): span's call is at (call_query, my_key0); add_call
  // packs its flags into the calls' halves e = 0, 1 (words 0, 1 and 2, 3); finish returns this
  // lane's bits (as bits[0], bits[1]).
  __device__ __forceinline__ static int call_query(int query0, int span, int lane) {
    return query0 + span * 32 + (lane & 3) * 2 + ((lane >> 2) & 1);  // the residue of this lane's parity
  }
  __device__ __forceinline__ static void add_call(uint32_t (&half)[2], int span, const uint4& f) {
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int w = 0; w < 2; ++w) half[e] |= (Dropout::word(f, 2 * e + w) & 0x80808080u) >> (7 - slot(span, w));
  }
  // Mine: the half of my parity (my keys) of my residue's calls; the other goes to lane ^ 4, whose
  // keys have the other parity and who made the other residue's calls.
  __device__ __forceinline__ static uint2 finish(const uint32_t (&half)[2], int lane) {
    const int parity = (lane >> 2) & 1;  // = my_key0 & 1
    const uint32_t mine = parity ? half[1] : half[0], theirs = parity ? half[0] : half[1];
    const uint32_t received = __shfl_xor_sync(0xffffffffu, theirs, 4);
    return make_uint2(parity ? received : mine, parity ? mine : received);
  }

  __device__ __forceinline__ static constexpr int slot(int span, int w) { return 2 * span + w; }
  // Element (nt, e) as KeyRowsMask: span nt / 4, word (nt >> 1) & 1, byte (nt & 1) * 2 + (e >> 1)
  // of residue e & 1.
  __device__ __forceinline__ static constexpr int slot(int nt) { return slot(nt / 4, (nt >> 1) & 1); }
  __device__ __forceinline__ static constexpr int byte(int nt, int e) { return (nt & 1) * 2 + (e >> 1); }

  __device__ __forceinline__ bool kept(int nt, int e) const {
    return (bits[e & 1] >> (8 * byte(nt, e) + slot(nt))) & 1u;
  }

  // P o Z in the sign bit, as FlashAttention-2's encode_dropout_in_sign_bit: acc[nt][e] (P >= 0)
  // negated where dropped. In bit order (residue, byte, slot), so ptxas tests the flags with R2P.
  __device__ __forceinline__ void sign_code(float (&acc)[kNt][4]) const {
#pragma unroll
    for (int res = 0; res < 2; ++res)
#pragma unroll
      for (int b = 0; b < 4; ++b)
#pragma unroll
        for (int k = 0; k < 2 * kSpans; ++k) {  // the element with slot(nt) = k, byte(nt, e) = b
          const int nt = 4 * (k >> 1) + 2 * (k & 1) + (b >> 1), e = 2 * (b & 1) + res;
          if (!kept(nt, e)) acc[nt][e] = -acc[nt][e];
        }
  }
};

#endif  // __CUDACC__

}  // namespace flashjit

// Forward pass for Hopper (sm_90a): warp-specialised, TMA loads into a ring of stages, wgmma.
//
// Same result as fwd_sm80.cuh (same masks, softmax, dropout mask and lse), different machine:
//   O[b, i, h, :] = sum_j softmax_j(scale * Q[b, i, h, :] . K[b, j, h_k, :]) V[b, j, h_k, :]
// q: [B, Sq, H, D], k: [B, Sk, H_k, D], v: [B, Sk, H_k, D_v], o: [B, Sq, H, D_v] (D_v <= D; usually
// D_v = D); lse: [B, H, Sq] fp32 or null. Variable-length batches as params.cuh's VarlenParams: q/o
// [total_q, H, D], k/v [total_k, H_k, D], lse [H, total_q]; each sequence computed as a dense call of
// its own lengths.
//
// Roles. One CTA owns kBlockM query rows of one (batch, head):
//   warpgroup 0            producer: one thread issues every TMA load, the rest only wait; it gives
//                          its registers to the consumers (setmaxnreg). With dropout and mask_warps
//                          (persistent kernels; Config::kMaskWarps), its warps 1-3 make each key block's
//                          mask bits (make_block_masks: a Philox call serves two consumer warps) a K
//                          stage ahead, off the consumers' softmax. Cross-tile without mask warps
//                          (Config::kStoreWarp), its warp 1's thread stores each tile's O (store_tiles).
//   warpgroups 1..kWG      consumers: 64 query rows each, O and the softmax statistics in registers.
// Persistent, a CTA per SM (two with kTwoCtas) walks a tile per round (tile_of); the rings run on across
// tiles.
// Barriers (who arrives / who waits):
//   q.full[s]              producer (expect_tx: the Q tile)      / every consumer thread, once a tile
//   q.empty[s]             every consumer thread, after its last  / the producer, before a later
//                          QK^T of the tile retired (cross-tile:     tile's Q into stage s
//                          the store warp, or with mask warps
//                          thread 0 of each consumer warpgroup,
//                          once O staged in the stage is stored)
//   o_ready(s, g)          (store warp) consumer warpgroup g's    / the store warp, before storing
//                          128 threads, once its rows of O are      those rows by TMA
//                          staged in Q stage s (or stored)
//   k.full[s], v.full[s]   producer (expect_tx: the K / V tile;   / every consumer thread
//                          k.full: with mask warps also each
//                          mask warp thread, its bits stored)
//   k.empty[s], v.empty[s] every consumer thread, once its QK^T /  / the producer, before refilling
//                          PV product has retired                    stage s (k: the mask warps too)
//   Barrier::kEpilogue+g   consumer warpgroup g's 128 threads, before its thread 0 stores O by TMA
//                          (cross-tile with mask warps: or releases the Q stage)
//   Barrier::kPingPong+g   (ping-pong) warpgroup g may issue its next matrix products (g - 1 arrives)
//   Barrier::kMaskPair+k   dropout's swap (Config::kPairSwap): the two warps of warp pair k (consumer warps
//                          2k, 2k + 1, one 32-row span), once each has left the other its half of its calls
//   Barrier::kVTail        every consumer thread, varlen only: V's rows past a sequence's keys are
//                          zeroed in the stage (zero_v_past_keys) before any PV reads it
// Schedule of consumer warpgroup g over its key blocks j (stage s = j mod kStages):
//   wait k.full[s]; S = Q_g K_j^T (wgmma, A and B from shared memory); release k.empty[s]
//   mask, online softmax in registers, P = exp(S - m)     [under the previous block's PV with overlap]
//   wait v.full[s]; O += P V_j (wgmma, P from registers, V from shared memory); release v.empty[s]
//   (without kOverlap, a block none of the warpgroup's rows see: wait k.full[s] and v.full[s], pass the
//   ping-pong token, release both: pass_over, warpgroup_sees)
//   epilogue: O / l into this warpgroup's rows of the Q tile, TMA store (persistent without cross-tile,
//   or a varlen tile ending past its sequence: straight from registers); lse from registers.
// With kOverlap the QK^T of block j+1 is issued before the softmax of block j, and PV of block j runs
// while the softmax of block j+1 computes its exponentials (FlashAttention-3's intra-warpgroup
// overlap). With kPingPong the warpgroups take turns issuing their matrix products, so one's softmax
// runs under the other's tensor-core work. With kCrossTile (persistent) that pipeline runs on across
// a CTA's tiles: a tile's first QK^T is issued with the previous tile's last PV, its first
// exponentials run under it, and the previous tile's epilogue follows (Q in two stages, so the next
// tile's Q is resident while the current one's is still read). Without it each tile starts and ends
// its pipeline: the first block's softmax and the last PV and epilogue run with none of the
// warpgroup's own products under them (with ping-pong the other warpgroups' still are). Measured on an
// H200 (docs/perf-log.md, 2026-12-04): with O stored through the Q stage, +3-5% at d128 up to 1k
// queries (the dispatcher's choice there), level or mixed beyond and at d64.
// Two cuts in the softmax, each a knob (the step's instructions a warp, bf16 non-causal: 683 at d128,
// 469 at d64 without either): kLazyRescale moves a row's max only when a block's is 2^8 above it, so
// the rescale of O (a multiply per O element, on the path from one PV's wait to the next PV's issue)
// runs only in the steps where some row of the warp moved (FlashAttention-4's conditional rescaling);
// kMmaSums has the tensor cores sum P's rows: each PV k-step's P fragment times a block of ones in
// shared memory (wgmma N = 8) into an extra n-tile of O, which the rescale covers with O, instead of
// an add an element (the sums are then of the rounded P that PV multiplies).
// With one CTA a tile and without kLazyRescale, O's rescale is applied a step late, between the next
// QK^T and its PV (FlashAttention-3's order), so that its multiplies run under that QK^T rather than
// between the PV's wait and the exponentials (kLateRescale in the consumer).
// With kTwoCtas two CTAs share an SM (half the registers and shared memory each; d64, 64-key blocks,
// no overlap): the other CTA's warpgroups run under a warpgroup's softmax instead of its own next QK^T.
#pragma once
#include <algorithm>
#include <type_traits>
#include "fwd_sm80.cuh"
#include "common/fast_div.cuh"
#include "common/grid_order.cuh"
#include "common/wgmma.cuh"
#include "common/sm90/mbarrier.cuh"
#include "common/sm90/tma.cuh"
#include "common/sm90/warpgroup.cuh"

namespace flashjit::fwd_sm90 {

using namespace flashjit::sm90;

// Named barrier ids (0 is __syncthreads).
enum class Barrier : int { kEpilogue = 1, kPingPong = 5, kVTail = 8, kMaskPair = 9 };

// Whether a CTA of `bytes` of shared memory fits: 227 KiB a CTA, and `ctas` of them (with the 1 KiB the hardware
// reserves for each) in an SM's 228 (FwdSm90Config.smem_bytes mirrors it).
constexpr bool fits_smem(int bytes, int ctas) { return bytes <= 227 * 1024 && ctas * (bytes + 1024) <= 228 * 1024; }

// One template parameter per FwdSm90Config field (flashjit/configs/fwd_sm90.py), in the same order; every
// static_assert message is one of its WHY_* reasons, verbatim.
template <bool kBf16_, int kDHead_, int kBlockM_, int kBlockN_, int kStages_, bool kOverlap_, bool kPingPong_,
          bool kPersistent_, bool kCausal_, bool kLocal_, bool kSoftcap_, bool kAlibi_, bool kDropout_, bool kSink_,
          int kDHeadV_, bool kCrossTile_, bool kHalfBlocks_, bool kLazyRescale_, bool kMmaSums_, bool kTwoCtas_,
          bool kMaskWarps_>
struct Config {
  static constexpr bool kBf16 = kBf16_, kOverlap = kOverlap_, kPingPong = kPingPong_, kCausal = kCausal_;
  static constexpr bool kPersistent = kPersistent_, kCrossTile = kCrossTile_;
  // Q buffers: the next tile's Q loads while the current one's is still read (cross-tile) or after.
  static constexpr int kQStages = kCrossTile_ ? 2 : 1;
  static constexpr bool kDropout = kDropout_, kSink = kSink_;
  static constexpr bool kLazyRescale = kLazyRescale_, kMmaSums = kMmaSums_;
  using Mod = ScoreMod<kCausal_, kLocal_, kSoftcap_, kAlibi_>;
  // kD: the tile width, whole 64-column swizzle blocks (TMA boxes); kDMma: the QK^T k extent.
  static constexpr int kDHead = kDHead_, kD = (kDHead_ + 63) / 64 * 64, kDMma = (kDHead_ + 15) / 16 * 16;
  // The value head dim (of V and O; kDHeadV_ == 0: kDHead) and its tile, PV's N.
  static constexpr int kDHeadV = kDHeadV_ == 0 ? kDHead_ : kDHeadV_, kDV = (kDHeadV + 63) / 64 * 64;
  // O's n-tiles in registers: kDV / 8, and with kMmaSums one more, the row sums (all 8 columns alike).
  static constexpr int kNtO = kDV / 8 + (kMmaSums_ ? 1 : 0);
  static constexpr int kBlockM = kBlockM_, kBlockN = kBlockN_, kStages = kStages_;
  static constexpr int kConsumers = kBlockM / 64, kThreads = 128 * (kConsumers + 1);
  // kTwoCtas: two CTAs an SM, four consumer warpgroups hiding each other's latency in place of the
  // intra-warpgroup overlap. Launch bounds of two blocks leave 80 registers a thread at launch (30720
  // a CTA), of which the consumers can claim 104 (with the overlap's second S that spilled: C7512).
  static constexpr int kCtasPerSm = kTwoCtas_ ? 2 : 1;
  // The register file (64 K, per CTA) split: 24 or 32 for the producer, the rest for the consumers.
  static constexpr int kProducerRegs = kConsumers == 2 ? 24 : 32;
  static constexpr int kConsumerRegs = kTwoCtas_ ? 104 : kConsumers == 2 ? 240 : 160;
  using TileQ = GmmaTile<kBlockM, kD>;
  using TileKV = GmmaTile<kBlockN, kD>;  // a K stage
  using TileV = GmmaTile<kBlockN, kDV>;  // a V stage
  // Cross-tile, a tile's O goes out through its Q stage: the consumers stage it and a store warp (the
  // producer warpgroup's warp 1, idle otherwise) stores it by TMA, waits until the copy has read the stage and
  // releases it, so that none of it sits between a warpgroup's tile start and its next products (clock64
  // stamps: ~800 cycles a warpgroup at d128's tile transitions, docs/perf-log.md, forty-eighth session). Not
  // with mask warps (warps 1-3 make dropout's masks): there warpgroup thread 0 stores, as one CTA a tile does.
  static constexpr bool kStoreWarp = kCrossTile_ && !kMaskWarps_;
  // 1 KiB of slack (the swizzle needs 1024-byte aligned tiles), the Q and K/V rings, kMmaSums' ones (a
  // swizzle atom, so the sums read it with K's descriptor), the barriers (the store warp's o_ready: a Q
  // stage and consumer warpgroup each).
  static constexpr int kBarrierBytes = 8 * (2 * kQStages + 4 * kStages + (kStoreWarp ? kQStages * kConsumers : 0));
  static constexpr int kOnesBytes = kMmaSums_ ? 1024 : 0;
  // Dropout's masks with kMaskWarps_, made by the producer warpgroup's mask warps (make_block_masks) a key
  // block at a time: per block and consumer thread a bit an entry of its two rows, 8 a 16-key chunk, in
  // kMaskWords words.
  // Twice as many slots as K stages (block n's: n mod 2 kStages, Smem::mask_slot), each filled under the K
  // ring's barriers: a consumer reads block n's bits after releasing its K stage, yet before it releases
  // block n + 1's, which the mask warps' write of block n + 2 kStages waits for.
  // Only in persistent kernels, whose mask warps run ahead across a CTA's tiles: with one CTA a tile each
  // tile's first K stage waits for its block's masks (11 calls a lane at d64's 128 x 128), a bubble every
  // tile. Where they pay over the consumers' pair swap (below) is the dispatcher's call (short causal rows:
  // flashjit/dispatch.py). Elsewhere the consumers make their own masks (kPairSwap, else where its buffers
  // do not fit beside the tiles, d256's 80-key blocks, as the sm_80 family does: fwd::apply_dropout, half of
  // each call unused).
  static constexpr int kMaskWords = (kBlockN / 16 + 3) / 4;
  static constexpr int kTileBytes =
      1024 + kQStages * TileQ::kBytes + kStages * (TileKV::kBytes + TileV::kBytes) + kOnesBytes + kBarrierBytes;
  static constexpr int kSlotBytes = 2 * kStages * 128 * kConsumers * kMaskWords * 4;
  static constexpr int kMaskWarps = kMaskWarps_ ? 3 : 0;
  static constexpr int kMaskBytes = kMaskWarps ? kSlotBytes : 0;  // (the mask warps: producer warps 1..3)
  // Dropout without mask warps: a Philox call covers a 32-row span, two consumer warps' rows (fwd::apply_dropout
  // uses half of each). The two warps of a span split its calls and swap the halves through shared memory
  // (swap_dropout_halves): per warp pair, two buffers (blocks alternate) of a uint2 a lane and 16-key chunk;
  // where that fits beside the tiles (else each warp makes every call, as the sm_80 family).
  static constexpr int kPairBytes = 2 * (2 * kConsumers) * (kBlockN / 16) * 32 * 8;
  static constexpr bool kPairSwap = kDropout_ && !kMaskWarps && fits_smem(kTileBytes + kPairBytes, kCtasPerSm);
  static_assert(!kPairSwap || int(Barrier::kMaskPair) + 2 * kConsumers <= 16, "a named barrier a warp pair: ids < 16");
  static constexpr int kSmemBytes = kTileBytes + kMaskBytes + (kPairSwap ? kPairBytes : 0);

  // The element-wise passes of fwd_sm80.cuh, seen from one consumer warp: 16 rows (one m-tile) of
  // kN keys (a block, or its first half).
  template <int kN>
  struct WarpOf {
    static constexpr int kM = 1, kNtC = kN / 8, kKtC = kN / 16, kNtD = kNtO;  // (O's rescale: the sums too)
    static constexpr bool kOptSoftmax = true, kBf16 = kBf16_;
    using Mod = Config::Mod;
  };
  using Warp = WarpOf<kBlockN>;
  // kHalfBlocks: a key block of which a consumer warpgroup's 64 rows see only the first half (the
  // causal diagonal for every other warpgroup of a tile, a window's right edge, a sequence's short
  // last block) runs QK^T and the softmax at half width for that warpgroup, and so does the tile's
  // last PV: the other half is masked, so this skips products of zeros and changes no bit of the
  // result. wgmma_ss is written out for the halves of 128 and 192.
  static constexpr bool kHalfBlocks = kHalfBlocks_;
  static constexpr int kHalfN = kBlockN / 2;

  static_assert(kDHead % 8 == 0 && kDHead >= 8 && kDHead <= 256, "d_head must be a multiple of 8 from 8 to 256");
  static_assert(kDHeadV_ == 0 || (kDHeadV_ % 8 == 0 && kDHeadV_ >= 8 && kDHeadV_ <= kDHead_),
                "d_v must be 0 (the same as d_head) or a multiple of 8 from 8 to d_head");
  static_assert(kBlockM == 128 || kBlockM == 192, "block_m must be 128 or 192 (two or three consumer warpgroups)");
  // Any multiple of 16 up to 256 would do for the kernel (QK^T's N, a multiple of 8; PV's k-steps of
  // 16; whole 8-row swizzle atoms, so every stage stays 1024-byte aligned; a TMA box of <= 256 rows);
  // these are the ones measured. 176 and 80 are FlashAttention-3's d128 and d256 tiles: with two
  // stages they fill 209 and 225 KiB of the 227.
  static_assert(kBlockN == 64 || kBlockN == 80 || kBlockN == 96 || kBlockN == 128 || kBlockN == 176 ||
                    kBlockN == 192,
                "block_n must be 64, 80, 96, 128, 176 or 192");
  static_assert(kStages >= 2 && kStages <= 4, "stages must be 2, 3 or 4");
  static_assert(!kPingPong || kOverlap, "ping-pong passes a token around the consumer warpgroups and needs the overlap");
  // Named barrier ids stay disjoint: kEpilogue + g (1..3), kPingPong + g (5..7), kVTail (8), and dropout's swap
  // kMaskPair + pair (9..14, asserted with kPairSwap above).
  static_assert(1 + kConsumers <= 5 && 5 + kConsumers <= 8, "block_m must be 128 or 192 (two or three consumer warpgroups)");
  static_assert(!kCrossTile || (kPersistent && kOverlap),
                "cross_tile runs one CTA's tiles as one pipeline: it needs persistent and the overlap");
  static_assert(!kHalfBlocks || (kOverlap && (kBlockN == 128 || kBlockN == 192)),
                "half_blocks runs a block's first half at wgmma width block_n / 2: it needs the overlap and block_n 128 or 192");
  static_assert(!kMmaSums || !kDropout,
                "mma_sums sums the P that PV multiplies: not with dropout, whose dropped entries still count in the sums");
  // Per consumer thread: O (kDV / 2 fp32), S (kBlockN / 2 fp32) and P (kBlockN / 4 packed pairs).
  // Each score feature keeps a few more values live (window bounds, slopes, the Philox state): 8 each,
  // measured as spills of the 160-register block_m 192 tile with any of them. (kMmaSums' n-tile of sums
  // takes the place of l and the running sums, no longer live in the loop: that tile fits with it.)
  static constexpr int kRegEstimate =
      kDV / 2 + kBlockN / 2 + kBlockN / 4 + 32 + 8 * (int(kLocal_) + int(kSoftcap_) + int(kAlibi_) + int(kDropout_));
  static_assert(kTwoCtas_ || kRegEstimate <= kConsumerRegs, "O, S and P of this config do not fit the consumers' registers");
  static_assert(!kTwoCtas_ || (kConsumers == 2 && !kOverlap_ && kD == 64 && kDV == 64 && kBlockN == 64),
                "two_ctas gives a consumer thread 104 registers (two CTAs an SM): it needs block_m 128, no overlap, d_head <= 64 and block_n 64");
  static_assert(!kMaskWarps_ || (kDropout_ && kPersistent_ && fits_smem(kTileBytes + kSlotBytes, kCtasPerSm)),
                "mask_warps has the producer's idle warps make dropout's masks across a CTA's tiles: it needs dropout, persistent and room for the masks' slots beside the tiles");
  static_assert(kSmemBytes <= 227 * 1024, "Q and the K/V stages of this config need more than 227 KiB of shared memory");
  // What the rules above guarantee for kTwoCtas, kept true by whoever changes them: setmaxnreg stays inside
  // the pool the launch bound gives a CTA (else .inc waits forever), and two CTAs' tiles (and the 1 KiB
  // the hardware reserves for each) fit an SM's 228 KiB (else only one runs there).
  static_assert(128 * kProducerRegs + 128 * kConsumers * kConsumerRegs <=
                    kThreads * ((65536 / (kCtasPerSm * kThreads)) & ~7),
                "the warpgroups' setmaxnreg counts exceed the registers the launch bound gives a CTA");
  static_assert(kCtasPerSm * (kSmemBytes + 1024) <= 228 * 1024, "kCtasPerSm CTAs' shared memory exceeds an SM's");
};

// The kernel's parameters: the plain ones, a TMA map per tensor and the divisors of a tile's decode (its
// query blocks a (batch, head) row, the heads, the query heads a KV head: common/fast_div.cuh), all made by
// launch().
struct Args {
  FwdParams p;
  CUtensorMap q, k, v, o;
  FastDiv by_m, by_heads, by_group;
};

#ifdef __CUDACC__  // device code (the launcher's host-only build skips it: common/launch.cuh)
// ---- consumer steps ------------------------------------------------------------------------------
// The first kNt n-tiles of a fragment array (a half block's scores or P), as an array of their own.
template <int kNt, class T, int kM, int kAll>
__device__ __forceinline__ auto& leading(T (&a)[kM][kAll][4]) {
  static_assert(kNt <= kAll, "a view of the leading n-tiles");
  return *reinterpret_cast<T(*)[kM][kNt][4]>(&a);
}

// S = Q_g K^T for the block's first kN keys (the K stage's first kN rows), over the real head dim's
// 16-wide k-steps; asynchronous (commit only).
template <class C, int kN = C::kBlockN>
__device__ __forceinline__ void issue_qk(float (&s)[1][C::kBlockN / 8][4], uint64_t q_desc, uint64_t k_desc) {
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < C::kDMma / 16; ++ks)
    wgmma_ss<kN, C::kBf16, 0, 0>(leading<kN / 8>(s)[0], gmma_desc_add(q_desc, kmajor_step<C::kBlockM>(ks)),
                                 gmma_desc_add(k_desc, kmajor_step<C::kBlockN>(ks)), ks > 0);
  wgmma_commit();
}

// O += P V over the block's keys, or its first half's (kHalf: P's second half is zero), and with
// kMmaSums the row sums (O's last n-tile) += P times ones (ones_desc: K-major, any k-step reads ones);
// asynchronous (commit only). A compile-time width: a wgmma left out at run time makes ptxas close
// the group with a dummy one and split the products with fences.
template <class C, bool kHalf = false>
__device__ __forceinline__ void issue_pv(float (&o)[C::kNtO][4], const uint32_t (&pf)[1][C::kBlockN / 16][4],
                                         uint64_t v_desc, uint64_t ones_desc) {
  auto& o_v = *reinterpret_cast<float(*)[C::kDV / 8][4]>(&o);  // O proper, and the sums' n-tile
  auto& sums = *reinterpret_cast<float(*)[1][4]>(&o[C::kDV / 8]);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < (kHalf ? C::kHalfN : C::kBlockN) / 16; ++ks) {
    wgmma_rs<C::kDV, C::kBf16, 1>(o_v, pf[0][ks], gmma_desc_add(v_desc, mnmajor_step(ks)), true);
    if constexpr (C::kMmaSums) wgmma_rs<8, C::kBf16, 0>(sums, pf[0][ks], ones_desc, true);
  }
  wgmma_commit();
}
// The pending P's PV at its width (pv_half).
template <class C>
__device__ __forceinline__ void issue_pending_pv(float (&o)[C::kNtO][4], const uint32_t (&pf)[1][C::kBlockN / 16][4],
                                                 uint64_t v_desc, uint64_t ones_desc, bool half) {
  if (C::kHalfBlocks && half) issue_pv<C, C::kHalfBlocks>(o, pf, v_desc, ones_desc);
  else issue_pv<C>(o, pf, v_desc, ones_desc);
}
// O (and the sums) times each row's alpha; with kLazyRescale only where some row of the warp moved
// its max (moved: softmax_rows' answer for this thread's rows; always true without).
template <class C>
__device__ __forceinline__ void rescale(float (&o)[1][C::kNtO][4], const float (&alpha)[1][2], bool moved) {
  if (!C::kLazyRescale || __any_sync(0xffffffffu, moved)) fwd::rescale_o<typename C::Warp>(o, alpha);
}

// Score modifiers and masks of block j for this warp's 16 rows (row0: global index of its first).
// kMask: the block has keys some row of the tile cannot see (a compile-time choice, so the
// overlapped step has no branch between its two wgmma waits: ptxas otherwise hoists the second
// wait above the exponentials it is meant to overlap).
template <class C, bool kMask, int kN = C::kBlockN>
__device__ __forceinline__ void mask_scores(float (&s)[1][C::kBlockN / 8][4], const typename C::Mod& mod, int row0,
                                            int j, int lane) {
  if constexpr (kMask || C::Mod::kTransforms)
    fwd::apply_score_mod<typename C::template WarpOf<kN>>(leading<kN / 8>(s), mod, row0, j * C::kBlockN, kMask,
                                                          lane);
}
// Whether block j needs the per-element mask for any row of the tile (uniform across the CTA).
template <class C>
__device__ __forceinline__ bool block_masked(const typename C::Mod& mod, int q_row0, int j) {
  return mod.block_needs_mask(q_row0, C::kBlockM, j * C::kBlockN, C::kBlockN);
}
// Whether consumer warpgroup g's rows (q_row0 + 64 g ..., 64 of them) see no key in the second half of
// block j: past the sequence's keys, or right of the causal diagonal or the window (uniform across
// the warpgroup).
template <class C>
__device__ __forceinline__ bool half_block(const typename C::Mod& mod, int q_row0, int g, int j) {
  int end = mod.seqlen_k;  // one past the last key any of the rows sees
  if (C::kCausal || (C::Mod::kLocal && mod.right >= 0)) end = min(end, q_row0 + g * 64 + 64 + mod.diag + mod.right);
  return end - j * C::kBlockN <= C::kHalfN;
}

// Whether block j lies wholly right of what consumer warpgroup g's rows (q_row0 + 64 g ..., 64 of them) see: the
// causal diagonal or a window's right edge (uniform across the warpgroup). With 64-key blocks a causal tile's last
// block does for its first warpgroup; on a 192-row tile of 128-key blocks for warpgroups 0 and 1 of every other tile.
// Its edge and half_block's stay two expressions: one helper for both (either form, `+ 64` or `+ 63`) tips ptxas
// into serializing d72's causal dropout cross-tile kernel's wgmmas (C7511), which compiles clean as written.
template <class C>
__device__ __forceinline__ bool warpgroup_past(const typename C::Mod& mod, int q_row0, int g, int j) {
  return (C::kCausal || (C::Mod::kLocal && mod.right >= 0)) &&
         j * C::kBlockN > q_row0 + g * 64 + 63 + mod.diag + mod.right;
}
// Whether some row of consumer warpgroup g sees a key of block j (Tile's block range for its rows alone).
template <class C>
__device__ __forceinline__ bool warpgroup_sees(const typename C::Mod& mod, int q_row0, int g, int j) {
  return !warpgroup_past<C>(mod, q_row0, g, j) &&
         !(C::Mod::kLocal && mod.left >= 0 && (j + 1) * C::kBlockN <= q_row0 + g * 64 + mod.diag - mod.left);
}

// Varlen: the box of a sequence's last, partial key block runs past its keys into the next
// sequence's rows (or rows in no sequence), which no map can clip. Their scores are masked, so P is 0
// there, but 0 * NaN is NaN: V's rows past the keys are zeroed before PV reads them. The consumers
// split the rows, make the zeros visible to the tensor cores and wait for each other (each reads the
// whole stage). ct: the thread's index among the consumers. Uniform across the CTA (the tile's keys).
template <class C>
__device__ __forceinline__ void zero_v_past_keys(const FwdParams& p, elem_t* v_stage, const typename C::Mod& mod,
                                                 int j, int ct) {
  const int keys = mod.seqlen_k - j * C::kBlockN;  // of block j, in the sequence
  if (!is_varlen(p) || keys >= C::kBlockN) return;  // dense: the map zero-fills past Sk
  constexpr int kChunks = C::kDV / 8;  // 16-byte chunks a row
  for (int i = keys * kChunks + ct; i < C::kBlockN * kChunks; i += C::kConsumers * 128)
    *reinterpret_cast<uint4*>(v_stage + C::TileV::offset(i / kChunks, i % kChunks)) = make_uint4(0, 0, 0, 0);
  fence_proxy_async();
  named_sync(int(Barrier::kVTail), C::kConsumers * 128);
}

// The online softmax of a lazy-rescaling step with P computed before the block's max is known, in two
// parts around the PV's wait (fwd::softmax_rows and rescale's roles). Lazy rescaling keeps a row's max m
// unless the block's is 2^8 above it, so the exponentials need not wait for the max's shuffles: exps()
// takes m as each row's reference, or this thread's own part of the block's max where that is 2^8 above
// m (P <= 2^8 either way, never inf), and computes P before the quad has agreed, under the PV (ptxas
// then keeps 37 of d128's 64 exponentials above the PV's wait; behind the shuffles it kept none there:
// scripts/sass_steps.py counts them). settle(), after the wait:
// where some row of the warp moves its max (rare), P, its sums and O are brought to the row's new max;
// elsewhere the result is fwd::softmax_rows' bit for bit.
struct KeptSoftmax {
  float ref[2], sum[2], mx[2];  // a row's P reference (exp2 units), P's sum, the quad's max

  // This thread's part of a row's max, as a tree (depth log2 kNt, not kNt: the exponentials wait on it).
  template <int kNt>
  __device__ __forceinline__ static float thread_max(const float (&s)[1][kNt][4], int half) {
    float v[kNt];
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt) v[nt] = fmaxf(s[0][nt][2 * half], s[0][nt][2 * half + 1]);
#pragma unroll
    for (int w = 1; w < kNt; w *= 2)
#pragma unroll
      for (int i = 0; i + w < kNt; i += 2 * w) v[i] = fmaxf(v[i], v[i + w]);
    return v[0];
  }
  template <int kNt>
  __device__ __forceinline__ void exps(float (&s)[1][kNt][4], const float (&m)[1][2], float scale_log2) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float t = thread_max(s, half);
      // (written out: the same choice through small helper functions, shared with settle(), made ptxas
      // keep 14 of d128's exponentials above the PV's wait instead of 37)
      ref[half] = (t - m[0][half]) * scale_log2 > fwd::kLazyRescaleLog2 ? t * scale_log2
                  : m[0][half] == -INFINITY                              ? 0.f
                                                                         : m[0][half] * scale_log2;
      exps_from(s, half, scale_log2);
      mx[half] = fmaxf(m[0][half], t);
      mx[half] = fmaxf(mx[half], __shfl_xor_sync(0xffffffffu, mx[half], 1));
      mx[half] = fmaxf(mx[half], __shfl_xor_sync(0xffffffffu, mx[half], 2));
    }
  }
  // P against the kept max alone, with no row max at all (kNoMaxExps): where every row has a finite max after its
  // tile's first block or sees no key at all (no window), the reference m, or 0 for a row without keys (whose
  // scores are all -inf: P = 0). Whether some P went above 2^8 (the max moved) is read off P's sums after the
  // PV's wait (settle_kept), the rare case then settled from P itself. Not covered: a row that sees keys whose
  // first block's scores are all -inf (a q.k past fp32's range) keeps reference 0, where the kept-max step took its
  // own max. Sending it to the scores-again path (a reference of -FLT_MAX, or a NaN one caught by the sums' test)
  // made ptxas serialize d96's causal half-block kernel (C7511), so it is left for such inputs.
  template <int kNt>
  __device__ __forceinline__ void exps_kept(float (&s)[1][kNt][4], const float (&m)[1][2], float scale_log2) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      ref[half] = m[0][half] == -INFINITY ? 0.f : m[0][half] * scale_log2;
      exps_from(s, half, scale_log2);
    }
  }
  // exps_kept's settle, after the PV's wait. A P above 2^8 (the lazy rescale's threshold) makes its thread's sum
  // of the row exceed 2^8, so a warp whose sums all stay below has no row that moves: l += the sums. Otherwise
  // (rare: a row's max rose more than 2^8 over its running one) each row's max P over the quad gives the move:
  // the new reference ref + log2(max P), P and the sums times 2^(ref - new), O rescaled. Past 2^64 that is not
  // safe (P near fp32's overflow, a thread's sum of 32 of them past it, 2^(ref - new) near the denormals, which
  // ex2 flushes: on the GPU, rows with P ~2^127 ended with l = inf or 0), and a P may have overflowed (its score
  // lost): recompute() makes the scores again (masked) and exps() / settle() take them as the kept-max step does.
  template <class C, int kNt, class Recompute>
  __device__ __forceinline__ void settle_kept(float (&s)[1][kNt][4], float (&m)[1][2], float (&l)[1][2],
                                             float (&o)[1][C::kNtO][4], float scale_log2, Recompute&& recompute) {
    constexpr float kMoved = float(1 << int(fwd::kLazyRescaleLog2));  // 2^8
    constexpr float kFromP = 18446744073709551616.f;                    // 2^64: moves settled from P up to here
    float alpha[1][2] = {{1.f, 1.f}};
    if (__any_sync(0xffffffffu, sum[0] > kMoved || sum[1] > kMoved)) {
      float top[2];  // the row's largest P over the quad
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        top[half] = thread_max(s, half);
        top[half] = fmaxf(top[half], __shfl_xor_sync(0xffffffffu, top[half], 1));
        top[half] = fmaxf(top[half], __shfl_xor_sync(0xffffffffu, top[half], 2));
      }
      if (__any_sync(0xffffffffu, !(top[0] <= kFromP && top[1] <= kFromP))) {  // (NaN too): scores needed
        recompute();
        exps(s, m, scale_log2);
        settle<C>(s, m, l, o, scale_log2);
        return;
      }
#pragma unroll
      for (int half = 0; half < 2; ++half)
        if (top[half] > kMoved) {  // (a row without keys has P = 0: never here)
          const float target = ref[half] + __log2f(top[half]), beta = fast_exp2(ref[half] - target);
          alpha[0][half] = beta;  // = 2^(m - target) in exp2 units: ref is m
          m[0][half] = __fdividef(target, scale_log2);
          rebase(s, half, beta);
        }
      fwd::rescale_o<typename C::Warp>(o, alpha);
    }
    add_sums(l, alpha);
  }
  template <class C, int kNt>
  __device__ __forceinline__ void settle(float (&s)[1][kNt][4], float (&m)[1][2], float (&l)[1][2],
                                        float (&o)[1][C::kNtO][4], float scale_log2) {
    float alpha[1][2] = {{1.f, 1.f}};
    const bool up0 = (mx[0] - m[0][0]) * scale_log2 > fwd::kLazyRescaleLog2;
    const bool up1 = (mx[1] - m[0][1]) * scale_log2 > fwd::kLazyRescaleLog2;
    if (__any_sync(0xffffffffu, up0 || up1)) {  // some row of the warp moves its max
      const bool up[2] = {up0, up1};
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float kept = m[0][half] == -INFINITY ? 0.f : m[0][half] * scale_log2;
        const float target = up[half] ? mx[half] * scale_log2 : kept;
        // (a thread's reference exceeds the target only where its P is all 0: a row that had seen no
        // key, and sees none in this thread's columns; there 2^(ref - target) could be inf)
        const float beta = ref[half] == target ? 1.f : fast_exp2(fminf(ref[half] - target, 0.f));
        if (up[half]) alpha[0][half] = fast_exp2(m[0][half] * scale_log2 - target), m[0][half] = mx[half];
        rebase(s, half, beta);
      }
      fwd::rescale_o<typename C::Warp>(o, alpha);
    }
    add_sums(l, alpha);
  }
  // A row half's P against ref[half], and its sum.
  template <int kNt>
  __device__ __forceinline__ void exps_from(float (&s)[1][kNt][4], int half, float scale_log2) {
    sum[half] = 0.f;
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
      for (int e = 2 * half; e < 2 * half + 2; ++e) {
        s[0][nt][e] = fast_exp2(fmaf(s[0][nt][e], scale_log2, -ref[half]));
        sum[half] += s[0][nt][e];
      }
  }
  // A row half's P and sum times beta (P brought to a new reference).
  template <int kNt>
  __device__ __forceinline__ void rebase(float (&s)[1][kNt][4], int half, float beta) {
    sum[half] *= beta;
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt) s[0][nt][2 * half] *= beta, s[0][nt][2 * half + 1] *= beta;
  }
  // The rows' sums after the step: the running ones at the step's alpha, plus P's.
  __device__ __forceinline__ void add_sums(float (&l)[1][2], const float (&alpha)[1][2]) const {
#pragma unroll
    for (int half = 0; half < 2; ++half) l[0][half] = l[0][half] * alpha[0][half] + sum[half];
  }
};

// A consumer thread's dropout bits of one key block, as the mask warps made them (make_block_masks): bit
// 8 (c % 4) + 4 (e & 1) + 2 (e >> 1) + (nt & 1) of word c / 4 keeps element (nt, e) of 16-key chunk
// c = nt / 2 (the entry fwd::apply_dropout keeps). Read from the block's mask slot (Config::kMaskBytes)
// right where P is made, by volatile loads: ptxas hoisted plain ones to the K stage's wait, and the two
// or three registers held across the step serialized the wgmmas of d64's causal half-block kernel
// (C7511). Nothing without mask warps.
template <class C>
struct BlockMask {
  uint32_t w[C::kMaskWarps ? C::kMaskWords : 1];
  template <bool kVolatile = true>
  __device__ __forceinline__ BlockMask(const uint32_t* slot, int ct, std::bool_constant<kVolatile> = {}) {
    if constexpr (C::kMaskWarps)
#pragma unroll
      for (int i = 0; i < C::kMaskWords; ++i)
        if constexpr (kVolatile)
          asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(w[i]) : "r"(smem_addr(slot + i * 128 * C::kConsumers + ct)));
        else
          w[i] = slot[i * 128 * C::kConsumers + ct];
  }
  __device__ __forceinline__ bool kept(int nt, int e) const {
    return (w[nt / 8] >> (8 * ((nt / 2) % 4) + 4 * (e & 1) + 2 * (e >> 1) + (nt & 1))) & 1u;
  }
};

// Dropout without mask warps (C::kPairSwap): this warp's 16 rows (from row0, 16-aligned) are half h = (row0 / 16)
// % 2 of a 32-row span, whose other half is the next or previous warp's (warps 2k and 2k + 1 of the consumer
// warpgroup). A Philox call covers both halves of a 16-key chunk (fwd::apply_dropout: words h and 2 + h are
// this half's). The warp makes the calls of the chunks c with c % 2 == h, keeps its own two words and leaves the
// other half's in `slot` for its partner; past the pair's named barrier (64 threads) it reads the words of the
// chunks the partner made. Half the calls a warp, and the same mask (bit for bit).
template <class C, int kN>
__device__ __forceinline__ void swap_dropout_halves(float (&s)[1][C::kBlockN / 8][4], const Dropout& drop, int row0,
                                                    int col0, uint2* slot, int pair, int lane) {
  constexpr int kChunks = kN / 16, kMine = (kChunks + 1) / 2;
  const int h = (row0 >> 4) & 1;
  uint2 mine[kMine], theirs[kMine];
#pragma unroll
  for (int i = 0; i < kMine; ++i) {
    const int c = 2 * i + h;
    if (c < kChunks) {
      const uint4 f = drop.keep_flags(row0 + (lane >> 2), col0 + c * 16 + (lane & 3) * 2);
      mine[i] = make_uint2(Dropout::word(f, h), Dropout::word(f, 2 + h));
      slot[c * 32 + lane] = make_uint2(Dropout::word(f, 1 - h), Dropout::word(f, 3 - h));
    }
  }
  named_sync(int(Barrier::kMaskPair) + pair, 64);
#pragma unroll
  for (int i = 0; i < kMine; ++i) {
    const int c = 2 * i + 1 - h;
    if (c < kChunks) theirs[i] = slot[c * 32 + lane];
  }
#pragma unroll
  for (int nt = 0; nt < kN / 8; ++nt) {
    const int c = nt / 2;  // chunk c is this warp's own iff c % 2 == h
    const uint2 w = (c & 1) == h ? mine[c / 2] : theirs[c / 2];
#pragma unroll
    for (int e = 0; e < 4; ++e)  // as Dropout::query_rows_mask: word (e & 1) * 2 + h, byte (e >> 1) * 2 + (nt & 1)
      s[0][nt][e] = Dropout::masked(s[0][nt][e], Dropout::mask(e & 1 ? w.y : w.x, (e >> 1) * 2 + (nt & 1)));
  }
}

// Softmax'd (and dropped-out) S as the A fragments of PV: dropout by the mask warps' bits (keep), or without
// mask warps by this warp's Philox calls (block j of (b, h) = bh, the warp's rows from row0), half of them
// swapped with the other warp of its span (warp pair `pair`, its buffer pair_slot) where kPairSwap.
template <class C, int kN = C::kBlockN>
__device__ __forceinline__ void scores_to_p(float (&s)[1][C::kBlockN / 8][4], uint32_t (&pf)[1][C::kBlockN / 16][4],
                                            const BlockMask<C>& keep, uint2* pair_slot, int pair, const FwdParams& p,
                                            int bh, int row0, int j, int lane) {
  if constexpr (C::kMaskWarps) {
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[0][nt][e] = keep.kept(nt, e) ? s[0][nt][e] : 0.f;
  } else if constexpr (C::kPairSwap) {
    swap_dropout_halves<C, kN>(s, Dropout(p.mods, bh), row0, j * C::kBlockN, pair_slot, pair, lane);
  } else if constexpr (C::kDropout) {
    fwd::apply_dropout<typename C::template WarpOf<kN>>(leading<kN / 8>(s), Dropout(p.mods, bh), row0, j * C::kBlockN,
                                                        lane);
  }
  acc_to_a<C::kBf16>(leading<kN / 8>(s), leading<kN / 16>(pf));
  // A half block's second half is zero, so a full-width PV of it adds nothing (the main loop issues
  // every PV at full width: a fourth compiled step made ptxas serialize the wgmmas, C7511).
#pragma unroll
  for (int kt = kN / 16; kt < C::kBlockN / 16; ++kt) pf[0][kt][0] = pf[0][kt][1] = pf[0][kt][2] = pf[0][kt][3] = 0u;
}

// One tile of work: kBlockM query rows of one (batch, head) and the key blocks [j_begin, j_end) any
// of its rows can see (as fwd_sm80.cuh). Tiles are numbered m-block fastest (neighbouring CTAs share
// K/V in L2), then head, then batch; with a causal mask the longest rows come first. A variable-length
// batch numbers tiles by its longest sequence: a tile past its own sequence's end is skipped (by the
// producer and the consumers alike, so the rings and the Q phase stay in step).
template <class C>
struct Tile {
  int bh, b, h, h_k, q_row0, q_rows, j_begin, j_end;
  // The TMA coordinates: the row of query q_row0 and of key 0, and the batch entry. Dense: q_row0, 0,
  // b. Varlen (the maps see [total, H, D] as one batch entry): the sequence's rows in the packed tensors.
  int q_first, k_first, tma_b;
  typename C::Mod mod;

  // (b, h) and the query block of a tile: its row of the grid and the block in it, the longest (the last
  // query block) first with causal; one CTA a causal tile takes common/grid_order.cuh's order, whose
  // tail runs block-outermost. The persistent walk keeps plain rows (a causal walk's lists number its
  // tiles so too: dispatch.causal_walk).
  __device__ __forceinline__ static GridPos position(const Args& a, int tile) {
    if (C::kCausal && !C::kPersistent) return longest_first(tile, a.p.batch * a.p.heads, int(a.by_m.divisor));
    const int row = a.by_m.div(tile);
    return {row, a.by_m.mod(tile, row)};
  }

  __device__ __forceinline__ Tile(const Args& a, int tile) : Tile(a, position(a, tile)) {}

  __device__ __forceinline__ Tile(const Args& a, GridPos at) : Tile(a, at, a.by_heads.div(at.row)) {}

  __device__ __forceinline__ Tile(const Args& a, GridPos at, int batch) : Tile(a, at, batch, Seq(a.p, batch)) {}

  __device__ __forceinline__ Tile(const Args& a, GridPos at, int batch, const Seq& seq)
      : bh(at.row), b(batch), h(a.by_heads.mod(at.row, batch)), h_k(a.by_group.div(h)),
        mod(a.p.mods, seq.len_q, seq.len_k, a.p.softmax_scale, b, h) {
    const FwdParams& p = a.p;
    const int m_block = C::kCausal ? int(a.by_m.divisor) - 1 - at.block : at.block;
    q_row0 = m_block * C::kBlockM;
    q_rows = min(C::kBlockM, seq.len_q - q_row0);  // <= 0: past a varlen sequence's end
    q_first = seq.q_start + q_row0, k_first = seq.k_start, tma_b = is_varlen(p) ? 0 : b;
    j_begin = 0;
    j_end = (seq.len_k + C::kBlockN - 1) / C::kBlockN;
    if (C::kCausal || (C::Mod::kLocal && mod.right >= 0)) {
      const int last_col = q_row0 + q_rows - 1 + mod.diag + mod.right;  // rightmost visible key
      j_end = last_col < 0 ? 0 : min(j_end, last_col / C::kBlockN + 1);
    }
    if (C::Mod::kLocal && mod.left >= 0) j_begin = max(0, (q_row0 + mod.diag - mod.left) / C::kBlockN);
  }
  __device__ __forceinline__ bool skipped() const { return q_rows <= 0; }
  __device__ __forceinline__ bool empty() const { return j_begin >= j_end; }
};

// The tile a CTA takes in its round r (r = 0 only, unless persistent): round r covers tiles
// [r * grid, (r + 1) * grid), in reverse on odd rounds. Tiles are numbered m-block fastest, so where
// num_m divides the grid (22 m-blocks of 192 rows at S = 4k, 132 SMs) plain striding would give a CTA
// the same m-block every round: under a causal mask the same work every round, long for some CTAs
// and short for others. Reversed odd rounds pair each CTA's long tile with a short one, and each
// round's tiles stay contiguous (neighbouring m-blocks share K/V in L2). A causal grid whose rows that
// walk leaves unbalanced comes with its own: FwdParams::tile_walk, (grid, grid + 1 offsets, tiles), each
// CTA's tiles as the hardware would hand them out one CTA a tile (dispatch.causal_walk); the launcher
// drops one made for another grid size, so a stale walk cannot drop or repeat a tile. num_tiles: past
// the last.
// (ld_global: a load the compiler may not hoist out of the tile loop, and no check here of the walk's
// grid: either, a value held across the loop, cost d64's 192-row causal consumers the registers that keep
// their wgmmas pipelined: ptxas C7511)
__device__ __forceinline__ int ld_global(const int32_t* base, int index) {
  int value;
  asm volatile("{\n .reg .u64 at;\n mul.wide.s32 at, %1, 4;\n add.u64 at, at, %2;\n ld.global.u32 %0, [at];\n}"
               : "=r"(value) : "r"(index), "l"(base));
  return value;
}

template <class C>
__device__ __forceinline__ int tile_of(const FwdParams& p, int round, int num_tiles) {
  if (C::kPersistent && C::kCausal && p.tile_walk != nullptr) {
    const int at = ld_global(p.tile_walk, 1 + blockIdx.x) + round;  // offsets from tile_walk[1], tiles after them
    return at < ld_global(p.tile_walk, 2 + blockIdx.x) ? ld_global(p.tile_walk, 2 + gridDim.x + at) : num_tiles;
  }
  const int base = round * int(gridDim.x);
  return base + (C::kPersistent && (round & 1) ? int(gridDim.x) - 1 - int(blockIdx.x) : int(blockIdx.x));
}

// The shared memory: the Q ring (a stage a tile; released once every consumer thread has issued and
// retired its last QK^T of the tile, so a persistent producer may load a later tile's Q; cross-tile,
// once the TMA store of O staged in it has read it: by the store warp, or with mask warps by each
// consumer warpgroup's thread 0), the K and V rings, kMmaSums' ones, the barriers (and the store warp's
// o_ready).
template <class C>
struct Smem {
  elem_t *q, *k, *v, *ones;
  uint32_t* mask;  // dropout's bits: [slot][word][consumer thread] (Config::kMaskBytes)
  uint2* pairs;     // dropout's swapped halves: [buffer][warp pair][chunk][lane] (Config::kPairSwap)
  sm90::Ring<C::kQStages>* q_ring;
  sm90::Ring<C::kStages>*k_ring, *v_ring;
  uint64_t* o_ready_;

  __device__ __forceinline__ explicit Smem(unsigned char* base) {
    q = reinterpret_cast<elem_t*>(base);
    k = q + C::kQStages * C::TileQ::kBytes / 2;
    v = k + C::kStages * C::TileKV::kBytes / 2;
    ones = v + C::kStages * C::TileV::kBytes / 2;
    mask = reinterpret_cast<uint32_t*>(ones + C::kOnesBytes / 2);
    pairs = reinterpret_cast<uint2*>(mask + C::kMaskBytes / 4);
    q_ring = reinterpret_cast<sm90::Ring<C::kQStages>*>(pairs + (C::kPairSwap ? C::kPairBytes / 8 : 0));
    k_ring = reinterpret_cast<sm90::Ring<C::kStages>*>(q_ring + 1);
    v_ring = k_ring + 1;
    o_ready_ = reinterpret_cast<uint64_t*>(v_ring + 1);
  }
  // The store warp's barrier of Q stage s and consumer warpgroup g (Config::kStoreWarp): the warpgroup's 128
  // threads arrive once O's rows are staged there (or stored straight).
  __device__ __forceinline__ uint64_t* o_ready(int s, int g) const { return o_ready_ + s * C::kConsumers + g; }
  __device__ __forceinline__ elem_t* q_stage(int s) const { return q + s * C::TileQ::kBytes / 2; }
  __device__ __forceinline__ elem_t* k_stage(int s) const { return k + s * C::TileKV::kBytes / 2; }
  __device__ __forceinline__ elem_t* v_stage(int s) const { return v + s * C::TileV::kBytes / 2; }
  // The mask slot of the key block whose K stage is st (the ring's phase tells two passes apart).
  __device__ __forceinline__ uint32_t* mask_slot(RingState<C::kStages> st) const {
    return mask + (st.stage + C::kStages * int(st.phase)) * C::kMaskBytes / (8 * C::kStages);
  }
  // The swap buffer of the key block whose K stage is st for warp pair `pair` (consumer warpgroup g's warps
  // 2 (pair % 2), + 1): blocks alternate buffers (stage + kStages phase counts the CTA's blocks, its parity
  // theirs), so a buffer is rewritten only after both warps passed the next block's barrier.
  __device__ __forceinline__ uint2* pair_slot(RingState<C::kStages> st, int pair) const {
    const int buffer = (st.stage + C::kStages * int(st.phase)) & 1;
    return pairs + (buffer * 2 * C::kConsumers + pair) * (C::kBlockN / 16) * 32;
  }
};

// Consumer warpgroup g's 64 rows of O, staged in its rows of the tile's Q stage (q_tile), out by TMA: a box a
// 64-column block, clipped to Sq and d_head by the map. Issued only (the caller commits and waits).
template <class C>
__device__ __forceinline__ void store_o_rows(const Args& args, elem_t* q_tile, const Tile<C>& T, int g) {
#pragma unroll
  for (int c = 0; c < C::kDV / 64; ++c)
    tma_store_4d(&args.o, q_tile + c * C::TileQ::kBlockBytes / 2 + g * 64 * 64, c * 64, T.q_first + g * 64, T.h,
                 T.tma_b);
}

// S = Q K^T of this warp's 16 rows (tile rows row_cta + 0..15) over block j's first kN keys, again, by mma.sync
// with Q and K read from global memory: KeptSoftmax::settle_kept's rare path, once a P has overflowed and its
// score is gone (the K stage may already hold another block). Rows past the sequence's queries, keys past its
// keys and columns past the head dim read 0; the caller masks the scores again. The accumulator layout of
// mma.sync m16n8k16 is wgmma's for a warp's 16 rows, so the scores land where the QK^T put them.
template <class C, int kN>
__device__ __forceinline__ void recompute_scores(float (&s)[1][C::kBlockN / 8][4], const FwdParams& p,
                                                 const Tile<C>& T, int row_cta, int j, int lane) {
  const int r = row_cta + lane / 4, c = (lane % 4) * 2;  // this thread's rows r, r + 8 and columns c, c + 1 (+8)
  const elem_t* q_rows[2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
    q_rows[i] = r + 8 * i < T.q_rows ? p.q.at<elem_t>(T.b, T.h, T.q_first + r + 8 * i) : nullptr;
  const auto pair = [](const elem_t* row, int col) {
    return row != nullptr && col < C::kDHead ? *reinterpret_cast<const uint32_t*>(row + col) : 0u;
  };
#pragma unroll
  for (int nt = 0; nt < kN / 8; ++nt) s[0][nt][0] = s[0][nt][1] = s[0][nt][2] = s[0][nt][3] = 0.f;
#pragma unroll 1
  for (int kt = 0; kt < C::kDMma / 16; ++kt) {
    const int col = kt * 16 + c;
    const uint32_t a[4] = {pair(q_rows[0], col), pair(q_rows[1], col), pair(q_rows[0], col + 8),
                           pair(q_rows[1], col + 8)};
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt) {
      const int key = j * C::kBlockN + nt * 8 + lane / 4;
      const elem_t* k_row = key < T.mod.seqlen_k ? p.k.at<elem_t>(T.b, T.h_k, T.k_first + key) : nullptr;
      const uint32_t b[2] = {pair(k_row, col), pair(k_row, col + 8)};
      mma_16816<C::kBf16>(s[0][nt], a, b);
    }
  }
}

// A row's normaliser, 1 / its sum (0 where the row saw nothing).
__device__ __forceinline__ float rcp_of_sum(float sum) { return sum > 0.f ? 1.f / sum : 0.f; }
// The same from this thread's share of the sum: the epilogue's, or made early (kEarlyRcp) by the same
// operations, so both give the same bits.
__device__ __forceinline__ float row_rcp(float share) { return rcp_of_sum(fwd::quad_sum(share)); }

// Normalise O and write it with lse. One CTA per tile, or cross-tile: O goes through this warpgroup's
// rows of the tile's Q stage (qs) and out with a TMA store (clipped to Sq and d_head by the map);
// cross-tile, the stage is released only once that store has read it (its next Q is two tiles on).
// Persistent otherwise: the single Q stage may already hold the next tile's rows, so each thread
// stores its pairs straight from registers (a quad writes 16 contiguous bytes of a row: twice the L2
// sectors of the TMA store, measured at S = 1k). So does a varlen tile that ends past its sequence:
// the packed rows after it are the next sequence's, which no map can clip.
// With a store warp (Config::kStoreWarp) the warpgroup's threads only stage O (or store it straight) and arrive
// on the stage's o_ready barrier: the store warp stores and releases the stage (store_tiles).
// kEarlyRcp: the rows' normalisers come made (rcp, row_rcp's; not with sinks or kMmaSums, whose sums are
// final only here, nor dropout, whose kernels keep the division below).
template <class C, bool kEarlyRcp = false>
__device__ __forceinline__ void epilogue(const Args& args, const Smem<C>& sm, const Tile<C>& T,
                                         RingState<C::kQStages> qs, float (&o)[1][C::kNtO][4],
                                         const float (&m)[1][2], const float (&l)[1][2], float scale, int g, int t,
                                         const float (&rcp)[2] = {}) {
  static_assert(!kEarlyRcp || !(C::kSink || C::kMmaSums || C::kDropout),
                "early normalisers: not with sinks, mma_sums or dropout");
  const FwdParams& p = args.p;
  const Seq seq(p, T.b);  // read again here rather than held in registers through the key loop
  const int lane = t & 31, row_cta = g * 64 + (t / 32) * 16;
  const bool direct = (C::kPersistent && !C::kCrossTile) || (is_varlen(p) && T.q_rows < C::kBlockM);
  elem_t* const q_tile = sm.q_stage(qs.stage);
  float inv[2];  // each row half's factor: O times it is the output
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float m_nat = m[0][half] * scale;  // natural-log units (m: raw-score units)
    // r: 1 / the row's sum (0 for a row that saw nothing); lse = m_nat - log(r). With dropout the division of
    // kernels before the early normalisers instead (the same bits in every dropout kernel, which never makes
    // them early): as r, d96's causal cross-tile dropout kernel serialized its wgmmas (C7511).
    float corr = 1.f, r, sum = 0.f;
    if constexpr (kEarlyRcp) {
      r = rcp[half];
    } else if constexpr (C::kMmaSums || C::kSink || C::kDropout) {
      sum = C::kMmaSums ? o[0][C::kDV / 8][2 * half] : fwd::quad_sum(l[0][half]);  // (kMmaSums: the whole row)
      if (C::kSink) corr = fold_sink(p.mods.sink[T.h], m_nat, sum);
      r = rcp_of_sum(sum);
    } else {
      r = row_rcp(l[0][half]);
    }
    // Dropped entries still count in the softmax denominator; kept ones are scaled by 1 / (1 - p).
    inv[half] = !C::kDropout ? corr * r : sum > 0.f ? p.mods.dropout_scale * corr / sum : 0.f;
    const int q_row = T.q_row0 + row_cta + (lane >> 2) + half * 8;
    if (direct) {
      elem_t* dst = p.o.at<elem_t>(T.b, T.h, seq.q_start + q_row);
#pragma unroll
      for (int nt = 0; nt < C::kDV / 8; ++nt) {
        const int col = nt * 8 + (lane & 3) * 2;
        if (q_row < seq.len_q && col < C::kDHeadV)
          *reinterpret_cast<uint32_t*>(dst + col) =
              pack2<C::kBf16>(o[0][nt][2 * half] * inv[half], o[0][nt][2 * half + 1] * inv[half]);
      }
    }
    if (p.lse != nullptr && (lane & 3) == 0 && q_row < seq.len_q)
      p.lse[seq.stat_row(T.h, q_row)] = C::kDropout ? (sum > 0.f ? m_nat + logf(sum) : INFINITY)
                                        : r > 0.f                 ? m_nat - logf(r)
                                                                  : INFINITY;
  }
  if (!direct) {  // O's 64-column blocks are the Q tile's first kDV / 64; a stmatrix for 16 of a warp's columns
    // (the accumulator's n-tiles 2kt and 2kt + 1 are a 16-bit A fragment), where 4-byte stores took four
    uint32_t a[1][C::kDV / 16][4];
    acc_to_a<C::kBf16>(*reinterpret_cast<const float(*)[1][C::kDV / 8][4]>(&o), a,
                       [&](int, int, int e, float x) { return x * inv[e >> 1]; });
    stmatrix_a<typename C::TileQ>(q_tile, a, row_cta, lane);
  }
  if constexpr (C::kStoreWarp) {
    fence_proxy_async();  // the stores above, visible to the TMA unit (and the store warp's copy)
    mbarrier_arrive(sm.o_ready(qs.stage, g));
    return;
  }
  if (!direct) {
    fence_proxy_async();  // the stores above, visible to the TMA unit
    named_sync(int(Barrier::kEpilogue) + g, 128);
    if (t == 0) {
      store_o_rows<C>(args, q_tile, T, g);
      tma_store_commit();
      tma_store_wait_read();
    }
  }
  if (C::kCrossTile) {  // one arrival a warpgroup releases the stage (Smem's q ring counts warpgroups)
    if (direct) named_sync(int(Barrier::kEpilogue) + g, 128);  // every thread's last QK^T has retired
    if (t == 0) sm.q_ring->release(qs);
  }
}

// The producer thread: per tile, Q once (into the Q stage a tile kQStages earlier released) and K/V
// block by block into the rings, which run on across tiles so the next tile's first blocks load under
// the current tile's last ones. K_{j_begin} goes first: it does not wait for a Q stage.
// Cross-tile (kLateV below), a tile's last V is issued only once the next tile is decoded: a chained tile
// start needs it with the next tile's first K, and its stage frees only once the PV of the block kStages
// before it has retired, which the producer used to wait for with the decode still ahead of that K (clock64
// stamps: the first K issued ~1100 cycles after the last V at d128, docs/perf-log.md, forty-eighth session).
template <class C>
__device__ __forceinline__ void produce(const Args& args, const Smem<C>& sm, int num_tiles) {
  const FwdParams& p = args.p;
  tma_prefetch_map(&args.q);
  tma_prefetch_map(&args.k);
  tma_prefetch_map(&args.v);
  RingState<C::kStages> st, v_st;
  RingState<C::kQStages> qs;
  // A tile of `width` columns: one TMA box per 64-column block.
  auto load = [&](const CUtensorMap* map, elem_t* dst, uint64_t* bar, int row0, int rows_block_bytes, int head,
                  int width, int b) {
#pragma unroll
    for (int c = 0; c < width / 64; ++c) tma_load_4d(dst + c * rows_block_bytes / 2, map, bar, c * 64, row0, head, b);
  };
  auto load_v = [&](RingState<C::kStages> at, int row0, int head, int b) {
    load(&args.v, sm.v_stage(at.stage), sm.v_ring->acquire(at, C::TileV::kBytes), row0, C::TileV::kBlockBytes, head,
         C::kDV, b);
  };
  // kLateV: the last tile's last V, not issued yet where v_row >= 0, into stage v_st. Not with a causal mask:
  // beside the causal walk's loads the producer's 24 registers spilled (12-20 bytes, d96 / d128 _xt_hb).
  constexpr bool kLateV = C::kCrossTile && !C::kCausal;
  int v_row = -1, v_head = 0, v_b = 0;
  for (int round = 0, tile = tile_of<C>(p, 0, num_tiles); tile < num_tiles; tile = tile_of<C>(p, ++round, num_tiles)) {
    const Tile<C> T(args, tile);
    if (kLateV && v_row >= 0) load_v(v_st, v_row, v_head, v_b), v_row = -1;
    if (T.skipped()) continue;
    // Persistent: this tile's Q waits for a Q stage (the previous tile's last QK^T), and Q is read
    // once, from DRAM; its L2 prefetch now, about `stages` key blocks before the stage frees, turns
    // that load into an L2 read (FlashAttention-3 does the same).
    if (C::kPersistent && !T.empty())
#pragma unroll
      for (int c = 0; c < C::kD / 64; ++c) tma_prefetch_l2_4d(&args.q, c * 64, T.q_first, T.h, T.tma_b);
    for (int j = T.j_begin; j < T.j_end; ++j, st.advance()) {
      load(&args.k, sm.k_stage(st.stage), sm.k_ring->acquire(st, C::TileKV::kBytes), T.k_first + j * C::kBlockN,
           C::TileKV::kBlockBytes, T.h_k, C::kD, T.tma_b);
      if (j == T.j_begin)
        load(&args.q, sm.q_stage(qs.stage), sm.q_ring->acquire(qs, C::TileQ::kBytes), T.q_first, C::TileQ::kBlockBytes,
             T.h, C::kD, T.tma_b);
      if (kLateV && j == T.j_end - 1) v_row = T.k_first + j * C::kBlockN, v_head = T.h_k, v_b = T.tma_b, v_st = st;
      else load_v(st, T.k_first + j * C::kBlockN, T.h_k, T.tma_b);
    }
    if (T.empty()) {  // nothing to load: the Q stage still turns, so both sides keep counting tiles
      sm.q_ring->wait_free(qs);
      sm.q_ring->filled(qs);
    }
    qs.advance();
  }
  if (kLateV && v_row >= 0) load_v(v_st, v_row, v_head, v_b);
}

// The store warp's thread (Config::kStoreWarp): per tile of the walk, once each consumer warpgroup has staged
// its rows of O in the tile's Q stage, their TMA store; then, once the copies have read the stage, its release
// to the producer (a later tile's Q). A varlen tile ending past its sequence was stored by the consumers
// straight from registers (epilogue): only the release.
template <class C>
__device__ __forceinline__ void store_tiles(const Args& args, const Smem<C>& sm, int num_tiles) {
  const FwdParams& p = args.p;
  tma_prefetch_map(&args.o);
  RingState<C::kQStages> qs;
  for (int round = 0, tile = tile_of<C>(p, 0, num_tiles); tile < num_tiles; tile = tile_of<C>(p, ++round, num_tiles)) {
    const Tile<C> T(args, tile);
    if (T.skipped()) continue;
    const bool direct = is_varlen(p) && T.q_rows < C::kBlockM;
    elem_t* const q_tile = sm.q_stage(qs.stage);
    for (int g = 0; g < C::kConsumers; ++g) {
      mbarrier_wait(sm.o_ready(qs.stage, g), qs.phase);
      if (!direct) store_o_rows<C>(args, q_tile, T, g);
    }
    tma_store_commit();
    tma_store_wait_read();
    sm.q_ring->release(qs);
    qs.advance();
  }
}

// Dropout (C::kMaskWarps): producer warp mw (1..3) makes its share of block j's masks into the block's
// mask slot. A unit is (pair q of consumer warps 2q and 2q + 1, whose 32 rows are one span of Philox calls;
// 16-key chunk c); unit u is warp 1 + u % 3's. A lane's call at (its row of the span, its key pair of the
// chunk) is what lane `lane` of both warps of the pair would make (fwd::apply_dropout: a 16-row warp
// uses half of each call), so each call serves 16 entries, not 8: one byte of bits for each warp's lane
// (BlockMask's layout). Two calls in flight with 64-key blocks (d64's short causal two-CTA kernel, whose
// consumers outrun one call at a time: forward with p = 0.1 +6% at causal 1k, H100), one at 128 keys (level
// there: d96 / d128 -1.7 to +0.6%; docs/perf-log.md, forty-fourth session). The producer warpgroup keeps 24
// or 32 registers.
template <class C>
__device__ __forceinline__ void make_block_masks(const Dropout& drop, uint32_t* stage_mask, int q_row0, int j, int mw,
                                                 int lane) {
  constexpr int kChunks = C::kBlockN / 16, kUnits = 2 * C::kConsumers * kChunks;
  // The top bits of two flag words' bytes (Dropout::keep_flags) in one byte, lo's as bits 0-3 and hi's as 4-7:
  // lo's moved 4 down, both gathered by one multiply (its terms land on distinct bits, so nothing carries).
  const auto top_bits = [](uint32_t lo, uint32_t hi) {
    return static_cast<unsigned char>(((((lo & 0x80808080u) >> 4) | (hi & 0x80808080u)) * 0x00204081u) >> 24);
  };
  // The call at query q_row0 + 32 q + (lane >> 2), key j kBlockN + 16 c + 2 (lane & 3) has counter words
  // (x0 + 8 q, y0 + 4 c) (Dropout::keep_flags_at; q_row0 is a multiple of 32, kBlockN of 16), and its bytes go
  // to consumer thread (2 q + h) 32 + lane's word c / 4, byte c % 4: a lane's fixed part made once a block,
  // the rest uniform (the loop's own arithmetic had been a third of its instructions).
  const uint32_t x0 = uint32_t(q_row0 >> 5) * 8 + uint32_t(lane >> 2), y0 = uint32_t(j * kChunks * 4 + (lane & 3));
  unsigned char* lane_bytes = reinterpret_cast<unsigned char*>(stage_mask) + lane * 4;
  constexpr int kInFlight = C::kBlockN == 64 ? 2 : 1;
#pragma unroll kInFlight
  for (int u = mw - 1; u < kUnits; u += C::kMaskWarps) {
    const int q = unsigned(u) / kChunks, c = unsigned(u) % kChunks;  // (unsigned: no rounding toward zero)
    const uint4 f = drop.keep_flags_at(x0 + 8 * q, y0 + 4 * c);
#pragma unroll
    for (int h = 0; h < 2; ++h)  // the 16-row half of the span: words h (e & 1 = 0) and 2 + h
      lane_bytes[(c / 4) * 512 * C::kConsumers + (2 * q + h) * 128 + c % 4] =
          top_bits(Dropout::word(f, h), Dropout::word(f, 2 + h));
  }
}

// The mask warps' walk: the producer's tiles and key blocks, each block's masks into its slot once the
// block's K stage is free (Config::kMaskBytes says why the slot is then no longer read); the K stage's
// full barrier counts their arrivals with the TMA copy's, so a consumer past its wait finds them made.
template <class C>
__device__ __forceinline__ void produce_masks(const Args& args, const Smem<C>& sm, int num_tiles, int mw,
                                              int lane) {
  const FwdParams& p = args.p;
  RingState<C::kStages> st;
  for (int round = 0, tile = tile_of<C>(p, 0, num_tiles); tile < num_tiles; tile = tile_of<C>(p, ++round, num_tiles)) {
    const Tile<C> T(args, tile);
    if (T.skipped()) continue;
    const Dropout drop(p.mods, T.bh);
    for (int j = T.j_begin; j < T.j_end; ++j, st.advance()) {
      sm.k_ring->wait_free(st);
      make_block_masks<C>(drop, sm.mask_slot(st), T.q_row0, j, mw, lane);
      sm.k_ring->filled(st);
    }
  }
}

template <class C>
__global__ void __launch_bounds__(C::kThreads, C::kCtasPerSm) fwd_kernel(const __grid_constant__ Args args) {
  const FwdParams& p = args.p;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
  const Smem<C> sm(smem_raw + (base - smem_addr(smem_raw)));
  const int tid = threadIdx.x;
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);  // warp-uniform to the compiler
  const int num_m = (p.seqlen_q + C::kBlockM - 1) / C::kBlockM;
  // the launch is one CTA per tile unless persistent (num_m as launch() counts it; read from args.by_m.divisor
  // instead, the count serialized the wgmmas of d128's causal cross-tile mask-warp dropout kernel: C7511)
  const int num_tiles = num_m * p.heads * p.batch;

  if (C::kMmaSums && tid < C::kOnesBytes / 4) {  // the ones PV's row sums multiply P by
    reinterpret_cast<uint32_t*>(sm.ones)[tid] = pack2<C::kBf16>(1.f, 1.f);
    fence_proxy_async();  // visible to the tensor cores (the async proxy) after the barrier below
  }
  if (tid == 0) {
    // Cross-tile, a Q stage holds O until its TMA store: the store warp, or thread 0 of each warpgroup, releases it.
    sm.q_ring->init(C::kStoreWarp ? 1 : C::kCrossTile ? C::kConsumers : C::kConsumers * 128);
    if constexpr (C::kStoreWarp)
      for (int i = 0; i < C::kQStages * C::kConsumers; ++i)
        mbarrier_init(sm.o_ready(i / C::kConsumers, i % C::kConsumers), 128);
    sm.k_ring->init(C::kConsumers * 128, 1 + 32 * C::kMaskWarps);  // and the mask warps, if any
    sm.v_ring->init(C::kConsumers * 128);
    mbarrier_init_fence();
  }
  __syncthreads();

  if (wg == 0) {  // ---- producer -----------------------------------------------------------------
    warpgroup_release_registers<C::kProducerRegs>();
    // (the warp made warp-uniform to the compiler, and the other warps' branch taken on it alone, so that the
    // mask warps' Philox keys live in uniform registers (in vector ones they spilled, even at 40 registers),
    // and the producer's loop keeps its 24 registers beside the store warp's (branching on tid, it spilled)
    const int warp = __shfl_sync(0xffffffffu, tid / 32, 0);
    if (warp == 0) {
      if (tid == 0) produce<C>(args, sm, num_tiles);
    } else if constexpr (C::kMaskWarps) {
      produce_masks<C>(args, sm, num_tiles, warp, tid % 32);
    } else if (C::kStoreWarp && warp == 1) {
      if (tid == 32) store_tiles<C>(args, sm, num_tiles);
    }
    return;
  }

  // ---- consumers -----------------------------------------------------------------------------------
  warpgroup_claim_registers<C::kConsumerRegs>();
  const int g = wg - 1, t = tid % 128, lane = t & 31;
  const int pair = g * 2 + t / 64;  // this warp's pair of a 32-row span (dropout's swap: Smem::pair_slot)
  const int row_cta = g * 64 + (t / 32) * 16;  // this warp's first row within the tile
  // Transformed scores are already in softmax units; otherwise the scale folds into the exp2 argument.
  const float scale = C::Mod::kTransforms ? 1.f : p.softmax_scale;
  const float scale_log2 = scale * 1.4426950408889634f;
  using W = typename C::Warp;
  auto q_desc = [&](int stage) { return gmma_desc(smem_addr(sm.q_stage(stage)) + g * 64 * 128, 16); };
  auto k_desc = [&](int stage) { return gmma_desc(smem_addr(sm.k_stage(stage)), 16); };
  auto v_desc = [&](int stage) { return gmma_desc(smem_addr(sm.v_stage(stage)), C::TileV::kBlockBytes); };
  const uint64_t ones_desc = gmma_desc(smem_addr(sm.ones), 16);  // (unused without kMmaSums)
  RingState<C::kStages> st, prev;  // prev: the V stage of the PV not issued yet
  RingState<C::kQStages> qs;
  float o[1][C::kNtO][4];  // O, and with kMmaSums its row sums
  float m[1][2], l[1][2];
  float s[1][C::kBlockN / 8][4];
  uint32_t pf[1][C::kBlockN / 16][4];
  // The rescale of O by a step's alpha, applied in the next step between its QK^T and its PV, or by
  // finish() before the tile's last PV: from the PV's wait to the next issue ptxas keeps every
  // exponential (it will not place them under the PV; docs/perf-log.md, 2026-12-03), and the multiplies
  // moved out of that stretch, which the other warpgroup's products must cover. H100, bf16, 16k tokens
  // (thirty-eighth session): d64 causal 16k at one CTA a tile +1-4% in three runs, d128 causal 16k
  // level, the persistent d64 causal kernels (2k-8k) level. So only at one CTA a tile (long causal rows,
  // varlen batches) and without lazy rescaling (it rarely rescales; the non-causal defaults lost 0-2.5%
  // with it): in persistent kernels the carried alpha pushed ptxas into serialized wgmmas (C7511 /
  // C7512) at d128 causal _hb and _xt_hb, d88 _xt_hb and the dropout cross-tile kernels of d72-d120.
  // A tile's first step rescales a zero O: alpha is always finite (2^(old max - new max), 0 from -inf), so
  // whatever alpha_p holds then is harmless.
  constexpr bool kLateRescale = C::kOverlap && !C::kLazyRescale && !C::kPersistent;
  // The step's exponentials against the kept maxima (KeptSoftmax) where the softmax is what the
  // tensor cores wait for: two consumer warpgroups, heads from 72 to 192 wide. H100, bf16 16k tokens,
  // non-causal (2026-12-05): d96 4k / 16k +3.6 / +1.8%, d128 +2.5 / +0.9%, d192 level / +2.5%; d64's 192-row
  // tile -1 to -3% and d256 -1 to -2%, where a softmax already runs under two warpgroups' products or
  // under longer ones. d256 takes them with no row max at all (below), whose shorter step pays there: H100,
  // bf16 (sixty-fourth session, two processes) +0.1-1.1% non-causal 2k-16k, +0.6-1.0% causal.
  constexpr bool kKeptExps = C::kOverlap && C::kLazyRescale && !C::kDropout && !C::kMmaSums && C::kConsumers == 2 &&
                             C::kDHead > 64 && (C::kDHead <= 192 || (!C::Mod::kLocal && !C::Mod::kAlibi));
  // ... and with no row max at all (KeptSoftmax::exps_kept) where every row that sees a key has a finite max from
  // its tile's first block on (no window) and the max rarely moves by 2^8 (no ALiBi, whose distance term moves
  // it every block): d128's steady step ~412 -> ~294 instructions a warp on its common path (read off the SASS).
  // H100, bf16 16k tokens, non-causal (sixty-first session): d96 / d128 4k +1.5 / +1.1%, 16k +1.0 / +0.9%; d128
  // causal on lazy rescaling (`_xt_hb_lr`, the default since the sixty-fourth session) 4k / 8k +5.9 / +5.8%
  // over `_xt_hb`.
  constexpr bool kNoMaxExps = kKeptExps && !C::Mod::kLocal && !C::Mod::kAlibi;
  float alpha_p[1][2] = {{1.f, 1.f}};
  // Ping-pong: warpgroup g issues its matrix products only while it holds the token (barrier
  // kPingPong + g, completed by warpgroup g - 1's arrival, around the ring of kConsumers) and hands it
  // to g + 1 right after issuing, so its softmax runs under the others' products. The last warpgroup
  // hands the token to 0 first, once a CTA; all issue the same sequence of products, and 0 takes the
  // last one's last hand-over at the end. No warpgroup arrives twice at a barrier before its phase
  // completes: g - 1's next hand-over needs the token to have gone round, through g's take.
  auto take_token = [&] {
    if (C::kPingPong) named_sync(int(Barrier::kPingPong) + g, 256);
  };
  auto pass_token = [&] {
    // (the next warpgroup, spelled so that two warpgroups compile as before: 1 - g)
    if (C::kPingPong)
      named_arrive(int(Barrier::kPingPong) + (C::kConsumers == 2 ? 1 - g : g + 1 == C::kConsumers ? 0 : g + 1), 256);
  };
  if (C::kPingPong && g == C::kConsumers - 1) named_arrive(int(Barrier::kPingPong), 256);
  // The tile whose last PV has not been issued (P in pf, V in stage prev, Q in stage q_pending; -1:
  // none): with kCrossTile it pairs with the next tile's first QK^T; finish() issues it alone and
  // stores the tile. Only its number is kept (the Tile is rebuilt where needed: 160-register consumers
  // spilled holding it).
  int pending = -1;
  RingState<C::kQStages> q_pending;
  // A chained tile start's epilogue: the pending tile's statistics are final once its last softmax is done,
  // so its rows' normalisers are made at the start, before the waits, not in the epilogue where the other
  // warpgroup's exponentials keep the reciprocal unit busy (clock64 stamps, docs/perf-log.md, forty-eighth
  // session). Not with half blocks: the two values held through the first block's softmax serialized the
  // wgmmas (C7511) of d96's causal cross-tile kernel.
  constexpr bool kEarlyRcp = !C::kSink && !C::kMmaSums && !C::kDropout && !C::kHalfBlocks;
  // Whether the P in pf is a half block's (its second half zero): finish() runs its PV over the first half's keys.
  bool pv_half = false;
  auto finish = [&] {
    const Tile<C> Tp(args, pending);
    sm.v_ring->wait(prev);
    // (the only block that can end past the sequence's keys is the last; all warpgroups reach this
    // before taking the token, so the barrier in it cannot wait on a hand-over)
    zero_v_past_keys<C>(p, sm.v_stage(prev.stage), Tp.mod, Tp.j_end - 1, g * 128 + t);
    if (kLateRescale) rescale<C>(o, alpha_p, true);
    take_token();
    issue_pending_pv<C>(o[0], pf, v_desc(prev.stage), ones_desc, pv_half);
    pass_token();
    wgmma_wait<0>();
    wgmma_settle(o[0]);
    sm.v_ring->release(prev);
    epilogue<C>(args, sm, Tp, q_pending, o, m, l, scale, g, t);
    pending = -1;
  };
  for (int round = 0, tile = tile_of<C>(p, 0, num_tiles); tile < num_tiles; tile = tile_of<C>(p, ++round, num_tiles)) {
    const Tile<C> T(args, tile);
    if (T.skipped()) continue;
    const int row0 = T.q_row0 + row_cta;  // this warp's first row, globally
    sm.q_ring->wait(qs);
    // The Q stage is released once this thread's last QK^T of the tile has retired (cross-tile: once O
    // staged in it has been stored, by the store warp or the epilogue).
    auto q_done = [&](int j) {
      if (!C::kCrossTile && j == T.j_end - 1) sm.q_ring->release(qs);
    };
    // Block j, none of whose keys this warpgroup's rows see: its products would add zeros (an all-masked block
    // leaves m and l as they are; without lazy rescaling its alpha, 2 to the rounding error of the fused
    // m * scale - m_scaled, scaled O and l by 1 +- an ulp), so the warpgroup only passes it on. The stages are
    // released once filled (an early arrival could complete an empty phase the other warpgroups still read), the
    // ping-pong token goes round as in a step, dropout's swap pair still meets (a swap buffer is rewritten only after
    // both warps read it: Smem::pair_slot), and a varlen block's V tail is zeroed with the others (its barrier counts
    // every consumer thread).
    auto pass_over = [&](int j) {
      if constexpr (C::kPairSwap) named_sync(int(Barrier::kMaskPair) + pair, 64);
      sm.k_ring->wait(st);
      sm.v_ring->wait(st);
      take_token();
      pass_token();
      sm.k_ring->release(st);
      q_done(j);
      zero_v_past_keys<C>(p, sm.v_stage(st.stage), T.mod, j, g * 128 + t);
      sm.v_ring->release(st);
    };
    if (!C::kOverlap || T.empty()) {
      if (!C::kCrossTile && T.empty()) sm.q_ring->release(qs);
      if (C::kCrossTile && pending >= 0) finish();
      zero(o);
      m[0][0] = m[0][1] = -INFINITY, l[0][0] = l[0][1] = 0.f;
      for (int j = T.j_begin; !C::kOverlap && j < T.j_end; ++j, st.advance()) {
        if (!warpgroup_sees<C>(T.mod, T.q_row0, g, j)) {
          pass_over(j);
          continue;
        }
        sm.k_ring->wait(st);
        issue_qk<C>(s, q_desc(qs.stage), k_desc(st.stage));
        wgmma_wait<0>();
        wgmma_settle(s[0]);
        sm.k_ring->release(st);
        q_done(j);
        if (block_masked<C>(T.mod, T.q_row0, j)) mask_scores<C, true>(s, T.mod, row0, j, lane);
        else mask_scores<C, false>(s, T.mod, row0, j, lane);
        float alpha[1][2];
        rescale<C>(o, alpha, fwd::softmax_rows<W, C::kLazyRescale, !C::kMmaSums>(s, m, l, alpha, scale, scale_log2));
        scores_to_p<C>(s, pf, BlockMask<C>(sm.mask_slot(st), g * 128 + t), sm.pair_slot(st, pair), pair, p, T.bh, row0, j, lane);
        sm.v_ring->wait(st);
        zero_v_past_keys<C>(p, sm.v_stage(st.stage), T.mod, j, g * 128 + t);
        issue_pv<C>(o[0], pf, v_desc(st.stage), ones_desc);
        wgmma_wait<0>();
        wgmma_settle(o[0]);
        sm.v_ring->release(st);
      }
      epilogue<C>(args, sm, T, qs, o, m, l, scale, g, t);
    } else {
      // Block j_begin: its scores, with fresh statistics. Chained (a pending tile): its QK^T is issued
      // with the pending tile's last PV, its exponentials run under that PV, and the pending tile's
      // epilogue follows; compiled per (chained, masked), so no branch sits between the two waits.
      auto first = [&](auto chained, auto masked) {
        constexpr bool kChained = decltype(chained)::value;
        [[maybe_unused]] float rcp[2];
        if constexpr (kChained && kEarlyRcp) rcp[0] = row_rcp(l[0][0]), rcp[1] = row_rcp(l[0][1]);
        sm.k_ring->wait(st);
        if constexpr (kChained) {
          sm.v_ring->wait(prev);
          const Tile<C> Tp(args, pending);
          zero_v_past_keys<C>(p, sm.v_stage(prev.stage), Tp.mod, Tp.j_end - 1, g * 128 + t);
        }
        take_token();
        issue_qk<C>(s, q_desc(qs.stage), k_desc(st.stage));
        if constexpr (kChained) issue_pending_pv<C>(o[0], pf, v_desc(prev.stage), ones_desc, pv_half);
        pass_token();
        wgmma_wait<kChained ? 1 : 0>();  // S is ready; the pending PV may still run
        wgmma_settle(s[0]);
        // A tile's first block: its bits by plain loads (scheduled where ptxas likes), but volatile ones where
        // P is made in the cross-tile kernels; the other way round, ptxas serialized d64's causal half-block
        // or d128's causal cross-tile wgmmas (C7511).
        [[maybe_unused]] BlockMask<C> early(sm.mask_slot(st), g * 128 + t, std::false_type{});
        sm.k_ring->release(st);
        q_done(T.j_begin);
        mask_scores<C, decltype(masked)::value>(s, T.mod, row0, T.j_begin, lane);
        float m1[1][2] = {{-INFINITY, -INFINITY}}, l1[1][2] = {{0.f, 0.f}}, alpha[1][2];
        fwd::softmax_rows<W, false, !C::kMmaSums>(s, m1, l1, alpha, scale, scale_log2);  // (fresh: alpha unused)
        if constexpr (kChained) {
          wgmma_wait<0>();
          wgmma_settle(o[0]);
          sm.v_ring->release(prev);
        }
        if constexpr (C::kCrossTile)
          scores_to_p<C>(s, pf, BlockMask<C>(sm.mask_slot(st), g * 128 + t), sm.pair_slot(st, pair), pair, p, T.bh, row0,
                         T.j_begin, lane);
        else
          scores_to_p<C>(s, pf, early, sm.pair_slot(st, pair), pair, p, T.bh, row0, T.j_begin, lane);
        pv_half = false;
        if constexpr (kChained)
          epilogue<C, kEarlyRcp>(args, sm, Tile<C>(args, pending), q_pending, o, m, l, scale, g, t, rcp);
        zero(o);
        m[0][0] = m1[0][0], m[0][1] = m1[0][1], l[0][0] = l1[0][0], l[0][1] = l1[0][1];
      };
      const bool masked = block_masked<C>(T.mod, T.q_row0, T.j_begin);
      if (C::kCrossTile && pending >= 0) {
        if constexpr (C::kCrossTile) {
          if (masked) first(std::true_type{}, std::true_type{});
          else first(std::true_type{}, std::false_type{});
        }
      } else if (masked) {
        first(std::false_type{}, std::true_type{});
      } else {
        first(std::false_type{}, std::false_type{});
      }
      prev = st;
      st.advance();
      // One steady-state step, compiled twice (masked or not): its QK^T is issued with block j-1's PV,
      // its softmax written to run under that PV (O is rescaled once the PV has retired), with no
      // branch between the two waits. ptxas 13.0 still moves the PV's wait above the exponentials
      // (their S registers belong to the same wgmma stage: docs/perf-log.md, 2026-12-03); with
      // ping-pong the other warpgroup's products run under them instead.
      // A half block (half_block: masked, this warpgroup sees none of its second half; also every
      // block after one) is a third compilation: its QK^T, softmax and P cover the first kHalfN keys
      // (P's second half zeroed). Its PV runs at full width in the next step (a half-width one there
      // would be a fourth compilation, which made ptxas 13.0 serialize the wgmmas of the d64 128-row
      // kernel for want of registers: C7511, -17% at 1k) and at half width only in finish() (pv_half).
      uint64_t uniform_k = 0, uniform_v = 0;  // half blocks: the step's descriptors (below)
      auto step = [&](int j, auto masked, auto half) {
        constexpr int kN = decltype(half)::value ? C::kHalfN : C::kBlockN;
        sm.k_ring->wait(st);
        sm.v_ring->wait(prev);
        take_token();
        // The K and V descriptors from warp-uniform stages, so that ptxas builds them on the uniform
        // datapath: from the ring states, loop-carried through the step's compilations, it built them
        // in vector registers and moved each k-step's to uniform ones (a 64-bit add and two R2UR a
        // wgmma; d128's step 525 instructions a warp, 458 this way). Without half blocks, a shuffle from
        // lane 0 here; with them (a third compiled step), uniform_k and uniform_v, made before the
        // branch to the step (below). Not in first() and finish(): there ptxas serialized some kernels'
        // wgmmas (C7511: registers; d96 and d128 causal).
        const uint64_t kd = C::kHalfBlocks ? uniform_k : k_desc(__shfl_sync(0xffffffffu, st.stage, 0));
        const uint64_t vd = C::kHalfBlocks ? uniform_v : v_desc(__shfl_sync(0xffffffffu, prev.stage, 0));
        issue_qk<C, kN>(s, q_desc(qs.stage), kd);
        if (kLateRescale) rescale<C>(o, alpha_p, true);  // the previous step's alpha, before its PV
        issue_pv<C>(o[0], pf, vd, ones_desc);
        pass_token();
        wgmma_wait<1>();  // S_j is ready; PV_{j-1} may still run
        wgmma_settle(s[0]);
        sm.k_ring->release(st);
        mask_scores<C, decltype(masked)::value, kN>(s, T.mod, row0, j, lane);
        [[maybe_unused]] KeptSoftmax kept;  // (kKeptExps only)
        [[maybe_unused]] bool moved = true;  // (softmax_rows only)
        if constexpr (kNoMaxExps) kept.exps_kept(leading<kN / 8>(s), m, scale_log2);
        else if constexpr (kKeptExps) kept.exps(leading<kN / 8>(s), m, scale_log2);
        else
          moved = fwd::softmax_rows<typename C::template WarpOf<kN>, C::kLazyRescale, !C::kMmaSums>(
              leading<kN / 8>(s), m, l, alpha_p, scale, scale_log2);
        wgmma_wait<0>();
        wgmma_settle(o[0]);
        sm.v_ring->release(prev);
        q_done(j);
        if constexpr (kNoMaxExps)
          kept.settle_kept<C>(leading<kN / 8>(s), m, l, o, scale_log2, [&] {
            recompute_scores<C, kN>(s, p, T, row_cta, j, lane);
            mask_scores<C, decltype(masked)::value, kN>(s, T.mod, row0, j, lane);
          });
        else if constexpr (kKeptExps) kept.settle<C>(leading<kN / 8>(s), m, l, o, scale_log2);
        else if (!kLateRescale) rescale<C>(o, alpha_p, moved);
        scores_to_p<C, kN>(s, pf, BlockMask<C>(sm.mask_slot(st), g * 128 + t), sm.pair_slot(st, pair), pair, p, T.bh, row0, j,
                             lane);
        pv_half = decltype(half)::value;
        prev = st;
      };
      for (int j = T.j_begin + 1; j < T.j_end; ++j, st.advance()) {
        if constexpr (C::kHalfBlocks) {
          // Half blocks: the step's K and V descriptors, from the stages made warp-uniform by a
          // redux.sync (its result is a uniform register), once a key block before the branch. In the
          // step instead (shuffled or reduced, before or between the QK^T and the PV, K's or V's or
          // both, in some compilations or all), ptxas serialized the wgmmas of some half-block kernel
          // (C7511; d64 to d128, 128- and 192-row); a shuffle here did the same for d128 causal xt_hb.
          const auto uniform = [](int stage) { return int(__reduce_or_sync(0xffffffffu, unsigned(stage))); };
          uniform_k = k_desc(uniform(st.stage)), uniform_v = v_desc(uniform(prev.stage));
        }
        if (!block_masked<C>(T.mod, T.q_row0, j)) step(j, std::false_type{}, std::false_type{});
        else if (C::kHalfBlocks && half_block<C>(T.mod, T.q_row0, g, j))  // off, the branch folds away
          step(j, std::true_type{}, std::bool_constant<C::kHalfBlocks>{});
        else step(j, std::true_type{}, std::false_type{});
      }
      pending = tile, q_pending = qs;
      if (!C::kCrossTile) finish();
    }
    qs.advance();
  }
  if (C::kCrossTile && pending >= 0) finish();
  if (C::kPingPong && g == 0) take_token();  // the last warpgroup's last hand-over
}
#endif  // __CUDACC__

template <class C>
cudaError_t launch(const FwdParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0 || p.seqlen_q == 0) return cudaSuccess;
  const int num_m = (p.seqlen_q + C::kBlockM - 1) / C::kBlockM;  // query blocks a (batch, head) row
  const int64_t blocks = int64_t(num_m) * p.heads * p.batch;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (p.heads_k <= 0 || p.heads % p.heads_k != 0) return cudaErrorInvalidValue;  // (the Python side checks it)
  Args args;
  args.p = p;
  args.by_m = FastDiv::of(unsigned(num_m));
  args.by_heads = FastDiv::of(unsigned(p.heads));
  args.by_group = FastDiv::of(unsigned(p.heads / p.heads_k));
  // The maps' rows: a dense call's [B, S, H, D] per batch entry; a varlen batch's [total, H, D] as one
  // entry (its TensorRefs have batch stride 0), each tile addressing its sequence's rows in it.
  // (rows per batch entry: common/varlen.cuh's planes of query and key rows)
  const int map_batch = is_varlen(p) ? 1 : p.batch, q_rows = stat_plane_rows(p);
  // With no keys no K/V tile is ever loaded; the maps must still encode, so they describe Q.
  const bool no_keys = key_plane_rows(p) == 0;
  const TensorRef& k = no_keys ? p.q : p.k;
  const TensorRef& v = no_keys ? p.q : p.v;
  const int kv_rows = no_keys ? q_rows : key_plane_rows(p);
  const int kv_heads = no_keys ? p.heads : p.heads_k;
  if (!encode_bshd(&args.q, p.q, C::kBf16, map_batch, q_rows, p.heads, C::kDHead, C::kBlockM) ||
      !encode_bshd(&args.k, k, C::kBf16, map_batch, kv_rows, kv_heads, C::kDHead, C::kBlockN) ||
      !encode_bshd(&args.v, v, C::kBf16, map_batch, kv_rows, kv_heads, no_keys ? C::kDHead : C::kDHeadV, C::kBlockN) ||
      !encode_bshd(&args.o, p.o, C::kBf16, map_batch, q_rows, p.heads, C::kDHeadV, 64))
    return cudaErrorInvalidValue;
  const void* kernel = FLASHJIT_KERNEL(fwd_kernel, C);
  static bool opted_in[64] = {};
  cudaError_t err = opt_in_smem(kernel, C::kSmemBytes, &opted_in);
  if (err != cudaSuccess) return err;
  if (C::kCtasPerSm > 1) {  // the largest carveout, so that the driver's choice never leaves room for one CTA
    static bool carved[64] = {};
    int device = 0;
    err = cudaGetDevice(&device);
    if (err == cudaSuccess && (device >= 64 || !carved[device]))
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    if (err != cudaSuccess) return err;
    if (device < 64) carved[device] = true;
  }
  unsigned grid = unsigned(blocks);
  if (C::kPersistent) {  // one CTA per SM (kCtasPerSm), each walking its tile_of every round
    int device = 0;
    err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    static int sm_count[64] = {};
    if (device >= 64 || sm_count[device] == 0) {
      int count = 0;
      err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
      if (err != cudaSuccess) return err;
      if (device >= 64) grid = std::min(grid, unsigned(count * C::kCtasPerSm));
      else sm_count[device] = count;
    }
    if (device < 64) grid = std::min(grid, unsigned(sm_count[device] * C::kCtasPerSm));
  }
  if (args.p.tile_walk_grid != int(grid)) args.p.tile_walk = nullptr;  // made for another grid: the static walk
  return launch_kernel(kernel, grid, C::kThreads, C::kSmemBytes, stream, args);
}

}  // namespace flashjit::fwd_sm90

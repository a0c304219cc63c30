// Backward pass for Hopper (sm_90a): the dK/dV kernel of bwd_sm80.cuh with warpgroup MMAs.
//
// Same algorithm and the same first and last kernels (dvec_kernel, dq_convert_kernel); the dK/dV
// kernel (fast dQ path: an fp32 buffer) is rewritten around wgmma. One CTA per (128-key block, kv
// head, batch): two warpgroups, each owning 64 keys of the accumulators, walk the query blocks of every
// query head of the GQA group. With kHeadSplit one CTA per (key block, query head, batch) instead,
// adding dK/dV to fp32 sums that dkv_convert_kernel rounds (GQA grids too short to fill the GPU).
// Per step, warpgroup g (keys 64 g ..):
//   S^T  = K_g Q^T,  dP^T = V_g dO^T          A and B from shared memory (both K-major)
//   P^T, dS^T element-wise in registers       (the accumulator layout is mma.sync's)
//   dV_g += P^T dO,  dK_g += dS^T Q           A from registers, B N-major from shared memory
//   dS^T -> shared memory; barrier; dQ (this block's share) = dS K, added to the fp32 buffer by the
//   TMA unit (a bulk reduction per warp): the warpgroups split it by query rows (block_m 128) or
//   head-dim columns (64).
// Every product is asynchronous: P^T is computed while dP^T is still on the tensor cores, dS^T
// while dV is, and dS^T is stored while dK is. Unlike mma.sync, B never passes through registers,
// which is what frees the registers and the issue slots the sm_80 kernel runs out of.
// Variable-length batches as in bwd_sm80.cuh (common/varlen.cuh's Seq).
// d_head 129-256 (Config::kWide, TMA-fed only): CTAs of 64 keys whose two consumer warpgroups split
// each step by product instead of by keys (consume_wide: roles, hand-overs and barriers).
//
// Two ways to feed the steps (Config::kTma, BwdSm90Config.tma):
// dkdv_kernel (cp.async): the 256 threads copy K and V once and each step's Q, dO, lse and D one
//   step ahead into two stages. Two CTA barriers a step: the first publishes the step's copy and
//   retires every read of the stage the next copy refills and of dS^T, the second publishes dS^T.
// dkdv_tma_kernel (kTma): warp-specialised as fwd_sm90.cuh, one warpgroup more.
//   warpgroup 0       producer: gives its registers to the consumers (setmaxnreg). Warp 0's lane 0
//                     issues the TMA copies of K and V (once) and of each step's Q and dO; warp 1
//                     stores the step's lse (x log2 e, +inf past the sequence: P = 0 there) and D
//                     (0 there) from plain loads; warps 2 and 3 exit. With dropout (the narrow
//                     kernel) every producer warp also makes a quarter of the step's masks
//                     (make_step_masks).
//   warpgroups 1, 2   consumers: the steps above, 64 keys each (the cp.async kernel's 256 threads).
//   A step's Q, dO, lse, D (and masks) share one stage of a two-stage ring. Barriers (who arrives / waits):
//   kv_full           lane 0 (expect_tx: K and V)          / every consumer thread, before its first step
//   ring.full[s]      lane 0 (expect_tx: Q and dO) and the / every consumer thread, before S^T
//                     32 statistics lanes once stored (with
//                     masks: the 128 producer threads)
//   ring.empty[s]     every consumer thread, once its      / lane 0 and the statistics lanes (with
//                     step's products have retired           masks: every producer thread), before
//                                                            refilling stage s
//   Barrier::kConsumers  the 256 consumer threads: once a step, dS^T stored (both warpgroups' keys)
//                     before dQ; and around the epilogue's staging of dK and dV.
//   dS^T has two buffers (step parity): a warpgroup writes buffer b at step t + 2 only after the
//   barrier of step t + 1, which the other warpgroup reaches after its dQ of step t has retired, so
//   the cp.async kernel's first barrier has no job left. Rows past the sequence: TMA zero-fills past
//   the tensor; inside a varlen batch they are the next sequence's (finite), and lse +inf makes
//   their P and dS zero as in the cp.async kernel. Keys past the sequence: P = 0 by the mask.
#pragma once
#include <type_traits>
#include "bwd_sm80.cuh"
#include "common/grid_order.cuh"
#include "common/wgmma.cuh"
#include "common/sm90/mbarrier.cuh"
#include "common/sm90/tma.cuh"
#include "common/sm90/warpgroup.cuh"

namespace flashjit::bwd_sm90 {

using namespace flashjit::sm90;

// Named barrier ids (0 is __syncthreads): the producer-warpgroup kernel's 256 consumer threads, and
// the wide kernel's hand-overs between its two consumer warpgroups (consume_wide: the protocol) and
// each warpgroup's own epilogue (kStaged + warpgroup).
enum class Barrier : int { kConsumers = 1, kSDone = 2, kPReady = 3, kDsReady = 4, kStaged = 5 };

// One template parameter per BwdSm90Config field (flashjit/configs/bwd_sm90.py), in the same order.
// What this kernel fixes (two warpgroups of 64 keys, one 16-row group a warp, dQ by fp32 bulk
// reductions, never the deterministic dQ kernel) is a constant here and a class constant there.
template <bool kBf16_, int kDHead_, int kBlockM_, bool kCausal_, bool kLocal_, bool kSoftcap_, bool kAlibi_,
          bool kDropout_, bool kHeadSplit_, bool kTma_>
struct Config {
  static constexpr bool kBf16 = kBf16_, kCausal = kCausal_, kSwizzle = true, kDeterministic = false;
  static constexpr bool kDropout = kDropout_;
  // A step issues dQ before dK and writes dQ out while dK runs (step_products). Not with local+ALiBi,
  // nor with dropout but in the TMA kernel's 64-query steps (d65-d128; the producer makes the masks):
  // holding dQ across dK spilled 4-52 bytes in their step loops, so they issue dK first, dQ after.
  // (With dropout at d64 it spilled 4-12 bytes and measured -0.7 to +2.2% against dK first: not taken.)
  static constexpr bool kDqFirst = !(kDropout && !(kTma_ && kBlockM_ == 64)) && !(kLocal_ && kAlibi_);
  using Mod = ScoreMod<kCausal_, kLocal_, kSoftcap_, kAlibi_>;
  // 1 / (1 - p), applied once to dK, dV and dQ (see bwd_sm80.cuh).
  __device__ __forceinline__ static float dropout_scale(const BwdParams& p) {
    return kDropout ? p.mods.dropout_scale : 1.f;
  }
  // kDHead: the real head dim; kD: its tile, one to four 64-column swizzle blocks (configs/bwd_sm90.py:
  // wgmma_tile).
  static constexpr int kDHead = kDHead_, kWarps = 8, kThreads = kWarps * 32;
  static constexpr int kD = kDHead > 32 && kDHead <= 64 ? 64 : kDHead > 64 && kDHead <= 128 ? 128
                          : kDHead > 128 ? (kDHead + 63) / 64 * 64 : head_dim_tile(kDHead);
  // d_head 129-256 (a 192 or 256 tile): the wide kernel (consume_wide, below). Its accumulators
  // (dV or dK, 64 keys x kD) fill a warpgroup's registers, so a CTA holds 64 keys, both consumer
  // warpgroups work on all of them and split each step by product instead of by keys.
  static constexpr bool kWide = kDHead > 128;
  static constexpr int kDHeadV = kDHead, kDV = kD;  // v's head dim is q/k's (bwd_sm80.cuh's helpers read these)
  // queries per step, keys per CTA (64 per warpgroup; the wide kernel: 64 shared by both)
  static constexpr int kBlockM = kBlockM_, kBlockN = kWide ? 64 : 128;
  static constexpr int kNtM = kBlockM / 8, kNtD = kD / 8, kKsM = kBlockM / 16, kKsN = kBlockN / 16;
  // S^T's and dP^T's k-steps: the real head dim's, as the forward's kDMma (d_head 80 and 96 run in the
  // 128 tile, d_head 160 in the 192 one): the tile's columns past d_head are TMA's zeros, whose
  // products add nothing.
  static constexpr int kKsD = (kDHead + 15) / 16;
  // dQ of a step, [kBlockM, kD]: each warpgroup computes a 64 x 64 share, by rows when kBlockM = 128
  // (then kD = 64), else by columns (kD = 128).
  static constexpr bool kDqByRows = kBlockM == 128;
  // dq_accum, [B, H, kD / 64, Sq, 64] fp32 (varlen [H, kD / 64, total_q, 64], i the packed row) with
  // the 16-byte chunks of row i at chunk ^ (i % 8): each
  // warp's 16 x 64 share of a step's dQ is 4 KiB in one piece, staged conflict-free in shared memory
  // and added with one bulk reduction (bwd_sm80.cuh's dq_convert_kernel reads this layout).
  static constexpr bool kDqTiled = true;
  // One CTA per (key block, query head), not per kv head: its dK/dV share is added to p.dkv_accum's
  // fp32 sums by bulk reductions and bwd_sm80.cuh's dkv_convert_kernel rounds them. A template
  // parameter, not a runtime branch: the branch's epilogue cost the feature variants' step loops
  // 20-40 bytes of spills.
  static constexpr bool kHeadSplit = kHeadSplit_;
  // A producer warpgroup feeds the steps (dkdv_tma_kernel) instead of every thread copying
  // (dkdv_kernel). kThreads stays the 256 that compute: the per-warp roles and the copies out are
  // theirs; the CTA has kCtaThreads. The register split as fwd_sm90.cuh's with two consumers.
  static constexpr bool kTma = kTma_;
  static constexpr int kCtaThreads = kThreads + (kTma ? 128 : 0);
  static constexpr int kStatThreads = 32;  // the producer's threads that load a step's lse and D
  // Dropout in the narrow TMA kernel: the producer's four warps make each step's masks, every consumer
  // lane's PackedKeyRowsMask bits, into the step's stage (kMaskBytes: two stages of 8 bytes a consumer
  // thread), and each of their threads arrives on the stage's full barrier (kFillThreads: else the
  // statistics warp's alone). Made by the consumers in their own step, the Philox rounds cost the
  // d64 backward 9-14% (docs/perf-log.md, thirty-eighth session); moved here, dropout 0.1 ran +1.1 to
  // +4.2% at d64 and (with dQ first) +2.1 to +4.2% at d128 (H100, 1k / 4k, fortieth session).
  static constexpr bool kMaskWarps = kDropout && kTma && !kWide;
  static constexpr int kFillThreads = kMaskWarps ? 128 : kStatThreads, kMaskBytes = kMaskWarps ? 2 * kThreads * 8 : 0;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static constexpr int kDqStageBytes = 16 * 64 * 4;  // per warp
  using TileN = GmmaTile<kBlockN, kD>;       // K, V
  using TileM = GmmaTile<kBlockM, kD>;       // Q, dO (two stages each)
  using TileS = GmmaTile<kBlockN, kBlockM>;  // dS^T (two buffers with kTma)
  static constexpr int kDsBuffers = kTma && !kWide ? 2 : 1;
  // After lse and D: the dQ staging tiles (a warp's 16 x 64 fp32 each), or in the wide kernel P^T
  // (kBlockN x kBlockM), handed from warpgroup 0 to warpgroup 1, then a dQ staging tile a warp of
  // kWideDqRows rows. The wide kernel's dQ goes out by bulk reductions as the narrow kernel's: its
  // 16-byte reductions from registers took 55% of its time (the kernel ran 2.2x as fast without
  // them: docs/perf-log.md, 2026-12-04; the L2 at 82% of its throughput). At d_head 256 the whole
  // pieces do not fit: P^T goes over in fp16 (relative error 2^-11 on P in [0, 1], absolute 2^-25 below
  // 2^-14: under the 2^-9 of dS's own rounding in bf16, about as large as it in fp16) and a warp
  // stages half a piece at a time.
  static constexpr bool kPtHalf = kWide && kD > 192;
  static constexpr int kWideDqRows = kPtHalf ? 8 : 16;
  static constexpr int kPtBytes = kBlockN * kBlockM * (kPtHalf ? 2 : 4);
  static constexpr int kScratchBytes = kWide ? kPtBytes + kWarps * kWideDqRows * 64 * 4 : kWarps * kDqStageBytes;
  // kv_full and a Ring<2> (a step's Q, dO, lse and D), after everything else: the epilogues'
  // staging never reaches them.
  static constexpr int kBarrierBytes = kTma ? 8 * (1 + 2 * 2) : 0;
  // 1 KiB of slack: the dynamic shared memory is aligned up to the swizzle's 1024 bytes by hand.
  static constexpr int kSmemBytes = 1024 + 2 * TileN::kBytes + 4 * TileM::kBytes + kDsBuffers * TileS::kBytes +
                                    2 * 2 * kBlockM * 4 + kScratchBytes + kMaskBytes + kBarrierBytes;
  static_assert((kD == 64 && kBlockM == 128) || (kD >= 128 && kBlockM == 64),
                "the wgmma backward supports d_head 33-64 with block_m 128 and 65-256 with block_m 64");
  static_assert(!kWide || kTma, "the d_head 129-256 wgmma backward is fed only by its TMA producer (tma=True)");
  static_assert(!(kSoftcap_ && kBlockM == 128),
                "softcap's factors push the d_head 64 wgmma backward (128-query steps) past 255 registers");
  // dK and dV are staged for the copy out through the two Q stages and the two dO stages.
  static_assert(2 * kBlockM >= kBlockN, "dK/dV are staged through the Q / dO tiles");
  static_assert(kWide || kWarps * 2 * (kD / 64) * 16 * 64 * 4 <= kSmemBytes - 1024 - kBarrierBytes,
                "add_dkdv stages dK and dV in fp32");  // the wide kernel: over Q's and dO's stages
  static_assert(kSmemBytes <= 227 * 1024, "the dK/dV kernel's tiles need more than 227 KiB of shared memory");
  // setmaxnreg moves registers only within the pool the launch bound gives a CTA (.inc waits forever
  // for more): 168 a thread at 384 threads, so 24 + 2 x 240 at most.
  static_assert(!kTma || 128 * kProducerRegs + kThreads * kConsumerRegs <= kCtaThreads * ((65536 / kCtaThreads) & ~7),
                "the warpgroups' setmaxnreg counts exceed the registers the launch bound gives a CTA");
};

#ifdef __CUDACC__  // device code (the launcher's host-only build skips it: common/launch.cuh)
// A warp's 16 x 64 fp32 share of an accumulator (n-tiles nt0 .. nt0 + 7 of acc, rows (lane >> 2) + 8 h),
// times scale, into a 16 x 64 staging tile laid out as dq_accum tiles its buffer: 16-byte chunk c of
// row r at c ^ ((r + row_base) & 7), row_base the buffer row of the tile's row 0 mod 8. The stores
// are conflict-free (8 rows, 8 chunks), and the tile is one contiguous run of the buffer.
// kHalf 0 or 1: only that 8-row half of the share, into an 8 x 64 tile (the same layout: 8 is a
// multiple of the swizzle's period).
template <int kNt, int kHalf = -1>
__device__ __forceinline__ void stage_rows_f32(float* tile, const float (&acc)[kNt][4], int nt0, int row_base, float scale,
                                               int lane) {
#pragma unroll
  for (int half = kHalf < 0 ? 0 : kHalf; half < (kHalf < 0 ? 2 : kHalf + 1); ++half) {
    const int key = ((lane >> 2) + half * 8 + row_base) & 7, r = (lane >> 2) + (kHalf < 0 ? half * 8 : 0);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
      *reinterpret_cast<float2*>(tile + r * 64 + (((2 * nt + (lane & 3) / 2) ^ key) * 4) + (lane & 1) * 2) =
          make_float2(acc[nt0 + nt][2 * half] * scale, acc[nt0 + nt][2 * half + 1] * scale);
  }
}

// With kHeadSplit, a warp's 16 key rows of dK or dV reach p.dkv_accum's fp32 sums (params.cuh) by
// bulk reductions: staged in shared memory as kD / 64 pieces of 16 x 64 floats in the tiling
// dq_accum has (stage_dkdv_rows), so each piece is one contiguous 4 KiB run there, written
// conflict-free; then lane 0 adds the real rows (reduce_dkdv_rows). From registers, each 16-byte
// reduction makes 16 L2 requests (the wide kernel's dQ that way took 55% of its time).
template <class C>
__device__ __forceinline__ void stage_dkdv_rows(float* stage, const float (&acc)[1][C::kNtD][4], float scale,
                                                const Seq& seq, int lane) {
  // The buffer row of the tile's row 0 is k_start + the CTA's key row, a multiple of 16.
#pragma unroll
  for (int piece = 0; piece < C::kD / 64; ++piece)
    stage_rows_f32(stage + piece * 1024, acc[0], piece * 8, seq.k_start, scale, lane);
}
// Lane 0: the staged rows row0 .. row0 + rows - 1 (rows > 0) of sum t (0: dK, 1: dV) of kv head h_k.
template <class C>
__device__ __forceinline__ void reduce_dkdv_rows(const BwdParams& p, const Seq& seq, int b, int h_k, int t, int row0,
                                                 int rows, const float* stage) {
  constexpr int kHalves = C::kD / 64;
  // Plane b * H_k + h_k of key_plane_rows (varlen: plane h_k, and k_start is the packed row).
  const int64_t plane = is_varlen(p) ? h_k : int64_t(b) * p.heads_k + h_k;
  const int plane_rows = key_plane_rows(p);
#pragma unroll
  for (int piece = 0; piece < kHalves; ++piece)
    bulk_reduce_add_f32(p.dkv_accum + t * key_rows(p) * C::kD +
                            ((plane * kHalves + piece) * plane_rows + seq.k_start + row0) * 64,
                        stage + piece * 1024, uint32_t(rows) * 64 * 4);
}

// The narrow kernel's dK and dV of this warp's 16 key rows (from key row0, `rows` of them real),
// scaled, added to the sums: staged from the start of shared memory (the whole buffer is free by now;
// 2 kD / 64 pieces a warp).
template <class C>
__device__ __forceinline__ void add_dkdv(const BwdParams& p, const Seq& seq, int b, int h_k, int row0, int rows,
                                         const float (&dk)[1][C::kNtD][4], const float (&dv)[1][C::kNtD][4],
                                         unsigned char* smem, int lane, int warp) {
  constexpr int kHalves = C::kD / 64;
  float* stage = reinterpret_cast<float*>(smem) + warp * 2 * kHalves * 16 * 64;
  const float scale_v = C::dropout_scale(p), scale_k = p.softmax_scale * scale_v;
#pragma unroll
  for (int piece = 0; piece < kHalves; ++piece) {  // dK's and dV's pieces in turn (stage_dkdv_rows' order)
    stage_rows_f32(stage + piece * 1024, dk[0], piece * 8, seq.k_start, scale_k, lane);
    stage_rows_f32(stage + (kHalves + piece) * 1024, dv[0], piece * 8, seq.k_start, scale_v, lane);
  }
  fence_proxy_async();
  __syncwarp();
  if (lane == 0 && rows > 0) {
    for (int t = 0; t < 2; ++t) reduce_dkdv_rows<C>(p, seq, b, h_k, t, row0, rows, stage + t * kHalves * 1024);
    bulk_wait_read<0>();  // the sources are read before the CTA (and its shared memory) is gone
  }
}


// The shared memory of either kernel: K, V, two stages of Q and of dO, dS^T (kDsBuffers), two
// stages of lse and D, a dQ staging tile per warp (the wide kernel: P^T and dQ staging), then (kTma) the
// barriers.
template <class C>
struct Smem {
  elem_t *k, *v, *q, *dout, *ds;
  float *lse, *dvec, *dq;
  uint2* mask;  // C::kMaskWarps: two stages of a uint2 a consumer thread
  uint64_t* kv_full;
  Ring<2>* ring;  // a step's Q, dO, lse and D (and with dropout its masks)

  __device__ __forceinline__ explicit Smem(unsigned char* base) {
    k = reinterpret_cast<elem_t*>(base);
    v = k + C::TileN::kBytes / 2;
    q = v + C::TileN::kBytes / 2;
    dout = q + 2 * C::TileM::kBytes / 2;
    ds = dout + 2 * C::TileM::kBytes / 2;
    lse = reinterpret_cast<float*>(ds + C::kDsBuffers * C::TileS::kBytes / 2);
    dvec = lse + 2 * C::kBlockM;
    dq = dvec + 2 * C::kBlockM;
    mask = reinterpret_cast<uint2*>(dq + C::kScratchBytes / 4);
    kv_full = reinterpret_cast<uint64_t*>(mask + C::kMaskBytes / 8);
    ring = reinterpret_cast<Ring<2>*>(kv_full + 1);
  }
  __device__ __forceinline__ elem_t* q_stage(int s) const { return q + s * C::TileM::kBytes / 2; }
  __device__ __forceinline__ elem_t* dout_stage(int s) const { return dout + s * C::TileM::kBytes / 2; }
  __device__ __forceinline__ float* lse_stage(int s) const { return lse + s * C::kBlockM; }
  __device__ __forceinline__ float* dvec_stage(int s) const { return dvec + s * C::kBlockM; }
  __device__ __forceinline__ uint2* mask_stage(int s) const { return mask + s * C::kThreads; }
};

// What a CTA computes: its key block, batch, kv head and query heads (h0 .. h0 + heads - 1): every
// head of the GQA group, or with kHeadSplit one; its sequence and its steps. The grid's rows are
// (batch, kv head) pairs, or with kHeadSplit (batch, query head) pairs, and a row's key blocks run
// together (they read the same Q and dO, which then come from L2); causal grids take
// common/grid_order.cuh's order (a row's longest CTA, key block 0, first; the last rows block-outermost).
template <class C>
struct Work {
  int b, h_k, key0;
  Seq seq;
  int keys;  // of the block, in [1, kBlockN] unless idle()
  bwd::QuerySteps<C> steps;

  __device__ __forceinline__ explicit Work(const BwdParams& p, unsigned block = blockIdx.x) : Work(p, ids(p, block)) {}
  // Past its sequence's keys (varlen: the grid fits the longest): nothing to do, not even a copy out.
  __device__ __forceinline__ bool idle() const { return keys <= 0; }

 private:
  struct Ids {
    int n_block, b, h_k, h0;
  };
  __device__ __forceinline__ static Ids ids(const BwdParams& p, unsigned block) {
    const int num_n = (p.seqlen_k + C::kBlockN - 1) / C::kBlockN, group = p.heads / p.heads_k;
    const int heads = C::kHeadSplit ? p.heads : p.heads_k;  // a row's head: a query head, or a kv head
    const GridPos at = C::kCausal ? longest_first(int(block), p.batch * heads, num_n)
                                  : GridPos{int(block) / num_n, int(block) % num_n};
    const int h = at.row % heads;
    if constexpr (C::kHeadSplit) return {at.block, at.row / heads, h / group, h};
    else return {at.block, at.row / heads, h, h * group};
  }
  __device__ __forceinline__ Work(const BwdParams& p, Ids id)
      : b(id.b), h_k(id.h_k), key0(id.n_block * C::kBlockN), seq(p, id.b), keys(min(C::kBlockN, seq.len_k - key0)),
        steps(p, seq, id.b, id.h0, C::kHeadSplit ? 1 : p.heads / p.heads_k, key0, keys) {}
};

// A consumer warpgroup's descriptors: K and V as K-major A (its 64 rows), Q and dO as K-major B
// (scores) and as N-major B (dV, dK), K as N-major B and dS^T as M-major A (dQ). Stage s of Q / dO
// and buffer b of dS^T are these moved on by s * TileM::kBytes and b * TileS::kBytes.
template <class C>
struct Descs {
  uint64_t k_a, v_a, q_b, dout_b, ds_a, kq_b;

  __device__ __forceinline__ Descs(const Smem<C>& sm, int wg)
      : k_a(gmma_desc(smem_addr(sm.k) + wg * 64 * 128, 16)),
        v_a(gmma_desc(smem_addr(sm.v) + wg * 64 * 128, 16)),
        q_b(gmma_desc(smem_addr(sm.q), C::TileM::kBlockBytes)),
        dout_b(gmma_desc(smem_addr(sm.dout), C::TileM::kBlockBytes)),
        ds_a(gmma_desc(smem_addr(sm.ds) + (C::kDqByRows ? wg * C::TileS::kBlockBytes : 0), C::TileS::kBlockBytes)),
        kq_b(gmma_desc(smem_addr(sm.k) + (C::kDqByRows ? 0 : wg * C::TileN::kBlockBytes), C::TileN::kBlockBytes)) {}
};

// The two kinds of a step's products for a warpgroup's 64 keys (every product issued, none committed):
// acc = A B^T over the head dim, A 64 rows of K or V (K-major), B the Q or dO stage at b_bytes
// (K-major): S^T or dP^T.
template <class C>
__device__ __forceinline__ void gemm_scores_t(float (&acc)[C::kNtM][4], uint64_t a, uint64_t b, uint32_t b_bytes) {
#pragma unroll
  for (int ks = 0; ks < C::kKsD; ++ks)
    wgmma_ss<C::kBlockM, C::kBf16, 0, 0>(acc, gmma_desc_add(a, kmajor_step<C::kBlockN>(ks)),
                                         gmma_desc_add(b, b_bytes + kmajor_step<C::kBlockM>(ks)), ks > 0);
}
// acc += A B, A a 64 x kBlockM fragment in registers (P^T or dS^T), B the Q or dO stage at b_bytes
// (N-major): dV or dK.
template <class C>
__device__ __forceinline__ void gemm_frag_t(float (&acc)[C::kNtD][4], const uint32_t (&a)[C::kKsM][4], uint64_t b,
                                            uint32_t b_bytes) {
#pragma unroll
  for (int ks = 0; ks < C::kKsM; ++ks)
    wgmma_rs<C::kD, C::kBf16, 1>(acc, a[ks], gmma_desc_add(b, b_bytes + mnmajor_step(ks)), true);
}

// P^T from S^T in place, for a warp's 16 keys (my_key0 and my_key0 + 8: row halves) and the kNtM
// query n-tiles from row0 (s_lse: their lse in log2 units): exp2(scaled - lse) where visible, else
// 0. Softcap's chain-rule factors (in [0, 1]) go to grad as fp16 pairs: as fp32 they pushed d_head
// 64 into spills.
template <class C>
__device__ __forceinline__ void probabilities_t(const typename C::Mod& mod, float (&st)[C::kNtM][4],
                                                uint32_t (&grad)[C::Mod::kSoftcap ? C::kNtM : 1][2],
                                                const float* s_lse, int row0, int my_key0, int lane, float scale_log2) {
  // The queries each of this lane's keys (my_key0 + 8 half) sees, as columns nt * 8 + (e & 1) from
  // its first, row0 + (lane & 3) * 2.
  const typename C::Mod::KeyRange range[2] = {mod.template key_range<C::kBlockM>(row0 + (lane & 3) * 2, my_key0),
                                              mod.template key_range<C::kBlockM>(row0 + (lane & 3) * 2, my_key0 + 8)};
#pragma unroll
  for (int nt = 0; nt < C::kNtM; ++nt) {
    // Both columns' lse in one load, read by both halves: loaded per element, ptxas sank each load under
    // its half's range predicate, four scalar loads where one pair does (d64: 64 LDS a step, now 16).
    const float2 lse = *reinterpret_cast<const float2*>(s_lse + nt * 8 + (lane & 3) * 2);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float g[2];
#pragma unroll
      for (int e = 2 * half; e < 2 * half + 2; ++e)
        st[nt][e] = bwd::probability_in<C>(mod, range[half], nt * 8 + (e & 1), st[nt][e], e & 1 ? lse.y : lse.x,
                                           scale_log2, g[e & 1]);
      if (C::Mod::kSoftcap) grad[nt][half] = pack2<false>(g[0], g[1]);
    }
  }
}

// One step's products for this warp's 16 keys (from my_key0; its rows r0 of the CTA's 128) and
// step_products' with_dq: the caller's dQ writer when C::kDqFirst, else one that does nothing. (The
// writer passed in unused, its references to the loop's locals cost the dropout step loop 4 bytes of
// spills.)
template <class C, class F>
__device__ __forceinline__ auto dq_writer(const F& write) {
  if constexpr (C::kDqFirst) return write;
  else return [](const float (&)[64 / 8][4]) {};
}

// query block row0 of head mod's: dV, dK accumulated, dQ (this warpgroup's share) returned, every
// product retired on return. stage_bytes: the Q / dO stage; s_lse, s_dvec: its statistics; sdS,
// ds_bytes: the dS^T buffer. sync_ds() runs between storing dS^T and dQ (every warp's keys of dS^T
// are in). With C::kDqFirst, with_dq(dq) once dQ has retired, while dK still runs (it writes dQ
// out); otherwise the caller writes dQ after the step.
template <class C, class Mask, class SyncDs, class WithDq>
__device__ __forceinline__ void step_products(const typename C::Mod& mod, const Descs<C>& d, uint32_t stage_bytes,
                                              const float* s_lse, const float* s_dvec, elem_t* sdS, uint32_t ds_bytes,
                                              const Mask& keep, int row0, int my_key0, int r0, int lane,
                                              float scale_log2, float (&dk)[1][C::kNtD][4],
                                              float (&dv)[1][C::kNtD][4], float (&dq)[64 / 8][4], SyncDs sync_ds,
                                              WithDq with_dq) {
  // S^T = K Q^T and dP^T = V dO^T, two commit groups.
  float st[1][C::kNtM][4], dpt[1][C::kNtM][4];
  wgmma_fence();
  gemm_scores_t<C>(st[0], d.k_a, d.q_b, stage_bytes);
  wgmma_commit();
  gemm_scores_t<C>(dpt[0], d.v_a, d.dout_b, stage_bytes);
  wgmma_commit();

  // P^T (rows = keys, columns = queries) while dP^T runs.
  wgmma_wait<1>();
  wgmma_settle(st[0]);
  // Softcap's chain-rule factors (in [0, 1]) as fp16 pairs: as fp32 they pushed d_head 64 into spills.
  uint32_t grad[C::Mod::kSoftcap ? C::kNtM : 1][2];
  const auto query = [&](int nt, int e) { return nt * 8 + (lane & 3) * 2 + (e & 1); };  // in the block
  // The key ranges (probabilities_t), but not in the cp.async kernel with softcap (255 registers and
  // spilling already): there they cost 8 spill instructions more.
  if constexpr (C::kTma || !C::Mod::kSoftcap) {
    probabilities_t<C>(mod, st[0], grad, s_lse, row0, my_key0, lane, scale_log2);
  } else {
#pragma unroll
    for (int nt = 0; nt < C::kNtM; ++nt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float g[2];
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          const int col = query(nt, e);
          st[0][nt][e] = bwd::probability<C>(mod, st[0][nt][e], row0 + col, my_key0 + half * 8, s_lse[col],
                                             scale_log2, g[e & 1]);
        }
        if (C::Mod::kSoftcap) grad[nt][half] = pack2<false>(g[0], g[1]);
      }
  }
  // Dropout in the producer-warpgroup kernel: the mask in P^T's sign bit (dropped: -P, as
  // FlashAttention-2), one flag test an element (R2P, 7 at a time) for both uses: the dV operand,
  // packed with ReLU (dropped -> 0, kept as before), and dS^T's Z in FP32 arithmetic below, where
  // a bit test and a select an element sat in an issue-bound stretch.
  constexpr bool kSignMask = C::kDropout && C::kTma;
  if constexpr (kSignMask) keep.sign_code(st[0]);
  uint32_t pa[1][C::kNtM / 2][4];
  acc_to_a<C::kBf16, kSignMask>(st, pa);
  if constexpr (C::kDropout && !kSignMask) keep.apply(pa);  // P o Z
  wgmma_fence();
  gemm_frag_t<C>(dv[0], pa[0], d.dout_b, stage_bytes);  // dV += P^T dO
  wgmma_commit();

  // dS^T = P^T o (Z o dP^T - D) while dV runs.
  wgmma_wait<1>();
  wgmma_settle(dpt[0]);
  for_each_acc<1, C::kNtM>([&](int, int nt, int e) {
    // dS^T / rp, rp = 1 / (1 - p): dS = P o (Z o dP rp - D), and s_dvec holds D / rp.
    float dp = dpt[0][nt][e];
    if constexpr (kSignMask) {
      // P is 0 or normal (ex2.approx.ftz), so z = sat(2^127 P_signed) is Z exactly and
      // |P_signed| (z dP - D) rounds as P (Z o dP - D) does: three FP32 operations.
      const float ps = st[0][nt][e];
      dpt[0][nt][e] = fabsf(ps) * fmaf(__saturatef(ps * 0x1p127f), dp, -s_dvec[query(nt, e)]);
    } else {
      if constexpr (C::kDropout) dp = keep.masked(dp, 0, nt, e);
      dpt[0][nt][e] = st[0][nt][e] * (dp - s_dvec[query(nt, e)]);
    }
    if constexpr (C::Mod::kSoftcap) {
      float g[2];
      unpack2<false>(grad[nt][e >> 1], g[0], g[1]);
      dpt[0][nt][e] *= g[e & 1];
    }
  });
  uint32_t dsa[1][C::kNtM / 2][4];
  acc_to_a<C::kBf16>(dpt, dsa);
  if constexpr (!C::kDqFirst) {
    wgmma_fence();
    gemm_frag_t<C>(dk[0], dsa[0], d.q_b, stage_bytes);  // dK += dS^T Q, under the dS^T store
    wgmma_commit();
  }

  // dS^T to shared memory; then this warpgroup's share of dQ = dS K, and dK += dS^T Q after it, so
  // that dQ retires first and is written out (with_dq) while dK runs (as FlashAttention-3 orders
  // them); issued the other way round, the tensor cores sat idle while each warp staged its dQ.
  stmatrix_a<typename C::TileS>(sdS, dsa, r0, lane);
  fence_proxy_async();
  sync_ds();
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < C::kKsN; ++ks)
    wgmma_ss<64, C::kBf16, 1, 1>(dq, gmma_desc_add(d.ds_a, ds_bytes + mnmajor_step(ks)),
                                 gmma_desc_add(d.kq_b, mnmajor_step(ks)), ks > 0);
  wgmma_commit();
  if constexpr (C::kDqFirst) {
    gemm_frag_t<C>(dk[0], dsa[0], d.q_b, stage_bytes);  // dK += dS^T Q
    wgmma_commit();
  }
  if constexpr (C::kDqFirst) {
    wgmma_wait<1>();
    wgmma_settle(dq);
    with_dq(dq);
    wgmma_wait<0>();
  } else {
    wgmma_wait<0>();
    wgmma_settle(dq);
  }
  wgmma_settle(dk[0]);
  wgmma_settle(dv[0]);
}

// This warp's 16 rows of a step's dQ (query block row0 of head h: rows dq_row .., 64-column half
// dq_half) added to dq_accum: staged in s_dq once the previous step's reduction has read it, then
// one bulk reduction.
template <class C>
__device__ __forceinline__ void add_dq(const BwdParams& p, const Seq& seq, int h, int row0, int dq_row, int dq_half,
                                       float* s_dq, const float (&dq)[64 / 8][4], int lane) {
  if (lane == 0) bulk_wait_read<0>();
  __syncwarp();
  // The buffer row of the tile's row 0 is q_start + row0 + dq_row, and row0, dq_row are multiples of
  // 16 (q_start, a varlen sequence's first row, is 0 when dense).
  stage_rows_f32(s_dq, dq, 0, seq.q_start, 1.f, lane);
  fence_proxy_async();
  __syncwarp();
  const int dq_rows = min(16, seq.len_q - row0 - dq_row);
  if (lane == 0 && dq_rows > 0)
    bulk_reduce_add_f32(p.dq_accum + ((int64_t(seq.plane0 + h) * (C::kD / 64) + dq_half) * seq.plane_rows +
                                      seq.q_start + row0 + dq_row) * 64,
                        s_dq, uint32_t(dq_rows) * 64 * 4);
}

// After the last step (every Q / dO stage landed and read): dK and dV out, by the 256 threads that
// computed them (tid, warp: among those); sync() is a barrier of theirs. Staged through the Q / dO
// stages (plain swizzled rows, as bwd_sm80.cuh: both hold 2 * kBlockM >= kBlockN rows) for
// coalesced stores, or with kHeadSplit added to the fp32 sums.
template <class C, class Sync>
__device__ __forceinline__ void write_dkdv(const BwdParams& p, const Work<C>& w, const Smem<C>& sm,
                                          unsigned char* smem, float (&dk)[1][C::kNtD][4],
                                          float (&dv)[1][C::kNtD][4], int r0, int tid, Sync sync) {
  const int lane = tid & 31, warp = tid >> 5;
  // The dQ reductions have read this warp's staging tile (nothing in this kernel reads dq_accum, and
  // the dQ conversion is a later launch, so their writes need not have landed: FlashAttention-3's
  // backward waits for the read alone too).
  if (lane == 0) bulk_wait_read<0>();
  sync();  // every wgmma read of the Q / dO stages and of K / V is done (each warpgroup waited for its own)
  if constexpr (C::kHeadSplit) {
    add_dkdv<C>(p, w.seq, w.b, w.h_k, w.key0 + r0, min(16, w.keys - r0), dk, dv, smem, lane, warp);
    return;
  }
  store_acc<C::kD, C::kSwizzle, C::kBf16>(sm.q, dk, r0, lane, p.softmax_scale * C::dropout_scale(p));
  store_acc<C::kD, C::kSwizzle, C::kBf16>(sm.dout, dv, r0, lane, C::dropout_scale(p));
  sync();
  bwd::store_rows<C, C::kBlockN>(p.dk, w.b, w.h_k, w.seq.k_start + w.key0, sm.q, w.keys, tid);
  bwd::store_rows<C, C::kBlockN>(p.dv, w.b, w.h_k, w.seq.k_start + w.key0, sm.dout, w.keys, tid);
}

// Dropout (common/dropout.cuh): this warp's masks, rows = keys, for a step (nothing made unless
// enabled). The cp.async kernel and the wide kernel's WG0 make them at the end of the step before and
// hold them through this one's S^T and P^T (the narrow TMA kernel's come from its producer warps:
// make_step_masks): the TMA kernels' 240 registers hold them packed (2 registers instead of kNtM / 2:
// d_head 64's dropout spilled 57-67 instructions' worth without), the cp.async kernel's 255 as the
// sm_80 kernel does.
template <class C>
using StepMask = std::conditional_t<C::kTma, PackedKeyRowsMask<C::kNtM>, KeyRowsMask<1, C::kNtM>>;
template <class C>
__device__ __forceinline__ StepMask<C> step_mask(const BwdParams& p, int b, typename bwd::QuerySteps<C>::Pos s,
                                                 int my_key0, int lane, bool enabled = C::kDropout) {
  return StepMask<C>(enabled, Dropout(p.mods, int(int64_t(b) * p.heads + s.h)), s.row0, my_key0, lane);
}

// ---- The cp.async kernel -------------------------------------------------------------------------
template <class C>
__global__ void __launch_bounds__(C::kThreads, 1) dkdv_kernel(const __grid_constant__ BwdParams p) {
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
  unsigned char* smem = smem_raw + (base - smem_addr(smem_raw));
  const Smem<C> sm(smem);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0);  // warpgroup: a shuffle makes it warp-uniform to the compiler
  const int r0 = warp * 16;  // this warp's first key row: warpgroup wg's 64 keys, 16 per warp
  const Work<C> w(p);
  if (w.idle()) return;
  const Seq& seq = w.seq;
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;

  load_gmma_tile<C::kBlockN, C::kD, C::kThreads, C::kDHead>(sm.k, p.k.at<const elem_t>(w.b, w.h_k, seq.k_start + w.key0),
                                                            p.k.row_stride, w.keys, tid);
  load_gmma_tile<C::kBlockN, C::kD, C::kThreads, C::kDHead>(sm.v, p.v.at<const elem_t>(w.b, w.h_k, seq.k_start + w.key0),
                                                            p.v.row_stride, w.keys, tid);
  cp_async_commit();

  float dk[1][C::kNtD][4], dv[1][C::kNtD][4];
  zero(dk);
  zero(dv);
  const int my_key0 = w.key0 + r0 + (lane >> 2);  // key of row half h: my_key0 + 8 h
  const Descs<C> d(sm, wg);
  // This warp's 16 rows of the step's dQ block, in 64-column half dq_half of dq_accum, and where
  // its 16 x 64 share is staged for the bulk reduction.
  const int dq_row = (C::kDqByRows ? wg * 64 : 0) + (warp & 3) * 16, dq_half = C::kDqByRows ? 0 : wg;
  float* s_dq = sm.dq + warp * (C::kDqStageBytes / 4);

  // One step per (query head of the group, query block), software-pipelined over two Q / dO
  // stages as in bwd_sm80.cuh. Two barriers per step: the first publishes the step's copy and
  // retires every read of the stage the next copy refills and of dS^T; the second publishes dS^T.
  using StepPos = typename bwd::QuerySteps<C>::Pos;
  const int steps = w.steps.count;
  auto stage = [&](StepPos s, int buf) {
    const int rows = min(C::kBlockM, seq.len_q - s.row0);
    load_gmma_tile<C::kBlockM, C::kD, C::kThreads, C::kDHead>(sm.q_stage(buf),
                                                              p.q.at<const elem_t>(w.b, s.h, seq.q_start + s.row0),
                                                              p.q.row_stride, rows, tid);
    load_gmma_tile<C::kBlockM, C::kD, C::kThreads, C::kDHead>(sm.dout_stage(buf),
                                                              p.dout.at<const elem_t>(w.b, s.h, seq.q_start + s.row0),
                                                              p.dout.row_stride, rows, tid);
    bwd::load_row_stats<C>(sm.lse_stage(buf), sm.dvec_stage(buf), p, seq.stat_row(s.h, 0), seq.len_q, s.row0, tid);
  };
  StepPos cur = w.steps.first();
  if (steps > 0) stage(cur, 0);
  cp_async_commit();
  // Each step makes the next step's dropout masks at its very end, where the warps would otherwise
  // wait at the top of the loop for the next block and the other warpgroup. Made inside the step,
  // ptxas put the Philox calls after the wait for S^T, on the path to the dV product (d64: 15-20%
  // cost, now 6-9%).
  auto keep = step_mask<C>(p, w.b, cur, my_key0, lane);
  for (int step = 0; step < steps; ++step) {
    cp_async_wait<0>();  // K, V and this step's block have landed (for this thread)
    fence_proxy_async();
    __syncthreads();
    const StepPos next = w.steps.next(cur);
    if (step + 1 < steps) stage(next, (step + 1) & 1);
    cp_async_commit();
    const int buf = step & 1;
    const typename C::Mod mod(p.mods, seq.len_q, seq.len_k, p.softmax_scale, w.b, cur.h);
    float dq[64 / 8][4];
    const auto write_dq = [&](const float (&q)[64 / 8][4]) {
      add_dq<C>(p, seq, cur.h, cur.row0, dq_row, dq_half, s_dq, q, lane);
    };
    step_products<C>(mod, d, buf * C::TileM::kBytes, sm.lse_stage(buf), sm.dvec_stage(buf), sm.ds, 0, keep, cur.row0,
                     my_key0, r0, lane, scale_log2, dk, dv, dq, [] { __syncthreads(); }, dq_writer<C>(write_dq));
    if constexpr (!C::kDqFirst) write_dq(dq);
    if (step + 1 < steps) keep = step_mask<C>(p, w.b, next, my_key0, lane);
    cur = next;
  }
  cp_async_wait<0>();
  write_dkdv<C>(p, w, sm, smem, dk, dv, r0, tid, [] { __syncthreads(); });
}
#endif  // __CUDACC__

// ---- The producer-warpgroup (TMA) kernel ---------------------------------------------------------
// The kernel's parameters: the plain ones and a TMA map per tensor it loads (encoded by launch()).
struct Args {
  BwdParams p;
  CUtensorMap q, dout, k, v;
};

#ifdef __CUDACC__  // device code (the launcher's host-only build skips it: common/launch.cuh)
// bwd::load_row_stats for the producer's statistics warp (24 registers): the step's kBlockM rows from
// statistic `stat` (its row 0; `rows` of them real), lane and lane + 32 i, through one pointer per
// tensor and immediate offsets (the per-row 64-bit index sums spilled at d64's four rows a lane).
template <class C>
__device__ __forceinline__ void store_step_stats(float* s_lse, float* s_dvec, const BwdParams& p, uint64_t stat,
                                                 int rows, int lane) {
  static_assert(C::kBlockM % C::kStatThreads == 0 && C::kStatThreads == 32, "a warp, whole rows a lane");
  const float* lse = p.lse + stat + lane;
  const float* dvec = p.dvec + stat + lane;
  rows -= lane;
#pragma unroll
  for (int i = 0; i < C::kBlockM / 32; ++i) {
    const bool valid = i * 32 < rows;
    s_lse[lane + i * 32] = valid ? lse[i * 32] * 1.4426950408889634f : INFINITY;
    s_dvec[lane + i * 32] = valid ? dvec[i * 32] : 0.f;
  }
}

// C::kMaskWarps: producer warp `pw` makes the step's dropout masks of consumer warps pw and pw + 4
// into stage `stage` (lane for lane: the calls and the shuffle a consumer lane would make,
// common/dropout.cuh). One Philox call at a time: d64's four calls a warp unrolled spilled (24
// bytes even in 32 registers; the producer has 24).
template <class C>
__device__ __forceinline__ void make_step_masks(const BwdParams& p, const Smem<C>& sm, const Work<C>& w,
                                                typename bwd::QuerySteps<C>::Pos s, int stage, int pw, int lane) {
  using Mask = PackedKeyRowsMask<C::kNtM>;
  const Dropout drop(p.mods, int(int64_t(w.b) * p.heads + s.h));
#pragma unroll 1
  for (int warp = pw; warp < C::kWarps; warp += 4) {
    uint32_t half[2] = {0u, 0u};
#pragma unroll 1
    for (int span = 0; span < Mask::kSpans; ++span)
      Mask::add_call(half, span, drop.keep_flags(Mask::call_query(s.row0, span, lane), w.key0 + warp * 16 + (lane >> 2)));
    sm.mask_stage(stage)[warp * 32 + lane] = Mask::finish(half, lane);
  }
}

// The producer warpgroup's warp `warp`: warp 0's lane 0 issues the TMA copies, K and V once, then
// per step Q and dO into a stage once the consumers have released its previous step; warp 1 stores
// the step's lse and D there. With dropout (C::kMaskWarps) every producer warp also makes a quarter
// of the step's masks (make_step_masks), a stage ahead of the consumers, on issue slots they leave
// idle while they wait for their products; without, warps 2 and 3 and warp 0's other lanes exit. A
// CTA with no step does nothing (its consumers wait for nothing either). Each warp keeps only its
// own loop's state: kProducerRegs registers.
template <class C>
__device__ __forceinline__ void produce(const Args& args, const Smem<C>& sm, int warp, int lane) {
  const BwdParams& p = args.p;
  if (!C::kMaskWarps && (warp > 1 || (warp == 0 && lane > 0))) return;
  const Work<C> w(p);
  if (w.idle() || w.steps.count == 0) return;
  RingState<2> st;
  auto s = w.steps.first();
  const auto masks = [&] {
    if constexpr (C::kMaskWarps) make_step_masks<C>(p, sm, w, s, st.stage, warp, lane);
  };
  if (C::kMaskWarps ? warp > 0 : warp == 1) {
    for (int step = 0; step < w.steps.count; ++step, s = w.steps.next(s), st.advance()) {
      sm.ring->wait_free(st);
      if (!C::kMaskWarps || warp == 1) {
        // Seq::stat_row(s.h, s.row0) as one unsigned 32 x 32 -> 64 multiply-add (every term is
        // non-negative): its signed 64-bit product needed a register more, and spilled.
        const uint64_t stat = uint64_t(uint32_t(w.seq.plane0 + s.h)) * uint32_t(w.seq.plane_rows) +
                              uint32_t(w.seq.q_start + s.row0);
        store_step_stats<C>(sm.lse_stage(st.stage), sm.dvec_stage(st.stage), p, stat, w.seq.len_q - s.row0, lane);
      }
      masks();
      sm.ring->filled(st);
    }
    return;
  }
  // The maps' batch entry: b, or a varlen batch's one entry (its sequences' rows packed).
  const int tma_b = p.varlen.cu_seqlens_q != nullptr ? 0 : w.b;
  // A tile of kD columns at `row` of head `head`: one box per 64-column block.
  const auto load = [&](const CUtensorMap* map, elem_t* dst, uint64_t* bar, int block_bytes, int row, int head) {
#pragma unroll
    for (int c = 0; c < C::kD / 64; ++c) tma_load_4d(dst + c * block_bytes / 2, map, bar, c * 64, row, head, tma_b);
  };
  const bool issuer = !C::kMaskWarps || lane == 0;
  if (issuer) {
    tma_prefetch_map(&args.q);
    tma_prefetch_map(&args.dout);
    mbarrier_arrive_expect_tx(sm.kv_full, 2 * C::TileN::kBytes);
    load(&args.k, sm.k, sm.kv_full, C::TileN::kBlockBytes, w.seq.k_start + w.key0, w.h_k);
    load(&args.v, sm.v, sm.kv_full, C::TileN::kBlockBytes, w.seq.k_start + w.key0, w.h_k);
  }
  for (int step = 0; step < w.steps.count; ++step, s = w.steps.next(s), st.advance()) {
    sm.ring->wait_free(st);
    if (issuer) {
      uint64_t* full = sm.ring->fill(st, 2 * C::TileM::kBytes);
      load(&args.q, sm.q_stage(st.stage), full, C::TileM::kBlockBytes, w.seq.q_start + s.row0, s.h);
      load(&args.dout, sm.dout_stage(st.stage), full, C::TileM::kBlockBytes, w.seq.q_start + s.row0, s.h);
    }
    if constexpr (C::kMaskWarps) {
      masks();
      sm.ring->filled(st);
    }
  }
}

// The consumer warpgroups' 256 threads (tid among them): the cp.async kernel's step loop, fed by
// the ring, with one barrier a step.
template <class C>
__device__ __forceinline__ void consume(const BwdParams& p, const Smem<C>& sm, unsigned char* smem, int tid) {
  const int lane = tid & 31, warp = tid >> 5;
  const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0);
  const int r0 = warp * 16;
  const Work<C> w(p);
  if (w.idle()) return;  // every consumer thread: no barrier waits for them
  const Seq& seq = w.seq;
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  float dk[1][C::kNtD][4], dv[1][C::kNtD][4];
  zero(dk);
  zero(dv);
  const int my_key0 = w.key0 + r0 + (lane >> 2);
  const Descs<C> d(sm, wg);
  const int dq_row = (C::kDqByRows ? wg * 64 : 0) + (warp & 3) * 16, dq_half = C::kDqByRows ? 0 : wg;
  float* s_dq = sm.dq + warp * (C::kDqStageBytes / 4);
  using StepPos = typename bwd::QuerySteps<C>::Pos;
  const int steps = w.steps.count;
  StepPos cur = w.steps.first();
  const auto sync = [] { named_sync(int(Barrier::kConsumers), C::kThreads); };
  if (steps > 0) mbarrier_wait(sm.kv_full, 0);
  for (int step = 0; step < steps; ++step) {
    const StepPos next = w.steps.next(cur);
    const typename C::Mod mod(p.mods, seq.len_q, seq.len_k, p.softmax_scale, w.b, cur.h);
    // The ring's stage and pass, from the step (no state of their own: registers are short here);
    // the dS^T buffer is the stage.
    RingState<2> st;
    st.stage = step & 1, st.phase = (step >> 1) & 1;
    float dq[64 / 8][4];
    sm.ring->wait(st);
    // Dropout: this lane's mask for the step, made by the producer warps (make_step_masks) into the stage.
    static_assert(!C::kDropout || C::kMaskWarps, "the narrow TMA kernel takes its masks from the mask warps");
    const PackedKeyRowsMask<C::kNtM> keep(C::kDropout ? sm.mask_stage(st.stage)[tid] : make_uint2(0u, 0u));
    const auto write_dq = [&](const float (&q)[64 / 8][4]) {
      add_dq<C>(p, seq, cur.h, cur.row0, dq_row, dq_half, s_dq, q, lane);
    };
    step_products<C>(mod, d, st.stage * C::TileM::kBytes, sm.lse_stage(st.stage), sm.dvec_stage(st.stage),
                     sm.ds + st.stage * C::TileS::kBytes / 2, st.stage * C::TileS::kBytes, keep, cur.row0, my_key0,
                     r0, lane, scale_log2, dk, dv, dq, sync, dq_writer<C>(write_dq));
    sm.ring->release(st);
    if constexpr (!C::kDqFirst) write_dq(dq);
    cur = next;
  }
  // The CTA's key block, heads and sequence found again: held through the loop, they spilled.
  write_dkdv<C>(p, Work<C>(p, block_index_again()), sm, smem, dk, dv, r0, tid, sync);
}

// ---- The wide kernel (d_head 129-256: Config::kWide) --------------------------------------------
// dkdv_tma_kernel with a CTA of 64 keys (kBlockN) and 64-query steps (kBlockM). One accumulator of
// 64 keys x kD in fp32 is 128 registers a consumer thread at d256, so the narrow kernel's split (each
// warpgroup dK and dV of its own 64 keys) does not fit: each warpgroup holds one accumulator for all
// 64 keys and the two split each step by product:
//   warpgroup 0 (WG0)   S^T = K Q^T; P^T; dV += P^T dO        tensor work a step, in 64^3 units at
//   warpgroup 1 (WG1)   dP^T = V dO^T; dS^T; dK += dS^T Q     d256: 4 + 4 a warpgroup,
//   both                dQ = dS K, 64-column pieces wg, wg + 2, ..         + 2 a warpgroup
// dS needs P: WG0 hands over P^T o softcap's factor, sign-coded with dropout's mask (the narrow
// kernel's P^T in registers), through shared memory (sm.dq: a thread's 32 values as 8 float4, or at
// d256 (kPtHalf) as 8 fp16 quadruples, thread-major, conflict-free; WG1's thread t reads WG0's thread
// t: the same accumulator layout). dS^T goes the other way through one 16-bit tile (sm.ds) for dQ,
// whose pieces each warp stages (after P^T in sm.dq: 16 rows, at d256 8 at a time) and adds to
// dq_accum with bulk reductions (wide_dq). Shared memory at d256: K, V 32 KiB each, two stages of Q
// and dO 128 KiB, dS^T 8 KiB, lse and D 1 KiB, P^T 8 KiB, dQ staging 16 KiB, barriers: 226 KiB of
// 227 (1 KiB alignment slack included).
// Named barriers, 256 threads each (WG0's and WG1's), once a step t:
//   kSDone    WG0 arrives once its S^T(t) has retired (and     / WG1 syncs before issuing dP^T(t):
//             its dQ(t - 1), which read sm.ds)                  S^T first on the tensor cores,
//                                                               and sm.ds free for dS^T(t)
//   kPReady   WG0 arrives once P^T(t) is in sm.dq              / WG1 syncs before reading it
//   kDsReady  WG1 syncs once dS^T(t) is in sm.ds (fenced for   / WG0 syncs before its dQ(t) and
//             wgmma) and it has read P^T(t) from sm.dq, before    before writing P^T(t + 1)
//             its own dQ(t), which reads all four warps' rows
// No warp arrives twice at a barrier before its phase completes: WG0 reaches kSDone(t + 1) and
// kPReady(t + 1) only after kDsReady(t), which WG1 reaches after kSDone(t) and kPReady(t); WG1
// reaches kDsReady(t + 1) only after kPReady(t + 1), which WG0 signals after kDsReady(t). The ids are
// not the narrow kernel's kConsumers (1), which both warpgroups take around the epilogue. The ring
// (Q, dO, lse, D) as in the narrow kernel: a consumer thread releases step t's stage once its
// warpgroup's dV or dK of step t has retired (dQ reads only K and sm.ds).

// This warpgroup's share of a step's dQ = dS K (dS^T from sm.ds M-major, K N-major): 64-column pieces
// kWg, kWg + 2, .., each staged by each warp (this warp's 16 of the step's queries from row0 of head
// h) in s_dq, kWideDqRows rows at a time, and added to dq_accum by a bulk reduction, as the narrow
// kernel's add_dq (one helper for both, a6d3cde, ran 1.3-2% slower at d96/d128: docs/perf-log.md,
// 2026-12-04, so each kernel keeps its own). Issued after the warpgroup's dV or dK product: under_dq() runs while the first
// piece is on the tensor cores, retired() once dV or dK has retired.
template <class C, int kWg, class UnderDq, class Retired>
__device__ __forceinline__ void wide_dq(const BwdParams& p, const Seq& seq, const Descs<C>& d, float* s_dq, int h,
                                        int row0, int warp, int lane, UnderDq under_dq, Retired retired) {
  // This warp's real rows: min(16, rows) of them (none where rows <= 0: past the sequence's end).
  const int q16 = (warp & 3) * 16, rows = seq.len_q - row0 - q16;
  // dq_accum as the narrow kernel's add_dq addresses it: plane, 64-column piece, row.
  float* dst = p.dq_accum + (int64_t(seq.plane0 + h) * (C::kD / 64) * seq.plane_rows + seq.q_start + row0 + q16) * 64;
#pragma unroll
  for (int piece = kWg; piece < C::kD / 64; piece += 2) {
    float dq[64 / 8][4];
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < C::kKsN; ++ks)
      wgmma_ss<64, C::kBf16, 1, 1>(dq, gmma_desc_add(d.ds_a, mnmajor_step(ks)),
                                   gmma_desc_add(d.kq_b, piece * C::TileN::kBlockBytes + mnmajor_step(ks)), ks > 0);
    wgmma_commit();
    if (piece == kWg) {
      under_dq();
      wgmma_wait<1>();
      retired();
    }
    wgmma_wait<0>();
    wgmma_settle(dq);
#pragma unroll
    for (int part = 0; part < 16 / C::kWideDqRows; ++part) {
      if (lane == 0) bulk_wait_read<0>();  // the previous reduction has read s_dq
      __syncwarp();
      // The buffer row of the tile's row 0 is q_start + row0 + q16 (+ 8 part), row0 and q16 multiples of 16.
      if constexpr (C::kWideDqRows == 16) stage_rows_f32(s_dq, dq, 0, seq.q_start, 1.f, lane);
      else if (part == 0) stage_rows_f32<8, 0>(s_dq, dq, 0, seq.q_start, 1.f, lane);
      else stage_rows_f32<8, 1>(s_dq, dq, 0, seq.q_start, 1.f, lane);
      fence_proxy_async();
      __syncwarp();
      const int n = min(C::kWideDqRows, rows - part * C::kWideDqRows);
      if (lane == 0 && n > 0)
        bulk_reduce_add_f32(dst + int64_t(piece) * seq.plane_rows * 64 + part * C::kWideDqRows * 64, s_dq,
                            uint32_t(n) * 64 * 4);
    }
  }
}

// After the last step: warpgroup kWg's accumulator (WG0 dV, WG1 dK; r0: this warp's 16 key rows)
// staged through the Q / dO stages and stored by the warpgroup's own 128 threads (tid among the 256), or
// with kHeadSplit staged there in fp32 (64 rows x kD floats: both stages' bytes) and added to
// p.dkv_accum's sums by bulk reductions.
template <class C, int kWg>
__device__ __forceinline__ void write_dkdv_wide(const BwdParams& p, const Work<C>& w, const Smem<C>& sm,
                                                float (&acc)[1][C::kNtD][4], int r0, int tid) {
  const int lane = tid & 31;
  const float scale = (kWg == 1 ? p.softmax_scale : 1.f) * C::dropout_scale(p);
  if (lane == 0) bulk_wait_read<0>();  // the dQ reductions have read this warp's staging tile (as write_dkdv)
  // Both warpgroups: every wgmma read of the Q and dO stages is done (each waited for its own), so
  // WG1 may overwrite Q's stages with dK and WG0 dO's with dV.
  named_sync_unaligned(int(Barrier::kConsumers), C::kThreads);  // each warpgroup from its own code
  if constexpr (C::kHeadSplit) {
    static_assert(64 * C::kD * 4 <= 2 * C::TileM::kBytes, "a warpgroup's fp32 dK or dV fits its two stages");
    float* stage = reinterpret_cast<float*>(kWg == 0 ? sm.dout : sm.q) + (r0 / 16) * (C::kD / 64) * 1024;
    stage_dkdv_rows<C>(stage, acc, scale, w.seq, lane);
    fence_proxy_async();
    __syncwarp();
    if (lane == 0 && w.keys > r0) {
      reduce_dkdv_rows<C>(p, w.seq, w.b, w.h_k, kWg == 0 ? 1 : 0, w.key0 + r0, min(16, w.keys - r0), stage);
      bulk_wait_read<0>();  // the sources are read before the CTA (and its shared memory) is gone
    }
    return;
  }
  elem_t* staged = kWg == 0 ? sm.dout : sm.q;
  store_acc<C::kD, C::kSwizzle, C::kBf16>(staged, acc, r0, lane, scale);
  // Each warpgroup stores the tile it staged: no data crosses warpgroups here, so a warpgroup's own
  // barrier orders its stores and loads.
  named_sync(int(Barrier::kStaged) + kWg, 128);
  bwd::store_rows<C, C::kBlockN, kWg == 0, 128>(kWg == 0 ? p.dv : p.dk, w.b, w.h_k, w.seq.k_start + w.key0, staged,
                                                w.keys, tid & 127);
}

// Consumer warpgroup kWg of the wide kernel (tid among the 256 consumer threads): its step loop, fed
// by the ring, and the epilogue.
template <class C, int kWg>
__device__ __forceinline__ void consume_wide(const BwdParams& p, const Smem<C>& sm, int tid) {
  const int lane = tid & 31, warp = tid >> 5;
  const int r0 = (warp & 3) * 16;  // this warp's 16 keys of the CTA's 64 (accumulator rows)
  const Work<C> w(p);
  if (w.idle()) return;  // every consumer thread: no barrier waits for them
  const Seq& seq = w.seq;
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  float acc[1][C::kNtD][4];  // WG0: dV, WG1: dK
  zero(acc);
  const int my_key0 = w.key0 + r0 + (lane >> 2);  // key of row half h: my_key0 + 8 h
  const Descs<C> d(sm, 0);                       // both warpgroups read all 64 keys of K and V
  // This thread's P^T, n-tile nt at [nt * 128]: four floats, or (kPtHalf) four fp16 in 8 bytes.
  float4* s_pt = reinterpret_cast<float4*>(sm.dq) + (tid & 127);
  uint2* s_pt_half = reinterpret_cast<uint2*>(sm.dq) + (tid & 127);
  float* s_dq = sm.dq + C::kPtBytes / 4 + warp * C::kWideDqRows * 64;  // this warp's dQ staging tile
  using StepPos = typename bwd::QuerySteps<C>::Pos;
  const int steps = w.steps.count;
  StepPos cur = w.steps.first();
  // Dropout's masks, WG0 only (WG1 reads them from P^T's signs), made a step ahead.
  const auto mask_of = [&](StepPos s) { return step_mask<C>(p, w.b, s, my_key0, lane, C::kDropout && kWg == 0); };
  auto keep = mask_of(cur);
  if (steps > 0) mbarrier_wait(sm.kv_full, 0);
  for (int step = 0; step < steps; ++step) {
    const StepPos next = w.steps.next(cur);
    RingState<2> st;  // from the step, as consume()
    st.stage = step & 1, st.phase = (step >> 1) & 1;
    const uint32_t stage_bytes = st.stage * C::TileM::kBytes;
    const auto retired = [&] {  // dV or dK of this step has retired: its stage is free
      wgmma_settle(acc[0]);
      sm.ring->release(st);
    };
    float s[1][C::kNtM][4];  // WG0: S^T, then P^T; WG1: dP^T, then dS^T
    sm.ring->wait(st);
    if constexpr (kWg == 0) {
      wgmma_fence();
      gemm_scores_t<C>(s[0], d.k_a, d.q_b, stage_bytes);
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_settle(s[0]);
      named_arrive(int(Barrier::kSDone), 2 * 128);
      const typename C::Mod mod(p.mods, seq.len_q, seq.len_k, p.softmax_scale, w.b, cur.h);
      uint32_t grad[C::Mod::kSoftcap ? C::kNtM : 1][2];
      probabilities_t<C>(mod, s[0], grad, sm.lse_stage(st.stage), cur.row0, my_key0, lane, scale_log2);
      // Dropout: the mask in P^T's sign bit (dropped: -P), as the narrow kernel: the dV operand packed
      // with ReLU (dropped -> 0), and WG1 takes Z from the sign.
      if constexpr (C::kDropout) keep.sign_code(s[0]);
      uint32_t pa[1][C::kKsM][4];
      acc_to_a<C::kBf16, C::kDropout>(s, pa);
      wgmma_fence();
      gemm_frag_t<C>(acc[0], pa[0], d.dout_b, stage_bytes);  // dV += P^T dO
      wgmma_commit();
      // P^T o softcap's factor (in [0, 1]: the sign stays) for WG1, while dV runs.
#pragma unroll
      for (int nt = 0; nt < C::kNtM; ++nt) {
        float g[4] = {1.f, 1.f, 1.f, 1.f};
        if constexpr (C::Mod::kSoftcap) {
          unpack2<false>(grad[nt][0], g[0], g[1]);
          unpack2<false>(grad[nt][1], g[2], g[3]);
        }
        if constexpr (C::kPtHalf)
          s_pt_half[nt * 128] = make_uint2(pack2<false>(s[0][nt][0] * g[0], s[0][nt][1] * g[1]),
                                           pack2<false>(s[0][nt][2] * g[2], s[0][nt][3] * g[3]));
        else
          s_pt[nt * 128] = make_float4(s[0][nt][0] * g[0], s[0][nt][1] * g[1], s[0][nt][2] * g[2], s[0][nt][3] * g[3]);
      }
      named_arrive(int(Barrier::kPReady), 2 * 128);
      named_sync_unaligned(int(Barrier::kDsReady), 2 * 128);
      wide_dq<C, 0>(p, seq, d, s_dq, cur.h, cur.row0, warp, lane, [&] {
        // The next step's mask while dQ is on the tensor cores (made past the last step too, unread).
        if constexpr (C::kDropout) {
          const auto made = mask_of(next);
          if (step + 1 < steps) keep = made;
        }
      }, retired);
    } else {
      named_sync(int(Barrier::kSDone), 2 * 128);
      wgmma_fence();
      gemm_scores_t<C>(s[0], d.v_a, d.dout_b, stage_bytes);
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_settle(s[0]);
      // dS^T / rp = P^T o (Z o dP^T - D / rp) (rp = 1 / (1 - p); s_dvec holds D / rp: see the narrow
      // kernel), times softcap's factor. Without dropout D comes off before the wait for P^T.
      const float* s_dvec = sm.dvec_stage(st.stage);
      const auto query = [&](int nt, int e) { return nt * 8 + (lane & 3) * 2 + (e & 1); };  // in the block
      if constexpr (!C::kDropout)
        for_each_acc<1, C::kNtM>([&](int, int nt, int e) { s[0][nt][e] -= s_dvec[query(nt, e)]; });
      named_sync(int(Barrier::kPReady), 2 * 128);
#pragma unroll
      for (int nt = 0; nt < C::kNtM; ++nt) {
        float pt[4];
        if constexpr (C::kPtHalf) {
          const uint2 v = s_pt_half[nt * 128];
          unpack2<false>(v.x, pt[0], pt[1]);
          unpack2<false>(v.y, pt[2], pt[3]);
        } else {
          const float4 v = s_pt[nt * 128];
          pt[0] = v.x, pt[1] = v.y, pt[2] = v.z, pt[3] = v.w;
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if constexpr (C::kDropout)  // z = sat(2^127 P_signed) is Z (see the narrow kernel)
            s[0][nt][e] = fabsf(pt[e]) * fmaf(__saturatef(pt[e] * 0x1p127f), s[0][nt][e], -s_dvec[query(nt, e)]);
          else
            s[0][nt][e] *= pt[e];
        }
      }
      uint32_t dsa[1][C::kKsM][4];
      acc_to_a<C::kBf16>(s, dsa);
      wgmma_fence();
      gemm_frag_t<C>(acc[0], dsa[0], d.q_b, stage_bytes);  // dK += dS^T Q
      wgmma_commit();
      // Four 4-byte stores an A fragment, not stmatrix_a as the narrow kernel: with stmatrix here the d256
      // backward ran 5-7% slower on an H200 (non-causal 1k / 4k: 307 / 362 against 331 / 379 TFLOP/s).
      store_a_in<typename C::TileS>(sm.ds, dsa, r0, lane);  // conflict-free: 8 rows, 8 different chunks
      fence_proxy_async();
      // A sync, not an arrive: this warpgroup's own dQ reads every warp's rows of sm.ds (the product
      // sums over the 64 keys), so its warps wait for each other too. WG0 is already waiting here.
      named_sync_unaligned(int(Barrier::kDsReady), 2 * 128);
      wide_dq<C, 1>(p, seq, d, s_dq, cur.h, cur.row0, warp, lane, [] {}, retired);
    }
    cur = next;
  }
  // The CTA's key block, heads and sequence found again: held through the loop they cost registers.
  write_dkdv_wide<C, kWg>(p, Work<C>(p, block_index_again()), sm, acc, r0, tid);
}

template <class C>
__global__ void __launch_bounds__(C::kCtaThreads, 1) dkdv_tma_kernel(const __grid_constant__ Args args) {
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
  unsigned char* smem = smem_raw + (base - smem_addr(smem_raw));
  const Smem<C> sm(smem);
  if (threadIdx.x == 0) {
    mbarrier_init(sm.kv_full, 1);
    // The TMA issuer's expect_tx, then the threads that store into a stage.
    sm.ring->init(C::kThreads, 1 + C::kFillThreads);
    mbarrier_init_fence();
  }
  __syncthreads();
  // Each role finds its work itself: nothing computed before the register hand-over stays live
  // across it (the producer's 24 registers).
  const int role = __shfl_sync(0xffffffffu, int(threadIdx.x) / 128, 0);  // warp-uniform to the compiler
  if (role == 0) {
    warpgroup_release_registers<C::kProducerRegs>();
    // With mask warps, the warp made warp-uniform to the compiler as the role: their Philox keys then
    // live in uniform registers (in vector registers, 32 were too few: d64 spilled 140 bytes).
    const int warp = C::kMaskWarps ? __shfl_sync(0xffffffffu, int(threadIdx.x / 32), 0) : int(threadIdx.x / 32);
    produce<C>(args, sm, warp, threadIdx.x % 32);
  } else {
    warpgroup_claim_registers<C::kConsumerRegs>();
    if constexpr (C::kWide) {
      if (role == 1)
        consume_wide<C, 0>(args.p, sm, threadIdx.x - 128);
      else
        consume_wide<C, 1>(args.p, sm, threadIdx.x - 128);
    } else {
      consume<C>(args.p, sm, smem, threadIdx.x - 128);
    }
  }
}
#endif  // __CUDACC__

// The maps of q, dout, k and v: a dense call's [B, S, H, D] per batch entry; a varlen batch's
// [total, H, D] as one entry (its TensorRefs have batch stride 0), each step addressing its
// sequence's rows in it. Boxes of a Q / dO tile's and a K / V tile's rows. False if the encoder
// refuses one (a stride TMA cannot take).
template <class C>
bool encode_maps(Args& args) {
  const BwdParams& p = args.p;
  const bool varlen = p.varlen.cu_seqlens_q != nullptr;
  const int batch = varlen ? 1 : p.batch;
  const int q_rows = varlen ? p.varlen.total_q : p.seqlen_q, k_rows = varlen ? p.varlen.total_k : p.seqlen_k;
  return encode_bshd(&args.q, p.q, C::kBf16, batch, q_rows, p.heads, C::kDHead, C::kBlockM) &&
         encode_bshd(&args.dout, p.dout, C::kBf16, batch, q_rows, p.heads, C::kDHead, C::kBlockM) &&
         encode_bshd(&args.k, p.k, C::kBf16, batch, k_rows, p.heads_k, C::kDHead, C::kBlockN) &&
         encode_bshd(&args.v, p.v, C::kBf16, batch, k_rows, p.heads_k, C::kDHead, C::kBlockN);
}

// The D kernel, a dK/dV kernel, the dQ conversion (and with kHeadSplit the dK/dV one):
// bwd_sm80.cuh's launch sequence.
template <class C>
cudaError_t launch(const BwdParams& p, cudaStream_t stream) {
  if constexpr (C::kTma) {
    return bwd::launch_with<C>(p, stream, [&](unsigned blocks) {
      Args args;
      args.p = p;
      if (!encode_maps<C>(args)) return cudaErrorInvalidValue;
      return bwd::launch_ctas<C>(FLASHJIT_KERNEL(dkdv_tma_kernel, C), blocks, stream, args);
    });
  } else {
    return bwd::launch_with<C>(p, stream, [&](unsigned blocks) {
      return bwd::launch_ctas<C>(FLASHJIT_KERNEL(dkdv_kernel, C), blocks, stream, p);
    });
  }
}

}  // namespace flashjit::bwd_sm90

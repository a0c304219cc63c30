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
#pragma once
#include "bwd_sm80.cuh"
#include "common/wgmma.cuh"

namespace flashjit::bwd_sm90 {

// One template parameter per BwdSm90Config field (flashjit/configs/bwd_sm90.py), in the same order.
// What this kernel fixes (two warpgroups of 64 keys, one 16-row group a warp, dQ by fp32 bulk
// reductions, never the deterministic dQ kernel) is a constant here and a class constant there.
template <bool kBf16_, int kDHead_, int kBlockM_, bool kCausal_, bool kLocal_, bool kSoftcap_, bool kAlibi_,
          bool kDropout_, bool kHeadSplit_>
struct Config {
  static constexpr bool kBf16 = kBf16_, kCausal = kCausal_, kSwizzle = true, kDeterministic = false;
  static constexpr bool kDropout = kDropout_;
  using Mod = ScoreMod<kCausal_, kLocal_, kSoftcap_, kAlibi_>;
  // 1 / (1 - p), applied once to dK, dV and dQ (see bwd_sm80.cuh).
  __device__ __forceinline__ static float dropout_scale(const BwdParams& p) {
    return kDropout ? p.mods.dropout_scale : 1.f;
  }
  // kDHead: the real head dim; kD: its tile, one or two 64-column swizzle blocks (configs/bwd_sm90.py:
  // wgmma_tile).
  static constexpr int kDHead = kDHead_, kWarps = 8, kThreads = kWarps * 32;
  static constexpr int kD = kDHead > 32 && kDHead <= 64 ? 64 : kDHead > 64 && kDHead <= 128 ? 128 : head_dim_tile(kDHead);
  static constexpr int kDHeadV = kDHead, kDV = kD;  // v's head dim is q/k's (bwd_sm80.cuh's helpers read these)
  static constexpr int kBlockM = kBlockM_, kBlockN = 128;  // queries per step, keys per CTA (64 per warpgroup)
  static constexpr int kNtM = kBlockM / 8, kNtD = kD / 8, kKsD = kD / 16, kKsM = kBlockM / 16, kKsN = kBlockN / 16;
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
  static constexpr int kDqStageBytes = 16 * 64 * 4;  // per warp
  using TileN = GmmaTile<kBlockN, kD>;       // K, V
  using TileM = GmmaTile<kBlockM, kD>;       // Q, dO (two stages each)
  using TileS = GmmaTile<kBlockN, kBlockM>;  // dS^T
  // 1 KiB of slack: the dynamic shared memory is aligned up to the swizzle's 1024 bytes by hand.
  static constexpr int kSmemBytes =
      1024 + 2 * TileN::kBytes + 4 * TileM::kBytes + TileS::kBytes + 2 * 2 * kBlockM * 4 + kWarps * kDqStageBytes;
  static_assert((kD == 64 && kBlockM == 128) || (kD == 128 && kBlockM == 64),
                "the wgmma backward supports d_head 33-64 with block_m 128 and 65-128 with block_m 64");
  static_assert(!(kSoftcap_ && kBlockM == 128),
                "softcap's factors push the d_head 64 wgmma backward (128-query steps) past 255 registers");
  // dK and dV are staged for the copy out through the two Q stages and the two dO stages.
  static_assert(2 * kBlockM >= kBlockN, "dK/dV are staged through the Q / dO tiles");
  static_assert(kWarps * 2 * (kD / 64) * 16 * 64 * 4 <= kSmemBytes - 1024, "add_dkdv stages dK and dV in fp32");
};

// A warp's 16 x 64 fp32 share of an accumulator (n-tiles nt0 .. nt0 + 7 of acc, rows (lane >> 2) + 8 h),
// times scale, into a 16 x 64 staging tile laid out as dq_accum tiles its buffer: 16-byte chunk c of
// row r at c ^ ((r + row_base) & 7), row_base the buffer row of the tile's row 0 mod 8. The stores
// are conflict-free (8 rows, 8 chunks), and the tile is one contiguous run of the buffer.
template <int kNt>
__device__ __forceinline__ void stage_rows_f32(float* tile, const float (&acc)[kNt][4], int nt0, int row_base, float scale,
                                               int lane) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = (lane >> 2) + half * 8, key = (r + row_base) & 7;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
      *reinterpret_cast<float2*>(tile + r * 64 + (((2 * nt + (lane & 3) / 2) ^ key) * 4) + (lane & 1) * 2) =
          make_float2(acc[nt0 + nt][2 * half] * scale, acc[nt0 + nt][2 * half + 1] * scale);
  }
}

// This warp's 16 key rows of dK and dV (from key row0, `rows` of them real), scaled, added to
// p.dkv_accum (params.cuh) by bulk reductions: staged in shared memory (the whole buffer is free by
// now; 2 kD / 64 pieces of 16 x 64 floats a warp) in the tiling dq_accum has, so each piece is one
// contiguous 4 KiB run there, written conflict-free.
template <class C>
__device__ __forceinline__ void add_dkdv(const BwdParams& p, const Seq& seq, int b, int h_k, int row0, int rows,
                                         const float (&dk)[1][C::kNtD][4], const float (&dv)[1][C::kNtD][4],
                                         unsigned char* smem, int lane, int warp) {
  constexpr int kHalves = C::kD / 64;
  float* stage = reinterpret_cast<float*>(smem) + warp * 2 * kHalves * 16 * 64;
  const float scale_v = C::dropout_scale(p), scale_k = p.softmax_scale * scale_v;
  // The buffer row of the tiles' row 0 is k_start + row0, and row0 is a multiple of 16.
#pragma unroll
  for (int piece = 0; piece < kHalves; ++piece) {
    stage_rows_f32(stage + piece * 1024, dk[0], piece * 8, seq.k_start, scale_k, lane);
    stage_rows_f32(stage + (kHalves + piece) * 1024, dv[0], piece * 8, seq.k_start, scale_v, lane);
  }
  fence_proxy_async();
  __syncwarp();
  if (lane == 0 && rows > 0) {
    // Plane b * H_k + h_k of key_plane_rows (varlen: plane h_k, and k_start is the packed row).
    const int64_t plane = is_varlen(p) ? h_k : int64_t(b) * p.heads_k + h_k;
    const int plane_rows = key_plane_rows(p);
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int piece = 0; piece < kHalves; ++piece)
        bulk_reduce_add_f32(p.dkv_accum + t * key_rows(p) * C::kD +
                                ((plane * kHalves + piece) * plane_rows + seq.k_start + row0) * 64,
                            stage + (t * kHalves + piece) * 1024, uint32_t(rows) * 64 * 4);
    bulk_wait_read<0>();  // the sources are read before the CTA (and its shared memory) is gone
  }
}

template <class C>
__global__ void __launch_bounds__(C::kThreads, 1) dkdv_kernel(const __grid_constant__ BwdParams p) {
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
  unsigned char* smem = smem_raw + (base - smem_addr(smem_raw));
  elem_t* sK = reinterpret_cast<elem_t*>(smem);
  elem_t* sV = sK + C::TileN::kBytes / 2;
  elem_t* sQ2 = sV + C::TileN::kBytes / 2;       // two stages of Q
  elem_t* sdO2 = sQ2 + 2 * C::TileM::kBytes / 2;  // two stages of dO
  elem_t* sdS = sdO2 + 2 * C::TileM::kBytes / 2;  // dS^T [kBlockN keys, kBlockM queries]
  float* s_lse2 = reinterpret_cast<float*>(sdS + C::TileS::kBytes / 2);
  float* s_dvec2 = s_lse2 + 2 * C::kBlockM;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0);  // warpgroup: a shuffle makes it warp-uniform to the compiler
  const int r0 = warp * 16;  // this warp's first key row: warpgroup wg's 64 keys, 16 per warp
  const int num_n = (p.seqlen_k + C::kBlockN - 1) / C::kBlockN, group = p.heads / p.heads_k;
  // The CTA's key block, batch, kv head and query heads: every head of the GQA group, or with
  // kHeadSplit one, the key block outermost (causal: the longest CTAs, the first key blocks, first).
  constexpr bool per_q_head = C::kHeadSplit;
  int n_block, b, h_k, h0;
  if constexpr (per_q_head) {
    const int bh = blockIdx.x % (p.batch * p.heads);
    n_block = blockIdx.x / (p.batch * p.heads), b = bh / p.heads, h0 = bh % p.heads, h_k = h0 / group;
  } else {
    const int bh_k = blockIdx.x / num_n;
    n_block = blockIdx.x % num_n, b = bh_k / p.heads_k, h_k = bh_k % p.heads_k, h0 = h_k * group;
  }
  const Seq seq(p, b);
  const int key0 = n_block * C::kBlockN;
  if (key0 >= seq.len_k) return;  // varlen: past this sequence's keys (the grid fits the longest)
  const int keys = min(C::kBlockN, seq.len_k - key0);
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;

  load_gmma_tile<C::kBlockN, C::kD, C::kThreads, C::kDHead>(sK, p.k.at<const elem_t>(b, h_k, seq.k_start + key0),
                                                            p.k.row_stride, keys, tid);
  load_gmma_tile<C::kBlockN, C::kD, C::kThreads, C::kDHead>(sV, p.v.at<const elem_t>(b, h_k, seq.k_start + key0),
                                                            p.v.row_stride, keys, tid);
  cp_async_commit();

  float dk[1][C::kNtD][4], dv[1][C::kNtD][4];
  zero(dk);
  zero(dv);
  const int my_key0 = key0 + r0 + (lane >> 2);  // key of row half h: my_key0 + 8 h

  // Descriptors: K and V as K-major A (this warpgroup's 64 rows), Q and dO as K-major B (scores)
  // and as N-major B (dV, dK), K as N-major B and dS^T as M-major A (dQ).
  const uint64_t dK_a = gmma_desc(smem_addr(sK) + wg * 64 * 128, 16);
  const uint64_t dV_a = gmma_desc(smem_addr(sV) + wg * 64 * 128, 16);
  const uint64_t dQ_b = gmma_desc(smem_addr(sQ2), C::TileM::kBlockBytes);
  const uint64_t ddO_b = gmma_desc(smem_addr(sdO2), C::TileM::kBlockBytes);
  const uint64_t dS_a = gmma_desc(smem_addr(sdS) + (C::kDqByRows ? wg * C::TileS::kBlockBytes : 0),
                                  C::TileS::kBlockBytes);
  const uint64_t dKq_b = gmma_desc(smem_addr(sK) + (C::kDqByRows ? 0 : wg * C::TileN::kBlockBytes),
                                   C::TileN::kBlockBytes);
  // This warp's 16 rows of the step's dQ block, in 64-column half dq_half of dq_accum, and where
  // its 16 x 64 share is staged for the bulk reduction.
  const int dq_row = (C::kDqByRows ? wg * 64 : 0) + (warp & 3) * 16, dq_half = C::kDqByRows ? 0 : wg;
  float* s_dq = s_dvec2 + 2 * C::kBlockM + warp * (C::kDqStageBytes / 4);

  // One step per (query head of the group, query block), software-pipelined over two Q / dO
  // stages as in bwd_sm80.cuh. Two barriers per step: the first publishes the step's copy and
  // retires every read of the stage the next copy refills and of dS^T; the second publishes dS^T.
  const bwd::QuerySteps<C> schedule(p, seq, b, h0, per_q_head ? 1 : group, key0, keys);
  using StepPos = typename bwd::QuerySteps<C>::Pos;
  const int steps = schedule.count;
  auto stage = [&](StepPos s, int buf) {
    const int rows = min(C::kBlockM, seq.len_q - s.row0);
    load_gmma_tile<C::kBlockM, C::kD, C::kThreads, C::kDHead>(sQ2 + buf * C::TileM::kBytes / 2,
                                                              p.q.at<const elem_t>(b, s.h, seq.q_start + s.row0),
                                                              p.q.row_stride, rows, tid);
    load_gmma_tile<C::kBlockM, C::kD, C::kThreads, C::kDHead>(sdO2 + buf * C::TileM::kBytes / 2,
                                                              p.dout.at<const elem_t>(b, s.h, seq.q_start + s.row0),
                                                              p.dout.row_stride, rows, tid);
    bwd::load_row_stats<C>(s_lse2 + buf * C::kBlockM, s_dvec2 + buf * C::kBlockM, p, seq.stat_row(s.h, 0),
                           seq.len_q, s.row0, tid);
  };
  StepPos cur = schedule.first();
  if (steps > 0) stage(cur, 0);
  cp_async_commit();
  // Dropout (common/dropout.cuh): this warp's masks, rows = keys, for the current step. Each step
  // makes the next step's at its very end, where the warps would otherwise wait at the top of the
  // loop for the next block and the other warpgroup. Made inside the step, ptxas put the Philox
  // calls after the wait for S^T, on the path to the dV product (d64: 15-20% cost, now 6-9%).
  using Mask = KeyRowsMask<1, C::kNtM>;
  const auto masks = [&](StepPos s) {
    return Mask(C::kDropout, Dropout(p.mods, int(int64_t(b) * p.heads + s.h)), s.row0, my_key0, lane);
  };
  Mask keep = masks(cur);
  for (int step = 0; step < steps; ++step) {
    cp_async_wait<0>();  // K, V and this step's block have landed (for this thread)
    fence_proxy_async();
    __syncthreads();
    const StepPos next = schedule.next(cur);
    if (step + 1 < steps) stage(next, (step + 1) & 1);
    cp_async_commit();
    const int h = cur.h, row0 = cur.row0, buf = step & 1;
    const typename C::Mod mod(p.mods, seq.len_q, seq.len_k, p.softmax_scale, b, h);
    const float* s_lse = s_lse2 + buf * C::kBlockM;
    const float* s_dvec = s_dvec2 + buf * C::kBlockM;
    const uint32_t stage_bytes = buf * C::TileM::kBytes;

    // S^T = K Q^T and dP^T = V dO^T, two commit groups.
    float st[1][C::kNtM][4], dpt[1][C::kNtM][4];
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < C::kKsD; ++ks)
      wgmma_ss<C::kBlockM, C::kBf16, 0, 0>(st[0], gmma_desc_add(dK_a, kmajor_step<C::kBlockN>(ks)),
                                           gmma_desc_add(dQ_b, stage_bytes + kmajor_step<C::kBlockM>(ks)), ks > 0);
    wgmma_commit();
#pragma unroll
    for (int ks = 0; ks < C::kKsD; ++ks)
      wgmma_ss<C::kBlockM, C::kBf16, 0, 0>(dpt[0], gmma_desc_add(dV_a, kmajor_step<C::kBlockN>(ks)),
                                           gmma_desc_add(ddO_b, stage_bytes + kmajor_step<C::kBlockM>(ks)), ks > 0);
    wgmma_commit();

    // P^T (rows = keys, columns = queries) while dP^T runs.
    wgmma_wait<1>();
    wgmma_settle(st[0]);
    // Softcap's chain-rule factors (in [0, 1]) as fp16 pairs: as fp32 they pushed d_head 64 into spills.
    uint32_t grad[C::Mod::kSoftcap ? C::kNtM : 1][2];
    const auto query = [&](int nt, int e) { return nt * 8 + (lane & 3) * 2 + (e & 1); };  // in the block
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
    uint32_t pa[1][C::kNtM / 2][4];
    acc_to_a<C::kBf16>(st, pa);
    if (C::kDropout) keep.apply(pa);  // P o Z
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < C::kKsM; ++ks)  // dV += P^T dO
      wgmma_rs<C::kD, C::kBf16, 1>(dv[0], pa[0][ks], gmma_desc_add(ddO_b, stage_bytes + mnmajor_step(ks)), true);
    wgmma_commit();

    // dS^T = P^T o (Z o dP^T - D) while dV runs.
    wgmma_wait<1>();
    wgmma_settle(dpt[0]);
    for_each_acc<1, C::kNtM>([&](int, int nt, int e) {
      // dS^T / rp, rp = 1 / (1 - p): dS = P o (Z o dP rp - D), and s_dvec holds D / rp.
      float dp = dpt[0][nt][e];
      if (C::kDropout) dp = Dropout::masked(dp, keep.keep(0, nt, e));
      dpt[0][nt][e] = st[0][nt][e] * (dp - s_dvec[query(nt, e)]);
      if constexpr (C::Mod::kSoftcap) {
        float g[2];
        unpack2<false>(grad[nt][e >> 1], g[0], g[1]);
        dpt[0][nt][e] *= g[e & 1];
      }
    });
    uint32_t dsa[1][C::kNtM / 2][4];
    acc_to_a<C::kBf16>(dpt, dsa);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < C::kKsM; ++ks)  // dK += dS^T Q
      wgmma_rs<C::kD, C::kBf16, 1>(dk[0], dsa[0][ks], gmma_desc_add(dQ_b, stage_bytes + mnmajor_step(ks)), true);
    wgmma_commit();

    // dS^T to shared memory while dK runs; then this warpgroup's share of dQ = dS K.
    store_a_in<typename C::TileS>(sdS, dsa, r0, lane);  // conflict-free: 8 rows, 8 different chunks
    fence_proxy_async();
    __syncthreads();
    float dq[64 / 8][4];
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < C::kKsN; ++ks)
      wgmma_ss<64, C::kBf16, 1, 1>(dq, gmma_desc_add(dS_a, mnmajor_step(ks)), gmma_desc_add(dKq_b, mnmajor_step(ks)),
                                   ks > 0);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_settle(dq);
    wgmma_settle(dk[0]);
    wgmma_settle(dv[0]);
    // dQ: staged (once the previous step's reduction has read the buffer), then one bulk reduction.
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
    if (step + 1 < steps) keep = masks(next);
    cur = next;
  }
  cp_async_wait<0>();
  if (lane == 0) bulk_wait_all();  // the dQ reductions have read shared memory (and are done)
  __syncthreads();  // every wgmma read of the Q / dO stages is done (each warpgroup waited for its own)
  if constexpr (per_q_head) {
    add_dkdv<C>(p, seq, b, h_k, key0 + r0, min(16, keys - r0), dk, dv, smem, lane, warp);
    return;
  }

  // Stage dK and dV through the Q / dO stages (plain swizzled rows, as bwd_sm80.cuh), then
  // coalesced stores. Both hold 2 * kBlockM >= kBlockN rows.
  store_acc<C::kD, C::kSwizzle, C::kBf16>(sQ2, dk, r0, lane, p.softmax_scale * C::dropout_scale(p));
  store_acc<C::kD, C::kSwizzle, C::kBf16>(sdO2, dv, r0, lane, C::dropout_scale(p));
  __syncthreads();
  bwd::store_rows<C, C::kBlockN>(p.dk, b, h_k, seq.k_start + key0, sQ2, keys, tid);
  bwd::store_rows<C, C::kBlockN>(p.dv, b, h_k, seq.k_start + key0, sdO2, keys, tid);
}

// The D kernel, this dK/dV kernel, the dQ conversion (and with kHeadSplit the dK/dV one):
// bwd_sm80.cuh's launch sequence.
template <class C>
cudaError_t launch(const BwdParams& p, cudaStream_t stream) {
  return bwd::launch_with<C>(p, stream, dkdv_kernel<C>);
}

}  // namespace flashjit::bwd_sm90

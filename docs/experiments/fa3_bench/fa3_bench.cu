// fa3_bench: times FlashAttention-3's own sm90 forward kernels (hopper/instantiations, linked in by build.sh) on
// dense [B, S, H, D] bf16/fp16 inputs, with the host logic of FA3's mha_fwd (hopper/flash_api.cpp) for the
// flash_attn_func path mirrored here, since that file needs torch. Timing follows triton's do_bench (L2 flush by
// zeroing 256 MiB before each call, events around one call, median). See README.md.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cutlass/numeric_types.h>

#include "flash.h"       // Flash_fwd_params, run_mha_fwd_ (declaration; the definitions are FA3's instantiations)
#include "heuristics.h"  // should_pack_gqa
#include "tile_size.h"   // tile_size_fwd_sm90

#ifndef FA3B_REV
#define FA3B_REV "unknown"
#endif

#define CK(call)                                                                                     \
  do {                                                                                               \
    cudaError_t e_ = (call);                                                                         \
    if (e_ != cudaSuccess) {                                                                         \
      fprintf(stderr, "error: %s failed: %s (%s:%d)\n", #call, cudaGetErrorString(e_), __FILE__, __LINE__); \
      exit(3);                                                                                       \
    }                                                                                                \
  } while (0)

// ---------------------------------------------------------------------------------------------------------------
// The instantiations this binary holds (build.sh defines FA3B_HAVE_<DTYPE>_D<D> per compiled file).
template <typename T, int D>
static void fa3_launch(Flash_fwd_params &p, cudaStream_t s) {
  // <Arch, T, kHeadDim, kHeadDimV, Split, PagedKVNonTMA, Has_softcap, PackGQA>: FA3's plain instantiation file.
  run_mha_fwd_<90, T, D, D, false, false, false, false>(p, s);
}

using Fa3Launch = void (*)(Flash_fwd_params &, cudaStream_t);

// run_mha_fwd_constexpr's dispatch, restricted to what was built: the launcher, or nullptr.
static Fa3Launch fa3_kernel(bool bf16, int d) {
#define FA3B_CASE(B, T, D) if (bf16 == B && d == D) return fa3_launch<T, D>;
#ifdef FA3B_HAVE_BF16_D64
  FA3B_CASE(true, cutlass::bfloat16_t, 64)
#endif
#ifdef FA3B_HAVE_BF16_D128
  FA3B_CASE(true, cutlass::bfloat16_t, 128)
#endif
#ifdef FA3B_HAVE_BF16_D256
  FA3B_CASE(true, cutlass::bfloat16_t, 256)
#endif
#ifdef FA3B_HAVE_FP16_D64
  FA3B_CASE(false, cutlass::half_t, 64)
#endif
#ifdef FA3B_HAVE_FP16_D128
  FA3B_CASE(false, cutlass::half_t, 128)
#endif
#ifdef FA3B_HAVE_FP16_D256
  FA3B_CASE(false, cutlass::half_t, 256)
#endif
#undef FA3B_CASE
  return nullptr;
}

static bool fa3_built(bool bf16, int d) { return fa3_kernel(bf16, d) != nullptr; }

static void fa3_fwd(Flash_fwd_params &p, cudaStream_t s) {
  if (const Fa3Launch launch = fa3_kernel(p.is_bf16, p.d)) return launch(p, s);
  fprintf(stderr, "error: no FA3 instantiation for %s d=%d in this build\n", p.is_bf16 ? "bf16" : "fp16", p.d);
  exit(2);
}

// ---------------------------------------------------------------------------------------------------------------
struct Point { bool bf16; int d, causal, S, B, H, HK; };

// What mha_fwd + set_params_fprop do for flash_attn_func(q, k, v, causal=causal) on contiguous [B, S, H, D]
// tensors: softmax_scale None, window (-1, -1), attention_chunk 0, softcap 0, num_splits 1 (flash_attn_func's
// default, so get_num_splits is not consulted), pack_gqa None (get_pack_gqa decides), sm_margin 0.
struct Fa3Call {
  Flash_fwd_params params;
  bool fa3_would_pack_gqa;    // get_pack_gqa's answer; this build runs PackGQA=false regardless
  int *sem_base = nullptr;    // the tile_count_semaphore tensor mha_fwd allocates and zeroes (causal only)
  int sem_ints = 0;
};

static void fa3_set_params(Fa3Call &c, const Point &pt, void *q, void *k, void *v, void *o, float *lse,
                           int arch, int num_sm) {
  Flash_fwd_params &p = c.params;
  p = {};
  const int b = pt.B, s = pt.S, h = pt.H, hk = pt.HK, d = pt.d;
  auto round_multiple = [](int x, int m) { return (x + m - 1) / m * m; };
  // mha_fwd: window / causal normalisation before set_params_fprop.
  int wl = -1, wr = -1;
  bool is_causal = pt.causal;
  if (s == 1 && wl == -1 && wr == -1) is_causal = false;  // "causal=true is the same as causal=false" (not paged)
  if (is_causal) wr = 0;
  // set_params_fprop
  p.is_bf16 = pt.bf16;
  p.is_e4m3 = false;
  p.q_ptr = q; p.k_ptr = k; p.v_ptr = v; p.o_ptr = o;
  p.q_row_stride = int64_t(h) * d;  p.k_row_stride = int64_t(hk) * d;  p.v_row_stride = int64_t(hk) * d;
  p.q_head_stride = d;              p.k_head_stride = d;               p.v_head_stride = d;
  p.v_dim_stride = 1;
  p.o_row_stride = int64_t(h) * d;  p.o_head_stride = d;
  p.q_batch_stride = int64_t(s) * h * d;  p.o_batch_stride = int64_t(s) * h * d;
  p.k_batch_stride = int64_t(s) * hk * d; p.v_batch_stride = int64_t(s) * hk * d;
  p.cu_seqlens_q = p.cu_seqlens_k = nullptr;
  p.seqused_q = p.seqused_k = nullptr;
  p.softmax_lse_ptr = lse;
  p.b = b; p.h = h; p.h_k = hk;
  p.seqlen_q = s; p.seqlen_k = s;
  p.seqlen_q_rounded = round_multiple(s, 128); p.seqlen_k_rounded = round_multiple(s, 128);
  p.d = d; p.d_rounded = d;  // round_up_headdim(d) is d for 64 / 128 / 256
  p.scale_softmax = float(1.0 / std::sqrt(double(d)));
  p.softcap = 0.f;
  p.p_dropout = 1.f;  // probability of keeping
  p.p_dropout_in_uint8_t = uint8_t(std::floor(p.p_dropout * 255.0));
  p.rp_dropout = 1.f / p.p_dropout;
  p.is_causal = wl < 0 && wr == 0;
  p.is_local = (wl >= 0 || wr >= 0) && !p.is_causal;
  if (wl < 0) wl = s - 1;
  if (wr < 0) wr = s - 1;
  p.window_size_left = wl; p.window_size_right = wr; p.attention_chunk = 0;
  p.arch = arch; p.num_sm = num_sm;
  // back in mha_fwd
  p.total_q = b * s; p.total_k = b * s; p.b_k = b;
  p.dv = d; p.dv_rounded = d;
  p.page_size = 1; p.num_pages = 0;
  p.prepare_varlen_pdl = false;      // not varlen
  p.num_splits_dynamic_ptr = nullptr;
  p.pagedkv_tma = false;             // get_pagedkv_tma: no page table
  p.num_splits = 1;
  // get_pack_gqa (arch 90, no page table, one split)
  auto tile = tile_size_fwd_sm90(p.d_rounded, p.dv_rounded, p.is_causal, p.is_local, 2, false, false, false);
  c.fa3_would_pack_gqa = h != hk && should_pack_gqa(false, s, h / hk, std::get<0>(tile));
  p.pack_gqa = false;
  // Scheduler metadata: on sm90, non-varlen, a semaphore only for causal/local with one split.
  const bool needs_sem = (p.is_causal || p.is_local) && p.num_splits == 1;
  p.varlen_sort_batches = !p.is_local;
  p.head_swizzle = p.is_causal || p.is_local;
  c.sem_base = nullptr; c.sem_ints = 0;
  if (needs_sem) {
    const int b_rounded = round_multiple(b, 4);
    int vectors = 0;  // use_prepare_varlen is false
    if (p.varlen_sort_batches) vectors += 1;
    if (p.head_swizzle) vectors += 1;
    const int offset = b_rounded * vectors;
    c.sem_ints = 1 + offset;
    CK(cudaMalloc(&c.sem_base, sizeof(int) * c.sem_ints));
    p.skip_scheduler_metadata_computation = false;
    p.num_m_blocks_ptr = nullptr; p.varlen_batch_idx_ptr = nullptr; p.num_nheads_in_l2_ptr = nullptr;
    p.tile_count_semaphore = c.sem_base + offset;
    p.tile_count_semaphore_offset = offset;
  }
  p.rotary_dim = 0;
}

// One FA3 forward as mha_fwd issues it: the semaphore's zero_() (causal), then run_mha_fwd.
static void fa3_call(Fa3Call &c, cudaStream_t s) {
  if (c.sem_base) CK(cudaMemsetAsync(c.sem_base, 0, sizeof(int) * c.sem_ints, s));
  fa3_fwd(c.params, s);
}

// The kernel FA3 picks for the point (run_mha_fwd_ / run_flash_fwd's constexpr choices), for the log.
static std::string fa3_variant(const Point &pt) {
  auto t = tile_size_fwd_sm90(pt.d, pt.d, pt.causal, false, 2, false, false, false);
  const int bm = std::get<0>(t), bn = std::get<1>(t);
#ifdef FLASHATTENTION_DISABLE_CLUSTER
  const bool enable_cluster = false;  // (built with EXTRA_FLAGS=-DFLASHATTENTION_DISABLE_CLUSTER)
#else
  const bool enable_cluster = pt.d >= 128 && !pt.causal;
#endif
  const bool use_cluster = ((pt.S + bm - 1) / bm) % 2 == 0;
  char buf[128];
  snprintf(buf, sizeof buf, "tile=%dx%d cluster=%d sched=%s", bm, bn, enable_cluster && use_cluster ? 2 : 1,
           pt.causal ? "dynamic" : "static");
  return buf;
}

// ---------------------------------------------------------------------------------------------------------------
// Inputs: a splitmix64 hash, uniform on [-sqrt(3), sqrt(3)) (unit variance, like randn).
__device__ __forceinline__ uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f(float x) { return __float2half(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T>
__global__ void fill_kernel(T *p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const float u = float(mix64(seed * 0x100000001b3ull ^ i) >> 40) * (1.f / 16777216.f);
    p[i] = from_f<T>((2.f * u - 1.f) * 1.7320508f);
  }
}

// Naive fp32 reference for `nrows` query rows of (batch bb, head hh): one block a row. scratch: nrows * S floats.
// Also gathers FA3's output rows and LSE for the same rows into got_o / got_lse.
template <typename T>
__global__ void ref_kernel(const T *q, const T *k, const T *v, const T *o, const float *lse, int S, int H, int HK,
                           int D, int causal, float scale, int bb, int hh, const int *rows, float *scratch,
                           float *ref_o, float *ref_lse, float *got_o, float *got_lse) {
  __shared__ float qs[256];
  __shared__ float red[32];
  const int r = blockIdx.x, i = rows[r], hk = hh / (H / HK);
  const T *qrow = q + ((size_t(bb) * S + i) * H + hh) * D;
  const T *kb = k + (size_t(bb) * S * HK + hk) * D;  // key j at kb + j * HK * D
  const T *vb = v + (size_t(bb) * S * HK + hk) * D;
  float *sc = scratch + size_t(r) * S;
  for (int e = threadIdx.x; e < D; e += blockDim.x) qs[e] = to_f(qrow[e]);
  __syncthreads();
  const int nk = causal ? i + 1 : S;
  float m = -INFINITY;
  for (int j = threadIdx.x; j < nk; j += blockDim.x) {
    const T *kr = kb + size_t(j) * HK * D;
    float acc = 0.f;
    for (int e = 0; e < D; ++e) acc += qs[e] * to_f(kr[e]);
    acc *= scale;
    sc[j] = acc;
    m = fmaxf(m, acc);
  }
  auto block_reduce = [&](float x, bool is_max) {
    for (int off = 16; off; off >>= 1) {
      const float y = __shfl_xor_sync(0xffffffffu, x, off);
      x = is_max ? fmaxf(x, y) : x + y;
    }
    __syncthreads();
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
    __syncthreads();
    x = red[0];
    for (int w = 1; w < int(blockDim.x / 32); ++w) x = is_max ? fmaxf(x, red[w]) : x + red[w];
    return x;
  };
  m = block_reduce(m, true);
  float l = 0.f;
  for (int j = threadIdx.x; j < nk; j += blockDim.x) {
    const float pj = expf(sc[j] - m);
    sc[j] = pj;
    l += pj;
  }
  l = block_reduce(l, false);
  __syncthreads();
  for (int e = threadIdx.x; e < D; e += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < nk; ++j) acc += sc[j] * to_f(vb[size_t(j) * HK * D + e]);
    ref_o[size_t(r) * D + e] = acc / l;
    got_o[size_t(r) * D + e] = to_f(o[((size_t(bb) * S + i) * H + hh) * D + e]);
  }
  if (threadIdx.x == 0) {
    ref_lse[r] = m + logf(l);
    got_lse[r] = lse[(size_t(bb) * H + hh) * S + i];  // softmax_lse is [B, H, S]
  }
}

// ---------------------------------------------------------------------------------------------------------------
struct Opts {
  bool table = false, check_only = false, flush = true, dry_run = false;
  int iters = 100;
  Point pt{true, 128, 0, 4096, 4, 16, -1};
};

static void usage(FILE *f) {
  fprintf(f,
          "usage: fa3_bench --dtype bf16|fp16 --d 64|128|256 --causal 0|1 --batch B --seqlen S --heads H\n"
          "                 [--heads-k HK] [--iters N] [--no-flush] [--check-only]\n"
          "       fa3_bench --table [--iters N] [--no-flush] [--check-only]\n"
          "       fa3_bench ... --dry-run   (no GPU needed: lists the points and the kernel variant FA3 picks)\n"
          "Times FlashAttention-3's sm90 forward (its own instantiations, host logic of flash_attn_func mirrored)\n"
          "on dense [B, S, H, D] inputs. --table: for dtype in {bf16, fp16}, d in {64, 128, 256} (those built),\n"
          "causal in {0, 1}: S in {1k, 2k, 4k, 8k, 16k} with B = 16384 / S, H = 2048 / d, plus GQA B=1 S=8192\n"
          "H=32 HK=8. Each point is checked first against a naive fp32 reference (rows of the first and last\n"
          "(b, h)); the process exits 1 if any max |error| of O exceeds 2e-2 (bf16) / 5e-3 (fp16) or of LSE 1e-2.\n"
          "Timing: triton do_bench style (256 MiB zeroed before each call unless --no-flush, events around one\n"
          "call, median of --iters, default 100). Output per point:\n"
          "  dtype d causal S B H HK ms TFLOP/s  # err_o err_lse variant\n"
          "with TFLOP/s = 4*B*H*S*S*d / time, halved for causal.\n"
          "Built instantiations:");
  for (int bf = 1; bf >= 0; --bf)
    for (int d : {64, 128, 256})
      if (fa3_built(bf, d)) fprintf(f, " %s/d%d", bf ? "bf16" : "fp16", d);
  fprintf(f, "\n");
}

static int parse_int(const char *flag, const char *s) {
  char *end = nullptr;
  const long x = strtol(s, &end, 10);
  if (!*s || *end || (x <= 0 && strcmp(flag, "--causal") != 0)) {
    fprintf(stderr, "error: bad value for %s: %s\n", flag, s);
    exit(2);
  }
  return int(x);
}

struct Bench {
  Opts o;
  int arch = 0, num_sm = 0;
  void *flush_buf = nullptr;
  bool any_fail = false;

  void init_device() {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
      fprintf(stderr, "error: no CUDA device available (%s); fa3_bench needs an sm_90 GPU (H100/H200)\n",
              e != cudaSuccess ? cudaGetErrorString(e) : "device count 0");
      exit(2);
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    arch = prop.major * 10 + prop.minor;
    num_sm = prop.multiProcessorCount;
    if (arch != 90) {
      fprintf(stderr, "error: %s is sm_%d; this binary holds sm_90a code only\n", prop.name, arch);
      exit(2);
    }
    printf("# device %s, %d SMs; FA3 (flash-attention %s) hopper forward, num_splits=1, pack_gqa off\n", prop.name,
           num_sm, FA3B_REV);
    if (o.flush && !o.check_only) CK(cudaMalloc(&flush_buf, size_t(256) << 20));
  }

  template <typename T>
  void run_point(const Point &pt) {
    const size_t nq = size_t(pt.B) * pt.S * pt.H * pt.d, nkv = size_t(pt.B) * pt.S * pt.HK * pt.d;
    T *q, *k, *v, *out;
    float *lse;
    CK(cudaMalloc(&q, nq * sizeof(T)));
    CK(cudaMalloc(&k, nkv * sizeof(T)));
    CK(cudaMalloc(&v, nkv * sizeof(T)));
    CK(cudaMalloc(&out, nq * sizeof(T)));
    CK(cudaMalloc(&lse, size_t(pt.B) * pt.H * pt.S * sizeof(float)));
    fill_kernel<T><<<1024, 256>>>(q, nq, 1);
    fill_kernel<T><<<1024, 256>>>(k, nkv, 2);
    fill_kernel<T><<<1024, 256>>>(v, nkv, 3);
    CK(cudaMemset(out, 0xff, nq * sizeof(T)));  // NaN-ish garbage, so rows FA3 does not write fail the check
    CK(cudaGetLastError());
    Fa3Call c;
    fa3_set_params(c, pt, q, k, v, out, lse, arch, num_sm);
    const char *dt = pt.bf16 ? "bf16" : "fp16";
    std::string note = fa3_variant(pt);
    if (c.fa3_would_pack_gqa) note += " WARNING:fa3_would_pack_gqa(not_built)";

    // Correctness: the first and the last (b, h), up to 256 rows each spread over the sequence.
    fa3_call(c, 0);
    CK(cudaGetLastError());
    const int R = std::min(pt.S, 256);
    std::vector<int> rows(R);
    for (int r = 0; r < R; ++r) rows[r] = R == 1 ? 0 : int((long long)r * (pt.S - 1) / (R - 1));
    int *drows;
    float *scratch, *bufs;
    CK(cudaMalloc(&drows, R * sizeof(int)));
    CK(cudaMemcpy(drows, rows.data(), R * sizeof(int), cudaMemcpyHostToDevice));
    CK(cudaMalloc(&scratch, size_t(R) * pt.S * sizeof(float)));
    const size_t nb = size_t(R) * pt.d;
    CK(cudaMalloc(&bufs, (2 * nb + 2 * R) * sizeof(float)));
    std::vector<float> h(2 * nb + 2 * R);
    double err_o = 0, err_lse = 0;
    for (int which = 0; which < 2; ++which) {
      const int bb = which ? pt.B - 1 : 0, hh = which ? pt.H - 1 : 0;
      ref_kernel<T><<<R, 256>>>(q, k, v, out, lse, pt.S, pt.H, pt.HK, pt.d, c.params.is_causal,
                                c.params.scale_softmax, bb, hh, drows, scratch, bufs, bufs + nb, bufs + nb + R,
                                bufs + 2 * nb + R);
      CK(cudaGetLastError());
      CK(cudaMemcpy(h.data(), bufs, h.size() * sizeof(float), cudaMemcpyDeviceToHost));
      for (size_t e = 0; e < nb; ++e) {
        const double d = std::fabs(double(h[e]) - h[nb + R + e]);
        err_o = std::isnan(d) ? INFINITY : std::max(err_o, d);
      }
      for (int r = 0; r < R; ++r) {
        const double d = std::fabs(double(h[nb + r]) - h[2 * nb + R + r]);
        err_lse = std::isnan(d) ? INFINITY : std::max(err_lse, d);
      }
    }
    CK(cudaFree(drows)); CK(cudaFree(scratch)); CK(cudaFree(bufs));
    const double tol = pt.bf16 ? 2e-2 : 5e-3;
    const bool ok = err_o <= tol && err_lse <= 1e-2;
    char errs[96];
    snprintf(errs, sizeof errs, "err_o=%.2e err_lse=%.2e", err_o, err_lse);

    double ms = NAN, tflops = NAN;
    if (!ok) {
      any_fail = true;
      printf("%s %d %d %d %d %d %d FAIL FAIL  # %s (tol %.0e) %s\n", dt, pt.d, pt.causal, pt.S, pt.B, pt.H, pt.HK,
             errs, tol, note.c_str());
    } else if (o.check_only) {
      printf("%s %d %d %d %d %d %d ok ok  # %s %s\n", dt, pt.d, pt.causal, pt.S, pt.B, pt.H, pt.HK, errs,
             note.c_str());
    } else {
      // do_bench: estimate from 5 calls, warm up for ~25 ms (at least 10 calls), then `iters` timed calls.
      cudaEvent_t e0, e1;
      CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
      CK(cudaEventRecord(e0));
      for (int i = 0; i < 5; ++i) fa3_call(c, 0);
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float est = 0;
      CK(cudaEventElapsedTime(&est, e0, e1));
      est /= 5;
      const int warm = std::min(1000, std::max(10, int(25.f / std::max(est, 1e-3f))));
      for (int i = 0; i < warm; ++i) fa3_call(c, 0);
      std::vector<cudaEvent_t> ev(2 * o.iters);
      for (auto &e : ev) CK(cudaEventCreate(&e));
      for (int i = 0; i < o.iters; ++i) {
        if (flush_buf) CK(cudaMemsetAsync(flush_buf, 0, size_t(256) << 20, 0));
        CK(cudaEventRecord(ev[2 * i]));
        fa3_call(c, 0);
        CK(cudaEventRecord(ev[2 * i + 1]));
      }
      CK(cudaDeviceSynchronize());
      std::vector<float> t(o.iters);
      for (int i = 0; i < o.iters; ++i) CK(cudaEventElapsedTime(&t[i], ev[2 * i], ev[2 * i + 1]));
      for (auto &e : ev) CK(cudaEventDestroy(e));
      CK(cudaEventDestroy(e0)); CK(cudaEventDestroy(e1));
      std::sort(t.begin(), t.end());
      ms = o.iters % 2 ? t[o.iters / 2] : 0.5 * (t[o.iters / 2 - 1] + t[o.iters / 2]);
      const double flops = 4.0 * pt.B * pt.H * double(pt.S) * pt.S * pt.d * (pt.causal ? 0.5 : 1.0);
      tflops = flops / (ms * 1e-3) / 1e12;
      printf("%s %d %d %d %d %d %d %.4f %.1f  # %s %s\n", dt, pt.d, pt.causal, pt.S, pt.B, pt.H, pt.HK, ms, tflops,
             errs, note.c_str());
    }
    fflush(stdout);
    if (c.sem_base) CK(cudaFree(c.sem_base));
    CK(cudaFree(q)); CK(cudaFree(k)); CK(cudaFree(v)); CK(cudaFree(out)); CK(cudaFree(lse));
  }

  void run(const Point &pt) {
    if (o.dry_run) {
      auto tile = tile_size_fwd_sm90(pt.d, pt.d, pt.causal, false, 2, false, false, false);
      const bool pack = pt.H != pt.HK && should_pack_gqa(false, pt.S, pt.H / pt.HK, std::get<0>(tile));
      printf("%s %d %d %d %d %d %d  # %s%s%s\n", pt.bf16 ? "bf16" : "fp16", pt.d, pt.causal, pt.S, pt.B, pt.H, pt.HK,
             fa3_variant(pt).c_str(), pack ? " WARNING:fa3_would_pack_gqa(not_built)" : "",
             fa3_built(pt.bf16, pt.d) ? "" : " NOT_BUILT");
      return;
    }
    if (!fa3_built(pt.bf16, pt.d)) {
      printf("# %s d=%d not built, skipped\n", pt.bf16 ? "bf16" : "fp16", pt.d);
      return;
    }
    if (pt.bf16) run_point<__nv_bfloat16>(pt); else run_point<__half>(pt);
  }
};

int main(int argc, char **argv) {
  Bench bench;
  Opts &o = bench.o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&]() -> const char * {
      if (i + 1 >= argc) { fprintf(stderr, "error: %s needs a value\n", a.c_str()); exit(2); }
      return argv[++i];
    };
    if (a == "-h" || a == "--help") { usage(stdout); return 0; }
    else if (a == "--table") o.table = true;
    else if (a == "--check-only") o.check_only = true;
    else if (a == "--no-flush") o.flush = false;
    else if (a == "--dry-run") o.dry_run = true;
    else if (a == "--iters") o.iters = parse_int(a.c_str(), val());
    else if (a == "--dtype") {
      const std::string t = val();
      if (t != "bf16" && t != "fp16") { fprintf(stderr, "error: --dtype bf16|fp16\n"); return 2; }
      o.pt.bf16 = t == "bf16";
    }
    else if (a == "--d") o.pt.d = parse_int(a.c_str(), val());
    else if (a == "--causal") o.pt.causal = parse_int(a.c_str(), val()) != 0;
    else if (a == "--batch") o.pt.B = parse_int(a.c_str(), val());
    else if (a == "--seqlen") o.pt.S = parse_int(a.c_str(), val());
    else if (a == "--heads") o.pt.H = parse_int(a.c_str(), val());
    else if (a == "--heads-k") o.pt.HK = parse_int(a.c_str(), val());
    else { fprintf(stderr, "error: unknown argument %s\n\n", a.c_str()); usage(stderr); return 2; }
  }
  std::vector<Point> pts;
  if (o.table) {
    for (bool bf : {true, false})
      for (int d : {64, 128, 256}) {
        if (!fa3_built(bf, d) && !o.dry_run) continue;
        for (int causal : {0, 1}) {
          for (int s : {1024, 2048, 4096, 8192, 16384}) pts.push_back({bf, d, causal, s, 16384 / s, 2048 / d, 2048 / d});
          pts.push_back({bf, d, causal, 8192, 1, 32, 8});
        }
      }
  } else {
    Point pt = o.pt;
    if (pt.HK < 0) pt.HK = pt.H;
    if (pt.d != 64 && pt.d != 128 && pt.d != 256) { fprintf(stderr, "error: --d must be 64, 128 or 256\n"); return 2; }
    if (pt.H % pt.HK) { fprintf(stderr, "error: --heads-k must divide --heads\n"); return 2; }
    if (!fa3_built(pt.bf16, pt.d) && !o.dry_run) {
      fprintf(stderr, "error: %s d=%d is not built into this binary (see --help)\n", pt.bf16 ? "bf16" : "fp16", pt.d);
      return 2;
    }
    pts.push_back(pt);
  }
  if (!o.dry_run) bench.init_device();
  printf("# dtype d causal S B H HK ms TFLOP/s  # check, FA3 kernel variant\n");
  for (const auto &pt : pts) bench.run(pt);
  if (bench.any_fail) { fprintf(stderr, "error: correctness check failed (see FAIL lines)\n"); return 1; }
  return 0;
}

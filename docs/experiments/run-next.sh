#!/bin/bash
# The measurements queued in docs/perf-log.md ("Next on the GPU"), one device call a step, most important
# first. On the lent GPU, from the checkout's root, with the wheels carried (../shared/DEVICE.md):
#   run(carry=[".whl"], command="bash docs/experiments/run-next.sh STEP")
# Steps (each fits one 10-minute call; a step's log and JSON go to $OUT):
#   knobs     (ran in the thirty-first session; its baselines are the defaults before that session)
#             the defaults against the knobs that won a first run (thirtieth session, docs/perf-log.md):
#             lazy_rescale (_lr) where it won, two CTAs an SM (_x2) at d64's short causal rows, at more
#             lengths (--rounds 3 --configs): the data for making them defaults
#   knobs2    (ran in the thirty-first session) lazy_rescale where no run had timed it: d192, d256's short causal rows, d96; two CTAs an
#             SM at d64's short non-causal rows and causal 2k / 8k
#   dropout   (ran in the thirty-eighth session, before the mask warps: Philox's rounds 9-14%, the mask's
#             application 4-11%) the attribution of dropout's backward cost (d64, 1k / 4k, p = 0.1): main,
#             Philox with one round, the mask made but not applied (both timing only: their gradients are
#             wrong), then main without dropout, for each one's cost
#   table [DTYPE]    issue 15's whole backward table (bench_backward, the defaults; bf16 unless fp16)
#   gqa       issue 15's other GQA points (B=2 2k 32/4, B=1 4k 16/4), bf16 and fp16
#   fwdtable DTYPE [HEAD_DIMS]   issue 14's forward table (bench_forward, the defaults, with FlexAttention;
#             head dims 64,128,256 unless given: one call may not hold all three, see the step)
#   tests     the GPU tests over the forward defaults (after a change to the dispatcher's choices)
#   outlier   (ran in the thirty-eighth session: host-bound calls, not the kernels) issue 15's short GQA backwards (d64 and d256, B=1 4k 16/4 and B=2 2k 32/4): the kernels' GPU
#             time, the host's time a call (--host), do_bench's figure and flashjit.backward alone split /
#             group (d256 non-causal fp16 ran 0.93x cuDNN through the group kernel, split alone 0.97x), with
#             the C++ autograd node and without
#   knobs3    d128 non-causal: the default (128-key blocks, lazy rescaling; cross-tile at 1k) against
#             FlashAttention-3's 176-key block with lazy rescaling (at 1k no cross-tile: 241 KiB) (n176 was level before lazy rescaling existed; with it its step is 407
#             instructions a 128 keys against n128's 444, read off the SASS); and cross-tile at every length,
#             d64 and d128 non-causal (the thirty-fifth session's B=1 8k 32/8 point: +2-3% over the default,
#             one process; before lazy rescaling it was level or lost at 2k-16k)
#   fa3       FlashAttention-3's own forward over issue 14's grid (+ GQA 1x8192x32x8), bf16 and fp16, d 64/128/256:
#             .fa3bench/fa3_bench --table (carry [".whl", ".fa3bench"]; the binary is built on the CPU machine by
#             docs/experiments/fa3_bench/build.sh, see its README.md; rebuilt here from .fa3bench/fa3src.tgz if
#             this image cannot start it)
#   ncu128 [CAUSAL [SEQLEN]]  (ran in the thirty-eighth session at 1 16384: tensor pipe 72% against FA3's 87%) Nsight Compute on flashjit's d128 default (non-causal 4k unless given) and on FlashAttention-3's kernel at the same
#             point (scripts/profile_ncu.py --external; needs the fa3_bench binary too): tensor pipe, stalls; both
#             folders come back in ncu.tgz (scripts/ncu_compare.py reads their source.csv side by side)
#   fa3check  that binary's correctness check alone (every point of the grid against an fp32 reference, no timing)
#   quant     (ran in the thirty-fifth session, H100: +3-4% forward from 32 to 33 heads) the last round's idle SMs: non-causal points at 32 heads (4096 tiles of 128 rows on 132 SMs: 31.03
#             rounds' work in 32) against 33 heads (32 rounds' work in 32; d128 also 34: 32.97), same tokens;
#             if a partial last round costs its share, flashjit's TFLOP/s rise ~3% from 32 to 33 heads; the
#             backward likewise at hidden 4096 against 4224 (its dK/dV grid: a CTA a key block and KV head)
#   sk-tests  (ran in the thirty-fifth session: passed) the stream-K tail (docs/experiments/stream-k.patch, branch experiment/stream-k): the GPU tests that run
#             the forward defaults (as `tests`, which now split the last tiles of non-causal calls) and its own
#   sk-sanitize  compute-sanitizer (memcheck, racecheck, synccheck, initcheck) over the patch's tail tests
#   idle      (ran in the thirty-fifth session: +0.4-1.2%, not landed) warpgroups with no query rows in a tile skip their products (docs/experiments/idle-wg.patch, on top of
#             stream-k.patch; branch experiment/idle-wg): its GPU tests, then it against stream-k alone
#   sk        (ran in the thirty-fifth session: slower, -13% to +1%, not landed) the same patch timed: each non-causal default against its stream_k twin in one process (--configs,
#             three interleaved rounds; at 1k also the cross-tile default it would replace)
#   ks-tests  split_keys (docs/experiments/split-keys.patch, branch experiment/split-keys): the forward GPU tests
#             over the patch's defaults (its dispatcher turns split_keys on wherever the tile takes it) with
#             its own tests, and the config tests
#   ks        split_keys timed: its probe (every tile of <= 64 queries against every tile whole, with and
#             without the knob, and the dispatcher's sm_80 choice at Sq <= 64), each dense default against
#             its split twin where the last tile has <= 64 queries (one process), the varlen batch of
#             100-1500-token sequences main against the patch (two processes each)
#   ks-sanitize  compute-sanitizer's four tools over two of the patch's tests (split and whole tiles mixed in
#             a persistent CTA; a varlen batch, whose last V block's zeroing every warpgroup joins)
#   walk      (ran in the thirty-sixth session; main has changed since) the walk timed: causal bf16 d64 / d128 at 4k-16k and B=1 8k 32/8, main against causal-walk-revert.patch
#             (the static walk, one CTA a tile where it would not balance), two processes each, the order
#             reversed in the second; d64 causal's 192 rows with cross-tile against without, d256 causal
#             persistent (walking the lists) against its one CTA a tile default (one process each)
#   dyn-tests  (ran in the thirty-seventh session: passed) the dynamic tile order (docs/experiments/dynamic-tiles.patch, branch experiment/dynamic-tiles: a
#             persistent causal grid draws its tiles from a per-call counter instead of main's host-made lists, or
#             one CTA a tile past 64 query blocks): the forward GPU tests over its defaults and its own test
#   dyn       (ran in the thirty-seventh session: 4k-8k level or -1%, d128 16k +2.4%, d256 16k persistent +7%
#             against a one-CTA figure that the next run did not repeat; then docs/experiments/draw-tiles.patch,
#             branch experiment/draw-tiles, drew only the long rows: level there too, not landed) it timed: causal bf16 d64 / d128 at 4k-16k and B=1 8k 32/8, main against the patch (two processes
#             each, the order reversed in the second); in the patch's tree, d256 causal persistent against its
#             one CTA a tile default at 4k-16k and the GQA point (one process)
#   steady    (ran in the thirty-ninth session: no softmax +19-21%, no exponentials +6-8%, no row max +4-7%, no sums +0-2%) where d128's steady key loop leaves the tensor pipe idle (25% of it at 16k against FA3's 13-15%):
#             timing-only variants of the steady step, each without a part of the softmax (steady-*-timing-only.patch:
#             nosm none of it, noexp no exponentials, nomax no row max, nosum no row sums), against main, d128
#             causal or not at 4k / 16k (two processes each). If nosm runs near the tensor pipe's ceiling the
#             softmax's overlap is the limit; if it gains little, the pipeline around it is
#   emu       (ran in the fortieth session: quarter -6.5 to -11% at d64 / d128, eighth -1 to -7%, d256 level; refuted)
#             a quarter / an eighth of the forward softmax's exponentials on the FMA pipe instead of MUFU
#             (exp2-emulation.patch; -every8.patch on top for the eighth): its
#             forward GPU tests (build set, softmax cuts, the kept-max row starts), then both against main, bf16
#             d64 / d128 / d256, causal or not, 4k and 16k (two processes each). d64's 192-row tile issues as many
#             MUFU cycles as tensor cycles a step (3 warps x 66 x 8 against 1536): there the quarter should pay
#
#   mw-tests, mw  (ran in the fortieth session; landed: the dropout masks from the producer warpgroup's four warps,
#             d64 dropout +1.1 to +4.2%, d128 with dQ first +2.1 to +4.2%; docs/perf-log.md)
#   kahead-tests  (ran in the fortieth session: 1119 passed, 13 skipped) the forward's producer loading K a block
#             ahead of V (docs/experiments/k-ahead.patch; FlashAttention-3's order): the forward GPU tests in its tree
#   kahead    (ran in the fortieth session: level, d128 non-causal 16k -3.8%; refuted) it timed against main, bf16
#             d64 / d128 / d256, causal or not, 4k and 16k, two processes each
#   bwd-tests [K]  the backward's GPU tests and every dropout test, or those `pytest -k K` selects (after a
#             backward change; the fortieth session's landed mask warps ran them before
#             test_narrow_tma_dropout_with_features_matches_reference existed)
#   treemax   a row's max over a thread's scores as a tree in fwd::softmax_rows (tree-max.patch; the kept-max
#             steps have had one since the thirty-ninth session), depth log2 kNtC instead of a chain of kNtC
#             FMNMX: the same instructions (sass_steps), results bit for bit; main against it, causal bf16
#             d64 / d128 (or the head dims given) at 1k / 4k / 16k and the GQA point, two processes each
#   keptc     (ran in the forty-third session: mixed, -1.8 to +3.9%; the defaults stay) lazy rescaling (and so the
#             kept max) for the persistent d96 / d128 causal defaults, `_xt_hb` against `_xt_hb_lr` at 1k-8k (+ the
#             GQA point), two processes
#   alu       (ran in the forty-third session: alu +5.8-7.3% backward, Threefry +2.6-5.2%, but the forward pays)
#             dropout's Philox multiplies against ALU stand-ins (timing only), whether its cost is FMA-pipe contention
#   dropfwd   (ran in the forty-fourth session: 87 passed) the forward GPU tests with dropout and the fwd+bwd
#             dropout figures at d64 / d96 / d128 after the forward's mask warps landed (forty-third session)
#   drop192   (ran in the forty-fourth session: level to -6%, refuted) d64's dropout calls on the 192-row tile
#             with mask warps (d64-dropout-192.patch), its tests and the fwd+bwd A/B; the patch is against
#             that run's main (its test hunk no longer applies: branch experiment/d64-dropout-192 holds it)
#   ncufwddrop (ran in the forty-fourth session: the mask warps are what the consumers wait for) ncu on d64's
#             forward with dropout: main's kernel, drop192's, and the default without dropout
#   pairswap  dropout without mask warps: a span's two consumer warps split its Philox calls and swap halves
#             (dropout-pair-swap.patch): the forward dropout tests, then the forward alone at d64 / d192 / d256
#             (ran in the forty-fifth session: 106 passed, +20-28% d64, +5-11% d192; landed)
#   dropps    d96 / d128 (and d64 causal 1k) with dropout: the persistent mask-warp defaults against one CTA a
#             tile whose consumers make their masks with the pair swap (ran in the forty-fifth session; the
#             psw tree's persistent kernels without mask warps led at 4k-8k: mask_warps became a knob)
#   mwknob    (ran in the forty-fifth session: landed) the forward dropout tests on the mask_warps knob, _mw at
#             causal 2k, d64's persistent tiles
#   hybrid    (ran in the forty-fifth session: refuted) the mask warps make half a CTA's blocks' masks, the
#             consumers (swap) the rest (dropout-hybrid.patch)
#   droptable (ran in the forty-fifth session) the forward defaults with dropout and without, d64-d256,
#             against SDPA's flash and cuDNN
#   ncuswap   (ran in the forty-sixth session: the swap's kernel stalls on instruction fetch, 20% of its samples)
#             ncu on d128 causal 1k with dropout: the swap against the mask warps, and without dropout
#   d64r192   (ran in the forty-sixth session: -5 to +2%, refuted) d64 with dropout on 192-row, 96-key tiles
#             against the 128-row defaults
#   d256n64   (ran in the forty-sixth session: +6 to +9%, landed) d256 with dropout: the 80-key default (no swap)
#             against 64-key tiles (the swap)
#   ncucudnn  (ran in the forty-sixth session) cuDNN's forward at the short causal points (d128 / d64 causal 1k) under ncu beside ours: its kernel
#             name, grid, block, registers, shared memory, tensor pipe (what tile and schedule it runs)
#   st3       (ran in the forty-sixth session: refuted; the causal st3 half-block kernel has C7511) d128 at the short points with three K/V stages (cuDNN's kernel there: 232 KiB of shared memory, one
#             CTA an SM, 384 threads, like ours but for the stages): st3 half blocks without cross-tile against the
#             st2 defaults (cross-tile's second Q stage leaves no room for a third K/V stage)
#   qfirst    (ran in the forty-sixth session as part of qsleep: -2.5 to +0.8%, refuted) cross-tile's producer loads a tile's Q before its first K (q-first.patch): main against it, d64 / d128
#             causal or not at 1k / 2k / 4k, two processes each; then [tests] the forward GPU tests in its tree
#   qsleep    (ran in the forty-sixth session: level, refuted) q-first, and q-first with every mbarrier wait sleeping on a suspend-time hint (wait-sleep.patch:
#             NANOSLEEP.SYNCS on the retry path, as cuDNN's kernel), against main: qfirst's points, two processes
#   exppp     (ran in the forty-sixth session: -6% at d128 causal 1k, refuted) ping-pong without the overlap, its token around the exponentials (cuDNN's short causal kernel; exp-pingpong.patch):
#             a correctness check of its kernels, then against the defaults at d128 causal 1k / 2k, non-causal 1k, d64 causal 1k
#   exppp3    (ran in the forty-sixth session: level to -3%, refuted) exppp's kernels on three K/V stages (cuDNN's 232 KiB), d128 causal 1k / 2k, non-causal 1k
#   ncuxt     (ran in the forty-sixth session: _xt 5.6% no_instruction against 6.7%, +0.9%) instruction fetch at d128 causal 1k: `_xt_hb` (the default) against `_xt` (one compilation fewer), ncu's
#             no_instruction share and the kernels' sizes, and both timed (three interleaved rounds)
#   fwd-tests [K]  the forward GPU tests ($FWD_TESTS), or those `pytest -k K` selects (e.g. `across`: the causal
#             keep mask bit for bit across a CTA's tiles, written after the forty-fifth session's review)
#   power     the SM clock and power each kernel runs at (docs/experiments/power_probe.py): flashjit, cuDNN and
#             FlashAttention-3 with and without its two-CTA clusters (carry .fa3bench: fa3_bench and
#             fa3_bench_nocluster, built by fa3_bench/build.sh, the second with
#             EXTRA_FLAGS=-DFLASHATTENTION_DISABLE_CLUSTER), back to back for ~3.5 s each, at d128 non-causal 4k /
#             16k (bf16), 4k (fp16), causal 1k; nvidia-smi sampled every 100 ms. Whether FA3's lead at d128
#             non-causal is work a cycle or clock, and what its cluster's K/V multicast is worth
#   q3        cross-tile kernels without dropout with three Q stages where they fit (q-three-stages.patch; d64's
#             192-row and d96-d128's 128-row tiles): a tile's Q no longer waits for the O store of the tile two
#             back (the d128 causal 1k consumers' first wait of a tile: 4.4% of ncu's samples). Its GPU tests of
#             the persistent / cross-tile walks, then against main at d64 / d96 / d128, causal or not, 1k-4k
#   ncuq3     d128 causal 1k under ncu in main and in q3's tree (three Q stages, level in q3): where each one's
#             warps wait on mbarriers (docs/experiments/ncu_waits.py: a wait's samples and its retry path's runs)
#   qa        q3's three Q stages with each tile's Q loaded during the tile before (q-ahead.patch, q-three-stages.patch
#             included): ncuq3 had the consumers' first wait of a tile unchanged by the third stage (the new tile's
#             Q and K and the last V, 96 KiB at d128, arrive together); its GPU tests, then q3's A/B
#   qf        q-ahead with the early Q only where its stage is already free (q-ahead-free.patch: a non-blocking
#             test of the empty barrier, else the Q at its usual place); its GPU tests, then qa's A/B
#   pvf       a chained tile start issues the last tile's pending PV before waiting for the new Q and first K
#             (pv-first.patch: the PV runs while they land; the new block's softmax loses the PV under it); its
#             GPU tests of the walks, then main against it at d64 / d128 (d96 causal serializes: C7511)
#   notes [FILTER]  ptxas over the forward kernels the dispatcher can pick (16 jobs): C75xx notes and spills
#   tt REVERT_PATCH  this tree against main before the tile transition's cuts (REVERT_PATCH restores it): the
#             walks' GPU tests in this tree, then bf16 d64 / d96 / d128, causal or not, 1k-4k, two processes each
#   tt3 CUT_PATCH REVERT_PATCH  as tt, with a third tree: this one with CUT_PATCH (one cut off)
#   ttq CUT_PATCH REVERT_PATCH  tt3 at d128 only, causal or not, 1k and 4k, without its tests
#   trace [SEQLENS] [D] [PATCH]  clock64 stamps of the non-causal default's schedule (tile_trace_instrument.py
#             edits a copy of this tree, PATCH applied first if given; a timing probe: the stamps go to a buffer
#             passed as the tile walk, which non-causal kernels ignore): the steady step's period, the tile's
#             overhead over its blocks, and each event of a tile transition (tile_trace.py)
#   walkc [COSTS] [tests]  the causal walk's model of a tile's fixed cost (dispatch.WALK_TILE_COST, main's 1.5): main
#             against a copy of this tree with each cost of COSTS (numbers, default "1"), causal bf16 d64 / d96 /
#             d128 at 1k / 2k / 4k and B=1 8k 32/8, two processes each; with `tests`, first the GPU and CPU tests of
#             the walk (bit for bit against the static walk). Ran in the forty-seventh session with main at 1 and
#             COSTS "2 3 4" (+5-8% at d96 / d128 causal 1k, -3 to +2% at 2k-4k: a true cost of 1.5 reproduces both
#             in the simulation), then on 1.5 with "1 2" tests (+6.3 / +8.7% over 1 at d128 / d96 causal 1k)
#   knobs4    two knobs never timed at these points since the tile transition landed (a chained tile start ~1 step,
#             no longer 1.6-1.7): d64 causal on the 192-row half blocks with cross-tile (`_xt_hb`) against the
#             defaults (`_hb`; at 1k the two-CTA `_x2`), 1k-16k; d256 non-causal persistent (`ps1`: the next tile's Q
#             and first K load under the current tile's last blocks) against its one CTA a tile default, 2k-16k;
#             three interleaved rounds, one process, with the GQA point
#   xt64-tests  the dispatcher's d64 causal cross-tile rule (d64-causal-xt.patch; branch experiment/d64-causal-xt):
#             the forward GPU tests over its defaults (every head dim up to 64 takes cross-tile causal past SHORT;
#             its new sink case: d64 causal Sq 1100 with a learnable sink, the gpt-oss shape), and the config tests
#   knobs5    d64 causal 1k, the table's point furthest under cuDNN (0.93x; cuDNN's kernel there: 128 rows, 128-key
#             blocks, a CTA an SM walking a tile counter): the two-CTA default against the 128-row tile with 128-key
#             blocks, persistent, half blocks, with and without cross-tile (it fills 1k's rows exactly; the 192-row
#             tile's last is a third full), and the 192-row `_xt_hb`; three interleaved rounds, two processes
#   knobs6    d64 causal 512 / 1k on the two-CTA kernel (`_x2`, the default there, 0.95x cuDNN at 1k): its stages
#             (4, the default, against 2 and 3), one CTA a tile instead of persistent, lazy rescaling; three
#             interleaved rounds, two processes
#   x2walk    (ran in the fifty-third session, after wg-skip landed, as knob_ab lines: persistent led one CTA a tile at
#             512 / 768 / 1k, and the fifty-first session's rule, one CTA a tile past four blocks, was removed) the
#             two-CTA kernel, persistent against one CTA a tile (and one CTA a tile with two stages) at d64 causal
#             512 / 768 / 1k, two processes; then the forward GPU tests of causal calls
#   wgskip-mutant  (ran in the fifty-third session: both fail) a warpgroup passing over blocks its last 32 rows see
#             (wg-skip-mutant.patch): its two-CTA equality tests of a causal and a windowed call must fail. wg-skip
#             itself (pass_over) landed in that session: tests, sanitizers and the 1k A/B (+2.7%) in docs/perf-log.md
#   pgdecode  (ran in the fifty-sixth session, cut to fit: every test passes, varlen pg 0.975-0.995x paged) the
#             paged varlen call's decoding route (fifty-fifth session, landed without a GPU run): the paged varlen
#             GPU tests, then bench_decode.py's points with paged caches of 16-slot pages ("varlen pg" against
#             "paged", the same kernels through forward_kvcache: level but the route's host work)
#   mutant    (ran in the fifty-sixth session: "failed, then hung (caught)") mutations.py's cross_tile_o_stored_early
#             with each pytest run cut at 150 s (the fifty-fifth session's run never reached a verdict)
#   initcheck (ran in the fifty-sixth session: initcheck's blind spot for TMA stores, docs/perf-log.md)
#             docs/experiments/initcheck_dvec.py under initcheck, O as the forward wrote it (TMA store) and as a
#             PyTorch copy (the fortieth session's dvec_kernel report)
#   powerbwd  issue 15's fp16 shortfall at the power cap (d256 causal B=1 8k 32/8: 0.971x cuDNN in fp16, 1.046 in
#             bf16; fifty-first session: our dK/dV kernel 15% slower in fp16, cuDNN's 9.6%): power_probe.py --backward,
#             flashjit and cuDNN back to back, each point's order reversed in a second pass, bf16 and fp16, with d128
#             non-causal 4k beside it; the clock and power each window held, and TFLOP/s a GHz. If ours needs more
#             energy a product (lower clock at equal power), the fp16 gap is power, not the schedule
#   suite PART  the whole GPU suite in two calls (each ~5 minutes on an H100, kernels compiled cold; ran in the
#             fifty-seventh session: 1141 passed, then 1118 passed and 5 failed, the CUDA-graph-tree walk bug): 1, the
#             forward files ($FWD_TESTS, as fwd-tests); 2, every other file (test_multi_gpu aside: one GPU), the
#             failures' tracebacks in $OUT/suite2.log
#   ghost     (ran in the fifty-third session: tests pass, -1.5 to -2.3% at 2k-8k; refuted) pass_over in the
#             overlapped loop (wg-ghost.patch): its causal / window / varlen tests, and d64 causal 2k-8k against main
#   gqa256    issue 15's d256 causal B=1 8k 32/8 point (0.956 / 0.926x cuDNN in the fifty-first session's tables,
#             0.997 / 0.995 in the forty-third's): bf16 and fp16, three interleaved rounds, the kernels' times
#             (torch.profiler) of flashjit's and cuDNN's backward, and flashjit.backward alone, split and group
#   ncubwd [D [SEQLEN [DTYPE]]]  (ran in the fifty-eighth session at d256 causal 4k bf16: ours 3.11M cycles, tensor
#             pipe 42%, memory throughput 88%; cuDNN 3.04M, 64%, 63%) the backward's dK/dV kernel and cuDNN's under ncu
#             (sdpa_launch.py --backward): cycles, tensor pipe, the L2's sectors by operation (read, write,
#             reduction, atomic), stalls, top SASS lines; both source.csv in ncu.tgz
#   wideab    (ran in the fifty-eighth session: -0.7 to -7.8%, refuted) the wide backward's next S^T / dP^T issued
#             under the last dQ piece (wide-ahead.patch, wide-ahead-wg0.patch)
#   widedq [HEAD_DIMS [VARIANTS]]  (ran in the fifty-eighth session) what the wide backward's dQ path costs, timing
#             only: noreduce +20-27%, nostage +52-91% (no dQ products left either), nofence +0.5-3.6%, nowait +2-6%
#   sts64     (ran in the fifty-eighth session: level, not landed) stage_rows_f32 with 8-byte shared stores
#   widedq 256 nodout  (not run yet) the L2 bytes a cluster pair's Q / dO multicast would save, timing only:
#             predicted +8-13% if the L2's bytes set the pace (noreduce's half of them gave +20-27%)
#   l2hints   (not run yet) the wide backward with L2 evict_last hints on its Q / dO loads and dQ reductions
#   narrowdq  (not run yet) the narrow backward's dQ reductions priced as widedq's noreduce, d64 / d128
#   nomax [tests]  (ran in the sixty-first session: landed, non-causal +0.9-1.5%, d128 causal `_xt_hb_lr` +5.8-5.9%
#             over `_xt_hb`) the key loop with no row max against main before it (nomax-revert.patch, made by
#             `git diff HEAD 12337d7 -- kernels/`, 12337d7 being main before it): its forward GPU tests, or the A/B
#   causallr, d256nomax  (ran in the sixty-fourth session, H100: both landed, their steps and patches removed; git
#             show 9f3d42c:docs/experiments/run-next.sh has them) lazy rescaling for causal d88-d128 (+4.4-7.1% at
#             d96 / d128 causal 2k-16k and the GQA point, 151 tail tests passed), the no-max key loop at d256
#             (+0.1-1.1%, 160 d256 tests passed, ptxas clean)
#   lse [tests|HEAD_DIMS]  (not run yet: no device in the sixty-fifth session) the epilogue's lse by __logf in every
#             lane (lse-fast.patch) against main, d64 / d128 / d256 1k / 4k; `tests`: the forward GPU tests in its tree
#             and test_native_autograd.py (the node's headers changed in the sixty-sixth session)
#
# The device copy has no usable .git: each variant is a copy of this tree with its patches applied by
# patch(1), imported through PYTHONPATH (its kernels/ come with it: codegen.kernels_dir); one kernel cache
# serves all, since the templates' hash is part of every key.
set -euo pipefail
STEP=${1:?usage: run-next.sh knobs|knobs2|dropout|table [DTYPE]|gqa|tests|fwdtable DTYPE|outlier|knobs3|steady|emu|kahead-tests|kahead|bwd-tests|keptc|ncu128|fa3|fa3check|quant|sk-tests|sk-sanitize|sk|idle|ks-tests|ks|ks-sanitize|walk|dyn-tests|dyn|treemax|early|ncudrop|alu|dropfwd|drop192|ncufwddrop|pairswap|dropps|mwknob|hybrid|droptable|ncuswap|d64r192|d256n64|fwd-tests|ncucudnn|st3|qfirst|qsleep|exppp|exppp3|ncuxt|power|walkc [COSTS] [tests]|q3|ncuq3|qa|qf|pvf|trace [SEQLENS] [D] [PATCH]|notes [FILTER]|tt REVERT_PATCH|tt3 CUT_PATCH REVERT_PATCH|ttq CUT_PATCH REVERT_PATCH|knobs4|xt64-tests|knobs5|knobs6|gqa256|x2walk|wgskip-mutant|ghost|pgdecode|mutant|initcheck|suite PART|powerbwd|ncubwd [D [SEQLEN [DTYPE]]]|wideab [HEAD_DIMS]|widedq [HEAD_DIMS [VARIANTS]]|sts64|l2hints|narrowdq|pairquick|nomax [tests]|lse [tests|HEAD_DIMS]}
ROOT=$(pwd)
OUT=${OUT:-/tmp/run-next-out}
mkdir -p "$OUT"
if [[ $STEP != fa3* ]] && compgen -G ".whl/*.whl" >/dev/null; then  # the device (../shared/DEVICE.md); elsewhere torch is there already; fa3* need no Python
  python3 -m pip install -q --no-index --no-deps .whl/*.whl
  python3 -m pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1
fi
export FLASHJIT_CACHE_DIR=/tmp/fj-cache PYTHONUNBUFFERED=1
EXP=$ROOT/docs/experiments
# The GPU tests that run the dispatcher's forward defaults (`tests`, and the same in an experiment's variant).
FWD_TESTS=${FWD_TESTS:-"tests/test_forward_sm90.py tests/test_parity.py tests/test_flash_api.py tests/test_varlen.py tests/test_head_dim_v.py"}
# The SM clock and power twice a second for the whole step, to $OUT/clocks.csv: fp16 ran 3-13% below bf16 at
# the same points with kernels of the same instruction counts (the wide backward's step loops: 664-687 a
# warp either way), which a power cap would explain (fp16's longer mantissa toggles more bits).
if command -v nvidia-smi >/dev/null; then
  FIELDS=timestamp,clocks.sm,power.draw.instant,power.limit,temperature.gpu,clocks_event_reasons.active
  nvidia-smi --query-gpu=$FIELDS --format=csv -c 1 >/dev/null 2>&1 || FIELDS=timestamp,clocks.sm,power.draw,temperature.gpu
  nvidia-smi --query-gpu=$FIELDS --format=csv -lms "$([[ $STEP == power* ]] && echo 100 || echo 500)" >"$OUT/clocks.csv" 2>&1 &
  CLOCKS=$!
  trap 'kill $CLOCKS 2>/dev/null || true' EXIT
fi
# stamp: each line with the time it was printed, to find a line's clocks in clocks.csv.
stamp() { while IFS= read -r line; do printf '%s %s\n' "$(date +%T)" "$line"; done; }

# variant NAME PATCH...: /tmp/variants/NAME, this tree with the patches applied in order.
variant() {
  local name=$1 dir=/tmp/variants/$1
  shift
  rm -rf "$dir" && mkdir -p "$dir"
  cp -r "$ROOT"/{flashjit,kernels,scripts,tests,docs,pyproject.toml,README.md} "$dir"/  # (README: patches and a test read it)
  for patch in "$@"; do (cd "$dir" && patch -f -s -p1 <"$patch"); done
  echo "$dir"
}
# with_variant NAME CMD...: run CMD with variant NAME's flashjit (main: this tree).
with_variant() {
  local name=$1
  shift
  if [ "$name" = main ]; then (cd "$ROOT" && "$@"); else (cd "/tmp/variants/$name" && PYTHONPATH=$PWD "$@"); fi
}
# warm SCRIPT ARGS "V1 V2 ...": one untimed pass of each variant at once, so that their kernels compile (in
# parallel, under the cache's locks) before any timed pass. It waits for those passes alone: a bare `wait` also
# waited for the clocks logger (nvidia-smi -lms, which never ends), and the idle step hung there until cut off.
warm() {
  local v pids=()
  for v in $3; do eval with_variant $v python3 scripts/$1 $2 --out /tmp/warm-$v >/dev/null 2>&1 & pids+=($!); done
  wait "${pids[@]}"
}
# passes SCRIPT ARGS "V1 V2 ..." [LINES]: two timed passes, the order reversed in the second, so each variant is
# timed in two processes; the result lines (those matching LINES, default ^bf16) to $OUT/bench.txt, then each
# point's means and changes against V1 (scripts/ab_means.py).
passes() {
  local pass order v
  for pass in 1 2; do
    order=$3; [ $pass = 2 ] && order=$(echo $3 | tr ' ' '\n' | tac | tr '\n' ' ')
    for v in $order; do
      echo "== $v (pass $pass)"
      eval with_variant $v python3 scripts/$1 $2 --out "$OUT/${1%.py}-$v-$pass" 2>&1 | grep --line-buffered -E "${4:-^bf16}" || true
    done
  done | tee -a "$OUT/bench.txt"
  { echo "== means (scripts/ab_means.py)"; python3 scripts/ab_means.py "$OUT" --script "${1%.py}" --variants $3 || true; } |
    tee -a "$OUT/bench.txt"
}
# causal_ab VARIANT PATCH: the tile-order A/B, main against VARIANT (this tree with PATCH): causal bf16 d64 / d128
# at 4k-16k and B=1 8k 32/8, two processes each (passes).
causal_ab() {
  variant "$1" "$2" >/dev/null
  local args="--dtypes bf16 --head-dims 64,128 --causal 1 --seqlens 4096,8192,16384 --gqa 8192 --no-flex"
  warm bench_forward.py "$args" "main $1"
  passes bench_forward.py "$args" "main $1"
}
# gpu_tests VARIANT NAME [MORE TESTS...]: the forward GPU tests ($FWD_TESTS, and MORE) in VARIANT's tree (main: this
# one), cut off at 520 s so that a hung kernel still leaves the call its report; the tail to $OUT/NAME.txt.
# A backward A/B with dropout 0.1 (HEAD_DIMS, "VARIANTS", the first the baseline; bf16 1k / 4k, causal or not),
# then main without dropout, so each variant's dropout cost comes out of ab_means (--plain).
dropout_ab() {
  local drop="--dtypes bf16 --head-dims $1 --seqlens 1024,4096 --causal 0,1 --dropout-p 0.1 --gqa ''"
  warm bench_backward.py "$drop" "$2"
  passes bench_backward.py "$drop" "$2"
  eval python3 scripts/bench_backward.py "${drop/--dropout-p 0.1/}" --out "$OUT/nodrop" 2>&1 | grep -E "^bf16" |
    tee -a "$OUT/bench.txt" || true
  python3 scripts/ab_means.py "$OUT" --script bench_backward --variants $2 \
    --plain "$OUT/nodrop/bench_backward.json" 2>&1 | tee -a "$OUT/bench.txt" || true
}
# tests_pass VARIANT SECONDS K TEST_FILES...: VARIANT's GPU tests (pytest -k K over TEST_FILES, cut off after
# SECONDS), their summary to $OUT/VARIANT-tests.txt; true when some passed and none failed. Timing comes after it
# only: a variant's kernel that deadlocks would otherwise hold the device call to its end.
tests_pass() {
  local v=$1 seconds=$2 k=$3
  shift 3
  with_variant "$v" timeout "$seconds" python3 -m pytest -q -n 16 -p no:cacheprovider --maxfail 10 "$@" -k "$k" 2>&1 |
    tail -6 | tee "$OUT/$v-tests.txt"
  grep -q ' passed' "$OUT/$v-tests.txt" && ! grep -qE 'failed|error' "$OUT/$v-tests.txt"
}
# bwd_ab "NAME=PATCH ..." ARGS [K TEST_FILES...]: each NAME a copy of this tree with docs/experiments/PATCH; with K,
# the first NAME's GPU tests (tests_pass, 240 s; timing-only variants have none), and the timing only if they
# pass; then main against every NAME (bench_backward ARGS), two processes each.
bwd_ab() {
  local spec names="" first=""
  for spec in $1; do
    variant "${spec%%=*}" "$EXP/${spec#*=}" >/dev/null
    names="$names ${spec%%=*}"
    first=${first:-${spec%%=*}}
  done
  local args=$2
  if [ $# -gt 2 ]; then
    local k=$3
    shift 3
    tests_pass "$first" 240 "$k" "$@" || { echo "== $first: tests did not pass, no timing"; return 0; }
  fi
  warm bench_backward.py "$args" "main$names"
  passes bench_backward.py "$args" "main$names"
}
gpu_tests() {
  local v=$1 name=$2
  shift 2
  with_variant "$v" timeout "${GPU_TESTS_TIMEOUT:-520}" python3 -m pytest -q -n 16 -p no:cacheprovider --maxfail 30 $FWD_TESTS "$@" 2>&1 |
    tail -30 | tee "$OUT/$name.txt"
}
# names_of BASE SUFFIX...: kernel names, BASE with each suffix ("-": none; a whole name, fwd_...: itself).
names_of() {
  local base=$1 k
  shift
  for k in "$@"; do case $k in fwd_*) echo -n "$k " ;; *) echo -n "$base${k#-} " ;; esac; done
}
# knob_ab VARIANT POINTS [ARGS]: in VARIANT's tree, precompile every kernel POINTS names, then one bench_forward a
# line "d_head causal seqlens base suffixes..." timing those kernels in interleaved rounds (--configs), with
# bench_forward's ARGS (e.g. "--dropout-p 0.1"); the result lines added to $OUT/bench.txt.
knob_ab() {
  local all
  all=$(echo "$2" | while read -r d causal seqlens base knobs; do names_of "$base" $knobs; done)
  with_variant $1 python3 -m flashjit precompile --arch sm_90a --jobs 16 $all 2>&1 | tail -2 || true
  echo "$2" | while read -r d causal seqlens base knobs; do
    with_variant $1 python3 scripts/bench_forward.py --dtypes bf16 --head-dims "$d" --causal "$causal" \
      --seqlens "$seqlens" --rounds 3 --no-flex --out "$OUT/d$d-c$causal-$seqlens" ${3:-} --configs $(names_of "$base" $knobs) 2>&1
  done | tee -a "$OUT/bench.txt"
}

# q_variant_ab NAME PATCH HEAD_DIMS: in NAME's tree (this one with docs/experiments/PATCH), the GPU tests of the
# persistent and cross-tile walks, then main against it, bf16 HEAD_DIMS causal or not at 1k-4k, two processes each.
q_variant_ab() {
  variant "$1" "$EXP/$2" >/dev/null
  with_variant "$1" timeout 200 python3 -m pytest -q -n 16 -p no:cacheprovider tests/test_forward_sm90.py \
    -k "walk_many_tiles or cross_tile_equals or causal_walk" 2>&1 | tail -3 | tee "$OUT/$1-tests.txt"
  local args="--dtypes bf16 --head-dims $3 --causal 0,1 --seqlens 1024,2048,4096 --gqa '' --no-flex"
  warm bench_forward.py "$args" "main $1"
  passes bench_forward.py "$args" "main $1"
}

# trees_ab "NAME=PATCH ..." HEAD_DIMS SEQLENS [tests]: this tree (main) against a copy of it per NAME with
# docs/experiments/PATCH applied; with `tests`, first the walks' GPU tests in this tree (the one being landed:
# q_variant_ab tests its variant instead), then bf16 HEAD_DIMS causal or not at SEQLENS, two processes each.
trees_ab() {
  local tree names=main
  for tree in $1; do variant "${tree%%=*}" "$EXP/${tree#*=}" >/dev/null; names="$names ${tree%%=*}"; done
  [ "${4:-}" = tests ] && gpu_tests main walks -k "walk_many_tiles or cross_tile_equals or causal_walk"
  local args="--dtypes bf16 --head-dims $2 --causal 0,1 --seqlens $3 --gqa '' --no-flex"
  warm bench_forward.py "$args" "$names"
  passes bench_forward.py "$args" "$names"
}

# fa3_bench: the path of a FlashAttention-3 forward benchmark that starts here: the carried
# .fa3bench/fa3_bench, else (this image's libraries refuse it) one built here from the carried
# .fa3bench/fa3src.tgz with build.sh (16 cores, ~1.5 min); its build log to $OUT/fa3-build.log.
fa3_bench() {
  local bin=$ROOT/.fa3bench/fa3_bench
  if ! "$bin" --help >/dev/null 2>"$OUT/fa3-start.log"; then
    echo "the carried fa3_bench does not start here ($(head -1 "$OUT/fa3-start.log")); rebuilding it" >&2
    rm -rf /tmp/fa3src && mkdir -p /tmp/fa3src && tar -xzf "$ROOT/.fa3bench/fa3src.tgz" -C /tmp/fa3src
    # shellcheck disable=SC1091  # the head dims and dtypes the carried binary was built with
    (source /tmp/fa3src/BUILT && export HDIMS DTYPES && JOBS=16 OUTDIR=/tmp/fa3bench-device SRC_TARBALL=0 \
      bash "$EXP/fa3_bench/build.sh" /tmp/fa3src/flash-attention /tmp/fa3src/cutlass) >"$OUT/fa3-build.log" 2>&1 \
      || { tail -20 "$OUT/fa3-build.log" >&2; exit 1; }
    bin=/tmp/fa3bench-device/fa3_bench
  fi
  echo "$bin"
}

case $STEP in
knobs)
  F=fwd_sm90_bf16
  X2=${F}_d64_m128_n64_st4_ov0_pp0_ps1_causal1
  POINTS="64 1 512,1024,2048 ${F}_d64_m128_n128_st4_ov1_pp1_ps1_causal1_hb - _ms ${X2}_x2 ${X2}_ms_x2 ${F}_d64_m128_n64_st2_ov0_pp0_ps1_causal1_x2
64 1 4096 ${F}_d64_m192_n128_st4_ov1_pp1_ps1_causal1_hb - ${X2}_x2
64 0 512,1024 ${F}_d64_m192_n128_st4_ov1_pp1_ps1_causal0_xt - _lr
64 0 4096,16384 ${F}_d64_m192_n128_st4_ov1_pp1_ps1_causal0 - _lr
128 0 1024 ${F}_d128_m128_n128_st2_ov1_pp1_ps1_causal0_xt - _lr
128 0 4096,16384 ${F}_d128_m128_n128_st2_ov1_pp1_ps1_causal0 - _lr
128 1 1024,4096,16384 ${F}_d128_m128_n128_st2_ov1_pp1_ps1_causal1_xt_hb - _lr
256 0 1024,4096,16384 ${F}_d256_m128_n80_st2_ov1_pp1_ps0_causal0 - _lr
256 1 2048,4096,16384 ${F}_d256_m128_n80_st2_ov1_pp1_ps0_causal1 - _lr"
  knob_ab main "$POINTS"
  ;;
knobs2)
  F=fwd_sm90_bf16
  X2=${F}_d64_m128_n64_st4_ov0_pp0_ps1
  POINTS="64 0 512,1024 ${F}_d64_m192_n128_st4_ov1_pp1_ps1_causal0_xt - _lr ${X2}_causal0_x2
64 1 2048,8192 ${F}_d64_m192_n128_st4_ov1_pp1_ps1_causal1_hb - ${X2}_causal1_x2
192 0 1024,4096,16384 ${F}_d192_m128_n96_st2_ov1_pp1_ps0_causal0 - _lr
192 1 2048,4096,16384 ${F}_d192_m128_n96_st2_ov1_pp1_ps0_causal1 - _lr
256 1 1024 ${F}_d256_m128_n64_st2_ov1_pp1_ps0_causal1 - _lr
96 0 4096 ${F}_d96_m128_n128_st2_ov1_pp1_ps1_causal0 - _lr"
  knob_ab main "$POINTS"
  ;;
knobs3)
  F=fwd_sm90_bf16_d128_m128
  D64=fwd_sm90_bf16_d64_m192_n128_st4_ov1_pp1_ps1_causal0
  knob_ab main "128 0 1024 ${F}_n128_st2_ov1_pp1_ps1_causal0 _xt_lr _lr ${F}_n176_st2_ov1_pp1_ps1_causal0_lr
128 0 2048,4096,8192,16384 ${F}_n128_st2_ov1_pp1_ps1_causal0 _lr _xt_lr ${F}_n176_st2_ov1_pp1_ps1_causal0_lr
64 0 2048,4096,8192,16384 $D64 _lr _xt_lr"
  ;;
dropout)
  variant philox1 "$EXP/dropout-philox1-timing-only.patch" >/dev/null
  variant noapply "$EXP/dropout-no-apply-timing-only.patch" >/dev/null
  dropout_ab 64 "main philox1 noapply"
  ;;
alu)  # dropout's Philox multiplies (IMAD.WIDE, the FMA pipe the consumers' FFMA / FMUL share) against ALU adds and
  # rotates of the same count (dropout-alu-timing-only.patch), and one round, d64 p = 0.1: whether the
  # consumers' dispatch stalls (ncudrop) come from FMA-pipe contention (alu near philox1) or from the rounds'
  # instructions as such (alu near main); and Threefry-4x32-13 (dropout-threefry-timing-only.patch: no multiply,
  # a call loop of 110 instructions against Philox's 57), the price of a multiply-free generator of known
  # quality (the thirty-eighth session's one-round Philox cost 9.7-12%; main 17-25%)
  variant alu "$EXP/dropout-alu-timing-only.patch" >/dev/null
  variant threefry "$EXP/dropout-threefry-timing-only.patch" >/dev/null
  dropout_ab 64 "main alu threefry"
  ;;
dropfwd)  # the forward's dropout masks from the producer's mask warps in persistent kernels (landed in the forty-third
  # session, 796f798, without a GPU run of that final form): the forward GPU tests with dropout, then main with
  # and without dropout through autograd at d64 / d96 / d128 (the forward's share: from the fwd+bwd and bwd
  # figures). The mw / mw2 A/B that chose the rule: docs/perf-log.md; two Philox calls in flight a mask warp
  # (fwd-mask-warps-ilp2.patch, on main) was level with one.
  gpu_tests main dropfwd-tests -k dropout
  dropout_ab 64,96,128 main
  ;;
drop192)  # d64 (the 64-wide tile: d8-d64) with dropout on the 192-row persistent tile, whose consumers fit in 160
  # registers once the mask warps make the masks (d64-dropout-192.patch; main: the 128-row tile at one CTA a
  # tile, its consumers making their own masks): the forward GPU tests with dropout on it, then main / drop192
  # through autograd at d64 (p = 0.1), with main without dropout for each one's cost
  variant drop192 "$EXP/d64-dropout-192.patch" >/dev/null
  gpu_tests drop192 drop192-tests -k "dropout or 192_rows"
  dropout_ab 64 "main drop192"
  ;;
ncufwddrop)  # where d64's forward with dropout waits (non-causal 4k, one launch under ncu): main's default (the
  # 128-row tile, its consumers making their masks), drop192's 192-row kernel (the mask warps make them), and the
  # 192-row default without dropout. Both dropout kernels ran at half the speed without (the forty-fourth session),
  # though the mask warps' consumers issue 21% more instructions a step than without dropout, main's 107% more.
  variant drop192 "$EXP/d64-dropout-192.patch" >/dev/null
  prof() {  # NAME VARIANT ARGS...
    local name=$1 v=$2
    shift 2
    with_variant "$v" python3 scripts/profile_ncu.py --d 64 --seqlen 4096 "$@" --out "$OUT/ncu-$name" \
      >"$OUT/ncu-$name.log" 2>&1 || true
    echo "== $name"; cat "$OUT/ncu-$name/summary.txt" 2>/dev/null || tail -20 "$OUT/ncu-$name.log"
    rm -f "$OUT/ncu-$name/report.ncu-rep"
  }
  prof main-drop main --dropout-p 0.1
  prof mw192-drop drop192 --dropout-p 0.1 --config fwd_sm90_bf16_d64_m192_n128_st4_ov1_pp1_ps1_causal0_dropout_xt_lr
  prof nodrop main
  tar -czf "$OUT/ncufwddrop.tgz" -C "$OUT" ncu-main-drop ncu-mw192-drop ncu-nodrop
  rm -rf "$OUT"/ncu-main-drop "$OUT"/ncu-mw192-drop "$OUT"/ncu-nodrop
  ;;
pairswap)  # dropout without mask warps (d64's and d192's one-CTA-a-tile defaults): the two consumer warps of a
  # 32-row span split its Philox calls and swap halves through shared memory (dropout-pair-swap.patch; main: each
  # warp makes every call of its span and uses half). The forward GPU tests with dropout on it (the bit-for-bit
  # mask test's one-CTA configs take the swap), then the forward with dropout, main / pairswap, two passes
  variant pairswap "$EXP/dropout-pair-swap.patch" >/dev/null
  gpu_tests pairswap pairswap-tests -k dropout tests/test_forward_gpu.py
  args="--dtypes bf16 --head-dims 64,192,256 --seqlens 1024,4096 --causal 0,1 --gqa '' --no-flex --dropout-p 0.1"
  warm bench_forward.py "$args" "main pairswap"
  passes bench_forward.py "$args" "main pairswap"
  ;;
dropps)  # dropout's two mask makers at d96 / d128 / d64's causal 1k: the defaults (persistent, the producer's mask
  # warps) against one CTA a tile, whose consumers now make their masks with the pair swap (361c8d6: +20-28% at
  # d64); p = 0.1, rounds interleaved in one process
  F=fwd_sm90_bf16
  knob_ab main "128 0 1024,4096 ${F}_d128_m128_n128_st2_ov1_pp1_ps1_causal0_dropout _xt_lr ${F}_d128_m128_n128_st2_ov1_pp1_ps0_causal0_dropout_lr
128 1 1024,4096 ${F}_d128_m128_n128_st2_ov1_pp1_ps1_causal1_dropout _xt_hb ${F}_d128_m128_n128_st2_ov1_pp1_ps0_causal1_dropout_hb
96 0 1024,4096 ${F}_d96_m128_n128_st2_ov1_pp1_ps1_causal0_dropout _xt_lr ${F}_d96_m128_n128_st2_ov1_pp1_ps0_causal0_dropout_lr
96 1 1024,4096 ${F}_d96_m128_n128_st2_ov1_pp1_ps1_causal1_dropout _xt_hb ${F}_d96_m128_n128_st2_ov1_pp1_ps0_causal1_dropout_hb
64 1 1024 ${F}_d64_m128_n64_st4_ov0_pp0_ps1_causal1_dropout _x2 ${F}_d64_m128_n128_st4_ov1_pp1_ps0_causal1_dropout_hb" "--dropout-p 0.1"
  # the same in persistent-pair-swap-probe.patch's tree, whose persistent kernels have no mask warps (their
  # consumers make the masks with the swap): the one-CTA-a-tile column, the same kernels in both, anchors the two
  variant psw "$EXP/persistent-pair-swap-probe.patch" >/dev/null
  knob_ab psw "128 0 1024,4096 ${F}_d128_m128_n128_st2_ov1_pp1_ps1_causal0_dropout _xt_lr ${F}_d128_m128_n128_st2_ov1_pp1_ps0_causal0_dropout_lr
128 1 1024,4096 ${F}_d128_m128_n128_st2_ov1_pp1_ps1_causal1_dropout _xt_hb ${F}_d128_m128_n128_st2_ov1_pp1_ps0_causal1_dropout_hb
96 0 1024,4096 ${F}_d96_m128_n128_st2_ov1_pp1_ps1_causal0_dropout _xt_lr ${F}_d96_m128_n128_st2_ov1_pp1_ps0_causal0_dropout_lr
96 1 1024,4096 ${F}_d96_m128_n128_st2_ov1_pp1_ps1_causal1_dropout _xt_hb ${F}_d96_m128_n128_st2_ov1_pp1_ps0_causal1_dropout_hb" "--dropout-p 0.1"
  ;;
mwknob)  # mask_warps as a knob (the dispatcher: causal rows up to 1k): the forward dropout tests, then _mw against the
  # pair swap at causal 2k (d96 / d128: 1k went to the mask warps by +18%, 4k to the swap by +7-10%), and d64's
  # one-CTA-a-tile dropout defaults against persistent 128-row tiles (now without mask warps' smem)
  [ "${2:-}" = d64 ] || gpu_tests main mwknob-tests -k dropout tests/test_forward_gpu.py
  F=fwd_sm90_bf16
  points="128 1 2048 ${F}_d128_m128_n128_st2_ov1_pp1_ps1_causal1_dropout_xt_hb - _mw
96 1 2048 ${F}_d96_m128_n128_st2_ov1_pp1_ps1_causal1_dropout_xt_hb - _mw
64 0 1024,2048,4096 ${F}_d64_m128_n128_st4_ov1_pp1_ps0_causal0_dropout_lr - ${F}_d64_m128_n128_st4_ov1_pp1_ps1_causal0_dropout_xt_lr ${F}_d64_m128_n128_st4_ov1_pp1_ps1_causal0_dropout_lr
64 1 2048,4096,8192 ${F}_d64_m128_n128_st4_ov1_pp1_ps0_causal1_dropout_hb - ${F}_d64_m128_n128_st4_ov1_pp1_ps1_causal1_dropout_hb"
  [ "${2:-}" = d64 ] && points=$(echo "$points" | grep "^64 ")  # (mwknob d64: d64's points alone)
  knob_ab main "$points" "--dropout-p 0.1 --gqa="
  ;;
hybrid)  # the mask warps and the consumers' swap sharing a CTA's blocks (dropout-hybrid.patch: the mask warps make the
  # blocks at even ring positions, the consumers those at odd ones, where both fit): the forward dropout tests in
  # its tree, then in each tree _mw against the swap alone (the same kernel in both: the anchor), p = 0.1
  variant hyb "$EXP/dropout-hybrid.patch" >/dev/null
  gpu_tests hyb hybrid-tests -k dropout tests/test_forward_gpu.py
  F=fwd_sm90_bf16
  points="128 0 1024,4096 ${F}_d128_m128_n128_st2_ov1_pp1_ps1_causal0_dropout_xt_lr - _mw
128 1 1024,4096 ${F}_d128_m128_n128_st2_ov1_pp1_ps1_causal1_dropout_xt_hb - _mw
96 0 4096 ${F}_d96_m128_n128_st2_ov1_pp1_ps1_causal0_dropout_xt_lr - _mw
96 1 1024,4096 ${F}_d96_m128_n128_st2_ov1_pp1_ps1_causal1_dropout_xt_hb - _mw"
  knob_ab main "$points" "--dropout-p 0.1 --gqa="
  knob_ab hyb "$points" "--dropout-p 0.1 --gqa="
  ;;
droptable)  # the forward's defaults with dropout p = 0.1 and without, d64-d256, 1k / 4k, causal or not, against
  # SDPA's flash and cuDNN backends with the same p (each kernel precompiled first, 16 at a time)
  python3 -m flashjit precompile --arch sm_90a --jobs 16 $(python3 -c "
from flashjit import dispatch
print(' '.join({dispatch.default_config('bf16', d, c, s, arch='sm_90a', dropout=p).name
                for d in (64, 96, 128, 192, 256) for c in (0, 1) for s in (1024, 4096) for p in (0, 1)}))") 2>&1 | tail -1
  args="--dtypes bf16 --head-dims 64,96,128,192,256 --seqlens 1024,4096 --causal 0,1 --gqa= --no-flex"
  python3 scripts/bench_forward.py $args --dropout-p 0.1 --out "$OUT/drop" 2>&1 | grep --line-buffered "^bf16" | tee "$OUT/bench.txt"
  python3 scripts/bench_forward.py $args --out "$OUT/nodrop" 2>&1 | grep --line-buffered "^bf16" | tee -a "$OUT/bench.txt"
  ;;
ncuswap)  # where d128's causal 1k forward with dropout waits: the swap (the consumers make the masks; 263 TFLOP/s)
  # against the mask warps (`_mw`, 316), one launch each under ncu (scripts/profile_ncu.py), and the same kernel
  # without dropout; the stall reasons at the swap's named barrier and the mask loop first
  F=fwd_sm90_bf16_d128_m128_n128_st2_ov1_pp1_ps1_causal1
  prof() {  # NAME ARGS...
    local name=$1
    shift
    python3 scripts/profile_ncu.py --d 128 --seqlen 1024 --causal "$@" --out "$OUT/ncu-$name" >"$OUT/ncu-$name.log" 2>&1 || true
    echo "== $name"; cat "$OUT/ncu-$name/summary.txt" 2>/dev/null || tail -20 "$OUT/ncu-$name.log"
    rm -f "$OUT/ncu-$name/report.ncu-rep"
  }
  prof swap --dropout-p 0.1 --config ${F}_dropout_xt_hb
  prof mw --dropout-p 0.1 --config ${F}_dropout_xt_hb_mw
  prof nodrop --config ${F}_xt_hb
  tar -czf "$OUT/ncuswap.tgz" -C "$OUT" ncu-swap ncu-mw ncu-nodrop
  rm -rf "$OUT"/ncu-swap "$OUT"/ncu-mw "$OUT"/ncu-nodrop
  ;;
d64r192)  # d64 with dropout on 192-row tiles of 96-key blocks (three consumer warpgroups; the 128-key 192-row tile
  # does not fit the registers with dropout): ptxas clean without cross_tile (its `_xt` twin spills 8 bytes), the
  # consumers making their masks with the swap; against the defaults (128 x 128, one CTA a tile non-causal,
  # persistent half blocks causal), p = 0.1
  F=fwd_sm90_bf16_d64
  knob_ab main "64 0 1024,4096 ${F}_m128_n128_st4_ov1_pp1_ps0_causal0_dropout_lr - ${F}_m192_n96_st4_ov1_pp1_ps1_causal0_dropout_lr ${F}_m192_n96_st4_ov1_pp1_ps0_causal0_dropout_lr
64 1 2048,8192 ${F}_m128_n128_st4_ov1_pp1_ps1_causal1_dropout_hb - ${F}_m192_n96_st4_ov1_pp1_ps1_causal1_dropout" "--dropout-p 0.1 --gqa="
  ;;
d256n64)  # d256 with dropout: the default 80-key tile (no room for the swap's buffers: each consumer warp makes
  # every Philox call of its span) against the 64-key tile (room: the swap, +7.1% at causal 1k where it is
  # already the default), p = 0.1
  F=fwd_sm90_bf16_d256_m128
  knob_ab main "256 0 1024,4096,16384 ${F}_n80_st2_ov1_pp1_ps0_causal0_dropout_lr - ${F}_n64_st2_ov1_pp1_ps0_causal0_dropout_lr
256 1 2048,4096,16384 ${F}_n80_st2_ov1_pp1_ps0_causal1_dropout_lr - ${F}_n64_st2_ov1_pp1_ps0_causal1_dropout_lr" "--dropout-p 0.1 --gqa="
  ;;
exppp)  # ping-pong around the exponentials without the overlap (exp-pingpong.patch) against the defaults
  variant epp "$EXP/exp-pingpong.patch" >/dev/null
  F=fwd_sm90_bf16_d128_m128_n128_st2
  G=fwd_sm90_bf16_d64_m128_n128_st4
  with_variant epp python3 "$EXP/check_configs.py" ${F}_ov0_pp1_ps1_causal1 ${F}_ov0_pp1_ps1_causal0 ${G}_ov0_pp1_ps1_causal1 \
    fwd_sm90_bf16_d64_m192_n128_st4_ov0_pp1_ps1_causal1 2>&1 | tail -8 | tee "$OUT/exppp-check.txt"
  knob_ab epp "128 1 1024,2048 ${F}_ov1_pp1_ps1_causal1_xt_hb - ${F}_ov0_pp1_ps1_causal1 ${F}_ov0_pp0_ps1_causal1
128 0 1024 ${F}_ov1_pp1_ps1_causal0_xt_lr - ${F}_ov0_pp1_ps1_causal0
64 1 1024 fwd_sm90_bf16_d64_m128_n64_st4_ov0_pp0_ps1_causal1_x2 - ${G}_ov0_pp1_ps1_causal1 fwd_sm90_bf16_d64_m192_n128_st4_ov0_pp1_ps1_causal1" "--gqa="
  ;;
ncuxt)  # d128 causal 1k: how much of the default's time is instruction fetch (no_instruction), with and without half blocks
  F=fwd_sm90_bf16_d128_m128_n128_st2_ov1_pp1_ps1_causal1
  knob_ab main "128 1 1024 ${F}_xt_hb - ${F}_xt" "--gqa="
  for k in xt_hb xt; do
    python3 scripts/profile_ncu.py --d 128 --seqlen 1024 --causal --config ${F}_$k --out "$OUT/ncu-$k" >"$OUT/ncu-$k.log" 2>&1 || true
    echo "== $k"
    grep -E 'Duration|tensor_cycles_active.avg.pct_of_peak_sustained_active' "$OUT/ncu-$k/summary.txt" || tail -5 "$OUT/ncu-$k.log"
    python3 - "$OUT/ncu-$k/source.csv" <<'PY' || true
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
head = next(i for i, r in enumerate(rows) if "Source" in r)
names, body = rows[head], rows[head + 1:]
ex, ni = names.index("Instructions Executed"), names.index("stall_no_inst")
reasons = [i for i, n in enumerate(names) if n.startswith("stall_") and "Not Issued" not in n]
total = sum(int(r[i] or 0) for r in body for i in reasons) or 1
print(f"instructions {len(body)}, executed at all {sum(int(r[ex]) > 0 for r in body)}, "
      f"no_instruction {100 * sum(int(r[ni] or 0) for r in body) / total:.1f}% of stall samples")
PY
    rm -f "$OUT/ncu-$k/report.ncu-rep" "$OUT/ncu-$k/raw.csv" "$OUT/ncu-$k/source.csv" "$OUT/ncu-$k/details.txt"
  done
  ;;
exppp3)  # exppp's kernels with three K/V stages against two (exp-pingpong.patch's tree)
  variant epp "$EXP/exp-pingpong.patch" >/dev/null
  F=fwd_sm90_bf16_d128_m128_n128
  knob_ab epp "128 1 1024,2048 ${F}_st2_ov1_pp1_ps1_causal1_xt_hb - ${F}_st2_ov0_pp1_ps1_causal1 ${F}_st3_ov0_pp1_ps1_causal1 ${F}_st3_ov0_pp0_ps1_causal1
128 0 1024 ${F}_st2_ov1_pp1_ps1_causal0_xt_lr - ${F}_st2_ov0_pp1_ps1_causal0 ${F}_st3_ov0_pp1_ps1_causal0" "--gqa="
  ;;
qsleep)  # main, q-first, q-first + wait-sleep (the mbarrier waits sleep on a suspend-time hint) at qfirst's points
  variant qf "$EXP/q-first.patch" >/dev/null
  variant qfs "$EXP/q-first.patch" "$EXP/wait-sleep.patch" >/dev/null
  args="--dtypes bf16 --head-dims 128,64 --causal 1,0 --seqlens 1024,2048,4096 --gqa '' --no-flex"
  warm bench_forward.py "$args" "main qf qfs"
  passes bench_forward.py "$args" "main qf qfs"
  ;;
qfirst)  # [tests]: cross-tile's Q before its tile's first K (q-first.patch), against main; with `tests`, its GPU tests
  variant qf "$EXP/q-first.patch" >/dev/null
  if [ "${2:-}" = tests ]; then gpu_tests qf qfirst-tests; exit 0; fi
  args="--dtypes bf16 --head-dims 128,64 --causal 1,0 --seqlens 1024,2048,4096 --gqa '' --no-flex"
  warm bench_forward.py "$args" "main qf"
  passes bench_forward.py "$args" "main qf"
  ;;
st3)  # d128 with three K/V stages at the short points (ncucudnn: cuDNN's 232 KiB kernel), against the defaults
  F=fwd_sm90_bf16_d128_m128_n128
  knob_ab main "128 1 1024,2048 ${F}_st2_ov1_pp1_ps1_causal1_xt_hb - ${F}_st2_ov1_pp1_ps1_causal1_hb ${F}_st3_ov1_pp1_ps1_causal1_hb
128 0 1024,2048 ${F}_st2_ov1_pp1_ps1_causal0_xt_lr - ${F}_st2_ov1_pp1_ps1_causal0_lr ${F}_st3_ov1_pp1_ps1_causal0_lr" "--gqa="
  ;;
ncucudnn)  # cuDNN's forward at d128 / d64 causal 1k (where it leads ours by 4-8%) under ncu, and ours: the launch
  # statistics (grid, block, registers, shared memory: cuDNN's tile and schedule) and the tensor pipe
  for d in 128 64; do
    L="python3 $EXP/sdpa_launch.py --d $d --seqlen 1024 --causal"
    $L --names | tee "$OUT/cudnn-d$d-names.txt"
    K=$(grep -m1 '^kernel: cudnn' "$OUT/cudnn-d$d-names.txt" | sed 's/^kernel: //' | cut -c1-40 | sed 's/[^A-Za-z0-9_]/./g')
    for who in cudnn ours; do
      if [ $who = cudnn ]; then A=(--external "$L" --kernel "$K"); else A=(--d $d --seqlen 1024 --causal); fi
      python3 scripts/profile_ncu.py "${A[@]}" --out "$OUT/ncu-$who-d$d" >"$OUT/ncu-$who-d$d.log" 2>&1 || true
      echo "== $who d$d"
      grep -E 'Grid Size|Block Size|Registers Per|Shared Memory Config|Dynamic Shared|Static Shared|Duration|Waves Per|Threads  |Theoretical Occ|Achieved Occ' \
        "$OUT/ncu-$who-d$d/details.txt" 2>/dev/null | sed 's/  */ /g' || tail -5 "$OUT/ncu-$who-d$d.log"
      head -30 "$OUT/ncu-$who-d$d/summary.txt" 2>/dev/null | grep -E 'tensor|Issued|Eligible|No Elig' || true
      rm -f "$OUT/ncu-$who-d$d/report.ncu-rep" "$OUT/ncu-$who-d$d/raw.csv"
    done
  done
  ;;
ncubwd)  # [D [SEQLEN [DTYPE]]] the backward's dK/dV kernel, ours and cuDNN's, under ncu (d256 causal 4k bf16 unless
  # given): cycles, tensor pipe, stall reasons, the top SASS lines; the two source.csv come back for ncu_compare.py
  d=${2:-256} n=${3:-4096} dt=${4:-bf16}
  L="python3 $EXP/sdpa_launch.py --d $d --seqlen $n --causal --backward --dtype $dt"
  $L --names | tee "$OUT/cudnn-bwd-names.txt"
  # cuDNN's longest kernel that is not its forward's (fprop): the dK/dV/dQ kernel
  K=$(grep '^kernel: ' "$OUT/cudnn-bwd-names.txt" | grep -v fprop | head -1 | sed 's/^kernel: //' | cut -c1-40 | sed 's/[^A-Za-z0-9_]/./g')
  # The L2's sectors by operation: loads, stores, reductions (dQ's bulk adds), atomics
  M=(); for op in read write red atom; do M+=(--metric lts__t_sectors_op_$op.sum); done
  for who in cudnn ours; do
    if [ $who = cudnn ]; then A=(--external "$L" --kernel "$K"); else A=(--d $d --seqlen $n --causal --backward --dtype $dt); fi
    python3 scripts/profile_ncu.py "${A[@]}" "${M[@]}" --out "$OUT/ncu-$who" >"$OUT/ncu-$who.log" 2>&1 || tail -5 "$OUT/ncu-$who.log"
    echo "== $who"
    grep -E 'Grid Size|Block Size|Registers Per|Dynamic Shared|Duration|Elapsed Cycles|SM Frequency|L2 Cache Throughput' \
      "$OUT/ncu-$who/details.txt" 2>/dev/null | sed 's/  */ /g' || true
    grep -E '^lts__|pct_of_peak_sustained_active: ' "$OUT/ncu-$who/summary.txt" 2>/dev/null | grep -E 'lts__|pipe_tensor_cycles' || true
    sed -n '/^stall reasons/,$p' "$OUT/ncu-$who/summary.txt" 2>/dev/null | head -30 || true
    rm -f "$OUT/ncu-$who/report.ncu-rep" "$OUT/ncu-$who/raw.csv"
  done
  tar -czf "$OUT/ncu.tgz" -C "$OUT" ncu-cudnn ncu-ours && rm -rf "$OUT/ncu-cudnn" "$OUT/ncu-ours"
  ;;
wideab)  # [HEAD_DIMS] the wide backward's next product issued under the last dQ piece (ran in the fifty-eighth
  # session: tests pass, -0.7 to -7.8%, not landed): its GPU tests in the ahead tree (both warpgroups ahead:
  # wide-ahead.patch), then main against wg0 (WG0's S^T alone: wide-ahead-wg0.patch) and ahead, bf16, 1k / 4k /
  # 16k causal or not and B=1 8k 32/8, two processes each
  bwd_ab "ahead=wide-ahead.patch wg0=wide-ahead-wg0.patch" \
    "--dtypes bf16 --head-dims ${2:-256} --causal 0,1 --seqlens 1024,4096,16384 --gqa 1x8192x32x8" \
    "wide or head_split or odd_shape or 192 or 256" tests/test_backward_gpu.py tests/test_flash_api.py
  ;;
widedq)  # what the wide backward's dQ path costs (timing only: dQ is wrong in both variants): main against
  # noreduce (staged, never added: wide-dq-noreduce-timing-only.patch) and nostage (neither staged nor added, so
  # ptxas drops the dQ products too: wide-dq-nostage-timing-only.patch), bf16 d256, 1k / 4k / 16k causal or not,
  # two processes each
  # ${3:-...}: the variants (nofence: no proxy fence before a reduction; nowait: no wait for the previous
  # reduction's read before staging the next part; nodout: dO loaded for the first two steps alone, the L2 bytes a
  # cluster pair's Q / dO multicast would save (wide-nodout-timing-only.patch); halfreduce: each warp reduces 8 of
  # its 16 rows, the bound of adding dQ once per 128 keys, ran in the sixtieth session: +3.0-8.4%; all timing only)
  specs=""
  for v in ${3:-noreduce nostage}; do
    f=wide-dq-$v-timing-only.patch; [ -f "$EXP/$f" ] || f=wide-$v-timing-only.patch
    specs="$specs $v=$f"
  done
  bwd_ab "$specs" "--dtypes bf16 --head-dims ${2:-256} --causal 0,1 --seqlens 1024,4096,16384 --gqa ''"
  ;;
sts64)  # stage_rows_f32's stores as st.shared.v2.f32 (the front end had split each float2 into two 4-byte
  # stores; sts64.patch, ran in the fifty-eighth session: level at d256, -0.1 to -2.5% at d128, not landed): its
  # backward GPU tests, then main against it, bf16 d128 / d256, 1k / 4k, causal or not, two processes each
  bwd_ab "sts64=sts64.patch" "--dtypes bf16 --head-dims 128,256 --causal 0,1 --seqlens 1024,4096 --gqa ''" \
    "backward or grad or wide or split" tests/test_backward_gpu.py tests/test_varlen.py
  ;;
pairquick)  # (ran in the sixtieth session: 33 passed; d256 4k 279.6 / 263.8 against main's 386.3 / 359.8, the
  # exchange's rendezvous: dropped) the wide backward (d129-d256) in clusters of two CTAs on adjacent key blocks
  # (wide-pair.patch), each warp handing the peer the 8 of its 16 dQ rows the peer owns, so a pair adds dQ once per
  # 128 keys: the wide and odd-shape backward tests (150 s at most), then one process each of main and pair at
  # d256 4k, causal or not
  variant pair "$EXP/wide-pair.patch" >/dev/null
  if tests_pass pair 150 "wide or odd_shape" tests/test_backward_gpu.py; then
    for v in main pair; do
      echo "== $v"
      with_variant $v python3 scripts/bench_backward.py --dtypes bf16 --head-dims 256 --causal 0,1 --seqlens 4096 \
        --gqa '' --out "$OUT/quick-$v" 2>&1 | grep -E '^bf16'
    done | tee -a "$OUT/bench.txt"
  fi
  ;;
l2hints)  # the wide backward's Q / dO loads and dQ reductions with an L2 evict_last policy (wide-l2-hints.patch;
  # FlashAttention-3's hints): its tests, then main against it, bf16 d256, 1k / 4k / 16k causal or not, two processes.
  # Prediction: level to +3% (the L2 is 88% busy at a 95% hit rate: bandwidth, which hints do not cut)
  bwd_ab "hints=wide-l2-hints.patch" "--dtypes bf16 --head-dims 256 --causal 0,1 --seqlens 1024,4096,16384 --gqa ''" \
    "wide or head_split" tests/test_backward_gpu.py
  ;;
narrowdq)  # the narrow backward's (d33-d128) dQ reductions priced, timing only (dQ wrong): main against noreduce
  # (narrow-dq-noreduce-timing-only.patch: staged, never added), bf16 d64 / d128, 1k / 4k / 16k causal or not, two
  # processes each. Prediction: +10-20% at d128 (the same reduction bytes a flop as d256, half its Q / dO loads)
  args="--dtypes bf16 --head-dims 64,128 --causal 0,1 --seqlens 1024,4096,16384 --gqa ''"
  bwd_ab "noreduce=narrow-dq-noreduce-timing-only.patch" "$args"
  ;;
nomax)  # [tests]: the key loop with no row max (KeptSoftmax::exps_kept / settle_kept: P against the kept max, a
  # move read off P's sums, the scores made again by mma.sync where a P overflowed) against main before it
  # (nomax-revert.patch). `tests`: the forward GPU tests only. Otherwise bf16 d96 / d128, 4k / 16k, non-causal, two
  # processes each (d192 and the causal defaults, which have no lazy rescaling, left out for the budget), then
  # d128 causal 4k / 8k `_xt_hb` against `_xt_hb_lr` in both trees, three rounds, one process each.
  # Prediction: non-causal d96-d192 +2-4% (d128's common step ~412 -> ~294 instructions a warp), causal lr +3-6%
  if [ "${2:-}" = tests ]; then
    gpu_tests main nomax-tests
  else
    variant before "$EXP/nomax-revert.patch" >/dev/null
    args="--dtypes bf16 --head-dims 96,128 --causal 0 --seqlens 4096,16384 --gqa '' --no-flex"
    warm bench_forward.py "$args" "main before"
    passes bench_forward.py "$args" "main before"
    F=fwd_sm90_bf16_d128_m128_n128_st2_ov1_pp1_ps1_causal1
    for v in before main; do
      echo "== $v" | tee -a "$OUT/bench.txt"
      with_variant $v python3 scripts/bench_forward.py --dtypes bf16 --head-dims 128 --causal 1 --seqlens 4096,8192 \
        --gqa '' --rounds 3 --no-flex --configs ${F}_xt_hb ${F}_xt_hb_lr --out "$OUT/causal-$v" 2>&1 | grep -E "^bf16" |
        tee -a "$OUT/bench.txt"
    done
  fi
  ;;
fwd-tests)  # [K]: the forward GPU tests `pytest -k K` selects (all of them without K)
  gpu_tests main fwd-tests ${2:+-k "$2"}
  ;;
bwd-tests)  # [K]: the tests `pytest -k K` selects
  timeout 520 python3 -m pytest -q -n 16 -p no:cacheprovider --maxfail 30 tests/test_backward_gpu.py tests/test_flash_api.py \
    tests/test_varlen.py tests/test_native_autograd.py tests/test_compile.py -k "${2:-dropout or backward_gpu}" 2>&1 |
    tail -30 | tee "$OUT/bwd-tests.txt"
  ;;
tests)  # the GPU tests that run the dispatcher's forward defaults (every head dim, feature and odd shape)
  gpu_tests main tests
  ;;
sk-tests)  # `tests` in the stream-K variant, and its CPU tests (the walk's cover, the params' C layout)
  variant sk "$EXP/stream-k.patch" >/dev/null
  with_variant sk python3 -m pytest -q -n 16 -p no:cacheprovider $FWD_TESTS tests/test_config.py 2>&1 | tail -30 |
    tee "$OUT/sk-tests.txt"
  ;;
walk)
  causal_ab nowalk "$EXP/causal-walk-revert.patch"
  F=fwd_sm90_bf16_d64_m192_n128_st4_ov1_pp1_ps1_causal1
  G=fwd_sm90_bf16_d256_m128_n80_st2_ov1_pp1_ps
  knob_ab main "64 1 4096,16384 $F _hb _xt_hb
256 1 4096,16384 ${G}0_causal1_lr - ${G}1_causal1_lr"
  ;;
dyn-tests)
  variant dyn "$EXP/dynamic-tiles.patch" >/dev/null
  gpu_tests dyn dyn-tests tests/test_config.py
  ;;
emu)
  variant emu4 "$EXP/exp2-emulation.patch" >/dev/null
  variant emu8 "$EXP/exp2-emulation.patch" "$EXP/exp2-emulation-every8.patch" >/dev/null
  with_variant emu4 timeout 200 python3 -m pytest -q -n 16 -p no:cacheprovider tests/test_forward_sm90.py \
    -k "build_set or softmax_cuts or lazy_rows" 2>&1 | tail -3 | tee "$OUT/emu4-tests.txt"
  ARGS="--dtypes bf16 --head-dims 64,128,256 --causal 0,1 --seqlens 4096,16384 --gqa '' --no-flex"
  warm bench_forward.py "$ARGS" "main emu4 emu8"
  passes bench_forward.py "$ARGS" "main emu4 emu8"
  ;;
kahead-tests)
  variant kahead "$EXP/k-ahead.patch" >/dev/null
  gpu_tests kahead kahead-tests
  ;;
kahead)
  variant kahead "$EXP/k-ahead.patch" >/dev/null
  ARGS="--dtypes bf16 --head-dims 64,128,256 --causal 0,1 --seqlens 4096,16384 --gqa '' --no-flex"
  warm bench_forward.py "$ARGS" "main kahead"
  passes bench_forward.py "$ARGS" "main kahead"
  ;;
treemax)  # [HEAD_DIMS] (the paths softmax_rows serves: causal steps, masked and first blocks, d64's short causal two-CTA kernel)
  variant treemax "$EXP/tree-max.patch" >/dev/null
  ARGS="--dtypes bf16 --head-dims ${2:-64,128} --causal 1 --seqlens 1024,4096,16384 --gqa 8192 --no-flex"
  warm bench_forward.py "$ARGS" "main treemax"
  passes bench_forward.py "$ARGS" "main treemax"
  ;;
early)  # [TEST_SECONDS [HEAD_DIMS]] dropout's masks made before the stage's wait (masks-early.patch): main / early at d64 and d128 (p = 0.1),
  # two processes each, main without dropout for the cost, then the backward's dropout tests on it
  variant early "$EXP/masks-early.patch" >/dev/null
  dropout_ab "${3:-64,128}" "main early"
  with_variant early timeout "${2:-300}" python3 -m pytest -q -n 16 -p no:cacheprovider --maxfail 30 \
    tests/test_backward_gpu.py -k dropout 2>&1 | tail -3 | tee "$OUT/early-tests.txt"
  ;;
knobs4)
  F=fwd_sm90_bf16_d64_m192_n128_st4_ov1_pp1_ps1_causal1
  G=fwd_sm90_bf16_d256_m128_n80_st2_ov1_pp1
  knob_ab main "64 1 1024 $F _hb _xt_hb fwd_sm90_bf16_d64_m128_n64_st4_ov0_pp0_ps1_causal1_x2
64 1 2048,4096,8192,16384 $F _hb _xt_hb
256 0 2048,4096,8192,16384 $G _ps0_causal0_lr _ps1_causal0_lr"
  ;;
knobs5)
  F=fwd_sm90_bf16_d64_m128_n128_st4_ov1_pp1_ps1_causal1
  for pass in 1 2; do
    knob_ab main "64 1 1024 $F _hb _xt_hb fwd_sm90_bf16_d64_m128_n64_st4_ov0_pp0_ps1_causal1_x2 fwd_sm90_bf16_d64_m192_n128_st4_ov1_pp1_ps1_causal1_xt_hb"
  done
  ;;
knobs6)
  F=fwd_sm90_bf16_d64_m128_n64
  for pass in 1 2; do
    knob_ab main "64 1 512,1024 ${F}_st4_ov0_pp0_ps1_causal1 _x2 ${F}_st2_ov0_pp0_ps1_causal1_x2 ${F}_st3_ov0_pp0_ps1_causal1_x2 ${F}_st4_ov0_pp0_ps0_causal1_x2 ${F}_st4_ov0_pp0_ps1_causal1_lr_x2"
  done
  ;;
x2walk)
  F=fwd_sm90_bf16_d64_m128_n64_st4_ov0_pp0
  for pass in 1 2; do knob_ab main "64 1 512,768,1024 $F _ps1_causal1_x2 _ps0_causal1_x2 fwd_sm90_bf16_d64_m128_n64_st2_ov0_pp0_ps0_causal1_x2"; done
  timeout "${TESTS_S:-200}" python3 -m pytest -q -n 16 -p no:cacheprovider tests/test_forward_sm90.py tests/test_parity.py \
    tests/test_flash_api.py -k "causal or two_ctas" 2>&1 | tail -5 | tee "$OUT/x2walk-tests.txt"
  ;;
wgskip-mutant)
  variant mutant "$EXP/wg-skip-mutant.patch" >/dev/null
  with_variant mutant timeout 200 python3 -m pytest -q -n 4 -p no:cacheprovider tests/test_forward_sm90.py \
    -k "two_ctas_equal and (True-plain or False-local)" 2>&1 | tail -4 | tee "$OUT/wgskip-mutant.txt" || true
  ;;
ghost)  # the overlapped loop's ghosts (wg-ghost.patch: a warpgroup passes a tile's last block its rows
  # cannot see with the token only) against main: the forward GPU tests of causal / window / varlen calls in
  # the ghost's tree, then d64 causal 2k-8k and B=1 8k 32/8 through the default (the 192-row cross-tile half blocks)
  variant ghost "$EXP/wg-ghost.patch" >/dev/null
  with_variant ghost timeout "${TESTS_S:-240}" python3 -m pytest -q -n 16 -p no:cacheprovider tests/test_forward_sm90.py \
    tests/test_parity.py tests/test_varlen.py -k "causal or window or local or varlen" 2>&1 | tail -5 | tee "$OUT/ghost-tests.txt"
  ARGS="--dtypes bf16 --head-dims 64 --causal 1 --seqlens 2048,4096,8192 --gqa 8192 --no-flex"
  warm bench_forward.py "$ARGS" "main ghost"
  passes bench_forward.py "$ARGS" "main ghost"
  ;;
gqa256)
  python3 scripts/bench_backward.py --dtypes bf16,fp16 --head-dims 256 --seqlens '' --causal 1 --gqa 1x8192x32x8 \
    --rounds 3 --kernels --out "$OUT" 2>&1 | grep --line-buffered -Ev "^\s*$" | stamp | tee "$OUT/bench.txt"
  ;;
keptc)
  F=fwd_sm90_bf16_d128_m128_n128_st2_ov1_pp1_ps1_causal1
  G=fwd_sm90_bf16_d96_m128_n128_st2_ov1_pp1_ps1_causal1
  for pass in 1 2; do
    knob_ab main "128 1 1024,2048,4096,8192 $F _xt_hb _xt_hb_lr
96 1 1024,4096,8192 $G _xt_hb _xt_hb_lr"
  done
  ;;
steady)
  for v in nosm noexp nomax nosum; do variant $v "$EXP/steady-$v-timing-only.patch" >/dev/null; done
  ARGS="--dtypes bf16 --head-dims 128 --causal 0,1 --seqlens 4096,16384 --gqa '' --no-flex"
  warm bench_forward.py "$ARGS" "main nosm noexp nomax nosum"
  passes bench_forward.py "$ARGS" "main nosm noexp nomax nosum"
  ;;
dyn)
  causal_ab dyn "$EXP/dynamic-tiles.patch"
  G=fwd_sm90_bf16_d256_m128_n80_st2_ov1_pp1_ps
  knob_ab dyn "256 1 4096,8192,16384 ${G}0_causal1_lr - ${G}1_causal1_lr"
  ;;
xt64-tests)
  variant xt64 "$EXP/d64-causal-xt.patch" >/dev/null
  gpu_tests xt64 xt64-tests tests/test_config.py tests/test_interface_cpu.py
  ;;
ks-tests)
  variant ks "$EXP/split-keys.patch" >/dev/null
  gpu_tests ks ks-tests tests/test_config.py
  ;;
ks)  # (1k / 4k / 16k: d64's last 192-row tile has 64 queries, causal: the one that sees every key; d128 at
  # 1050 / 4000: 26 / 32 of 128)
  variant ks "$EXP/split-keys.patch" >/dev/null
  F=fwd_sm90_bf16_d64_m192_n128_st4_ov1_pp1_ps1_causal0
  G=fwd_sm90_bf16_d128_m128_n128_st2_ov1_pp1_ps1_causal0
  knob_ab ks "64 0 1024 $F _xt_lr _lr _lr_ks
64 0 4096,16384 $F _lr _lr_ks
64 1 4096,16384 ${F%0}1 _hb _hb_ks
128 0 1050,4000 $G _lr _lr_ks"
  with_variant ks python3 docs/experiments/split_keys_probe.py --configs ${F}_lr ${F}_lr_ks ${G}_lr ${G}_lr_ks default \
    2>&1 | tee -a "$OUT/bench.txt"
  VARLEN="--dtype bf16 --head-dims 64,128 --causal 0 --lengths 100:1500"
  warm bench_varlen.py "$VARLEN" "main ks"
  passes bench_varlen.py "$VARLEN" "main ks" "^d"
  ;;
ks-sanitize)
  variant ks "$EXP/split-keys.patch" >/dev/null
  with_variant ks python3 scripts/sanitize.py --out "$OUT/sanitize" -- \
    "tests/test_forward_sm90.py::test_split_keys_tiles[fwd_sm90_bf16_d64_m192_n128_st4_ov1_pp1_ps1_causal0_lr_ks-448-300]" \
    "tests/test_forward_sm90.py::test_fa3_tiles_varlen_equal_dense_calls[fwd_sm90_bf16_d64_m192_n128_st4_ov1_pp1_ps1_causal0_lr_ks]" \
    2>&1 | tail -8 | tee "$OUT/ks-sanitize.txt"
  ;;
sk-sanitize)  # compute-sanitizer's four tools over the tail's two tests in scripts/sanitize.py's selection
  variant sk "$EXP/stream-k.patch" >/dev/null
  with_variant sk python3 scripts/sanitize.py --out "$OUT/sanitize" -- \
    "tests/test_forward_sm90.py::test_stream_k_tail[fwd_sm90_bf16_d128_m128_n128_st2_ov1_pp1_ps1_causal0_lr_sk-(1, 300, 5000, 2, 1)]" \
    "tests/test_forward_sm90.py::test_stream_k_tail[fwd_sm90_fp16_d128_m128_n128_st2_ov1_pp1_ps0_causal0_sk-(1, 300, 5000, 2, 1)]" \
    2>&1 | tail -8 | tee "$OUT/sk-sanitize.txt"
  ;;
idle)  # warpgroups whose rows are all past Sq skip their products (idle-wg.patch, on top of stream-k.patch): its
  # GPU tests, then it against stream-k alone (each in two processes) where tiles end part-empty
  variant sk "$EXP/stream-k.patch" >/dev/null
  variant skidle "$EXP/stream-k.patch" "$EXP/idle-wg.patch" >/dev/null
  with_variant skidle python3 -m pytest -q -n 16 -p no:cacheprovider tests/test_forward_sm90.py tests/test_varlen.py \
    tests/test_flash_api.py 2>&1 | tail -15 | tee "$OUT/idle-tests.txt"
  F=fwd_sm90_bf16_d64_m192_n128_st4_ov1_pp1_ps1_causal0  # (1k: a head's 6th tile has 64 rows; 2k-4k: 128 / 64)
  IDLE="--dtypes bf16 --head-dims 64 --causal 0 --seqlens 1024,2048,4096 --gqa '' --no-flex --configs ${F}_lr_sk ${F}_xt_lr"
  warm bench_forward.py "$IDLE" "sk skidle"
  passes bench_forward.py "$IDLE" "sk skidle"
  # a packed batch of 100-1500-token sequences: every sequence's last tile part-empty
  passes bench_varlen.py "--dtype bf16 --head-dims 64,128 --causal 0 --lengths 100:1500" "sk skidle" "^d"
  ;;
sk)  # default (whole tiles) against stream_k, bf16, issue 14's non-causal lengths; 1k: the cross-tile default too
  variant sk "$EXP/stream-k.patch" >/dev/null
  F=fwd_sm90_bf16
  M128=${F}_d64_m128_n128_st4_ov1_pp1_ps1_causal0  # (1k / 2k: 192-row tiles leave 1/3 of a tile's rows a head idle)
  knob_ab sk "64 0 1024 ${F}_d64_m192_n128_st4_ov1_pp1_ps1_causal0 _xt_lr _lr _lr_sk ${M128}_xt_lr ${M128}_lr_sk
64 0 2048 ${F}_d64_m192_n128_st4_ov1_pp1_ps1_causal0 _lr _lr_sk ${M128}_lr_sk
64 0 4096,16384 ${F}_d64_m192_n128_st4_ov1_pp1_ps1_causal0 _lr _lr_sk
128 0 1024 ${F}_d128_m128_n128_st2_ov1_pp1_ps1_causal0 _xt_lr _lr _lr_sk
128 0 2048,4096,16384 ${F}_d128_m128_n128_st2_ov1_pp1_ps1_causal0 _lr _lr_sk
256 0 1024,4096,16384 ${F}_d256_m128_n80_st2_ov1_pp1_ps0_causal0 _lr _lr_sk"
  ;;
pgdecode)  # the paged varlen call's decoding route: its GPU tests, then bench_decode.py (paged 16-slot pages)
  GPU_TESTS_TIMEOUT=240 FWD_TESTS="tests/test_paged_varlen.py tests/test_kvcache.py" gpu_tests main pgdecode-tests
  python3 scripts/bench_decode.py --out "$OUT" 2>&1 | grep -v "^\s*$" | tee "$OUT/bench.txt"
  ;;
mutant)  # the cross-tile mutant (never reached a verdict: a hung worker outlived the call), each pytest run cut at 150 s
  python3 scripts/mutations.py --only cross_tile_o_stored_early -n 8 --timeout 150 --out /tmp/mutations 2>&1 | tail -8 || true
  cp /tmp/mutations/*.log "$OUT/" 2>/dev/null || true
  ;;
initcheck)  # initcheck's dvec_kernel report at d80: O as the forward's TMA store wrote it, then copied by PyTorch
  CS=$(python3 -c "import sys; sys.path.insert(0, 'scripts'); import sanitize; print(sanitize.find_sanitizer())")
  for m in fwd copy; do
    "$CS" --tool initcheck --print-limit 20 python3 docs/experiments/initcheck_dvec.py $m >"$OUT/initcheck-$m.log" 2>&1 || true
    echo "$m: $(grep -c dvec_kernel "$OUT/initcheck-$m.log") lines name dvec_kernel; $(grep -E 'ERROR SUMMARY|done' "$OUT/initcheck-$m.log" | tr '\n' ' ')"
  done
  ;;
powerbwd)  # the backward's sustained TFLOP/s beside its clock and power, flashjit against cuDNN
  W=$OUT/windows.jsonl
  while read -r dt d c gqa; do
    P=(--backward --dtype "$dt" --d "$d" $([ "$c" = 1 ] && echo --causal || true) ${gqa:+--gqa "$gqa"}
       --seconds 3.5 --gap 1.5 --windows "$W")
    { python3 "$EXP/power_probe.py" run "${P[@]}" --contenders flashjit,cudnn
      python3 "$EXP/power_probe.py" run "${P[@]}" --contenders cudnn,flashjit; } </dev/null
  done <<<"bf16 256 1 1x8192x32x8
fp16 256 1 1x8192x32x8
bf16 128 0
fp16 128 0" 2>&1 | stamp | tee "$OUT/power-runs.txt"
  sleep 1  # the clocks log's last samples
  python3 "$EXP/power_probe.py" join --windows "$W" --clocks "$OUT/clocks.csv" | tee "$OUT/power.txt"
  ;;
suite)  # PART: 1 the forward files, 2 every other file (../shared/DEVICE.md: one GPU, so test_multi_gpu skips)
  case ${2:?suite 1|2} in
    1) GPU_TESTS_TIMEOUT=560 gpu_tests main suite1 ;;
    2) IGNORE=(--ignore tests/test_multi_gpu.py)
       for f in $FWD_TESTS; do IGNORE+=(--ignore "$f"); done
       timeout 560 python3 -m pytest -q -n 16 -p no:cacheprovider -p no:logging --maxfail 30 -W ignore::DeprecationWarning \
         tests "${IGNORE[@]}" >"$OUT/suite2.log" 2>&1 || true
       grep -E "^(FAILED|ERROR) |passed|failed" "$OUT/suite2.log" | tail -40 | tee "$OUT/suite2.txt" ;;
    *) echo "suite 1 or suite 2" >&2; exit 2 ;;
  esac
  ;;
fwdtable)  # fwdtable DTYPE [HEAD_DIMS]: issue 14's forward table, the defaults against FA2, cuDNN and FlexAttention
  # FlexAttention compiles once a shape (~10 s: 36 shapes a dtype), so the whole table may outlast a 10-minute
  # call: split it by head dims over two calls (64, then 128,256). The JSON is rewritten after every point,
  # so a call cut off still brings back what it measured.
  python3 -m flashjit precompile --arch sm_90a --jobs 16 --filter "fwd_sm90_${2:?fwdtable bf16|fp16}_*" 2>&1 | tail -1
  python3 scripts/bench_forward.py --dtypes "$2" --head-dims "${3:-64,128,256}" \
    --seqlens 1024,2048,4096,8192,16384 --causal 0,1 --out "$OUT" 2>&1 | grep --line-buffered -Ev "^\s*$" | stamp | tee "$OUT/bench.txt"
  python3 scripts/targets.py --forward "$OUT/bench_forward.json" | tee "$OUT/targets.txt" || true  # (this call's points)
  ;;
table)  # table [DTYPE]: bf16 (default) or fp16
  python3 scripts/bench_backward.py --dtypes "${2:-bf16}" --head-dims 64,128,256 --seqlens 1024,2048,4096,8192,16384 \
    --causal 0,1 --gqa 1x8192x32x8 --out "$OUT" 2>&1 | grep --line-buffered -Ev "^\s*$" | stamp | tee "$OUT/bench.txt"
  python3 scripts/targets.py --backward "$OUT/bench_backward.json" | tee "$OUT/targets.txt" || true
  ;;
gqa)  # issue 15's other two GQA points (B=2 S=2k 32/4 heads; the transformers shape B=1 S=4k 16/4), both dtypes
  python3 scripts/bench_backward.py --dtypes bf16,fp16 --head-dims 64,128,256 --seqlens '' --causal 0,1 \
    --gqa 2x2048x32x4,1x4096x16x4 --out "$OUT" 2>&1 | grep --line-buffered -Ev "^\s*$" | stamp | tee "$OUT/bench.txt"
  ;;
outlier)  # why d64 causal B=1 4k 16/4 ran 187 through autograd where flashjit.backward alone ran 365
  python3 -c "from flashjit import native; native.build()"  # the node cached before any timing
  # the build set's d64 and d256 kernels in parallel (the points' other kernels compile on first use)
  python3 -m flashjit precompile --arch sm_90a --jobs 16 --filter _d64_ --filter _d256_ 2>&1 | tail -1
  ARGS=(--head-dims 64,256 --seqlens '' --causal 0,1 --gqa 1x4096x16x4,2x2048x32x4 --kernels --host --rounds 3)
  for node in auto 0; do
    echo "== FLASHJIT_NATIVE_AUTOGRAD=$node"
    FLASHJIT_NATIVE_AUTOGRAD=$node python3 scripts/bench_backward.py --dtypes bf16,fp16 "${ARGS[@]}" \
      --out "$OUT/node-$node" 2>&1 | grep --line-buffered -Ev "^\s*$"
  done | stamp | tee "$OUT/bench.txt"
  ;;
fa3)  # needs .fa3bench/fa3_bench, built on the CPU machine by docs/experiments/fa3_bench/build.sh and carried
  FA3=$(fa3_bench)
  "$FA3" --table 2>&1 | tee "$OUT/fa3.txt"
  ;;
ncudrop)  # where d64's dropout backward waits (dK/dV kernel, non-causal 4k): with p = 0.1 and without. If the
  # extra stalls are `no_instruction` (the instruction cache: the consumers' step loop is 13.8 KB with dropout,
  # 11.4 KB without, and each scheduler also runs a producer warp's mask loop), the cost is code size, not
  # the Philox rounds' latency or issue slots (docs/perf-log.md, forty-second session)
  for p in 0.1 0; do
    python3 scripts/profile_ncu.py --d 64 --seqlen 4096 --backward --kernel dkdv --dropout-p $p \
      --out "$OUT/ncu-drop$p" >"$OUT/ncu-drop$p.log" 2>&1 || true
    echo "== dropout $p"; cat "$OUT/ncu-drop$p/summary.txt" || tail -20 "$OUT/ncu-drop$p.log"
    rm -f "$OUT/ncu-drop$p/report.ncu-rep"
  done
  tar -czf "$OUT/ncudrop.tgz" -C "$OUT" ncu-drop0.1 ncu-drop0 && rm -rf "$OUT"/ncu-drop0.1 "$OUT"/ncu-drop0
  ;;
ncu128)  # ncu128 [CAUSAL [SEQLEN]]: where each kernel's warps wait, flashjit's and FA3's, same point (d128 bf16,
  # 16k tokens, 16 heads; non-causal 4k unless given, e.g. `ncu128 1 16384`: causal 16k, FA3 8% ahead there)
  CAUSAL=${2:-0} SEQ=${3:-4096}
  python3 scripts/profile_ncu.py --d 128 --seqlen "$SEQ" $([ "$CAUSAL" = 1 ] && echo --causal) \
    --out "$OUT/ncu-flashjit" >"$OUT/ncu-flashjit.log" 2>&1 || true
  FA3=$(fa3_bench)
  python3 scripts/profile_ncu.py --kernel FlashAttnFwdSm90 --out "$OUT/ncu-fa3" --external \
    "$FA3 --dtype bf16 --d 128 --causal $CAUSAL --batch $((16384 / SEQ)) --seqlen $SEQ --heads 16 --iters 5" \
    >"$OUT/ncu-fa3.log" 2>&1 || true
  for who in flashjit fa3; do echo "== $who"; cat "$OUT/ncu-$who/summary.txt" || tail -20 "$OUT/ncu-$who.log"; done
  # One archive of both folders, less the reports (the device call returns only a few files: the thirty-seventh
  # session's run lost flashjit's source.csv, the per-instruction table scripts/ncu_compare.py reads).
  rm -f "$OUT"/ncu-*/report.ncu-rep
  tar -czf "$OUT/ncu.tgz" -C "$OUT" ncu-flashjit ncu-fa3 && rm -rf "$OUT"/ncu-flashjit "$OUT"/ncu-fa3
  ;;
quant)  # heads (hidden = heads * d) d seqlens: the tiles' rounds on 132 SMs, full or with a partial last round
  python3 -m flashjit precompile --arch sm_90a --jobs 16 --filter "fwd_sm90_bf16_*causal0*" 2>&1 | tail -1
  while read -r d seqlens heads; do
    for h in $heads; do
      python3 scripts/bench_forward.py --dtypes bf16 --head-dims "$d" --causal 0 --seqlens "$seqlens" --gqa '' \
        --hidden $((h * d)) --rounds 3 --no-flex --out "$OUT/quant-d$d-h$h" 2>&1 | grep --line-buffered -E "^bf16" |
        sed "s/^/heads $h: /"
    done
  done <<<"128 4096 32 33 34
64 1024,4096 32 33
256 4096 32 33" | stamp | tee "$OUT/bench.txt"
  # The backward's dK/dV kernel: one CTA a 128-key block (d256: 64) and KV head, one an SM: at 4k keys and 16k
  # tokens, 4096 CTAs at 32 heads (d256: 8192, 62.06 rounds' work in 63), 4224 (8448) at 33.
  for d in 64 128 256; do
    for h in 32 33; do
      python3 scripts/bench_backward.py --dtypes bf16 --head-dims $d --causal 0 --seqlens 4096 --gqa '' \
        --hidden $((h * d)) --rounds 3 --out "$OUT/quant-bwd-d$d-h$h" 2>&1 | grep --line-buffered -E "^bf16" |
        sed "s/^/heads $h: /"
    done
  done | stamp | tee -a "$OUT/bench.txt"
  ;;
trace)  # clock64 stamps around the tile transitions of the non-causal default (tile_trace_instrument.py, tile_trace.py)
  # in this tree, or with docs/experiments/$4 applied (e.g. a revert patch: main before a change)
  variant trace ${4:+"$EXP/$4"} >/dev/null
  (cd /tmp/variants/trace && python3 docs/experiments/tile_trace_instrument.py)
  with_variant trace python3 docs/experiments/tile_trace.py --seqlens "${2:-1024,2048,4096}" --head-dim "${3:-128}" \
    --out "$OUT/trace${4:+-${4%.patch}}.json" 2>&1 | tee "$OUT/trace${4:+-${4%.patch}}.txt"
  ;;
notes)  # ptxas over every forward kernel the dispatcher can pick (scripts/ptxas_notes.py): C75xx notes, spills
  python3 scripts/ptxas_notes.py --jobs 16 --filter "${2:-fwd_sm90}" 2>&1 | tail -40 | tee "$OUT/notes.txt"
  ;;
tt)  # the tile transition's cuts (this tree) against main before them (docs/experiments/$2, a revert patch)
  trees_ab "before=$2" 64,96,128 1024,2048,4096 tests
  ;;
tt3)  # as tt, with a third tree: this one with docs/experiments/$2 (a patch turning one cut off)
  trees_ab "cut=$2 before=$3" 64,96,128 1024,2048,4096 tests
  ;;
lse)  # [tests | HEAD_DIMS]: the epilogue's lse by __logf in every lane (lse-fast.patch) against main (logf in each quad's
  # first lane): d64 / d128 / d256 unless given, 1k / 4k, causal or not; with `tests`, the forward GPU tests in the
  # patched tree instead, and test_native_autograd's (the C++ node's leaner headers, sixty-sixth session, untested on a GPU)
  if [ "${2:-}" = tests ]; then
    variant fast "$EXP/lse-fast.patch" >/dev/null && gpu_tests fast lse-tests tests/test_native_autograd.py
  else trees_ab "fast=lse-fast.patch" "${2:-64,128,256}" 1024,4096; fi
  ;;
ttq)  # a quick tt3: d128 only, 1k and 4k, no tests
  trees_ab "cut=$2 before=$3" 128 1024,4096
  ;;
pvf)  # the pending PV before the new tile's Q and K (pv-first.patch) against main
  q_variant_ab pvf pv-first.patch 64,128
  ;;
q3|qa|qf)  # a Q-ring variant of the cross-tile kernels (q3: q-three-stages.patch; qa: q-ahead.patch; qf:
  # q-ahead-free.patch; each patch holds q3's hunks too) against main: its GPU tests of the walks, then the A/B
  q_variant_ab "$STEP" "$(case $STEP in q3) echo q-three-stages ;; qa) echo q-ahead ;; qf) echo q-ahead-free ;; esac).patch" \
    "$([ "$STEP" = qf ] && echo 96,128 || echo 64,96,128)"
  ;;
ncuq3)  # d128 causal 1k profiled in main and in q3's tree; each one's mbarrier waits (ncu_waits.py)
  variant q3 "$EXP/q-three-stages.patch" >/dev/null
  for v in main q3; do
    with_variant $v python3 scripts/profile_ncu.py --d 128 --seqlen 1024 --causal --out "$OUT/ncu-$v" >"$OUT/ncu-$v.log" 2>&1 || true
    grep -E 'tensor_cycles_active.avg.pct_of_peak_sustained_(active|elapsed)' "$OUT/ncu-$v/summary.txt" || tail -5 "$OUT/ncu-$v.log"
    { python3 "$EXP/ncu_waits.py" "$OUT/ncu-$v" || true; } | tee -a "$OUT/waits.txt"
    rm -f "$OUT/ncu-$v/report.ncu-rep" "$OUT/ncu-$v/raw.csv"
  done
  tar -czf "$OUT/ncuq3.tgz" -C "$OUT" ncu-main ncu-q3 && rm -rf "$OUT"/ncu-main "$OUT"/ncu-q3
  ;;
walkc)  # [COSTS] [tests]: main against copies of this tree with WALK_TILE_COST set to each of COSTS (default "1")
  if [ "${3:-}" = tests ]; then
    python3 -m pytest -q -n 16 -p no:cacheprovider tests/test_forward_sm90.py tests/test_interface_cpu.py -k walk 2>&1 |
      tail -3 | tee "$OUT/walk-tests.txt"
  fi
  names=main
  [[ ${2:-1} =~ ^[0-9.\ ]+$ ]] || { echo "walkc COSTS: numbers, e.g. walkc \"1 2\" tests" >&2; exit 2; }
  for c in ${2:-1}; do
    dir=$(variant wc$c)
    sed -i "s/^WALK_TILE_COST = [0-9.]*$/WALK_TILE_COST = $c/" "$dir/flashjit/dispatch.py"
    grep -q "^WALK_TILE_COST = $c$" "$dir/flashjit/dispatch.py"
    names="$names wc$c"
  done
  args="--dtypes bf16 --head-dims 64,96,128 --causal 1 --seqlens 1024,2048,4096 --gqa 8192 --no-flex"
  warm bench_forward.py "$args" "$names"
  passes bench_forward.py "$args" "$names"
  ;;
power)  # each contender's sustained TFLOP/s beside the clock and power it held (docs/experiments/power_probe.py)
  FA3=$(fa3_bench)
  NOC=$ROOT/.fa3bench/fa3_bench_nocluster
  "$NOC" --help >/dev/null 2>&1 || { echo "no fa3_bench_nocluster here: FA3 with clusters only" >&2; NOC=; }
  W=$OUT/windows.jsonl
  fa3_window() {  # NAME BIN DTYPE D CAUSAL S: FA3 back to back (no flush) for ~3.5 s, its window to $W
    local b=$((16384 / $6)) h=$((2048 / $4)) iters line
    iters=$(python3 -c "print(max(200, int(3.5 / (4 * $b * $h * $6 * $6 * $4 / (2 if $5 else 1) / 600e12))))")
    line=$("$2" --dtype "$3" --d "$4" --causal "$5" --batch $b --seqlen "$6" --heads $h --iters "$iters" --no-flush |
      grep -v '^#' | tail -1)
    python3 - "$1" "$line" "$(date +%s.%N)" "$iters" "$W" <<'PY'
import json, sys
name, line, end, iters, path = sys.argv[1], sys.argv[2].split(), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
ms, tf = float(line[7]), float(line[8])
row = dict(dtype=line[0], d=int(line[1]), causal=line[2] == "1", seqlen=int(line[3]), name=name,
           start=end - iters * ms / 1e3, end=end, calls=iters, ms=ms, tflops=tf)
print(f"{name:10s} {line[0]} d{line[1]} causal={line[2]} S={line[3]}: {ms:.3f} ms {tf:.1f} TFLOP/s over {iters} calls",
      " ".join(line[9:]))
open(path, "a").write(json.dumps(row) + "\n")
PY
    sleep 1.5
  }
  python3 -m flashjit precompile --arch sm_90a --jobs 16 --filter "fwd_sm90_*_d128_*" 2>&1 | tail -1
  while read -r dt c s; do
    P=(--dtype "$dt" --d 128 --seqlen "$s" $([ "$c" = 1 ] && echo --causal || true) --seconds 3.5 --gap 1.5 --windows "$W")
    {  # (stdin: not the point list's)
      python3 "$EXP/power_probe.py" run "${P[@]}" --contenders flashjit,cudnn
      fa3_window fa3 "$FA3" "$dt" 128 "$c" "$s"
      if [ -n "$NOC" ]; then fa3_window fa3-nocluster "$NOC" "$dt" 128 "$c" "$s"; fa3_window fa3-nocluster "$NOC" "$dt" 128 "$c" "$s"; fi
      fa3_window fa3 "$FA3" "$dt" 128 "$c" "$s"
      python3 "$EXP/power_probe.py" run "${P[@]}" --contenders cudnn,flashjit
    } </dev/null
  done <<<"bf16 0 4096
bf16 0 16384
fp16 0 4096
bf16 1 1024" 2>&1 | stamp | tee "$OUT/power-runs.txt"
  sleep 1  # the clocks log's last samples
  python3 "$EXP/power_probe.py" join --windows "$W" --clocks "$OUT/clocks.csv" | tee "$OUT/power.txt"
  ;;
fa3check)  # the same binary's correctness mode only: exits 1 if any point is off
  FA3=$(fa3_bench)
  "$FA3" --table --check-only 2>&1 | tee "$OUT/fa3check.txt"
  ;;
*)
  echo "unknown step $STEP (see the list at the top)" >&2
  exit 2
  ;;
esac

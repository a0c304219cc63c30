#!/bin/bash
# The measurements queued in docs/perf-log.md ("Next on the GPU"), one device call a step, most important
# first. On the lent GPU, from the checkout's root, with the wheels carried (../shared/DEVICE.md):
#   run(carry=[".whl"], command="bash docs/experiments/run-next.sh STEP")
# Steps (each fits one 10-minute call; a step's log and JSON go to $OUT). A timing step runs a few of its
# variant's GPU tests first (smoke.txt); the whole tests (the -tests steps) are for the variants that win.
#   all-tests  all.patch: the patches below in one series (the softmax knobs, the uniform stages, the mask
#             ranges, the backward's two cuts, two CTAs, a dispatcher rule), the whole GPU suite on it but the transformers
#             and multi-GPU files; each test's line goes to $OUT/tests.log as it ends (a timeout keeps them)
#   all       main against all.patch's defaults (the uniform stages, the mask ranges): bench_forward d64 /
#             d128, 1k / 4k, causal or not, and d256 4k (two passes)
#   allknobs  in all.patch's tree, each default against its knobs (_lr, _ms, _lr_ms where ptxas does not
#             serialize them; at d64 causal 1k also the _x2 kernels), --rounds 3 --configs
#   allbwd    main against all.patch: bench_backward d64 / d128, 1k / 4k, causal or not (two passes)
#   If all-tests passes and a timing step wins, land the series (git am docs/experiments/all.patch) and make
#   the knobs that won dispatcher defaults (ptxas_notes.py clean); otherwise the single-patch steps below
#   say which part failed or lost. (ptxas serialized 3 of the series' half-block kernels, d104-d120 causal:
#   its last commit takes those head dims off half blocks.)
#   softmax-tests, softmax  fwd-softmax-cuts.patch (lazy_rescale, mma_sums): its GPU tests; then the default against _lr,
#             _ms and _lr_ms at d64 causal 1k, non-causal 1k / 4k, d128 non-causal 1k / 4k, causal 4k, d256
#             4k (--rounds 3 --configs)
#   ranges-tests, ranges    fwd-mask-ranges.patch (one key range a row in the forwards' masks): the forward
#             GPU tests; then main against it on the defaults, d64 / d128, 1k / 4k, causal or not (two passes)
#   ustages-tests, ustages  fwd-uniform-stages.patch (the K/V descriptors on the uniform datapath): the same,
#             and causal d128 / d64 without half blocks against the half-block defaults
#   combo     fwd-softmax-ustages.patch (the knobs on top of the uniform stages): the default there against the
#             knobs, non-causal d64 / d128 / d256 and causal d256 at 4k; causal d64 1k and d128 1k / 4k: the
#             half-block defaults with and without a knob against kernels without half blocks with _lr_ms
#   bwdtests  bwd-step-cuts.patch: test_backward_gpu.py with both commits (stmatrix's layout)
#   bwdcuts   then bench_backward for main, the first commit and both (d64 / d128: 1k, 4k, causal 4k;
#             two passes)
#   twoctas   fwd-two-ctas.patch: its GPU tests, then d64 causal 1k / 2k and non-causal 1k, the default
#             against the _x2 kernels (bench_forward --rounds 3 --configs)
#   dropout   the attribution of dropout's backward cost (d64, 1k / 4k, p = 0.1): main, Philox with one
#             round, the mask made but not applied (both timing only: their gradients are wrong)
#   table     issue 15's whole backward table (bench_backward, the defaults)
# The device copy has no usable .git: each variant is a copy of this tree with its patches applied by
# patch(1), imported through PYTHONPATH (its kernels/ come with it: codegen.kernels_dir); one kernel cache
# serves all, since the templates' hash is part of every key.
set -euo pipefail
STEP=${1:?usage: run-next.sh all-tests|all|allknobs|allbwd|softmax-tests|softmax|ranges-tests|ranges|ustages-tests|ustages|combo|bwdtests|bwdcuts|twoctas|dropout|table}
ROOT=$(pwd)
OUT=${OUT:-/tmp/run-next-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then  # the device (../shared/DEVICE.md); elsewhere torch is there already
  python3 -m pip install -q --no-index --no-deps .whl/*.whl
  python3 -m pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1
fi
export FLASHJIT_CACHE_DIR=/tmp/fj-cache PYTHONUNBUFFERED=1
EXP=$ROOT/docs/experiments
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || true)  # pytest-xdist, where installed

# variant NAME PATCH...: /tmp/variants/NAME, this tree with the patches applied in order.
variant() {
  local name=$1 dir=/tmp/variants/$1
  shift
  rm -rf "$dir" && mkdir -p "$dir"
  cp -r "$ROOT"/{flashjit,kernels,scripts,tests,docs,pyproject.toml} "$dir"/
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
# parallel, under the cache's locks) before any timed pass.
warm() {
  local v
  for v in $3; do eval with_variant $v python3 scripts/$1 $2 --out /tmp/warm-$v >/dev/null 2>&1 & done
  wait
}
# passes SCRIPT ARGS "V1 V2 ...": two timed passes, the order reversed in the second, so each variant is
# timed in two processes; the result lines to $OUT/bench.txt.
passes() {
  local pass order v
  for pass in 1 2; do
    order=$3; [ $pass = 2 ] && order=$(echo $3 | tr ' ' '\n' | tac | tr '\n' ' ')
    for v in $order; do
      echo "== $v (pass $pass)"
      eval with_variant $v python3 scripts/$1 $2 --out "$OUT/$v-$pass" 2>&1 | grep -E "^bf16" || true
    done
  done | tee -a "$OUT/bench.txt"
}
# names_of BASE SUFFIX...: kernel names, BASE with each suffix ("-": none; a whole name, fwd_...: itself).
names_of() {
  local base=$1 k
  shift
  for k in "$@"; do case $k in fwd_*) echo -n "$k " ;; *) echo -n "$base${k#-} " ;; esac; done
}
# smoke VARIANT PYTEST_K: a few of VARIANT's GPU tests before its timing (a wrong kernel times nothing real);
# the whole tests are steps of their own, for the variants that win.
smoke() {
  with_variant $1 python3 -m pytest -q $XDIST tests/test_forward_sm90.py -k "$2" 2>&1 | tail -2 | tee "$OUT/smoke.txt" || true
}
# knob_ab VARIANT POINTS: in VARIANT's tree, precompile every kernel POINTS names, then one bench_forward a
# line "d_head causal seqlens base suffixes..." timing those kernels in interleaved rounds (--configs); the
# result lines added to $OUT/bench.txt.
knob_ab() {
  local all
  all=$(echo "$2" | while read -r d causal seqlens base knobs; do names_of "$base" $knobs; done)
  with_variant $1 python3 -m flashjit precompile --arch sm_90a --jobs 16 $all 2>&1 | tail -2 || true
  echo "$2" | while read -r d causal seqlens base knobs; do
    with_variant $1 python3 scripts/bench_forward.py --dtypes bf16 --head-dims "$d" --causal "$causal" \
      --seqlens "$seqlens" --rounds 3 --no-flex --out "$OUT/d$d-c$causal-$seqlens" --configs $(names_of "$base" $knobs) 2>&1
  done | tee -a "$OUT/bench.txt"
}
# The patch of a forward change without a knob.
patch_of() {
  case $1 in
  ranges) echo "$EXP/fwd-mask-ranges.patch" ;;
  ustages) echo "$EXP/fwd-uniform-stages.patch" ;;
  esac
}
# The first commit of a two-commit patch file (git format-patch output).
first_commit() { awk '/^From [0-9a-f]+ Mon Sep 17 00:00:00 2001$/ {n++} n == 1' "$1" >"$2"; }

case $STEP in
all-tests)
  variant all "$EXP/all.patch" >/dev/null
  XDIST16=$(python3 -c "import xdist" 2>/dev/null && echo "-n 16" || true)
  # The files whose kernels the series changes first (xdist hands tests out about in collection order, and
  # a cold suite took ~420 s: should the limit cut it, what ran is what matters most), then the rest.
  FIRST="test_forward_sm90 test_backward_gpu test_forward_gpu test_varlen test_kvcache test_kvattn test_head_dim_v"
  with_variant all timeout 570 python3 -m pytest -v $XDIST16 -p no:cacheprovider $(printf "tests/%s.py " $FIRST) \
    tests/ --ignore=tests/test_transformers_integration.py --ignore=tests/test_multi_gpu.py >"$OUT/tests.log" 2>&1 || true
  grep -E "FAILED|ERROR" "$OUT/tests.log" | head -40 || true
  echo "passed $(grep -c PASSED "$OUT/tests.log"), skipped $(grep -c SKIPPED "$OUT/tests.log")"
  tail -2 "$OUT/tests.log"
  ;;
all)
  variant all "$EXP/all.patch" >/dev/null
  smoke all "test_build_set and bf16"
  FWD="--dtypes bf16 --head-dims 64,128 --seqlens 1024,4096 --causal 0,1 --gqa '' --no-flex --rounds 2"
  FWD256="--dtypes bf16 --head-dims 256 --seqlens 4096 --causal 0,1 --gqa '' --no-flex --rounds 2"
  warm bench_forward.py "$FWD" "main all" & warm bench_forward.py "$FWD256" "main all" & wait
  passes bench_forward.py "$FWD" "main all"
  passes bench_forward.py "$FWD256" "main all"
  ;;
allknobs)
  variant all "$EXP/all.patch" >/dev/null
  smoke all "softmax_cuts and growing and (d128_m128_n128_st2_ov1_pp1_ps0_causal0 or d64_m128_n128_st4_ov1_pp1_ps1_causal1 or d256)"
  F=fwd_sm90_bf16
  X2=${F}_d64_m128_n64_st4_ov0_pp0_ps1_causal1
  # each default, then its knobs but what ptxas serializes there (C7511: d64 m128 causal hb _lr, d64 m192
  # causal hb _lr_ms); at d64 causal 1k the two-CTA kernels too
  POINTS="64 1 1024 ${F}_d64_m128_n128_st4_ov1_pp1_ps1_causal1_hb - _ms _lr_ms ${X2}_x2 ${X2}_ms_x2
64 1 4096 ${F}_d64_m192_n128_st4_ov1_pp1_ps1_causal1_hb - _lr _ms
64 0 1024 ${F}_d64_m192_n128_st4_ov1_pp1_ps1_causal0_xt - _lr _ms _lr_ms
64 0 4096 ${F}_d64_m192_n128_st4_ov1_pp1_ps1_causal0 - _lr _ms _lr_ms
128 0 4096 ${F}_d128_m128_n128_st2_ov1_pp1_ps1_causal0 - _lr _ms _lr_ms
128 1 1024,4096 ${F}_d128_m128_n128_st2_ov1_pp1_ps1_causal1_xt_hb - _lr _ms _lr_ms
256 0 4096 ${F}_d256_m128_n80_st2_ov1_pp1_ps0_causal0 - _lr _ms _lr_ms
256 1 4096 ${F}_d256_m128_n80_st2_ov1_pp1_ps0_causal1 - _lr _ms _lr_ms"
  knob_ab all "$POINTS"
  ;;
allbwd)
  variant all "$EXP/all.patch" >/dev/null
  BWD="--dtypes bf16 --head-dims 64,128 --seqlens 1024,4096 --causal 0,1 --gqa ''"
  warm bench_backward.py "$BWD" "main all"
  passes bench_backward.py "$BWD" "main all"
  ;;
softmax-tests)
  variant cuts "$EXP/fwd-softmax-cuts.patch" >/dev/null
  with_variant cuts python3 -m pytest -q $XDIST tests/test_forward_sm90.py -k "softmax_cuts or varlen_equal" \
    tests/test_config.py 2>&1 | tail -3 | tee "$OUT/tests.txt" || true
  ;;
softmax)
  variant cuts "$EXP/fwd-softmax-cuts.patch" >/dev/null
  F=fwd_sm90_bf16
  # d_head, causal, seqlens, a kernel name without knob suffixes, the suffixes ("-": none); the causal hb kernels
  # leave out what ptxas serializes (C7511): d128 xt_hb with _lr, d64 m128 hb with _lr_ms
  POINTS="64 1 1024 ${F}_d64_m128_n128_st4_ov1_pp1_ps1_causal1_hb - _lr _ms
128 0 1024 ${F}_d128_m128_n128_st2_ov1_pp1_ps1_causal0_xt - _lr _ms _lr_ms
128 0 4096 ${F}_d128_m128_n128_st2_ov1_pp1_ps1_causal0 - _lr _ms _lr_ms
128 1 4096 ${F}_d128_m128_n128_st2_ov1_pp1_ps1_causal1_xt_hb - _ms
64 0 1024 ${F}_d64_m192_n128_st4_ov1_pp1_ps1_causal0_xt - _lr _ms _lr_ms
64 0 4096 ${F}_d64_m192_n128_st4_ov1_pp1_ps1_causal0 - _lr _ms _lr_ms
256 0 4096 ${F}_d256_m128_n80_st2_ov1_pp1_ps0_causal0 - _lr _ms _lr_ms
256 1 4096 ${F}_d256_m128_n80_st2_ov1_pp1_ps0_causal1 - _lr _lr_ms"
  smoke cuts "softmax_cuts and growing and (d128_m128_n128_st2_ov1_pp1_ps0_causal0 or d64_m128_n128_st4_ov1_pp1_ps1_causal1 or d256)"
  knob_ab cuts "$POINTS"
  ;;
twoctas)
  variant x2 "$EXP/fwd-two-ctas.patch" >/dev/null
  with_variant x2 python3 -m pytest -q $XDIST tests/test_forward_sm90.py -k two_ctas 2>&1 | tail -3 | tee "$OUT/tests.txt" || true
  with_variant x2 python3 -m pytest -q $XDIST tests/test_jit_cache.py -k x2 2>&1 | tail -2 | tee -a "$OUT/tests.txt" || true
  X2=fwd_sm90_bf16_d64_m128_n64
  for causal in 1 0; do
    if [ $causal = 1 ]; then seqlens=1024,2048; defaults="fwd_sm90_bf16_d64_m128_n128_st4_ov1_pp1_ps1_causal1_hb
        fwd_sm90_bf16_d64_m192_n128_st4_ov1_pp1_ps1_causal1_hb"; else seqlens=1024
      defaults=fwd_sm90_bf16_d64_m192_n128_st4_ov1_pp1_ps1_causal0_xt; fi
    with_variant x2 python3 scripts/bench_forward.py --dtypes bf16 --head-dims 64 --causal $causal --seqlens $seqlens \
      --rounds 3 --no-flex --out "$OUT/causal$causal" --configs $defaults \
      ${X2}_st2_ov0_pp0_ps0_causal${causal}_x2 ${X2}_st4_ov0_pp0_ps0_causal${causal}_x2 \
      ${X2}_st2_ov0_pp0_ps1_causal${causal}_x2 ${X2}_st4_ov0_pp0_ps1_causal${causal}_x2 2>&1 | tee "$OUT/bench$causal.txt"
  done
  ;;
combo)
  # fwd-softmax-ustages.patch: the softmax knobs on top of the uniform stages (both GPU-tested by then): the
  # default there (uniform stages) against the knobs, non-causal d64 / d128 / d256 and causal d256, 4k.
  variant combo "$EXP/fwd-softmax-ustages.patch" >/dev/null
  F=fwd_sm90_bf16
  POINTS="128 0 4096 ${F}_d128_m128_n128_st2_ov1_pp1_ps1_causal0 - _lr _ms _lr_ms
64 0 4096 ${F}_d64_m192_n128_st4_ov1_pp1_ps1_causal0 - _ms
256 0 4096 ${F}_d256_m128_n80_st2_ov1_pp1_ps0_causal0 - _lr _lr_ms
256 1 4096 ${F}_d256_m128_n80_st2_ov1_pp1_ps0_causal1 - _lr _lr_ms
64 1 1024 ${F}_d64_m128_n128_st4_ov1_pp1_ps1_causal1 _hb _hb_lr - _lr_ms
128 1 1024,4096 ${F}_d128_m128_n128_st2_ov1_pp1_ps1_causal1_xt _hb _hb_ms - _lr_ms"
  smoke combo "softmax_cuts and growing and causal0 and not dv64"
  knob_ab combo "$POINTS"
  ;;
ranges-tests | ustages-tests)
  # A forward change without a knob: the forward GPU tests with it.
  name=${STEP%-tests}
  variant $name "$(patch_of $name)" >/dev/null
  with_variant $name python3 -m pytest -q $XDIST tests/test_forward_sm90.py tests/test_forward_gpu.py \
    tests/test_score_mod_host.py 2>&1 | tail -3 | tee "$OUT/tests.txt" || true
  ;;
ranges | ustages)
  # ... then main against it on the defaults (two passes, the order reversed in the second).
  variant $STEP "$(patch_of $STEP)" >/dev/null
  smoke $STEP "test_build_set and bf16"
  FWD="--dtypes bf16 --head-dims 64,128 --seqlens 1024,4096 --causal 0,1 --gqa '' --no-flex --rounds 2"
  warm bench_forward.py "$FWD" "main $STEP"
  passes bench_forward.py "$FWD" "main $STEP"
  if [ $STEP = ustages ]; then  # causal without half blocks against the half-block defaults, both with them
    knob_ab ustages "128 1 1024,4096 fwd_sm90_bf16_d128_m128_n128_st2_ov1_pp1_ps1_causal1_xt _hb -
64 1 1024 fwd_sm90_bf16_d64_m128_n128_st4_ov1_pp1_ps1_causal1 _hb -"
  fi
  ;;
bwdtests)
  variant cuts "$EXP/bwd-step-cuts.patch" >/dev/null
  with_variant cuts python3 -m pytest -q $XDIST tests/test_backward_gpu.py 2>&1 | tail -3 | tee "$OUT/tests.txt" || true
  ;;
bwdcuts)
  first_commit "$EXP/bwd-step-cuts.patch" /tmp/lse-pairs.patch
  variant lse /tmp/lse-pairs.patch >/dev/null
  variant cuts "$EXP/bwd-step-cuts.patch" >/dev/null
  BWD="--dtypes bf16 --head-dims 64,128 --seqlens 1024,4096 --causal 0,1 --gqa ''"
  warm bench_backward.py "$BWD" "main lse cuts"
  passes bench_backward.py "$BWD" "main lse cuts"
  ;;
dropout)
  variant philox1 "$EXP/dropout-philox1-timing-only.patch" >/dev/null
  variant noapply "$EXP/dropout-no-apply-timing-only.patch" >/dev/null
  DROP="--dtypes bf16 --head-dims 64 --seqlens 1024,4096 --causal 0,1 --dropout-p 0.1 --gqa ''"
  warm bench_backward.py "$DROP" "main philox1 noapply"
  passes bench_backward.py "$DROP" "main philox1 noapply"
  ;;
table)
  python3 scripts/bench_backward.py --dtypes bf16 --head-dims 64,128,256 --seqlens 1024,2048,4096,8192,16384 \
    --causal 0,1 --gqa 1x8192x32x8 --out "$OUT" 2>&1 | grep -Ev "^\s*$" | tee "$OUT/bench.txt"
  ;;
*)
  echo "unknown step $STEP (see the list at the top)" >&2
  exit 2
  ;;
esac

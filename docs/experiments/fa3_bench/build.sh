#!/bin/bash
# Builds .fa3bench/fa3_bench: fa3_bench.cu linked against FlashAttention-3's own sm90 forward instantiations
# (hopper/instantiations/flash_fwd_hdim{D}_{dtype}_sm90.cu), static cudart; on the GPU machine it needs only the
# CUDA driver, glibc >= 2.34 and libstdc++ (GLIBCXX_3.4.21). Also writes .fa3bench/fa3src.tgz, the FA3 and cutlass
# sources it compiled (~3 MB): if the carried binary cannot start on the GPU machine's image, run-next.sh rebuilds
# it there from that archive (build.sh on 16 cores, ~1.5 min).
#   docs/experiments/fa3_bench/build.sh FA3_DIR CUTLASS_DIR
#   FA3_DIR: a Dao-AILab/flash-attention checkout (the one holding hopper/); CUTLASS_DIR: its pinned
#   cutlass (csrc/cutlass in that checkout, the one holding include/). Both may come as env vars instead.
# Env: HDIMS (default "64 128 256"), DTYPES (default "bf16 fp16"), JOBS (parallel nvcc, default nproc),
#      NVCC (default nvcc), OUTDIR (default <repo>/.fa3bench: the binary alone, since that folder is carried to
#      the GPU), OBJDIR (default ${TMPDIR:-/tmp}/fa3bench-obj). An FA3 object is rebuilt when missing, older than its .cu,
#      or built with other flags / another nvcc (OBJDIR/flags.txt); CLEAN=1 rebuilds all (after header edits).
#      FA3_REV (default: FA3_DIR/REV, else its git rev, else "unknown"): printed by the binary, for the record.
#      SRC_TARBALL=0 skips fa3src.tgz. EXTRA_FLAGS: more nvcc flags for FA3's objects and the harness (e.g.
#      -DFLASHATTENTION_DISABLE_CLUSTER: FA3 without its two-CTA clusters; give that build its own OBJDIR / OUTDIR).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
FA3_DIR=${1:-${FA3_DIR:?usage: build.sh FA3_DIR CUTLASS_DIR (or env FA3_DIR, CUTLASS_DIR)}}
CUTLASS_DIR=${2:-${CUTLASS_DIR:?usage: build.sh FA3_DIR CUTLASS_DIR (or env FA3_DIR, CUTLASS_DIR)}}
FA3_DIR=$(cd "$FA3_DIR" && pwd)
CUTLASS_DIR=$(cd "$CUTLASS_DIR" && pwd)
HOPPER=$FA3_DIR/hopper
FA3_REV=${FA3_REV:-$(cat "$FA3_DIR/REV" 2>/dev/null || git -C "$FA3_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)}
[[ $FA3_REV =~ ^[A-Za-z0-9._-]+$ ]] || { echo "FA3_REV must be a plain name: $FA3_REV" >&2; exit 2; }
[ -f "$HOPPER/flash_fwd_launch_template.h" ] || { echo "no hopper/flash_fwd_launch_template.h under $FA3_DIR" >&2; exit 2; }
[ -f "$CUTLASS_DIR/include/cutlass/cutlass.h" ] || { echo "no include/cutlass/cutlass.h under $CUTLASS_DIR" >&2; exit 2; }
HDIMS=${HDIMS:-64 128 256}
DTYPES=${DTYPES:-bf16 fp16}
JOBS=${JOBS:-$(nproc)}
NVCC=${NVCC:-nvcc}
OUTDIR=${OUTDIR:-$REPO/.fa3bench}
OBJDIR=${OBJDIR:-${TMPDIR:-/tmp}/fa3bench-obj}
mkdir -p "$OUTDIR" "$OBJDIR"

# FA3's setup.py nvcc flags (less -lineinfo and --resource-usage, which do not change the code), torch's
# CUDAExtension additions (--expt-relaxed-constexpr, -D__CUDA_NO_*), and the FLASHATTENTION_DISABLE_* macros that cut
# everything but dense non-causal / causal bf16+fp16 forward: the kernels FA3's flash_attn_func runs for
# [B, S, H, D] inputs with num_splits=1 and no pack_gqa.
FLAGS=(-O3 -std=c++17 --ftemplate-backtrace-limit=0 --use_fast_math --expt-relaxed-constexpr
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED -DCUTLASS_ENABLE_GDC_FOR_SM90 -DCUTLASS_DEBUG_TRACE_LEVEL=0 -DNDEBUG
  -DFLASHATTENTION_DISABLE_BACKWARD -DFLASHATTENTION_DISABLE_SPLIT -DFLASHATTENTION_DISABLE_PAGEDKV
  -DFLASHATTENTION_DISABLE_APPENDKV -DFLASHATTENTION_DISABLE_LOCAL -DFLASHATTENTION_DISABLE_SOFTCAP
  -DFLASHATTENTION_DISABLE_PACKGQA -DFLASHATTENTION_DISABLE_FP8 -DFLASHATTENTION_DISABLE_VARLEN
  -DFLASHATTENTION_DISABLE_SM8x -DFLASHATTENTION_DISABLE_HDIMDIFF64 -DFLASHATTENTION_DISABLE_HDIMDIFF192
  -diag-suppress 20013,20014,177,550
  -I"$HOPPER" -I"$CUTLASS_DIR/include" -gencode arch=compute_90a,code=sm_90a)
read -r -a EXTRA <<<"${EXTRA_FLAGS:-}"
FLAGS+=(${EXTRA[@]+"${EXTRA[@]}"})

SRCS=("$HOPPER/flash_prepare_scheduler.cu")  # referenced (not run) by run_flash_fwd's varlen branch
HAVE=("-DFA3B_REV=\"$FA3_REV\"")
for d in $HDIMS; do
  for t in $DTYPES; do
    SRCS+=("$HOPPER/instantiations/flash_fwd_hdim${d}_${t}_sm90.cu")
    HAVE+=("-DFA3B_HAVE_${t^^}_D${d}")
  done
done
for s in "${SRCS[@]}"; do [ -f "$s" ] || { echo "missing $s" >&2; exit 2; }; done
STAMP="$("$NVCC" --version | tail -1) | $HOPPER | $CUTLASS_DIR | ${FLAGS[*]}"
if [ "${CLEAN:-0}" = 1 ] || [ "$(cat "$OBJDIR/flags.txt" 2>/dev/null)" != "$STAMP" ]; then
  rm -f "$OBJDIR"/*.o "$OBJDIR"/*.log
  echo "$STAMP" >"$OBJDIR/flags.txt"
fi

compile() {  # compile SRC: SRC -> OBJDIR/NAME.o unless up to date
  local src=$1 obj
  obj=$OBJDIR/$(basename "${src%.cu}").o
  if [ -f "$obj" ] && [ "$obj" -nt "$src" ]; then return 0; fi
  local t0=$SECONDS
  "$NVCC" "${FLAGS[@]}" -c "$src" -o "$obj.tmp" >"$obj.log" 2>&1 || { cat "$obj.log" >&2; echo "FAILED $src" >&2; return 1; }
  mv "$obj.tmp" "$obj"
  echo "built $(basename "$obj") in $((SECONDS - t0)) s"
}
T0=$SECONDS
running=0
fail=0
for s in "${SRCS[@]}"; do
  compile "$s" &
  running=$((running + 1))
  if [ $running -ge "$JOBS" ]; then wait -n || fail=1; running=$((running - 1)); fi
done
while [ $running -gt 0 ]; do wait -n || fail=1; running=$((running - 1)); done
[ $fail = 0 ] || { echo "an FA3 object failed to build" >&2; exit 1; }

OBJS=("$OBJDIR/flash_prepare_scheduler.o")
for s in "${SRCS[@]:1}"; do OBJS+=("$OBJDIR/$(basename "${s%.cu}").o"); done
# The harness, then the link: static cudart (nvcc's default, named here); libstdc++ stays dynamic, since the
# static one (gcc 12) would ask for glibc 2.36 (arc4random); -s strips the host symbols.
"$NVCC" "${FLAGS[@]}" "${HAVE[@]}" -c "$HERE/fa3_bench.cu" -o "$OBJDIR/fa3_bench.o"
"$NVCC" -gencode arch=compute_90a,code=sm_90a -cudart static -Xlinker -s "$OBJDIR/fa3_bench.o" "${OBJS[@]}" -o "$OUTDIR/fa3_bench"
echo "wrote $OUTDIR/fa3_bench ($(du -h "$OUTDIR/fa3_bench" | cut -f1)) in $((SECONDS - T0)) s: hdims {$HDIMS}, dtypes {$DTYPES}"

if [ "${SRC_TARBALL:-1}" = 1 ]; then  # the sources, laid out as build.sh's two arguments expect
  STAGE=$(mktemp -d)
  mkdir -p "$STAGE/flash-attention/hopper/instantiations" "$STAGE/cutlass"
  cp "$HOPPER"/*.h "$HOPPER"/*.hpp "$HOPPER"/*.cu "$STAGE/flash-attention/hopper/"
  cp "${SRCS[@]:1}" "$STAGE/flash-attention/hopper/instantiations/"
  cp -r "$CUTLASS_DIR/include" "$STAGE/cutlass/"
  for f in LICENSE LICENSE.txt; do
    if [ -f "$FA3_DIR/$f" ]; then cp "$FA3_DIR/$f" "$STAGE/flash-attention/"; fi
    if [ -f "$CUTLASS_DIR/$f" ]; then cp "$CUTLASS_DIR/$f" "$STAGE/cutlass/"; fi
  done
  echo "$FA3_REV" >"$STAGE/flash-attention/REV"
  printf 'HDIMS="%s"\nDTYPES="%s"\n' "$HDIMS" "$DTYPES" >"$STAGE/BUILT"  # what a rebuild from it must build
  tar -czf "$OUTDIR/fa3src.tgz" -C "$STAGE" flash-attention cutlass BUILT
  rm -rf "$STAGE"
  echo "wrote $OUTDIR/fa3src.tgz ($(du -h "$OUTDIR/fa3src.tgz" | cut -f1))"
fi

"""A problem -> a kernel config: the dispatcher's measured defaults (forward and backward), the default
build set of an arch and the forward's autotuning space.

The preference tables sit next to the functions that read them, with the measurements behind them.
Which family serves a problem is decided here; the families themselves live in flashjit/configs/.
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
from collections.abc import Callable

from .configs.bwd_sm80 import BWD_BLOCK_M, BWD_D_SPLIT, BWD_GROUP_ROWS, BwdConfig
from .configs.bwd_sm90 import WGMMA_ARCH, WGMMA_SHAPES, BwdSm90Config, wgmma_tile
from .configs.common import DTYPES, HEAD_DIMS, SMEM_LIMIT_SM90, WARPS, head_dim_tile
from .configs.fwd_sm80 import BLOCK_COLS, BLOCK_ROWS, KernelConfig
from .configs.fwd_sm90 import BLOCK_M, BLOCK_N, STAGES, FwdSm90Config, sm90_tile

# Measured preferences (docs/perf-log.md, H100 SXM, 2026-11-22), best first; the first that is valid
# and fits the device's shared memory wins. At d_head=256, 128x128 on 8 warps ran at 332 TFLOP/s
# against 248 for 128x32 (FA2: 322); with a causal mask 64x64 on 4 warps wastes less on the diagonal.
_DB0 = dict(mma_double_buffer_loads=False)
_PREFERENCES = {  # (head-dim class, causal) -> tiles, best first
    "short": [dict(B_r=64, B_c=64, n_warps=4), dict(B_r=64, B_c=32, n_warps=4, **_DB0)],
    64: [dict(B_r=128, B_c=128, n_warps=4, **_DB0), dict(B_r=128, B_c=64, n_warps=4)],
    128: [dict(B_r=128, B_c=64, n_warps=4), dict(B_r=64, B_c=64, n_warps=4)],
    160: [dict(B_r=128, B_c=128, n_warps=8, **_DB0), dict(B_r=64, B_c=64, n_warps=4, **_DB0)],
    192: [dict(B_r=64, B_c=64, n_warps=4, **_DB0), dict(B_r=64, B_c=32, n_warps=4, **_DB0)],
    256: [dict(B_r=128, B_c=128, n_warps=8, **_DB0), dict(B_r=64, B_c=64, n_warps=4, **_DB0),
          dict(B_r=64, B_c=32, n_warps=4, **_DB0)],
    (256, True): [dict(B_r=64, B_c=64, n_warps=4, **_DB0), dict(B_r=64, B_c=32, n_warps=4, **_DB0)],
}


# The Hopper forward (FwdSm90Config) by tile width, measured on an H200 (docs/perf-log.md, ninth
# session, bf16 16k tokens): d128 128x128 with overlap + ping-pong ran 0.90-0.96x cuDNN against 0.77-0.88x
# without the overlap, 128x192 and 128x64 lost 5-20%; d64 192x128 over 4 stages, persistent, 1.04x at
# S=4k (0.93x one CTA per tile); d192 128x96 0.95-1.05x; d256 128x64 0.93-1.02x. Persistent CTAs lost
# 3-16% at d>64 with the first static tile order; with odd rounds reversed (and one CTA per tile where
# the walk would not balance) d128 persistent ran +3-8% causal at S = 1k-2k and level elsewhere
# (twenty-first session, H200, interleaved A/B runs), so the 128-wide tile takes them too (a causal grid
# now walks causal_walk's lists instead).
# With score features the 192-row tile's 160 registers a consumer thread spill: d64 then takes 128 rows.
# Causal d64 up to SHORT_CAUSAL queries (sixteenth session, bf16 16k tokens): 128 rows with ping-pong,
# persistent, ran 293.8 / 349.2 TFLOP/s at S = 1k / 2k against 254.2 / 339.5 for 192 rows (a 1k row of
# queries is 5.3 tiles of 192: its last tile a third full), but 409 / 416 against 437 / 461 at 8k / 16k
# and level at 4k. Keyed (tile width, "short causal"), looked up before the tile width alone.
# d64's 192 rows with the ping-pong token round its three consumer warpgroups (twenty-fifth session,
# H200, bf16 16k tokens, three interleaved rounds), against 192 rows without ping-pong: non-causal
# 445 / 461 TFLOP/s at 2k / 4k against 420 / 442 (+6 / +4%) but 374 against 381 at 1k (so non-causal
# rows up to SHORT kept it off, until cross_tile with it won there: below); causal 4k 406 against 381
# (+6%); causal 1k-2k keep 128 rows (291 / 349 against 255 / 348 for 192 rows with ping-pong). The
# new default at 8k / 16k ran 1.03-1.13x cuDNN (not timed against the old one there); d32-56, which
# share the 64-wide tile, were not measured.
# d256 128x80 (FlashAttention-3's tile; seventeenth session, two runs, bf16 16k tokens) against 128x64:
# non-causal +2-5% at 2k-16k (level at 1k), causal +1-5% at 4k-16k but -4% at 1k and 2k.
# d128 up to SHORT queries (twenty-second session, H200, bf16 16k tokens, three runs of interleaved
# rounds): cross_tile with its TMA epilogue against persistent alone, non-causal +3.2 / +2.8 / +3.7% at
# 1k and +5.3% at 512, causal +1.3 / +3.1 / +2.9% at 1k and level at 512; at 2k-4k the runs disagree
# (-3.5 to +2.4%), so longer rows keep persistent. Not with a window: its cross-tile kernel spills (ptxas,
# causal + local: 32 bytes against 8).
# Cross-tile at every non-causal length, d64 and d128 (thirty-sixth session, H100, bf16 16k tokens, three
# interleaved rounds, each default against itself with _xt, TFLOP/s): d128 2k 569.9 -> 599.0, 4k 595.1 ->
# 620.6, 8k 634.0 -> 629.4, 16k 616.4 -> 655.8, B=1 8k 32/8 605.4 -> 638.8 (+5.1 / +4.3 / -0.7 / +6.4 /
# +5.5%); d64 2k 459.5 -> 467.4, 4k 477.1 -> 488.0, 8k 499.8 -> 516.7, 16k 505.8 -> 522.6, GQA 486.4 -> 504.5
# (+1.7 / +2.3 / +3.4 / +3.3 / +3.7%). Before lazy rescaling it had lost 1-4% at d64 4k-16k and the
# runs disagreed at d128 2k-4k (above); each tile's first QK^T and softmax now run under the last one's PV
# and epilogue, worth ~1 key block a tile. Keyed (tile width, "non-causal"), without a window.
# d64 non-causal up to SHORT (twenty-sixth session, H200, bf16 16k tokens, three interleaved rounds in
# each of two processes): 192 rows with ping-pong and cross_tile against the 192 rows without ping-pong
# that were the default, 366.7 TFLOP/s at 512 and 396.1 / 398.5 at 1k (two processes) against 340.9 and
# 382.6 / 388.0 (+8%, +3-4%); at 2k 451.3 against 444.4 for ping-pong alone (+1.6%, one run: longer rows keep it off,
# as d64's cross_tile lost 1-4% at 4k-16k in the twenty-first session). Score features other than sinks
# leave the 192-row tile (registers), so the next entries serve them.
# Half blocks (FwdSm90Config.half_blocks; twenty-seventh session, H200, bf16 16k tokens, three
# interleaved rounds in each of two processes, TFLOP/s without -> with): d64 causal 128 rows 288 -> 298
# at 1k, 343 -> 347 at 2k; 192 rows 253 -> 270 / 341 -> 359 / 394 -> 405 at 1k / 2k / 4k, 402 -> 404 at
# 8k; d128 causal persistent 469 -> 472 / 524 -> 526 / 551 -> 559 at 2k / 4k / 8k, and with cross_tile
# as well 491 / 540 / 564 (so causal d128 takes cross_tile at every length, not only up to SHORT: it
# had measured -3.5 to +2.4% alone at 2k-4k); 1k 396 against 400 for xt alone (-1%, one run). Causal
# kernels take them from d64 up, except with a window, softcap, ALiBi, sinks or d_v != d_head: there
# ptxas serialized the wgmmas of some kernels (C7511, too few registers for a third compiled step; d40,
# d48, d8, d16 too; scripts/ptxas_notes.py lists them) or a window's kernels spilled 20-32 bytes more.
# Nor at d104-d120: with the mask ranges (one key range a row) ptxas serialized three of their kernels
# (tests/test_jit_cache.py checks every half-block kernel the dispatcher can pick).
# And with them the 128-row tile leads d64's causal rows only up to SHORT (298 against 270 at 1k; 347
# against 359 at 2k).
# Two CTAs an SM (two_ctas: 128 rows, 64-key blocks, no overlap) lead d64's causal rows up to SHORT
# (thirtieth / thirty-first sessions, H200, bf16 16k tokens, three interleaved rounds): 256 against the
# 128-row half-block tile's 221 at 512, 313 against 289 at 1k (297 -> 321 the session before); at 2k 359
# against 369 for the 192 rows there, at 4k / 8k 396 / 407 against 416 / 417, so longer rows keep them.
# Non-causal (1k) 386 against 403 for the lazy 192 rows. ptxas: all 224 kernels of the knob at d8-d64, each
# score feature, compile without spills or notes.
# Lazy rescaling (FwdSm90Config.lazy_rescale: O rescaled only in the steps where a row's max moved by more
# than 2^8) by (tile width, causal). Thirty-first session, H200, bf16 16k tokens, each default against itself
# with _lr, three interleaved rounds (--configs), TFLOP/s at S = 1k / 4k / 16k and the B=1 8k 32/8 GQA point:
# d64 non-causal 394 -> 403 / 465 -> 479 / 494 -> 513 / 474 -> 496 (512: 357 -> 369); d128 non-causal 540 ->
# 544 / 594 -> 587 / 603 -> 625 / 588 -> 615 (the thirtieth session's 4k: 597 -> 604); d192 non-causal 550 ->
# 567 / 650 -> 629 / 659 -> 715 / 645 -> 706, causal (2k / 4k / 16k / GQA) 503 -> 522 / 576 -> 605 / 637 ->
# 674 / 621 -> 632; d256 non-causal 589 -> 601 / 668 -> 673 / 662 -> 739 / 667 -> 736, causal 427 -> 448 (1k,
# its 64-key tile) / 608 -> 605 / 636 -> 685 / 637 -> 662; d96 (the 128-wide tile) 4k 477 -> 480. So on for
# those, despite d192's -3% at 4k and d128's -1% there. Off at d64 causal (192 rows: -0.4 / -1.4%, thirtieth
# session) and d128 causal (level: 405 -> 404 / 542 -> 545 / 576 -> 578 at 1k / 4k / GQA). Sixty-first session
# (H100): with the key loop's row max gone (fwd_sm90.cuh kNoMaxExps), d128 causal `_xt_hb_lr` 609.0 / 628.3
# against `_xt_hb` 575.2 / 593.7 at 4k / 8k (+5.9 / +5.8%), so on for the 128-wide tile's causal rows too,
# except d72 / d80 (_EAGER_CAUSAL_MAX): ptxas 13.0 serialized their one-CTA-a-tile causal lazy kernels (C7511;
# varlen batches and long causal rows run those), and a persistent kernel and its twin rescale alike. Sixty-fourth
# session (H100, two processes): +4.4-7.1% at d96 / d128 causal 2k-16k and the B=1 8k 32/8 point.
_LAZY_RESCALE = {(64, False), (128, False), (128, True), (192, False), (192, True), (256, False), (256, True)}
_EAGER_CAUSAL_MAX = 80


def lazy_rescale(d_head: int, causal: bool) -> bool:
    """Whether the Hopper forward rescales lazily at this head dim and mask (the measured table above)."""
    return (sm90_tile(d_head), causal) in _LAZY_RESCALE and not (causal and 64 < d_head <= _EAGER_CAUSAL_MAX)


# Dropout's masks in persistent kernels (FwdSm90Config.mask_warps; forty-fifth session, H100, bf16 16k
# tokens, p = 0.1, three interleaved rounds, TFLOP/s): the producer's mask warps against the consumers
# making them with the pair swap, d128 / d96 causal 1k 316 / 251 against 267 / 213 (+18%), but at 4k and the
# B=1 8k 32/8 point the consumers lead: d128 non-causal 408 / 419 against 444 / 465, causal 388 / 409
# against 415 / 431, d96 non-causal 329 / 333 against 361 / 379, causal 310 / 321 against 340 / 353 (+7 to
# +14%; non-causal 1k too: +7-8%). So the mask warps serve causal rows up to MASK_WARPS_CAUSAL only (d64's
# two-CTA kernel among them). At 2k the swap still led: d128 376 against 362, d96 308 against 287.
# And with the swap d64's causal rows past SHORT take persistent 128-row tiles (their 192 rows do not fit the
# registers with dropout): 258 / 287 / 300 at 2k / 4k / 8k against 242 / 273 / 291 at one CTA a tile (+3 to
# +7%); non-causal they were level (270 / 286 / 296 against 264 / 288 / 300 at 1k / 2k / 4k), so keep it.
MASK_WARPS_CAUSAL = 1024


def with_mask_warps(cfg, seqlen_q: int, smem_limit: int = SMEM_LIMIT_SM90):
    """A Hopper forward config with dropout in persistent kernels: with the producer's mask warps where
    the rule above wants them (causal rows up to MASK_WARPS_CAUSAL), or where the swap's buffers do not fit
    beside the tiles (FlashAttention-3's 176-key tiles: the consumers would then make every call of a span
    each), and where their slots fit; else without. A tuned entry gets its features switched on, so it
    passes here too. Other configs as they are."""
    if not (isinstance(cfg, FwdSm90Config) and cfg.dropout and cfg.persistent):
        return cfg
    return _mask_warps_as(cfg, cfg.causal and seqlen_q <= MASK_WARPS_CAUSAL, smem_limit)


@functools.lru_cache(maxsize=None)
def _mask_warps_as(cfg: FwdSm90Config, short_causal: bool, smem_limit: int) -> FwdSm90Config:
    """with_mask_warps once the call's rows are read (cached: a tuned entry passes here on every call)."""
    want = short_causal or not cfg.fits_beside_tiles(cfg.pair_swap_bytes)
    masked = dataclasses.replace(cfg, mask_warps=want)
    if masked.problems() or masked.smem_bytes > smem_limit:
        return dataclasses.replace(cfg, mask_warps=False)
    return masked


# d256 with dropout takes 64-key tiles at every length ((256, "dropout") below; forty-sixth session, H200,
# bf16 16k tokens, p = 0.1, three interleaved rounds, TFLOP/s, 80 -> 64 keys): non-causal 470 -> 503 / 527 ->
# 560 / 544 -> 574 at 1k / 4k / 16k, causal 441 -> 479 / 491 -> 523 / 535 -> 566 at 2k / 4k / 16k (+6 to +9%;
# again on an H100: +7 to +16%), where without dropout the 80-key tile leads by 2-5%: only the 64-key tile
# leaves room for the pair swap's buffers, so with 80 keys each consumer warp makes every Philox call of its span.
# d64's causal rows past SHORT take cross-tile on their 192-row half blocks ((64, "causal"); fiftieth session,
# H100, bf16 16k tokens, three interleaved rounds, two processes, TFLOP/s, without / with): 2k 385.6 -> 393.0 and
# 382.7 -> 397.0 (+1.9 / +3.7%), 4k 422.5 -> 423.4, 8k 461.7 -> 466.6 and 470.4 -> 465.6, B=1 8k 32/8 454.8 -> 468.0
# and 461.6 -> 470.1 (+2.9 / +1.8%); since the tile transition (a chained tile start ~1 step) it no longer loses.
# Rows long enough for one CTA a tile (with_tile_walk) run the same twin either way.
SHORT_CAUSAL = 2048
SHORT = 1024
_SHORT_CAUSAL_BY_TILE = {64: SHORT}  # where "short causal" ends for a tile width, if not at SHORT_CAUSAL
_SM90_PREFERENCES = {
    64: [dict(block_m=192, block_n=128, stages=4, overlap=True, pingpong=True, persistent=True),
         dict(block_m=128, block_n=128, stages=4)],
    (64, "non-causal"): [dict(block_m=192, block_n=128, stages=4, overlap=True, pingpong=True, persistent=True,
                         cross_tile=True),
                    dict(block_m=192, block_n=128, stages=4, overlap=True, pingpong=False, persistent=True),
                    dict(block_m=128, block_n=128, stages=4)],
    (64, "causal"): [dict(block_m=192, block_n=128, stages=4, overlap=True, pingpong=True, persistent=True,
                          cross_tile=True),
                     dict(block_m=192, block_n=128, stages=4, overlap=True, pingpong=True, persistent=True),
                     dict(block_m=128, block_n=128, stages=4)],
    (64, "causal dropout"): [dict(block_m=128, block_n=128, stages=4, persistent=True),
                             dict(block_m=128, block_n=128, stages=4)],
    (64, "short causal"): [dict(block_m=128, block_n=64, stages=4, overlap=False, pingpong=False, persistent=True,
                                two_ctas=True),
                           dict(block_m=128, block_n=128, stages=4, persistent=True),
                           dict(block_m=128, block_n=128, stages=4)],
    128: [dict(block_m=128, block_n=128, stages=2, persistent=True)],
    (128, "causal"): [dict(block_m=128, block_n=128, stages=2, persistent=True, cross_tile=True),
                      dict(block_m=128, block_n=128, stages=2, persistent=True)],
    (128, "non-causal"): [dict(block_m=128, block_n=128, stages=2, persistent=True, cross_tile=True),
                     dict(block_m=128, block_n=128, stages=2, persistent=True)],
    192: [dict(block_m=128, block_n=96, stages=2)],
    256: [dict(block_m=128, block_n=80, stages=2), dict(block_m=128, block_n=64, stages=2)],
    (256, "dropout"): [dict(block_m=128, block_n=64, stages=2), dict(block_m=128, block_n=80, stages=2)],
    (256, "short causal"): [dict(block_m=128, block_n=64, stages=2)],
}


@functools.lru_cache(maxsize=None)
def default_config(dtype: str, d_head: int, causal: bool, seqlen_q: int = 4096,
                   smem_limit: int = SMEM_LIMIT_SM90, local: bool = False, softcap: bool = False,
                   alibi: bool = False, dropout: bool = False, arch: str | None = None,
                   sink: bool = False, d_v: int = 0) -> KernelConfig | FwdSm90Config:
    """The dispatcher's choice when no tuned entry exists for (dtype, d_head, causal, seqlen_q) on a
    device allowing `smem_limit` bytes of shared memory per block. On sm_90a (`arch`) the Hopper
    family at every length: a single short block of queries (Sq <= 64) wastes most of its 128- or
    192-row tile, yet streams its keys 1.1-1.3x faster than the sm_80 kernel's 64-row tile at B x H = 512
    and 1.4-2.5x at B x H = 16 (H100, Sq 1-64, Sk 1k-16k; d256 with many heads 0.99-1.06x:
    docs/perf-log.md, forty-third session). A value head dim `d_v` other than d_head (MLA-style) takes the
    tiles of d_head (QK^T's width)."""
    d_v = 0 if d_v == d_head else d_v
    if arch == WGMMA_ARCH:
        tile = sm90_tile(d_head)
        short_causal = _SHORT_CAUSAL_BY_TILE.get(tile, SHORT_CAUSAL)
        keys = ((tile, "short causal") if causal and seqlen_q <= short_causal else None,
                (tile, "causal dropout") if causal and dropout and not local else None,
                (tile, "dropout") if dropout else None,
                (tile, "causal") if causal and not local else None,  # a window's cross-tile kernel spills
                (tile, "non-causal") if not (causal or local) else None, tile)
        half = (causal and d_head >= 64 and d_head not in (104, 112, 120)  # ptxas: C7511 else (see above)
                and not (local or softcap or alibi or sink or d_v))
        for knobs in _SM90_PREFERENCES[next(key for key in keys if key in _SM90_PREFERENCES)]:
            cfg = FwdSm90Config(dtype, d_head, causal=causal, local=local, softcap=softcap, alibi=alibi,
                                dropout=dropout, sink=sink, d_v=d_v, lazy_rescale=lazy_rescale(d_head, causal),
                                **knobs)
            if half:  # where this tile can halve its blocks at all (FwdSm90Config.problems)
                halves = dataclasses.replace(cfg, half_blocks=True)
                cfg = cfg if halves.problems() else halves
            cfg = with_mask_warps(cfg, seqlen_q, smem_limit)
            if not cfg.problems() and cfg.smem_bytes <= smem_limit:
                return cfg
    size = next(c for c in (64, 128, 160, 192, 256) if d_head <= c)
    key = "short" if seqlen_q <= 64 else (size, True) if (size, causal) in _PREFERENCES else size
    for knobs in _PREFERENCES[key]:
        for depth in (1, 2):  # d_head = 96 or 160 has 6 or 10 k-tiles: depth 1 always divides
            cfg = KernelConfig(dtype=dtype, d_head=d_head, causal=causal, q_frag_depth=depth,
                               k_frag_depth=depth, v_frag_depth=1, local=local, softcap=softcap, alibi=alibi,
                               dropout=dropout, sink=sink, d_v=d_v, **knobs)
            if not cfg.problems() and cfg.smem_bytes <= smem_limit:
                return cfg
    cfg.validate()  # a d_v the kernels do not build says why; the table's tiles always build
    raise ValueError(f"no flashjit kernel for dtype={dtype} d_head={d_head} fits {smem_limit // 1024} KiB "
                     "of shared memory per block")


# Measured backward choices (n_warps, block_m, d_split, group_rows) by (head-dim class,
# deterministic, dropout), best first; the first that validates (registers) and fits the GPU's
# shared memory is used, else the last resort after it. H100, bf16, docs/perf-log.md:
# - d_head <= 96 takes 8 x 128 (0.94-1.25x the speed of 8 x 64 at d64), with dropout too since
#   the mask costs no spills (1.08-1.12x of 8 x 64; deterministic 1.01-1.11x of 4 x 64).
# - d_head 128: split groups of two warps over 32 keys (squarer warp tiles: 18% fewer ldmatrix)
#   run 1.05-1.06x of 8 x 64 unsplit, 1.02-1.07x of 4 x 64 deterministic; with dropout 1.0-1.05x
#   of 8 x 64 unsplit (deterministic: 0.98-1.06x of 4 x 64).
# - d_head > 128 needs a split to hold dK/dV: groups of four warps over 32 keys run 1.06-1.09x of
#   pairs over 16 keys (d_head 160 cannot split its 20 column tiles four ways and takes pairs).
_BWD_PREFERENCES = {
    ("narrow", False, False): ((8, 128, 1, 16), (8, 64, 1, 16), (4, 64, 1, 16)),
    ("narrow", False, True): ((8, 128, 1, 16), (8, 64, 1, 16), (4, 64, 1, 16)),
    ("narrow", True, False): ((8, 128, 1, 16), (4, 64, 1, 16)),
    ("narrow", True, True): ((8, 128, 1, 16), (4, 64, 1, 16)),
    (128, False, False): ((8, 64, 2, 32), (8, 64, 1, 16), (4, 64, 1, 16)),
    (128, False, True): ((8, 64, 2, 32), (8, 64, 1, 16), (4, 64, 1, 16)),
    (128, True, False): ((8, 64, 2, 32), (4, 64, 1, 16)),
    (128, True, True): ((8, 64, 2, 32), (4, 64, 1, 16)),
    ("wide", False, False): ((8, 64, 4, 32), (8, 64, 2, 16), (8, 32, 2, 16)),
    ("wide", False, True): ((8, 64, 4, 32), (8, 64, 2, 16), (8, 32, 2, 16)),
    ("wide", True, False): ((8, 64, 4, 32), (8, 64, 2, 16), (4, 32, 2, 16)),
    ("wide", True, True): ((8, 64, 4, 32), (8, 64, 2, 16), (4, 32, 2, 16)),
}
# Deterministic, and the smallest: 49 KiB at d_head 128, 77 KiB at 192 (sm_86/sm_89 allow 99 KiB);
# d_head 256 needs 101 KiB, which only sm_80/sm_90-class GPUs have.
_BWD_LAST_RESORT = {False: (4, 64, 1, 16), True: (4, 32, 2, 16)}


# A smaller d_v lowers the estimate of the 8 x 128 tiling at d_head 72-96 to 240 registers, under the limit
# that keeps it off at d_v = d_head (256). ptxas 13.0 (sm_90a) spills it 36-84 bytes, which still ran
# 1.05x the wgmma kernel on v padded at 96/64 (H200), but 388 bytes with softcap + window + ALiBi, where
# 8 x 64 fits with none: for d_v pairs each score feature counts 8 registers more (as FwdSm90Config's).
_BWD_FEATURE_REGISTERS = 8


@functools.lru_cache(maxsize=None)
def default_bwd_config(dtype: str, d_head: int, causal: bool, local: bool = False, softcap: bool = False,
                       alibi: bool = False, dropout: bool = False, deterministic: bool = False,
                       smem_limit: int = SMEM_LIMIT_SM90, wgmma: bool = False,
                       d_v: int = 0) -> BwdConfig | BwdSm90Config:
    """The first preference that builds and fits `smem_limit` bytes of shared memory per block; if
    none does, the deterministic last resort (on GPUs with 99 KiB per block, sm_86 and sm_89, the
    d_head 128 backward is deterministic either way). Raises ValueError if even that does not fit.
    wgmma=True (the target is sm_90a) puts the Hopper kernel (BwdSm90Config) first where it exists,
    fed by its TMA producer warpgroup (tma: 1.27-1.32x the cp.async feed at S=4k, H200, docs/perf-log.md),
    d_head 129-256 included (the wide kernel: 1.43-1.61x FlashAttention-2 and 1.03-1.26x cuDNN, H200, 2026-12-04);
    a value head dim `d_v` other than d_head runs the sm_80 family (the only one that has it)."""
    d_v = 0 if d_v == d_head else d_v
    block_m = dict(WGMMA_SHAPES).get(wgmma_tile(d_head)) if wgmma and not d_v else None
    if block_m and not deterministic:  # the Hopper kernel has no deterministic variant
        cfg = BwdSm90Config(dtype, d_head, block_m, causal, local, softcap, alibi, dropout, tma=True)
        if not cfg.problems() and cfg.smem_bytes <= smem_limit:
            return cfg
    size = "wide" if d_head > 128 else 128 if head_dim_tile(d_head) == 128 else "narrow"
    choices = [(*c, deterministic) for c in _BWD_PREFERENCES[size, deterministic, dropout]]
    for n_warps, block_m, d_split, group_rows, det in choices + [(*_BWD_LAST_RESORT[d_head > 128], True)]:
        cfg = BwdConfig(dtype, d_head, n_warps, block_m, d_split, group_rows, det, causal, local, softcap, alibi,
                        dropout, d_v=d_v)
        if d_v and cfg.register_estimate() + _BWD_FEATURE_REGISTERS * (local + softcap + alibi + dropout) > 255:
            continue
        if not cfg.problems() and cfg.smem_bytes <= smem_limit:
            return cfg
    cfg.validate()  # the last resort builds; this only guards the table above
    raise ValueError(f"no flashjit backward kernel for d_head={d_head} fits {smem_limit // 1024} KiB of shared "
                     f"memory per block (the smallest, {cfg.name}, needs {cfg.smem_bytes // 1024} KiB); "
                     "use a GPU with more shared memory or FLASHJIT_BACKEND=reference")


def backward_pads_value(dtype: str, d_head: int, d_v: int, causal: bool, local: bool = False, softcap: bool = False,
                        alibi: bool = False, dropout: bool = False, deterministic: bool = False,
                        smem_limit: int = SMEM_LIMIT_SM90, wgmma: bool = False) -> bool:
    """Whether the backward of a (d_head, d_v < d_head) pair runs faster with v, out and dout zero-padded
    to d_head on the wgmma kernel than natively on the sm_80 one: on sm_90a (`wgmma`), where the wgmma
    kernel serves d_head with these features and d_head fills its tile (64 or 128), so padding v adds no
    column the native kernel's tile did not already hold for q. Measured on an H200 (bf16, S=4k, 16k tokens,
    TFLOP/s, causal 0/1): 128/64 natively 240/212, padded on wgmma 281/250; 96/64 natively 251/226,
    padded 239/212 (the wgmma tile is 128 wide, a quarter of it padding at d96); 192/128 and the other
    pairs of the wide kernel (d_head > 128), and pairs with d_v below d_head / 2, stay native (not measured)."""
    if not wgmma or not d_head / 2 <= d_v < d_head or head_dim_tile(d_head) != wgmma_tile(d_head):
        return False  # a d_v below d_head / 2 (unmeasured) would have the padding more than double V's work
    if d_head > 128:  # the wide kernel (d_head 129-256) against the native d_v kernel: not measured
        return False
    chosen = default_bwd_config(dtype, d_head, causal, local, softcap, alibi, dropout, deterministic=deterministic,
                                smem_limit=smem_limit, wgmma=wgmma)
    return isinstance(chosen, BwdSm90Config)


# backward_splits_heads: the kv-head grid, in waves of one CTA per SM, below which the wgmma backward
# runs one dK/dV CTA per query head instead: causal (uneven CTAs; the wide kernel, d_head > 128, has
# 64-key CTAs and gains from splitting up to larger grids), and without a mask (even ones).
HEAD_SPLIT_WAVES_CAUSAL = 4
HEAD_SPLIT_WAVES_CAUSAL_WIDE = 16
HEAD_SPLIT_WAVES = 0.75


def backward_splits_heads(batch: int, heads: int, heads_k: int, seqlen_k: int, block_n: int, sm_count: int,
                          causal: bool, wide: bool = False) -> bool:
    """Whether the wgmma backward of a GQA call (heads > heads_k) runs one dK/dV CTA per query head,
    adding dK/dV to fp32 sums and rounding them afterwards, instead of one per key/value head walking
    the whole group. Measured on an H200 (132 SMs; bf16, kernels alone, TFLOP/s split vs group;
    docs/perf-log.md, twenty-sixth session, split grids in rows of (batch, query head)). Causal, the
    first key blocks' CTAs walk every query block and the last ones almost none, so a short grid ends
    on a few long CTAs. The narrow kernel (d <= 128, 128-key CTAs): split won 1.35-1.55x at 128 kv-head
    CTAs (B=2 S=2k 32/4, B=1 S=4k 16/4), 1.00-1.03x at 512 (B=1 S=8k 32/8), level at 1024 and lost
    0.98x at 2048. The wide kernel (64-key CTAs, d192/d256): split won 1.25-1.34x at 256 (B=2 S=2k 32/4)
    but lost 0.94-0.99x at the other 256 (B=1 S=4k 16/4), won 1.14-1.19x at 1024 (B=1 S=8k 32/8) and
    1.08x at 2048 (d256, B=2), lost 0.95x at 4096 (B=4). Without a mask every CTA has the same work and
    the fp32 sums cost: group won 1.01-1.05x at 512-1024 kv-head CTAs (d128, d256 S=8k 32/8), so it
    splits only a grid that leaves SMs idle: at 64 kv-head CTAs (S=1k, B=1 32/8 and B=2 32/4) split won
    1.23-1.59x (thirteenth session)."""
    if heads <= heads_k:
        return False
    ctas = batch * heads_k * -(-seqlen_k // block_n)
    waves = (HEAD_SPLIT_WAVES_CAUSAL_WIDE if wide else HEAD_SPLIT_WAVES_CAUSAL) if causal else HEAD_SPLIT_WAVES
    return ctas < waves * sm_count


def with_head_split(config, batch: int, heads: int, heads_k: int, seqlen_k: int, sm_count: int):
    """The dispatcher's backward config for a call's shape: a BwdSm90Config with head_split set where
    backward_splits_heads says so, else config as it is."""
    if isinstance(config, BwdSm90Config) and not config.head_split and backward_splits_heads(
            batch, heads, heads_k, seqlen_k, config.block_n, sm_count, config.causal, config.wide):
        return dataclasses.replace(config, head_split=True)
    return config


# causal_walk: a persistent causal grid's tiles, each CTA's list, fixed on the host. The kernel's own static
# walk (kernels/fwd_sm90.cuh: tile_of, odd rounds reversed) serves grids past WALK_MAX_ROUNDS rounds (rounds of
# mixed lengths average out; the simulation's cost stays ~ms) and calls made while a CUDA graph is captured.
WALK_MAX_ROUNDS = 32
# A tile's fixed cost in the walk's model, in key blocks (its Q's wait, the diagonal's mask, the epilogue): 1.5,
# fit to the forty-seventh session's A/B (H100, bf16, causal, two processes each): lists made with 2 / 3 / 4 ran
# d128 1k +6.9 / +5.2 / +6.0% and d96 1k +7.8 / +5.8 / +7.9% over 1's, and -3.2 to +1.9% at 2k-4k; simulated
# with a true cost of 1.5 the lists give +6.8 / +4.6 / +5.2% and +7.6 / +4.7 / +8.0% at 1k and +0.3 to -2.8% at
# 2k-4k, with a true cost of 1 (the model before) -2 to -5% at 1k. (Halves keep the simulation's sums exact, so
# ties, and the lists, are the same in every process.) Short rows are where the model matters: a 1k row of
# 128-row tiles has tiles of 1-8 key blocks.
WALK_TILE_COST = 1.5


@functools.lru_cache(maxsize=1024)
def causal_walk(rows: int, seqlen_q: int, seqlen_k: int, block_m: int, block_n: int, ctas: int) -> tuple | None:
    """The tiles each CTA of the persistent Hopper forward takes on a causal dense grid of `rows` rows (batch *
    heads) of query tiles, `ctas` CTAs at most (SMs * ctas_per_sm): what one CTA per tile gets from the hardware,
    which hands each tile to whichever SM frees first, in common/grid_order.cuh's longest_first order (rows
    together, longest first, the last two waves' rows block-outermost), simulated with a tile's time its key
    blocks plus WALK_TILE_COST blocks' worth of fixed cost, so that the persistent kernel (its rings and, with
    cross_tile, its pipeline running on across tiles) keeps that balance. Its static walk does not: simulated
    (a tile's cost one block) at 16k tokens (132 SMs), d128 causal 0.97 of ideal at S = 1k-8k and 0.65 at 16k,
    d64 0.84 / 0.79 at 8k / 16k, d256 0.66 / 0.56, where this list reaches 0.98-0.997 (the order the simulation matched on the H200, d64
    causal: persistent 1.02-1.12x one CTA per tile where the walk balanced, 0.92x where it did not).
    As kernels/fwd_sm90.cuh's tile_of reads it: (grid, grid + 1 offsets into the tiles, the tiles), a tile
    numbered row * num_m + block, block 0 the row's last (longest) query block; None past WALK_MAX_ROUNDS
    or for no tile."""
    num_m = -(-seqlen_q // block_m)
    tiles = rows * num_m
    if not tiles or tiles > WALK_MAX_ROUNDS * ctas:
        return None
    grid = min(tiles, ctas)
    blocks_k = -(-seqlen_k // block_n)

    def work(block: int) -> float:  # key blocks (as Tile's j_end for bottom-right causal rows) + a tile's cost
        q_row0 = (num_m - 1 - block) * block_m
        last_col = min(q_row0 + block_m, seqlen_q) - 1 + seqlen_k - seqlen_q
        return (0 if last_col < 0 else min(blocks_k, last_col // block_n + 1)) + WALK_TILE_COST

    tail = min(rows, -(-2 * ctas // num_m))
    together = (rows - tail) * num_m
    order = [i if i < together else (rows - tail + (i - together) % tail) * num_m + (i - together) // tail
             for i in range(tiles)]
    free = [(0, c) for c in range(grid)]  # (time it frees, CTA): ties to the lower CTA
    lists = [[] for _ in range(grid)]
    for tile in order:
        at, cta = free[0]
        lists[cta].append(tile)
        heapq.heapreplace(free, (at + work(tile % num_m), cta))
    offsets = list(itertools.accumulate((len(t) for t in lists), initial=0))
    return (grid, *offsets, *itertools.chain.from_iterable(lists))


# Rows of more query blocks than this take one CTA a tile (where the grid is within WALK_MAX_ROUNDS): the walk's
# lists, fixed from a model of each tile's time, drift from the real times over a CTA's many tiles of very
# different lengths, where the hardware hands each tile to the SM that is actually free (thirty-sixth session, H100,
# bf16 16k tokens, one process, persistent with the lists against one CTA a tile: d128 causal 8k (64 blocks)
# 579.6 / 567.9, B=1 8k 32/8 565.0 / 561.0, d64 8k (43) 463.6 / 454.7, B=1 8k 32/8 475.6 / 462.8; 16k: d128
# (128 blocks) 605.2 / 615.7 and 588.7 / 599.2, d64 (86) 481.1 / 487.9 and 473.8 / 472.3).
WALK_MAX_BLOCKS = 64


def with_tile_walk(config, grid: tuple | None, seqlen_q: int, sm_count: Callable[[], int]):
    """The dispatcher's forward config for a call's grid, (batch, heads) of a dense call or None for a
    variable-length batch (sm_count: the device's SMs, asked only for long causal rows): a persistent
    FwdSm90Config launches one CTA per tile instead for a varlen batch, whose tiles' lengths the host cannot
    see (cu_seqlens live on the device) and whose mixed lengths unbalance a static walk (simulated for ~16k
    tokens of 256-4096-token sequences at d64: 0.80-0.90 of ideal against 0.96-0.97 for one CTA per tile),
    and for a causal grid of rows longer than WALK_MAX_BLOCKS query blocks within WALK_MAX_ROUNDS rounds
    (beyond, its static walk balances). Other causal grids keep it, walking causal_walk's lists (interface.py
    hands them to the kernel); the two-CTA kernels' short rows too: one CTA a tile led there from 6 blocks
    (fifty-first session, H100, bf16 16k tokens, three interleaved rounds, two processes, TFLOP/s persistent ->
    one CTA a tile: 1k 304.9 -> 316.7 and 311.5 -> 318.2) until a warpgroup passed over the blocks it cannot see
    (fwd_sm90's pass_over); since, the lists lead at every length those kernels run (fifty-third session, same
    method: 512 263.2 / 262.5 against 243.4 / 244.5, 768 312.2 / 309.6 against 297.0 / 296.0, 1k 329.8 / 336.6
    against 328.8 / 327.6)."""
    if not (isinstance(config, FwdSm90Config) and config.persistent):
        return config
    if grid is None:
        return config.one_cta_per_tile()
    if not config.causal or config.local:
        return config
    num_m = -(-seqlen_q // config.block_m)
    long_rows = num_m > WALK_MAX_BLOCKS and \
        grid[0] * grid[1] * num_m <= WALK_MAX_ROUNDS * sm_count() * config.ctas_per_sm
    return config.one_cta_per_tile() if long_rows else config


def get_kernels_to_build(smem_limit: int = SMEM_LIMIT_SM90, arch: str | None = None) -> list:
    """The default build set for `arch` (None: any, so no sm_90a-only kernel): the dispatcher's
    choice for every dtype, tile-width head dim (HEAD_DIMS) and causal flag at long, short (SHORT_CAUSAL,
    SHORT) and decoding-like sequence lengths and GQA grids short or not (what `python -m flashjit precompile`
    builds without names). Other head dims, e.g. 80, are kernels of their own (their d_head is a
    template parameter): precompile names them."""
    configs = []
    seqlens = (4096, SHORT_CAUSAL, SHORT, 1)
    for dtype, d_head, causal, seqlen in itertools.product(DTYPES, HEAD_DIMS, (False, True), seqlens):
        cfg = default_config(dtype, d_head, causal, seqlen, smem_limit, arch=arch)
        # and a persistent kernel's one-CTA-per-tile twin, which with_tile_walk picks for some grids
        twins = (cfg.one_cta_per_tile(),) if isinstance(cfg, FwdSm90Config) and cfg.persistent else ()
        for cfg in (cfg, *twins):
            if cfg not in configs:
                configs.append(cfg)
    for dtype, d_head, causal, det in itertools.product(DTYPES, HEAD_DIMS, (False, True), (False, True)):
        try:
            cfg = default_bwd_config(dtype, d_head, causal, deterministic=det, smem_limit=smem_limit,
                                     wgmma=arch == WGMMA_ARCH)
        except ValueError:  # d_head 256 on a 99 KiB GPU: no backward fits
            continue
        # and its one-CTA-per-query-head twin, which with_head_split picks for short GQA grids
        for cfg in (cfg, dataclasses.replace(cfg, head_split=True)) if isinstance(cfg, BwdSm90Config) else (cfg,):
            if cfg not in configs:
                configs.append(cfg)
    return configs


def get_autotuning_bwd_configs(dtype: str = "bf16", d_head: int = 128, causal: bool = False,
                               deterministic: bool = False, arch: str | None = None) -> list:
    """The backward's search space for `flashjit tune`: every sm_80-kernel tiling (warps, block_m,
    d_split, group_rows) that builds in this mode, and on sm_90a the wgmma kernel's block_m choices
    (it has no deterministic variant)."""
    out = []
    for n_warps, block_m, d_split, group_rows in itertools.product(WARPS, BWD_BLOCK_M, BWD_D_SPLIT, BWD_GROUP_ROWS):
        cfg = BwdConfig(dtype, d_head, n_warps, block_m, d_split, group_rows, deterministic, causal)
        if not cfg.problems():
            out.append(cfg)
    if arch == WGMMA_ARCH and not deterministic:
        out += [c for c in (BwdSm90Config(dtype, d_head, block_m, causal) for block_m in (64, 128)) if not c.problems()]
    return out


def get_autotuning_kernel_configs(dtype: str = "bf16", d_head: int = 128, causal: bool = False,
                                  exhaustive: bool = False, arch: str | None = None) -> list:
    """The search space for `flashjit.tune`. On sm_90a (`arch`): the Hopper family's tiles, stages,
    overlap, ping-pong, persistence, the cross-tile pipeline and half blocks (every combination that builds),
    with lazy rescaling as the dispatcher has it for (d_head, causal) (exhaustive=True: both ways). Else
    the sm_80 kernel's: by default the knobs that only ever help (cp.async, eager loading, swizzling,
    the fused softmax) stay on; exhaustive=True varies them too."""
    if arch == WGMMA_ARCH:
        out = []
        rescales = (False, True) if exhaustive else (lazy_rescale(d_head, causal),)
        for block_m, block_n, stages, overlap, pingpong, persistent, cross_tile, half_blocks, lazy in itertools.product(
                BLOCK_M, BLOCK_N, STAGES, (True, False), (True, False), (False, True), (False, True),
                (False, True) if causal else (False,), rescales):  # non-causal rows: only a short last block halves
            cfg = FwdSm90Config(dtype, d_head, block_m, block_n, stages, overlap, pingpong, persistent, causal,
                                cross_tile=cross_tile, half_blocks=half_blocks, lazy_rescale=lazy)
            if not cfg.problems():
                out.append(cfg)
        return out
    flags = (True, False) if exhaustive else (True,)
    depths = (0, 1, 2, 4)
    out = []
    for B_r, B_c, n_warps, ac, el, sw, fq, fk, fv, db, os_ in itertools.product(
            BLOCK_ROWS, BLOCK_COLS, WARPS, flags, flags, flags, depths, depths, depths, (True, False), flags):
        cfg = KernelConfig(dtype, d_head, B_r, B_c, n_warps, ac, el, sw, fq, fk, fv, db, os_, causal)
        if not cfg.problems():
            out.append(cfg)
    return out

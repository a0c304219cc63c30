"""BwdConfig (both backward kernels), the dispatcher's defaults, the build set and the autotuning
space. KernelConfig (flashjit/configs/fwd_sm80.py) and what every config shares
(flashjit/configs/common.py) moved to the family modules and are importable from here too.
"""
from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass

from .configs.common import (DTYPES, FEATURES, HEAD_DIMS, MAX_HEAD_DIM, REGISTER_LIMIT, SMEM_LIMIT_SM90, WARPS,
                             WHY_HEAD_DIM, _Validated, features_suffix, head_dim_problem, head_dim_tile,
                             smem_limit_for_arch)
from .configs.fwd_sm80 import (BLOCK_COLS, BLOCK_ROWS, WHY_DEPTH, WHY_DOUBLE_BUFFER, WHY_EAGER, WHY_REGISTERS,
                               WHY_WARP_ROWS, KernelConfig)

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


@functools.lru_cache(maxsize=None)
def default_config(dtype: str, d_head: int, causal: bool, seqlen_q: int = 4096,
                   smem_limit: int = SMEM_LIMIT_SM90, local: bool = False, softcap: bool = False,
                   alibi: bool = False, dropout: bool = False) -> KernelConfig:
    """The dispatcher's choice when no tuned entry exists for (dtype, d_head, causal, seqlen_q) on a
    device allowing `smem_limit` bytes of shared memory per block. A single short block of queries
    (decoding-like, Sq <= 64) gets a 64-row tile rather than wasting half of a 128-row one."""
    size = next(c for c in (64, 128, 160, 192, 256) if d_head <= c)
    key = "short" if seqlen_q <= 64 else (size, True) if (size, causal) in _PREFERENCES else size
    for knobs in _PREFERENCES[key]:
        for depth in (1, 2):  # d_head = 96 or 160 has 6 or 10 k-tiles: depth 1 always divides
            cfg = KernelConfig(dtype=dtype, d_head=d_head, causal=causal, q_frag_depth=depth,
                               k_frag_depth=depth, v_frag_depth=1, local=local, softcap=softcap, alibi=alibi,
                               dropout=dropout,
                               **knobs)
            if not cfg.problems() and cfg.smem_bytes <= smem_limit:
                return cfg
    raise ValueError(f"no flashjit kernel for dtype={dtype} d_head={d_head} fits {smem_limit // 1024} KiB "
                     "of shared memory per block")


WHY_BWD_REGISTERS = "the backward accumulators of this config need more than 255 registers"
WHY_BWD_STAGING = ("dK/dV are staged through the Q / dO tiles: 2 * block_m must be at least the block's "
                   "group_rows * n_warps / d_split keys")
WHY_BWD_DQ_TILING = "no warp tiling of the fused dQ product"
WHY_BWD_SHARES = "each warp's share of a score block must be whole 16-wide k-tiles"
WHY_BWD_COLUMNS = "each warp's share of the head dim must be whole 16-column pairs"
# The reasons, shared verbatim with the static_asserts in kernels/bwd_sm90.cuh.
WHY_WGMMA_WARPS = "the wgmma backward runs two warpgroups of 64 keys: n_warps=8, d_split=1, group_rows=16"
WHY_WGMMA_SHAPES = "the wgmma backward supports d_head 33-64 with block_m 128 and 65-128 with block_m 64"
WHY_WGMMA_VARIANTS = "the wgmma backward has no deterministic variant"
WHY_WGMMA_SOFTCAP = "softcap's factors push the d_head 64 wgmma backward (128-query steps) past 255 registers"
WGMMA_SHAPES = ((64, 128), (128, 64))  # (tile width, block_m)


def wgmma_tile(d_head: int) -> int:
    """The wgmma backward's tile width (kernels/bwd_sm90.cuh: Config::kD): 64 or 128, one or two
    64-column swizzle blocks, never 96. Measured on an H200 (docs/perf-log.md): at d_head 80 its 128
    tile ran 1.10-1.17x FA2 where the sm_80 kernel's 96 tile ran 0.98-1.04x; at d_head 32 its 64
    tile ran 0.76-0.86x FA2, so head dims up to 32 keep the sm_80 kernel's own 32 tile."""
    if 32 < d_head <= 64:
        return 64
    return 128 if 64 < d_head <= 128 else head_dim_tile(d_head)
WGMMA_ARCH = "sm_90a"
BWD_BLOCK_M = (32, 64, 128)
BWD_D_SPLIT = (1, 2, 4)
BWD_GROUP_ROWS = (16, 32)


@dataclass(frozen=True)
class BwdConfig(_Validated):
    """One backward specialization (kernels/bwd_sm80.cuh): dtype, d_head, n_warps, block_m (queries
    per dK/dV step), d_split and group_rows (a group of d_split warps owns group_rows accumulator
    rows, each warp d_head / d_split of the columns, so a dK/dV CTA covers group_rows * n_warps /
    d_split keys; a split group shares its score rows through shared memory, which lets head dims
    above 128 fit their accumulators in registers and makes each warp's tiles squarer),
    deterministic (dQ by a separate kernel that recomputes P and dP, bit-identical run to run; else
    dQ is added up with fp32 atomics inside the dK/dV kernel: 5 matrix products per block pair
    instead of 7), causal and the score features. Always cp.async, swizzled shared memory and the
    fused exp2 softmax."""

    dtype: str = "bf16"
    d_head: int = 128
    n_warps: int = 4
    block_m: int = 64
    d_split: int = 1
    group_rows: int = 16
    deterministic: bool = False
    causal: bool = False
    local: bool = False
    softcap: bool = False
    alibi: bool = False
    dropout: bool = False
    wgmma: bool = False

    # Sizes and rules mirror flashjit::bwd::Config (kernels/bwd_sm80.cuh) and, with wgmma,
    # flashjit::bwd_sm90::Config (kernels/bwd_sm90.cuh); tests/test_jit_cache.py checks smem_bytes
    # against the compiled kernel.
    @property
    def d_tile(self) -> int:
        return wgmma_tile(self.d_head) if self.wgmma else head_dim_tile(self.d_head)

    @property
    def block_n(self) -> int:
        return self.group_rows * self.n_warps // self.d_split

    @property
    def smem_bytes(self) -> int:
        if self.wgmma:  # 1 KiB alignment slack, K, V, two stages of Q and dO, dS^T, lse and D, dQ staging
            return 1024 + 2 * 2 * self.block_n * self.d_tile + 4 * 2 * self.block_m * self.d_tile + \
                2 * self.block_n * self.block_m + 2 * 2 * self.block_m * 4 + self.n_warps * 16 * 64 * 4
        n_tile, m_tile, score_tile = (2 * self.block_n * self.d_tile, 2 * self.block_m * self.d_tile,
                                      2 * self.block_n * self.block_m)
        split = self.d_split > 1
        ds_stages = (1 if split else 0) if self.deterministic else 2
        dkdv = 2 * n_tile + 4 * m_tile + 2 * 2 * self.block_m * 4 + (ds_stages + split) * score_tile
        dq = 6 * n_tile + (2 * self.block_n ** 2 if split else 0)
        return max(dkdv, dq) if self.deterministic else dkdv

    def register_estimate(self) -> int:
        acc_tiles, row_tiles = self.d_tile // 8 // self.d_split, self.group_rows // 16
        dkdv = row_tiles * (2 * acc_tiles * 4 + 2 * (self.block_m // self.d_split // 8) * 4) + 32
        dq = row_tiles * (acc_tiles * 4 + 2 * (self.block_n // self.d_split // 8) * 4) + 32
        return max(dkdv, dq) if self.deterministic else dkdv

    def _dq_tiling(self) -> int:
        """m-tiles per warp of the fused dQ product (Config::dq_m_tiles), 0 if no tiling fits."""
        n_tiles = self.d_tile // 8
        for m_tiles in (2, 4, 1):
            rows = self.block_m // (16 * m_tiles)
            if rows < 1 or self.block_m % (16 * m_tiles) or self.n_warps % rows:
                continue
            cols = self.n_warps // rows
            if n_tiles % cols == 0 and (n_tiles // cols) % 2 == 0:
                return m_tiles
        return 0

    def problems(self) -> list[str]:
        out = self._choices(dtype=DTYPES, n_warps=WARPS, block_m=BWD_BLOCK_M, d_split=BWD_D_SPLIT,
                            group_rows=BWD_GROUP_ROWS) + head_dim_problem(self.d_head)
        if out:
            return out
        if self.wgmma:
            return self._wgmma_problems()
        if (self.block_m // self.d_split) % 16 or (self.block_n // self.d_split) % 16:
            out.append(f"{WHY_BWD_SHARES} (block_m={self.block_m} and {self.block_n} keys over d_split={self.d_split})")
        if (self.d_tile // 8 // self.d_split) % 2:
            out.append(f"{WHY_BWD_COLUMNS} (d_head={self.d_head} in a {self.d_tile} tile, d_split={self.d_split})")
        if 2 * self.block_m < self.block_n:
            out.append(f"{WHY_BWD_STAGING} (block_m={self.block_m}, {self.block_n} keys)")
        if not self.deterministic and not self._dq_tiling():
            out.append(f"{WHY_BWD_DQ_TILING} (d_head={self.d_head}, n_warps={self.n_warps}, block_m={self.block_m})")
        if self.register_estimate() > REGISTER_LIMIT:
            out.append(f"{WHY_BWD_REGISTERS} (about {self.register_estimate()}); use fewer warps, a smaller block_m "
                       "or d_split=2")
        return out

    def _wgmma_problems(self) -> list[str]:
        out = []
        if (self.n_warps, self.d_split, self.group_rows) != (8, 1, 16):
            out.append(f"{WHY_WGMMA_WARPS} (n_warps={self.n_warps}, d_split={self.d_split}, "
                       f"group_rows={self.group_rows})")
        if (self.d_tile, self.block_m) not in WGMMA_SHAPES:
            out.append(f"{WHY_WGMMA_SHAPES} (d_head={self.d_head} in a {self.d_tile} tile, block_m={self.block_m})")
        if self.deterministic:
            out.append(WHY_WGMMA_VARIANTS)
        if self.softcap and self.block_m == 128:
            out.append(WHY_WGMMA_SOFTCAP)
        return out

    @functools.cached_property
    def name(self) -> str:
        return (f"bwd_{self.dtype}_d{self.d_head}_w{self.n_warps}_m{self.block_m}_s{self.d_split}_r{self.group_rows}"
                f"_det{int(self.deterministic)}_causal{int(self.causal)}{features_suffix(self)}"
                f"{'_wgmma' if self.wgmma else ''}")

    _NAME_RE = re.compile(r"^bwd_(?P<dtype>fp16|bf16)_d(?P<d_head>\d+)_w(?P<n_warps>\d+)_m(?P<block_m>\d+)"
                          r"_s(?P<d_split>\d+)_r(?P<group_rows>\d+)_det(?P<det>[01])_causal(?P<causal>[01])"
                          r"(?P<local>_local)?(?P<softcap>_softcap)?(?P<alibi>_alibi)?(?P<dropout>_dropout)?"
                          r"(?P<wgmma>_wgmma)?$")

    @classmethod
    def from_name(cls, name: str) -> "BwdConfig":
        match = cls._NAME_RE.match(name)
        if not match:
            raise ValueError(f"{name!r} is not a flashjit backward kernel name (expected e.g. {cls().name!r})")
        return cls(match["dtype"], int(match["d_head"]), int(match["n_warps"]), int(match["block_m"]),
                   int(match["d_split"]), int(match["group_rows"]), bool(int(match["det"])), bool(int(match["causal"])),
                   *(match[f] is not None for f in FEATURES), match["wgmma"] is not None)


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


@functools.lru_cache(maxsize=None)
def default_bwd_config(dtype: str, d_head: int, causal: bool, local: bool = False, softcap: bool = False,
                       alibi: bool = False, dropout: bool = False, deterministic: bool = False,
                       smem_limit: int = SMEM_LIMIT_SM90, wgmma: bool = False) -> BwdConfig:
    """The first preference that builds and fits `smem_limit` bytes of shared memory per block; if
    none does, the deterministic last resort (on GPUs with 99 KiB per block, sm_86 and sm_89, the
    d_head 128 backward is deterministic either way). Raises ValueError if even that does not fit.
    wgmma=True (the target is sm_90a) puts the Hopper kernel first where it exists."""
    block_m = dict(WGMMA_SHAPES).get(wgmma_tile(d_head)) if wgmma else None
    if block_m:
        cfg = BwdConfig(dtype, d_head, 8, block_m, 1, 16, deterministic, causal, local, softcap, alibi, dropout, True)
        if not cfg.problems() and cfg.smem_bytes <= smem_limit:
            return cfg
    size = "wide" if d_head > 128 else 128 if head_dim_tile(d_head) == 128 else "narrow"
    choices = [(*c, deterministic) for c in _BWD_PREFERENCES[size, deterministic, dropout]]
    for n_warps, block_m, d_split, group_rows, det in choices + [(*_BWD_LAST_RESORT[d_head > 128], True)]:
        cfg = BwdConfig(dtype, d_head, n_warps, block_m, d_split, group_rows, det, causal, local, softcap, alibi,
                        dropout)
        if not cfg.problems() and cfg.smem_bytes <= smem_limit:
            return cfg
    cfg.validate()  # the last resort builds; this only guards the table above
    raise ValueError(f"no flashjit backward kernel for d_head={d_head} fits {smem_limit // 1024} KiB of shared "
                     f"memory per block (the smallest, {cfg.name}, needs {cfg.smem_bytes // 1024} KiB); "
                     "use a GPU with more shared memory or FLASHJIT_BACKEND=reference")


def config_from_name(name: str):
    """A KernelConfig or BwdConfig from its canonical name."""
    return BwdConfig.from_name(name) if name.startswith("bwd_") else KernelConfig.from_name(name)


def get_kernels_to_build(smem_limit: int = SMEM_LIMIT_SM90, arch: str | None = None) -> list[KernelConfig]:
    """The default build set for `arch` (None: any, so no sm_90a-only kernel): the dispatcher's
    choice for every dtype, tile-width head dim (HEAD_DIMS) and causal flag at long and short sequence
    lengths (what `python -m flashjit precompile` builds without names). Other head dims, e.g. 80, are
    kernels of their own (their d_head is a template parameter): precompile names them."""
    configs = []
    for dtype, d_head, causal, seqlen in itertools.product(DTYPES, HEAD_DIMS, (False, True), (4096, 1)):
        cfg = default_config(dtype, d_head, causal, seqlen, smem_limit)
        if cfg not in configs:
            configs.append(cfg)
    for dtype, d_head, causal, det in itertools.product(DTYPES, HEAD_DIMS, (False, True), (False, True)):
        try:
            cfg = default_bwd_config(dtype, d_head, causal, deterministic=det, smem_limit=smem_limit,
                                     wgmma=arch == WGMMA_ARCH)
        except ValueError:  # d_head 256 on a 99 KiB GPU: no backward fits
            continue
        if cfg not in configs:
            configs.append(cfg)
    return configs


def get_autotuning_kernel_configs(dtype: str = "bf16", d_head: int = 128, causal: bool = False,
                                  exhaustive: bool = False) -> list[KernelConfig]:
    """The search space for `flashjit.tune`. By default the knobs that only ever help (cp.async,
    eager loading, swizzling, the fused softmax) stay on; exhaustive=True varies them too."""
    flags = (True, False) if exhaustive else (True,)
    depths = (0, 1, 2, 4)
    out = []
    for B_r, B_c, n_warps, ac, el, sw, fq, fk, fv, db, os_ in itertools.product(
            BLOCK_ROWS, BLOCK_COLS, WARPS, flags, flags, flags, depths, depths, depths, (True, False), flags):
        cfg = KernelConfig(dtype, d_head, B_r, B_c, n_warps, ac, el, sw, fq, fk, fv, db, os_, causal)
        if not cfg.problems():
            out.append(cfg)
    return out


# Defined here or moved to flashjit/configs/: all still importable from flashjit.config.
__all__ = [
    "DTYPES", "FEATURES", "HEAD_DIMS", "MAX_HEAD_DIM", "REGISTER_LIMIT", "SMEM_LIMIT_SM90", "WARPS", "WHY_HEAD_DIM",
    "_Validated", "features_suffix", "head_dim_problem", "head_dim_tile", "smem_limit_for_arch", "BLOCK_COLS",
    "BLOCK_ROWS", "WHY_DEPTH", "WHY_DOUBLE_BUFFER", "WHY_EAGER", "WHY_REGISTERS", "WHY_WARP_ROWS", "KernelConfig",
    "default_config", "WHY_BWD_REGISTERS", "WHY_BWD_STAGING", "WHY_BWD_DQ_TILING", "WHY_BWD_SHARES",
    "WHY_BWD_COLUMNS", "WHY_WGMMA_WARPS", "WHY_WGMMA_SHAPES", "WHY_WGMMA_VARIANTS", "WHY_WGMMA_SOFTCAP",
    "WGMMA_SHAPES", "wgmma_tile", "WGMMA_ARCH", "BWD_BLOCK_M", "BWD_D_SPLIT", "BWD_GROUP_ROWS", "BwdConfig",
    "default_bwd_config", "config_from_name", "get_kernels_to_build", "get_autotuning_kernel_configs",
]

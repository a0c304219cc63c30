"""The sm_80 backward family (kernels/bwd_sm80.cuh, runs on sm_80 and newer): BwdConfig, its
validation and its canonical name.

Each field maps one-to-one onto a template parameter of ``flashjit::bwd::Config``; every rule
``problems()`` enforces is also a ``static_assert`` there with the same message (FAMILY.reasons).
"""
from __future__ import annotations

import functools
import re
import warnings
from dataclasses import InitVar, dataclass, fields

from .common import (D_V_RE, DTYPES, FEATURES, FEATURES_RE, REGISTER_LIMIT, WARPS, WHY_HEAD_DIM, WHY_HEAD_DIM_V,
                     ConfigBase, d_v_suffix, features_suffix, head_dim_problem, head_dim_tile, head_dim_v_problem)
from .registry import Family

BWD_BLOCK_M = (32, 64, 128)
BWD_D_SPLIT = (1, 2, 4)
BWD_GROUP_ROWS = (16, 32)

# The reasons, shared verbatim with the static_asserts in kernels/bwd_sm80.cuh.
WHY_BWD_REGISTERS = "the backward accumulators of this config need more than 255 registers"
WHY_BWD_STAGING = ("dK/dV are staged through the Q / dO tiles: 2 * block_m must be at least the block's "
                   "group_rows * n_warps / d_split keys")
WHY_BWD_DQ_TILING = "no warp tiling of the fused dQ product"
WHY_BWD_SHARES = "each warp's share of a score block must be whole 16-wide k-tiles"
WHY_BWD_COLUMNS = "each warp's share of the head dim must be whole 16-column pairs"


@dataclass(frozen=True)
class BwdConfig(ConfigBase):
    """One backward specialization (kernels/bwd_sm80.cuh): dtype, d_head, n_warps, block_m (queries
    per dK/dV step), d_split and group_rows (a group of d_split warps owns group_rows accumulator
    rows, each warp d_head / d_split of the columns, so a dK/dV CTA covers group_rows * n_warps /
    d_split keys; a split group shares its score rows through shared memory, which lets head dims
    above 128 fit their accumulators in registers and makes each warp's tiles squarer),
    deterministic (dQ by a separate kernel that recomputes P and dP, bit-identical run to run; else
    dQ is added up with fp32 atomics inside the dK/dV kernel: 5 matrix products per block pair
    instead of 7), causal and the score features. Always cp.async, swizzled shared memory and the
    fused exp2 softmax. d_v: v's head dim when it differs from d_head (0 = d_head; a multiple of 8 up
    to d_head), as KernelConfig. The sm_90a backward is BwdSm90Config."""

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
    # Deprecated, not a field: wgmma=True was the sm_90a kernel, now BwdSm90Config (see __new__).
    wgmma: InitVar[bool] = False
    d_v: int = 0  # after wgmma, which callers may still pass positionally

    def __post_init__(self, wgmma):
        super().__post_init__()

    _WHAT = "backward kernel"

    def __new__(cls, *args, **kwargs):
        """BwdConfig(..., wgmma=True), the sm_90a kernel's spelling before it had a class of its own,
        still gives that kernel's config, a BwdSm90Config, with a DeprecationWarning."""
        given = dict(zip([f.name for f in fields(cls) if f.name != "d_v"] + ["wgmma", "d_v"], args), **kwargs)
        if not given.get("wgmma"):
            return super().__new__(cls)
        from .bwd_sm90 import from_wgmma_bwd_config  # only here: the sm_80 family needs nothing else of it

        warnings.warn("BwdConfig(..., wgmma=True) is deprecated: use flashjit.BwdSm90Config(dtype, d_head, "
                      "block_m, causal, ...)", DeprecationWarning, stacklevel=2)
        return from_wgmma_bwd_config({**{f.name: f.default for f in fields(cls)}, **given})

    # Sizes and rules mirror flashjit::bwd::Config (kernels/bwd_sm80.cuh); tests/test_jit_cache.py
    # checks smem_bytes against the compiled kernel.
    @property
    def d_tile(self) -> int:
        return head_dim_tile(self.d_head)

    @property
    def d_tile_v(self) -> int:
        return head_dim_tile(self.head_dim_v)

    @property
    def block_n(self) -> int:
        return self.group_rows * self.n_warps // self.d_split

    @property
    def smem_bytes(self) -> int:
        # K and Q tiles are d_tile wide, V and dO tiles d_tile_v (2 bytes an element).
        n_tiles, m_tiles = 2 * self.block_n * (self.d_tile + self.d_tile_v), 2 * self.block_m * (self.d_tile + self.d_tile_v)
        score_tile = 2 * self.block_n * self.block_m
        split = self.d_split > 1
        ds_stages = (1 if split else 0) if self.deterministic else 2
        dkdv = n_tiles + 2 * m_tiles + 2 * 2 * self.block_m * 4 + (ds_stages + split) * score_tile
        dq = 3 * n_tiles + (2 * self.block_n ** 2 if split else 0)
        return max(dkdv, dq) if self.deterministic else dkdv

    def register_estimate(self) -> int:
        acc_tiles, row_tiles = self.d_tile // 8 // self.d_split, self.group_rows // 16
        acc_tiles_v = self.d_tile_v // 8 // self.d_split
        dkdv = row_tiles * ((acc_tiles + acc_tiles_v) * 4 + 2 * (self.block_m // self.d_split // 8) * 4) + 32
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
        out += head_dim_v_problem(self.d_head, self.d_v)
        if out:
            return out
        if (self.block_m // self.d_split) % 16 or (self.block_n // self.d_split) % 16:
            out.append(f"{WHY_BWD_SHARES} (block_m={self.block_m} and {self.block_n} keys over d_split={self.d_split})")
        for what, dim, tile in (("d_head", self.d_head, self.d_tile), ("d_v", self.head_dim_v, self.d_tile_v)):
            if (tile // 8 // self.d_split) % 2 and (what == "d_head" or self.d_v):
                out.append(f"{WHY_BWD_COLUMNS} ({what}={dim} in a {tile} tile, d_split={self.d_split})")
        if 2 * self.block_m < self.block_n:
            out.append(f"{WHY_BWD_STAGING} (block_m={self.block_m}, {self.block_n} keys)")
        if not self.deterministic and not self._dq_tiling():
            out.append(f"{WHY_BWD_DQ_TILING} (d_head={self.d_head}, n_warps={self.n_warps}, block_m={self.block_m})")
        if self.register_estimate() > REGISTER_LIMIT:
            out.append(f"{WHY_BWD_REGISTERS} (about {self.register_estimate()}); use fewer warps, a smaller block_m "
                       "or d_split=2")
        return out

    @functools.cached_property
    def name(self) -> str:
        return (f"bwd_{self.dtype}_d{self.d_head}_w{self.n_warps}_m{self.block_m}_s{self.d_split}_r{self.group_rows}"
                f"_det{int(self.deterministic)}_causal{int(self.causal)}{features_suffix(self)}{d_v_suffix(self)}")

    _NAME_RE = re.compile(r"^bwd_(?P<dtype>fp16|bf16)_d(?P<d_head>\d+)_w(?P<n_warps>\d+)_m(?P<block_m>\d+)"
                          r"_s(?P<d_split>\d+)_r(?P<group_rows>\d+)_det(?P<det>[01])_causal(?P<causal>[01])"
                          + FEATURES_RE + D_V_RE + "$")

    @classmethod
    def parse_name(cls, name: str) -> "BwdConfig | None":
        match = cls._NAME_RE.match(name)
        if not match:
            return None
        return cls(match["dtype"], int(match["d_head"]), int(match["n_warps"]), int(match["block_m"]),
                   int(match["d_split"]), int(match["group_rows"]), bool(int(match["det"])), bool(int(match["causal"])),
                   *(match[f] is not None for f in FEATURES), d_v=int(match["d_v"] or 0))


BwdConfig.family = FAMILY = Family(
    "bwd_sm80", BwdConfig, template="bwd_sm80.cuh", namespace="bwd", params="BwdParams", direction="bwd",
    reasons=(WHY_HEAD_DIM, WHY_HEAD_DIM_V, WHY_BWD_REGISTERS, WHY_BWD_STAGING, WHY_BWD_DQ_TILING, WHY_BWD_SHARES, WHY_BWD_COLUMNS))

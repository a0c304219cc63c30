"""The sm_90a backward family (kernels/bwd_sm90.cuh, Hopper only: wgmma and TMA bulk reductions):
BwdSm90Config, its validation and its canonical name.

The kernel fixes its warps (two consumer warpgroups: n_warps 8, d_split 1, group_rows 16) and has no
deterministic variant, so those are class constants here, as they are constants of
``flashjit::bwd_sm90::Config``; the fields map one-to-one onto that template's parameters. d_head
129-256 is the wide kernel (Config::kWide: a CTA of 64 keys whose warpgroups split each step by
product), a path of the same template chosen by the head dim, not a knob: block_n follows d_head.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, fields
from typing import ClassVar

from .common import DTYPES, FEATURES, FEATURES_RE, ConfigBase, features_suffix, head_dim_problem, head_dim_tile
from .registry import Family

WGMMA_ARCH = "sm_90a"
WGMMA_SHAPES = ((64, 128), (128, 64), (192, 64), (256, 64))  # (tile width, block_m)

# The reasons, shared verbatim with the static_asserts in kernels/bwd_sm90.cuh.
WHY_WGMMA_SHAPES = "the wgmma backward supports d_head 33-64 with block_m 128 and 65-256 with block_m 64"
WHY_WGMMA_WIDE_TMA = "the d_head 129-256 wgmma backward is fed only by its TMA producer (tma=True)"
WHY_WGMMA_SOFTCAP = "softcap's factors push the d_head 64 wgmma backward (128-query steps) past 255 registers"
# Not rules any more (the kernel fixes these): what the deprecated BwdConfig(..., wgmma=True) says
# when it is given other values.
WHY_WGMMA_WARPS = "the wgmma backward runs two warpgroups of 64 keys: n_warps=8, d_split=1, group_rows=16"
WHY_WGMMA_VARIANTS = "the wgmma backward has no deterministic variant"


def wgmma_tile(d_head: int) -> int:
    """The wgmma backward's tile width (kernels/bwd_sm90.cuh: Config::kD): whole 64-column swizzle
    blocks, 64 to 256 (d_head 160 in 192), never 96. Measured on an H200 (docs/perf-log.md): at d_head
    80 its 128 tile ran 1.10-1.17x FA2 where the sm_80 kernel's 96 tile ran 0.98-1.04x; at d_head 32
    its 64 tile ran 0.76-0.86x FA2, so head dims up to 32 keep the sm_80 kernel's own 32 tile."""
    if 32 < d_head <= 64:
        return 64
    return 128 if 64 < d_head <= 128 else -(-d_head // 64) * 64 if 128 < d_head <= 256 else head_dim_tile(d_head)


@dataclass(frozen=True)
class BwdSm90Config(ConfigBase):
    """One sm_90a backward specialization (kernels/bwd_sm90.cuh): dtype, d_head (33 to 256, run in a
    64, 128, 192 or 256 tile), block_m (queries per step: 128 for the 64 tile, 64 for the others),
    causal and the score features. Up to d_head 128 each CTA's two warpgroups own 64 keys each and dQ
    is added up in fp32 by TMA bulk reductions; d_head 129-256 (the wide kernel, TMA-fed only) has
    CTAs of 64 keys whose warpgroups split each step (S^T, P^T, dV / dP^T, dS^T, dK) and adds dQ by
    bulk reductions too, staged a warp at a time. No deterministic variant (dQ's fp32 sums).
    bwd_sm80.cuh's first and last kernels (D, dQ conversion).
    head_split (name tail _hs): one CTA per query head instead of per kv head, dK/dV added up in fp32
    and rounded by one more kernel (so dK/dV, like dQ, may then differ in their last bits run to run).
    tma (name tail _tma): a producer warpgroup loads K/V once and Q/dO (TMA) with lse/D through a
    two-stage ring of mbarriers, so the consumers' steps need one barrier each instead of two."""

    dtype: str = "bf16"
    d_head: int = 128
    block_m: int = 64
    causal: bool = False
    local: bool = False
    softcap: bool = False
    alibi: bool = False
    dropout: bool = False
    # One dK/dV CTA per query head, dK/dV added to fp32 sums (GQA grids with too few CTAs; the
    # dispatcher sets it by shape: dispatch.with_head_split), instead of one per kv head.
    head_split: bool = False
    # A third warpgroup that only loads (the dispatcher's choice, dispatch.default_bwd_config): TMA for
    # Q, dO, K, V, plain loads for lse and D, full/empty mbarriers per stage and dS^T double-buffered,
    # instead of cp.async by all threads and a CTA barrier at every step.
    tma: bool = False

    # Fixed by the kernel (Config::kWarps, two warpgroups; one 16-row group a warp; fp32 atomics for
    # dQ); readable like BwdConfig's fields, so code that reads any backward config needs no branch.
    n_warps: ClassVar[int] = 8
    d_split: ClassVar[int] = 1
    group_rows: ClassVar[int] = 16
    deterministic: ClassVar[bool] = False

    _WHAT = "sm_90a backward kernel"

    @property
    def d_tile(self) -> int:
        return wgmma_tile(self.d_head)

    @property
    def wide(self) -> bool:
        """The wide kernel (Config::kWide): d_head 129-256."""
        return self.d_head > 128

    @property
    def block_n(self) -> int:
        """Keys per CTA (Config::kBlockN): 128, the wide kernel's 64."""
        return 64 if self.wide else 128

    @property
    def loads_with_tma(self) -> bool:
        return self.tma

    @property
    def smem_bytes(self) -> int:
        """Config::kSmemBytes: 1 KiB alignment slack, K, V, two stages of Q and dO, dS^T (two with tma,
        but for the wide kernel), lse and D, dQ staging (the wide kernel: P^T and dQ staging), and with tma the
        mbarriers (K/V, and full/empty for two stages: 5 of 8 bytes); tests/test_jit_cache.py checks it
        against the compiled kernel. The wide kernel's scratch: P^T and a dQ staging tile a warp, in fp16
        and of 8 rows at d_head 256 (Config::kPtHalf), else in fp32 and of 16 rows. With tma and dropout (not the
        wide kernel): two stages of the producer warps' masks, 8 bytes a consumer thread (Config::kMaskBytes)."""
        half = self.wide and self.d_tile > 192
        scratch = (self.block_n * self.block_m * (2 if half else 4) + self.n_warps * (8 if half else 16) * 64 * 4
                   if self.wide else self.n_warps * 16 * 64 * 4)
        return 1024 + 2 * 2 * self.block_n * self.d_tile + 4 * 2 * self.block_m * self.d_tile + \
            (2 if self.tma and not self.wide else 1) * 2 * self.block_n * self.block_m + 2 * 2 * self.block_m * 4 + \
            scratch + (2 * self.n_warps * 32 * 8 if self.tma and self.dropout and not self.wide else 0) + \
            (5 * 8 if self.tma else 0)

    def problems(self) -> list[str]:
        out = self._choices(dtype=DTYPES) + head_dim_problem(self.d_head)
        if out:
            return out
        if (self.d_tile, self.block_m) not in WGMMA_SHAPES:
            out.append(f"{WHY_WGMMA_SHAPES} (d_head={self.d_head} in a {self.d_tile} tile, block_m={self.block_m})")
        if self.softcap and self.block_m == 128:
            out.append(WHY_WGMMA_SOFTCAP)
        if self.wide and not self.tma:
            out.append(WHY_WGMMA_WIDE_TMA)
        return out

    @functools.cached_property
    def name(self) -> str:
        """BwdConfig's name pattern with the fixed values and a _wgmma tail: the name the kernel had as
        BwdConfig(wgmma=True), so caches, bundles and names users wrote down keep working."""
        return (f"bwd_{self.dtype}_d{self.d_head}_w{self.n_warps}_m{self.block_m}_s{self.d_split}_r{self.group_rows}"
                f"_det{int(self.deterministic)}_causal{int(self.causal)}{features_suffix(self)}"
                f"{'_hs' if self.head_split else ''}{'_tma' if self.tma else ''}_wgmma")

    _NAME_RE = re.compile(r"^bwd_(?P<dtype>fp16|bf16)_d(?P<d_head>\d+)_w8_m(?P<block_m>\d+)_s1_r16_det0"
                          r"_causal(?P<causal>[01])" + FEATURES_RE + "(?P<hs>_hs)?(?P<tma>_tma)?_wgmma$")

    @classmethod
    def parse_name(cls, name: str) -> "BwdSm90Config | None":
        match = cls._NAME_RE.match(name)
        if not match:
            return None
        return cls(match["dtype"], int(match["d_head"]), int(match["block_m"]), bool(int(match["causal"])),
                   *(match[f] is not None for f in FEATURES), head_split=match["hs"] is not None,
                   tma=match["tma"] is not None)


def from_wgmma_bwd_config(values: dict) -> BwdSm90Config:
    """The config that BwdConfig(**values, wgmma=True) meant (the deprecated spelling); ValueError
    when it asks for what this kernel fixes otherwise."""
    if values["deterministic"]:
        raise ValueError(f"BwdConfig(..., deterministic=True, wgmma=True): {WHY_WGMMA_VARIANTS}")
    if values.get("d_v", 0) not in (0, values["d_head"]):
        raise ValueError("BwdConfig(..., d_v=..., wgmma=True): the wgmma backward needs d_v == d_head; use the "
                         "sm_80 BwdConfig for a different value head dim")
    fixed = {k: values[k] for k in ("n_warps", "d_split", "group_rows")}
    if fixed != {k: getattr(BwdSm90Config, k) for k in fixed}:
        raise ValueError(f"BwdConfig(..., wgmma=True) with {fixed}: {WHY_WGMMA_WARPS}")
    return BwdSm90Config(**{f.name: values[f.name] for f in fields(BwdSm90Config)
                          if f.name not in ("head_split", "tma")})


BwdSm90Config.family = FAMILY = Family(
    "bwd_sm90", BwdSm90Config, template="bwd_sm90.cuh", namespace="bwd_sm90", params="BwdParams", direction="bwd",
    arch=WGMMA_ARCH, reasons=(WHY_WGMMA_SHAPES, WHY_WGMMA_SOFTCAP, WHY_WGMMA_WIDE_TMA))

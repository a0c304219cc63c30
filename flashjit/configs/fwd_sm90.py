"""The Hopper forward family (kernels/fwd_sm90.cuh, sm_90a only): FwdSm90Config, its knobs, rules and
name. A producer warpgroup loads Q once and K/V through a ring of `stages` shared-memory buffers with
TMA; block_m / 64 consumer warpgroups run S = QK^T and O += PV on wgmma with the online softmax in
registers. Each field is one template parameter of ``flashjit::fwd_sm90::Config``, in order; every
rule ``problems()`` enforces is a ``static_assert`` there with the same message (FAMILY.reasons).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

from .common import (D_V_RE, DTYPES, FEATURES, FWD_FEATURES_RE, WHY_HEAD_DIM, WHY_HEAD_DIM_V, ConfigBase, d_v_suffix,
                     features_suffix, head_dim_problem, head_dim_v_problem)
from .registry import Family

ARCH = "sm_90a"
BLOCK_M = (128, 192)        # query rows per CTA: 64 per consumer warpgroup
# Keys per main-loop step (the QK^T wgmma's N). 176 and 80 are FlashAttention-3's d128 and d256 tiles
# (two stages: 209 and 225 KiB of shared memory); like every value here they pass only where
# problems()' register and shared-memory rules let them.
BLOCK_N = (64, 80, 96, 128, 176, 192)
STAGES = (2, 3, 4)
SMEM_LIMIT = 227 * 1024

# The reasons, shared verbatim with the static_asserts in kernels/fwd_sm90.cuh.
WHY_BLOCK_M = "block_m must be 128 or 192 (two or three consumer warpgroups)"
WHY_BLOCK_N = "block_n must be 64, 80, 96, 128, 176 or 192"
WHY_STAGES = "stages must be 2, 3 or 4"
WHY_PINGPONG = "ping-pong passes a token around the consumer warpgroups and needs the overlap"
WHY_CROSS_TILE = "cross_tile runs one CTA's tiles as one pipeline: it needs persistent and the overlap"
WHY_HALF_BLOCKS = "half_blocks runs a block's first half at wgmma width block_n / 2: it needs the overlap and block_n 128 or 192"
WHY_MMA_SUMS = ("mma_sums sums the P that PV multiplies: not with dropout, whose dropped entries still count in "
                "the sums")
WHY_TWO_CTAS = ("two_ctas gives a consumer thread 104 registers (two CTAs an SM): it needs block_m 128, no overlap, "
                "d_head <= 64 and block_n 64")
WHY_MASK_WARPS = ("mask_warps has the producer's idle warps make dropout's masks across a CTA's tiles: it needs "
                  "dropout, persistent and room for the masks' slots beside the tiles")
WHY_REGISTERS = "O, S and P of this config do not fit the consumers' registers"
WHY_SMEM = "Q and the K/V stages of this config need more than 227 KiB of shared memory"


def sm90_tile(d_head: int) -> int:
    """The tile width (Config::kD): whole 64-column blocks, the TMA box and wgmma swizzle unit. The
    QK^T product covers only d_head rounded up to 16; PV covers the whole tile (wgmma's N)."""
    return (d_head + 63) // 64 * 64


@dataclass(frozen=True)
class FwdSm90Config(ConfigBase):
    """One Hopper forward specialization.

    dtype        'fp16' or 'bf16'
    d_head       head dimension: a multiple of 8 up to 256, run in a tile of whole 64-column blocks
    block_m      query rows per CTA: 128 (two consumer warpgroups) or 192 (three)
    block_n      keys per main-loop step
    stages       K/V shared-memory buffers in the TMA ring (how far the producer runs ahead)
    overlap      issue block j's QK^T with block j-1's PV and compute block j's exponentials while
                 that PV runs (FlashAttention-3's intra-warpgroup overlap); speed only
    pingpong     the consumer warpgroups take turns issuing their products (a token passed round
                 them), so one's softmax runs under the others' (named barriers); speed only; needs
                 overlap
    persistent   one CTA per SM walks the tiles (the K/V ring runs on into the next tile, whose Q
                 loads once the last QK^T of the current one retired; O is stored from registers)
                 instead of one CTA per tile (O through shared memory and a TMA store); speed only
    causal, local, softcap, alibi, dropout, sink   as KernelConfig (same masks, same Philox dropout mask)
    d_v          v's and the output's head dim when it differs from d_head (0 = d_head; a multiple of 8
                 up to d_head): V stages and PV's N are d_tile_v wide
    cross_tile   (persistent) run a CTA's tiles as one pipeline: each tile's first QK^T and softmax run
                 under the previous tile's last PV, whose epilogue follows; Q takes two shared-memory
                 stages, and O leaves through its tile's stage by a TMA store (persistent kernels
                 otherwise store O from registers); speed only (H200: +3-5% at d128 up to 1k queries,
                 the default there; level or mixed at longer rows and at d64)
    half_blocks  where a consumer warpgroup's 64 rows see none of a key block's second half (the causal
                 diagonal, a window's right edge, a short last block), run that block's QK^T and softmax
                 at half width for it, and the tile's last PV too (the skipped products are of zeros: no
                 bit of the output changes, for finite inputs); a third compiled step, so it can push
                 ptxas past the registers its wgmma pipeline needs (C7511: the dispatcher leaves it off
                 with a window, softcap, ALiBi, sinks, d_v or below d64; scripts/ptxas_notes.py); speed
                 only (H200: +1-7% at d64/d128 causal, flashjit/dispatch.py)
    lazy_rescale move a row's running max only when a key block's is more than 2^8 above it, so O's
                 rescale (a multiply an O element) runs only in the steps where some row of a warp moved
                 (FlashAttention-4's conditional rescaling; P is then below 2^8 rather than 1, the same
                 function up to rounding); speed only (H200: up to +12% at d192/d256; the default
                 non-causal and above d128 causal: flashjit/dispatch.py)
    mma_sums     the tensor cores sum P's rows (P times ones, wgmma N = 8, in an extra n-tile of O) instead
                 of an add an element; the sums are of the rounded P that PV multiplies, so O is normalised
                 by the very P it holds but lse carries P's rounding: up to -log1p(-2^-8) = 3.9e-3 in bf16
                 (2^-11 in fp16) where one key dominates a row whose P is not 1 (lazy_rescale); 1 KiB more
                 shared memory; not with dropout (its dropped entries count in the sums); speed only
    two_ctas     two CTAs an SM, each with half the register file (the consumers 104 registers a thread)
                 and of the shared memory (its tiles take at most 81 KiB of the 113 a CTA can have two
                 an SM); persistent grids are two CTAs an SM. The other
                 CTA's warpgroups fill the tensor cores during a warpgroup's softmax in place of the
                 overlap, which does not fit 104 registers (ptxas spills it and serializes its wgmmas):
                 d_head <= 64, block_n 64, block_m 128, no overlap; speed only (H200: +8-16% at d64
                 causal up to 1k, the default there; behind 192 rows from 2k: flashjit/dispatch.py)
    mask_warps   (dropout, persistent) the producer warpgroup's three idle warps make dropout's masks into
                 shared-memory slots, running ahead across the CTA's tiles, instead of the consumers (whose
                 two warps of a 32-row span otherwise share each Philox call's work and swap halves through
                 shared memory); the same mask; speed only (H100: +17-18% at d96 / d128 causal 1k, but -7 to
                 -14% at 4k-8k: flashjit/dispatch.py)
    """

    dtype: str = "bf16"
    d_head: int = 128
    block_m: int = 128
    block_n: int = 128
    stages: int = 2
    overlap: bool = True
    pingpong: bool = True
    persistent: bool = False
    causal: bool = False
    local: bool = False
    softcap: bool = False
    alibi: bool = False
    dropout: bool = False
    sink: bool = False
    d_v: int = 0
    cross_tile: bool = False
    half_blocks: bool = False
    lazy_rescale: bool = False
    mma_sums: bool = False
    two_ctas: bool = False
    mask_warps: bool = False

    @property
    def d_tile(self) -> int:
        return sm90_tile(self.d_head)

    @property
    def d_tile_v(self) -> int:
        return sm90_tile(self.head_dim_v)

    @property
    def consumers(self) -> int:
        return self.block_m // 64

    @property
    def ctas_per_sm(self) -> int:
        """CTAs an SM (Config::kCtasPerSm): a persistent grid's size is this times the SMs."""
        return 2 if self.two_ctas else 1

    def one_cta_per_tile(self) -> "FwdSm90Config":
        """The same kernel launched one CTA per tile (not persistent, so no cross-tile pipeline and no mask
        warps: the consumers make dropout's masks)."""
        return dataclasses.replace(self, persistent=False, cross_tile=False, mask_warps=False)

    def plain(self) -> "FwdSm90Config | None":
        """Without half blocks, whose third compiled step is what ptxas has serialized (C7511) in kernels a
        small source change away from ones it compiles whole (docs/perf-log.md, twenty-seventh session on),
        and without the softmax knobs, which ptxas has serialized with half blocks."""
        knobs = dict(half_blocks=False, lazy_rescale=False, mma_sums=False)
        return dataclasses.replace(self, **knobs) if any(getattr(self, k) for k in knobs) else None

    @property
    def q_stages(self) -> int:
        """Q tiles in shared memory (Config::kQStages): two with cross_tile."""
        return 2 if self.cross_tile else 1

    @property
    def store_warp(self) -> bool:
        """Whether a store warp (the producer warpgroup's warp 1) stores each tile's O by TMA and releases its Q
        stage (Config::kStoreWarp): cross-tile kernels whose warps 1-3 make no dropout masks."""
        return self.cross_tile and not self.mask_warps

    @property
    def tile_bytes(self) -> int:
        """Alignment slack, the Q stages, `stages` K and V tiles, mma_sums' ones and the mbarriers, with the
        store warp's one a Q stage and consumer warpgroup (Config::kTileBytes)."""
        return 1024 + 2 * self.q_stages * self.block_m * self.d_tile + \
            2 * self.stages * self.block_n * (self.d_tile + self.d_tile_v) + 1024 * self.mma_sums + \
            8 * (2 * self.q_stages + 4 * self.stages + self.store_warp * self.q_stages * self.consumers)

    def fits_beside_tiles(self, extra: int) -> bool:
        """Config::fits_smem(kTileBytes + extra): a CTA's 227 KiB, and ctas_per_sm CTAs (+ 1 KiB each) an SM's 228."""
        total = self.tile_bytes + extra
        return total <= SMEM_LIMIT and self.ctas_per_sm * (total + 1024) <= 228 * 1024

    @property
    def smem_bytes(self) -> int:
        """The tiles, and with dropout the mask warps' slots (mask_warps) or, where they fit, the warp pairs'
        swap buffers (Config::kSmemBytes)."""
        if self.mask_slot_bytes:  # (problems() holds them to fitting)
            return self.tile_bytes + self.mask_slot_bytes
        swap = self.dropout and self.fits_beside_tiles(self.pair_swap_bytes)
        return self.tile_bytes + (self.pair_swap_bytes if swap else 0)

    @property
    def mask_slot_bytes(self) -> int:
        """Dropout's mask slots (Config::kSlotBytes) with mask_warps: a bit an entry of each consumer
        thread's, in whole words, two slots a K stage, which the producer's mask warps fill."""
        if not (self.mask_warps and self.dropout and self.persistent):
            return 0
        return 2 * self.stages * 128 * self.consumers * 4 * ((self.block_n // 16 + 3) // 4)

    @property
    def pair_swap_bytes(self) -> int:
        """Dropout without mask warps: the buffers in which the two warps of a 32-row span swap their halves of
        the Philox calls (Config::kPairBytes), used where they fit."""
        return 2 * 2 * self.consumers * (self.block_n // 16) * 32 * 8

    def register_estimate(self) -> int:
        """Per consumer thread: O, S and P fragments plus indices, and 8 for each score feature
        (Config::kRegEstimate; with any feature the 160-register block_m 192 tile spilled). mma_sums' n-tile
        of sums takes the place of l and the running sums (ptxas: d64's 192-row tile with it, 0 spills)."""
        features = self.local + self.softcap + self.alibi + self.dropout
        return self.d_tile_v // 2 + self.block_n // 2 + self.block_n // 4 + 32 + 8 * features

    @property
    def register_budget(self) -> int:
        """What setmaxnreg gives each consumer thread: 240 with two consumer warpgroups, 160 with three,
        104 with two CTAs an SM (two_ctas, whose own rule stands in for the estimate: ptxas fits its
        one shape in 104 without spills, where the estimate's allowance says 112)."""
        return 104 if self.two_ctas else 240 if self.consumers == 2 else 160

    def problems(self) -> list[str]:
        out = self._choices(dtype=DTYPES) + head_dim_problem(self.d_head)
        if self.block_m not in BLOCK_M:
            out.append(f"{WHY_BLOCK_M}, got {self.block_m!r}")
        if self.block_n not in BLOCK_N:
            out.append(f"{WHY_BLOCK_N}, got {self.block_n!r}")
        if self.stages not in STAGES:
            out.append(f"{WHY_STAGES}, got {self.stages!r}")
        out += head_dim_v_problem(self.d_head, self.d_v)
        if out:
            return out
        if self.pingpong and not self.overlap:
            out.append(WHY_PINGPONG)
        if self.cross_tile and not (self.persistent and self.overlap):
            out.append(WHY_CROSS_TILE)
        if self.half_blocks and not (self.overlap and self.block_n in (128, 192)):
            out.append(WHY_HALF_BLOCKS)
        if self.mma_sums and self.dropout:
            out.append(WHY_MMA_SUMS)
        if self.two_ctas and not (self.consumers == 2 and not self.overlap and self.d_tile == 64 and
                                  self.d_tile_v == 64 and self.block_n == 64):
            out.append(WHY_TWO_CTAS)
        if self.mask_warps and not (self.dropout and self.persistent and self.fits_beside_tiles(self.mask_slot_bytes)):
            out.append(WHY_MASK_WARPS)
        if not self.two_ctas and self.register_estimate() > self.register_budget:
            out.append(f"{WHY_REGISTERS} (about {self.register_estimate()} of {self.register_budget}); "
                       "use a smaller block_n or block_m 128")
        if self.smem_bytes > SMEM_LIMIT:
            out.append(f"{WHY_SMEM} ({self.smem_bytes // 1024} KiB); use fewer stages or a smaller block_n")
        return out

    @functools.cached_property
    def name(self) -> str:
        return (f"fwd_sm90_{self.dtype}_d{self.d_head}_m{self.block_m}_n{self.block_n}_st{self.stages}"
                f"_ov{int(self.overlap)}_pp{int(self.pingpong)}_ps{int(self.persistent)}_causal{int(self.causal)}"
                f"{features_suffix(self)}{d_v_suffix(self)}{'_xt' if self.cross_tile else ''}"
                f"{'_hb' if self.half_blocks else ''}{'_lr' if self.lazy_rescale else ''}"
                f"{'_ms' if self.mma_sums else ''}{'_x2' if self.two_ctas else ''}{'_mw' if self.mask_warps else ''}")

    _NAME_RE = re.compile(r"^fwd_sm90_(?P<dtype>fp16|bf16)_d(?P<d_head>\d+)_m(?P<block_m>\d+)_n(?P<block_n>\d+)"
                          r"_st(?P<stages>\d+)_ov(?P<overlap>[01])_pp(?P<pingpong>[01])_ps(?P<persistent>[01])"
                          r"_causal(?P<causal>[01])"
                          + FWD_FEATURES_RE + D_V_RE + r"(?P<cross_tile>_xt)?(?P<half_blocks>_hb)?(?P<lazy_rescale>_lr)?"
                          r"(?P<mma_sums>_ms)?(?P<two_ctas>_x2)?(?P<mask_warps>_mw)?$")

    @classmethod
    def parse_name(cls, name: str) -> "FwdSm90Config | None":
        match = cls._NAME_RE.match(name)
        if not match:
            return None
        return cls(match["dtype"], int(match["d_head"]), int(match["block_m"]), int(match["block_n"]),
                   int(match["stages"]), match["overlap"] == "1", match["pingpong"] == "1", match["persistent"] == "1",
                   match["causal"] == "1",
                   *(match[f] is not None for f in FEATURES), match["sink"] is not None, int(match["d_v"] or 0),
                   match["cross_tile"] is not None, match["half_blocks"] is not None,
                   match["lazy_rescale"] is not None, match["mma_sums"] is not None, match["two_ctas"] is not None,
                   match["mask_warps"] is not None)


FwdSm90Config.family = FAMILY = Family(
    "fwd_sm90", FwdSm90Config, template="fwd_sm90.cuh", namespace="fwd_sm90", params="FwdParams", direction="fwd",
    arch=ARCH, reasons=(WHY_HEAD_DIM, WHY_HEAD_DIM_V, WHY_BLOCK_M, WHY_BLOCK_N, WHY_STAGES, WHY_PINGPONG, WHY_CROSS_TILE,
                        WHY_HALF_BLOCKS, WHY_MMA_SUMS, WHY_TWO_CTAS, WHY_MASK_WARPS, WHY_REGISTERS, WHY_SMEM))

"""The sm_80 forward family (kernels/fwd_sm80.cuh, runs on sm_80 and newer): KernelConfig, every knob
of the forward kernel, its validation and its canonical name.

Each field maps one-to-one onto a template parameter of ``flashjit::fwd::Config``; every rule
``problems()`` enforces is also a ``static_assert`` there with the same message (FAMILY.reasons;
tests/test_config.py checks that the messages stay in sync).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, fields

from .common import (D_V_RE, DTYPES, FWD_FEATURES, FWD_FEATURES_RE, REGISTER_LIMIT, WARPS, WHY_HEAD_DIM,
                     WHY_HEAD_DIM_V, ConfigBase, d_v_suffix, features_suffix, head_dim_problem, head_dim_tile,
                     head_dim_v_problem)
from .registry import Family

BLOCK_ROWS = (64, 128)        # B_r: query rows per CTA
BLOCK_COLS = (32, 64, 128)    # B_c: key/value rows per main-loop step

# The reasons, shared verbatim with the static_asserts in kernels/fwd_sm80.cuh.
WHY_WARP_ROWS = "each warp must own 16 or 32 query rows: B_r / n_warps must be 16 or 32"
WHY_DEPTH = "a fragment depth must be 0 (whole block up front) or a power of two dividing its k-tile count"
WHY_EAGER = "eager_load_blocks needs async_copy: synchronous loads cannot overlap the matrix multiplies"
WHY_DOUBLE_BUFFER = ("mma_double_buffer_loads needs a fragment depth that splits its k loop "
                     "(0 < depth < k-tiles) for Q, K or V")
WHY_KVCACHE = "kvcache kernels have no dropout (flash_attn_with_kvcache has none)"
WHY_KVCACHE_D_V = "kvcache kernels need d_v == d_head (flash_attn_with_kvcache's caches share a head dim)"
# Page sizes the kvcache kernels take: multiples of 16 rows (common/params.cuh: kPageMultiple; flash-attn 2
# asks for multiples of 256).
PAGE_MULTIPLE = 16
WHY_REGISTERS = "the fragments of this config need more than 255 registers per thread and would spill"


@dataclass(frozen=True)
class KernelConfig(ConfigBase):
    """One forward-kernel specialization.

    dtype            'fp16' or 'bf16' (inputs and output; accumulation is always fp32)
    d_head           head dimension D: a multiple of 8 up to 256, run in a tile of width d_tile
    B_r, B_c         query rows per CTA, key/value rows per main-loop step
    n_warps          warps per CTA; each warp owns B_r / n_warps query rows (16 or 32)
    async_copy       global->shared copies with cp.async (else 16-byte loads then shared stores)
    eager_load_blocks  issue the next K/V tile's copy before computing on the current one, so
                     copies overlap the tensor-core work (FlashAttention-2's pipelining)
    swizzled         XOR-swizzle shared-memory rows so ldmatrix is bank-conflict free
    q/k/v_frag_depth how many 16-wide k-tiles of Q (QK^T), K (QK^T) and V (PV) fragments are loaded
                     from shared memory into registers at once; 0 = the whole block up front (for Q:
                     once per CTA, kept in registers for the whole key loop)
    mma_double_buffer_loads  load the next fragment chunk while the tensor cores work on this one
    optimized_softmax  fold the softmax scale and log2(e) into one FMA feeding exp2 (else scale
                     the scores, then expf)
    causal           bottom-right aligned causal mask (flash-attn's convention when Sq != Sk)
    local            sliding window (flash-attn's window_size; left/right are run-time values)
    softcap          scores become softcap * tanh(scores / softcap) (softcap is a run-time value)
    alibi            ALiBi: scores -= slope * |i + Sk - Sq - j| (slopes are a run-time tensor)
    dropout          dropout on the attention probabilities (Philox RNG; p and the seed are run-time)
    sink             learnable sinks: a logit per query head in every row's softmax denominator
                     (the logits are a run-time tensor)
    kvcache          queries over a KV cache (flash_attn_with_kvcache, flashjit/kvattn.py): per-entry
                     key ranges, cache rows, a paged layout and split-KV with a combine kernel, each
                     chosen at run time (kernels/common/params.cuh: CacheParams)
    d_v              the head dim of v and of the output when it differs from d_head (MLA-style,
                     e.g. 192/128): 0 = d_head; otherwise a multiple of 8 up to d_head. V and O
                     run in a tile of width d_tile_v, QK^T in d_tile
    """

    dtype: str = "bf16"
    d_head: int = 128
    B_r: int = 128
    B_c: int = 64
    n_warps: int = 4
    async_copy: bool = True
    eager_load_blocks: bool = True
    swizzled: bool = True
    q_frag_depth: int = 1
    k_frag_depth: int = 1
    v_frag_depth: int = 1
    mma_double_buffer_loads: bool = True
    optimized_softmax: bool = True
    causal: bool = False
    local: bool = False
    softcap: bool = False
    alibi: bool = False
    dropout: bool = False
    sink: bool = False
    kvcache: bool = False
    d_v: int = 0

    # ---- derived quantities --------------------------------------------------------------
    @property
    def d_tile(self) -> int:
        return head_dim_tile(self.d_head)

    @property
    def d_tile_v(self) -> int:
        return head_dim_tile(self.head_dim_v)

    @property
    def d_mma(self) -> int:
        """The head-dim extent of QK^T: d_head rounded up to 16 (Config::kDMma)."""
        return (self.d_head + 15) // 16 * 16

    @property
    def d_mma_v(self) -> int:
        """The head-dim extent of PV: the value head dim rounded up to 16 (Config::kDMmaV)."""
        return (self.head_dim_v + 15) // 16 * 16

    @property
    def warp_rows(self) -> int:
        return self.B_r // self.n_warps

    @property
    def threads(self) -> int:
        return self.n_warps * 32

    @property
    def smem_bytes(self) -> int:
        """Q tile + K tile + V tile, 2 bytes an element; kvcache kernels add two key blocks' page-table
        entries (B_c / PAGE_MULTIPLE + 1 int32 each: fwd_sm80.cuh, Config::kSmemBytes)."""
        pages = 2 * (self.B_c // PAGE_MULTIPLE + 1) * 4 if self.kvcache else 0
        return ((self.B_r + self.B_c) * self.d_tile + self.B_c * self.d_tile_v) * 2 + pages

    def k_tiles(self, operand: str) -> int:
        """k-tiles (16 wide) of the loop that loads this operand: D for Q and K, B_c for V."""
        return (self.d_mma if operand in "qk" else self.B_c) // 16

    def register_estimate(self) -> int:
        """32-bit registers for the fragments that are live at once, per thread (fp32 accumulators,
        16-bit operands packed in pairs), plus a few for indices. A lower bound on the real count."""
        m = self.warp_rows // 16
        o_acc = m * (self.d_mma_v // 8) * 4
        s_acc = m * (self.B_c // 8) * 4

        def chunk(operand: str, per_tile: int) -> int:
            depth = getattr(self, f"{operand}_frag_depth")
            tiles = self.k_tiles(operand) if depth == 0 else depth
            buffers = 2 if self.mma_double_buffer_loads and 0 < depth < self.k_tiles(operand) else 1
            return tiles * per_tile * buffers

        q = chunk("q", m * 4)
        k = chunk("k", (self.B_c // 8) * 2)
        v = chunk("v", (self.d_mma_v // 8) * 2)
        q_resident = q if self.q_frag_depth == 0 else 0
        qk_phase = o_acc + s_acc + q + k
        pv_phase = o_acc + s_acc // 2 + v + q_resident
        return max(qk_phase, pv_phase) + 8

    # ---- validation ----------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every reason this config cannot be built (empty when it can)."""
        out = self._choices(dtype=DTYPES, B_r=BLOCK_ROWS, B_c=BLOCK_COLS, n_warps=WARPS)
        out += head_dim_problem(self.d_head)
        if out:
            return out  # the rules below assume the basic shapes are sane
        out += head_dim_v_problem(self.d_head, self.d_v)
        if self.kvcache and self.d_v:
            out.append(WHY_KVCACHE_D_V)
        if self.warp_rows not in (16, 32):
            out.append(WHY_WARP_ROWS)
        for operand in "qkv":
            depth, tiles = getattr(self, f"{operand}_frag_depth"), self.k_tiles(operand)
            if depth != 0 and (depth & (depth - 1) or tiles % depth):
                out.append(f"{operand}_frag_depth={depth}: {WHY_DEPTH} ({tiles})")
        if self.kvcache and self.dropout:
            out.append(WHY_KVCACHE)
        if self.eager_load_blocks and not self.async_copy:
            out.append(WHY_EAGER)
        if self.mma_double_buffer_loads and not any(
                0 < getattr(self, f"{o}_frag_depth") < self.k_tiles(o) for o in "qkv"):
            out.append(WHY_DOUBLE_BUFFER)
        if not out and self.register_estimate() > REGISTER_LIMIT:
            out.append(f"{WHY_REGISTERS} (about {self.register_estimate()}); "
                       "use smaller fragment depths, fewer rows per warp or a smaller B_c")
        return out

    # ---- canonical name ------------------------------------------------------------------
    @functools.cached_property  # frozen dataclass: computed once, stored in the instance dict
    def name(self) -> str:
        """Readable, parseable, unique: KernelConfig.from_name(c.name) == c."""
        b = lambda flag: int(bool(flag))  # noqa: E731
        return (f"fwd_{self.dtype}_d{self.d_head}_br{self.B_r}_bc{self.B_c}_w{self.n_warps}"
                f"_ac{b(self.async_copy)}_el{b(self.eager_load_blocks)}_sw{b(self.swizzled)}"
                f"_fq{self.q_frag_depth}_fk{self.k_frag_depth}_fv{self.v_frag_depth}"
                f"_db{b(self.mma_double_buffer_loads)}_os{b(self.optimized_softmax)}"
                f"_causal{b(self.causal)}{features_suffix(self)}{'_kvcache' if self.kvcache else ''}{d_v_suffix(self)}")

    _NAME_RE = re.compile(
        r"^fwd_(?P<dtype>fp16|bf16)_d(?P<d_head>\d+)_br(?P<B_r>\d+)_bc(?P<B_c>\d+)_w(?P<n_warps>\d+)"
        r"_ac(?P<async_copy>[01])_el(?P<eager_load_blocks>[01])_sw(?P<swizzled>[01])"
        r"_fq(?P<q_frag_depth>\d+)_fk(?P<k_frag_depth>\d+)_fv(?P<v_frag_depth>\d+)"
        r"_db(?P<mma_double_buffer_loads>[01])_os(?P<optimized_softmax>[01])_causal(?P<causal>[01])"
        + FWD_FEATURES_RE + "(?P<kvcache>_kvcache)?" + D_V_RE + "$")

    @classmethod
    def parse_name(cls, name: str) -> "KernelConfig | None":
        match = cls._NAME_RE.match(name)
        if not match:
            return None
        values = {}
        for f in fields(cls):
            raw = match.group(f.name)
            if f.name == "d_v":
                values[f.name] = int(raw or 0)
            elif f.name in FWD_FEATURES or f.name == "kvcache":
                values[f.name] = raw is not None
            else:
                values[f.name] = raw if f.type == "str" else (bool(int(raw)) if f.type == "bool" else int(raw))
        return cls(**values)


KernelConfig.family = FAMILY = Family(
    "fwd_sm80", KernelConfig, template="fwd_sm80.cuh", namespace="fwd", params="FwdParams", direction="fwd",
    reasons=(WHY_HEAD_DIM, WHY_HEAD_DIM_V, WHY_WARP_ROWS, WHY_DEPTH, WHY_EAGER, WHY_DOUBLE_BUFFER, WHY_KVCACHE,
             WHY_KVCACHE_D_V, WHY_REGISTERS))

"""The kernel configs of every family: names round-trip, every rule rejects with its reason, the C++
static_asserts carry the same reasons and the template parameters mirror the fields; the registry
(config_from_name, family_of, register); the build set and the tuning space are valid."""
import dataclasses
import itertools
import re
from dataclasses import dataclass

import pytest

import flashjit
from flashjit import BwdConfig, BwdSm90Config, FwdSm90Config, KernelConfig, codegen, config as cfgmod, dispatch, jit, launch
from flashjit.configs import (FAMILIES, Family, bwd_sm80, bwd_sm90, common, config_from_name, family_of, fwd_sm80,
                              fwd_sm90, register)
from flashjit.configs.common import ConfigBase, smem_limit_for_arch


def test_name_round_trip_over_the_whole_space():
    space = flashjit.get_autotuning_kernel_configs("fp16", 96, True, exhaustive=True)
    assert len(space) > 100
    names = {c.name for c in space}
    assert len(names) == len(space)
    for c in space:
        assert KernelConfig.from_name(c.name) == c


@pytest.mark.parametrize("bad", ["", "fwd_bf16", "fwd_bf16_d128_br128_bc64_w4", KernelConfig().name + "_x"])
def test_from_name_rejects_garbage(bad):
    with pytest.raises(ValueError, match="not a flashjit kernel name"):
        KernelConfig.from_name(bad)


@pytest.mark.parametrize("changes, reason", [
    (dict(dtype="fp32"), "dtype must be one of"),
    (dict(d_head=84), common.WHY_HEAD_DIM),
    (dict(d_head=264), common.WHY_HEAD_DIM),
    (dict(d_head=0), common.WHY_HEAD_DIM),
    (dict(B_r=32), "B_r must be one of"),
    (dict(B_c=16), "B_c must be one of"),
    (dict(n_warps=2), "n_warps must be one of"),
    (dict(B_r=64, n_warps=8), fwd_sm80.WHY_WARP_ROWS),
    (dict(q_frag_depth=3), fwd_sm80.WHY_DEPTH),
    (dict(d_head=96, k_frag_depth=4), fwd_sm80.WHY_DEPTH),
    (dict(async_copy=False, eager_load_blocks=True), fwd_sm80.WHY_EAGER),
    (dict(B_r=64, q_frag_depth=0, k_frag_depth=0, v_frag_depth=0, mma_double_buffer_loads=True),
     fwd_sm80.WHY_DOUBLE_BUFFER),
    (dict(q_frag_depth=0, k_frag_depth=0, v_frag_depth=0, mma_double_buffer_loads=False), fwd_sm80.WHY_REGISTERS),
])
def test_invalid_configs_say_why(changes, reason):
    config = dataclasses.replace(KernelConfig(), **changes)
    assert any(reason in p for p in config.problems()), config.problems()
    with pytest.raises(ValueError, match=re.escape(reason)):
        config.validate()


def _family_module(family: Family):
    import sys

    return sys.modules[family.config.__module__]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_static_asserts_carry_the_same_reasons(family):
    """Each family's reasons are static_asserts of its template, verbatim; a WHY_* of its module that
    is not one of its reasons is not (a rule Python enforces alone, or a message kept for another use)."""
    source = (codegen.kernels_dir() / family.template).read_text()
    assert family.reasons
    for reason in family.reasons:
        assert f'"{reason}"' in source, reason
    module = _family_module(family)
    for name in dir(module):
        if name.startswith("WHY_") and getattr(module, name) not in family.reasons:
            assert f'"{getattr(module, name)}"' not in source, f"{name} is a static_assert: add it to the reasons"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_template_parameters_mirror_the_fields(family):
    """flashjit::<namespace>::Config takes one parameter per field, in field order (dtype as bf16), of
    the same kind (bool or int), and the rendered TU names the family's template, namespace and params."""
    config = family.config()
    args = config.template_args()
    assert [name for name, _ in args] == ["bf16"] + [f.name for f in dataclasses.fields(config) if f.name != "dtype"]
    source = (codegen.kernels_dir() / family.template).read_text()
    declared = re.search(r"namespace flashjit::" + family.namespace + r" \{.*?template <([^>]*)>\s*struct Config\s*\{",
                         source, re.S)
    assert declared, f"no flashjit::{family.namespace}::Config in {family.template}"
    kinds = [p.split()[0] for p in declared.group(1).split(",")]
    assert kinds == ["bool" if isinstance(value, bool) else "int" for _, value in args]
    text = codegen.render(config)
    for name, _ in args:
        assert f"/*{name}=*/" in text, name
    assert f'#include "{family.template}"' in text and f"using Cfg = flashjit::{family.namespace}::Config<" in text
    assert f"flashjit::{family.namespace}::launch<Cfg>" in text and f"const flashjit::{family.params}* params" in text
    assert f'flashjit_config_name() {{ return "{config.name}"; }}' in text


@pytest.mark.parametrize("d_head, tile", [(8, 32), (32, 32), (40, 64), (80, 96), (96, 96), (112, 128), (136, 160),
                                          (168, 192), (200, 256), (224, 256), (256, 256)])
def test_head_dims_run_in_the_next_tile(d_head, tile):
    """Any multiple of 8 up to 256 is a valid config whose geometry (shared memory, registers) is its
    tile's, and the kernels' head_dim_tile agrees with the Python one."""
    assert common.head_dim_tile(d_head) == tile
    fwd = flashjit.default_config("bf16", d_head, False)
    assert fwd.d_head == d_head and fwd.d_tile == tile and not fwd.problems()
    assert fwd.smem_bytes == dataclasses.replace(fwd, d_head=tile).smem_bytes
    for wgmma in (False, True):
        bwd = dispatch.default_bwd_config("bf16", d_head, False, wgmma=wgmma)
        assert bwd.d_head == d_head and not bwd.problems()
        hopper = isinstance(bwd, BwdSm90Config)
        assert hopper == (wgmma and 32 < d_head <= 256)
        assert bwd.d_tile == (bwd_sm90.wgmma_tile(d_head) if hopper else tile)
        assert config_from_name(bwd.name) == bwd
    assert KernelConfig.from_name(fwd.name) == fwd
    source = (codegen.kernels_dir() / "common" / "params.cuh").read_text()
    assert "constexpr int head_dim_tile(int d) { return d <= 192 ? (d + 31) / 32 * 32 : 256; }" in source


def test_every_knob_changes_the_rendered_code():
    base = KernelConfig(B_r=64)  # 16 rows a warp: room to deepen every fragment depth
    flips = dict(dtype="fp16", d_head=64, B_r=128, B_c=32, n_warps=8, async_copy=False, eager_load_blocks=False,
                 swizzled=False, q_frag_depth=2, k_frag_depth=2, v_frag_depth=2, mma_double_buffer_loads=False,
                 optimized_softmax=False, causal=True, local=True, softcap=True, alibi=True,
                 dropout=True, sink=True, kvcache=True, d_v=64)
    assert set(flips) == {f.name for f in dataclasses.fields(KernelConfig)}
    for name, value in flips.items():
        changed = dataclasses.replace(base, **{name: value})
        if name == "async_copy":
            changed = dataclasses.replace(changed, eager_load_blocks=False)
        if name == "n_warps":
            changed = dataclasses.replace(changed, B_r=128)
        assert codegen.render(changed) != codegen.render(base), name


def test_every_hopper_forward_knob_changes_the_rendered_code():
    base = FwdSm90Config(d_head=64, pingpong=False)  # ping-pong needs the overlap: flipped on alone
    flips = dict(dtype="fp16", d_head=128, block_m=192, block_n=64, stages=3, overlap=False, pingpong=True,
                 persistent=True, causal=True, local=True, softcap=True, alibi=True, dropout=True, sink=True, d_v=32,
                 cross_tile=True, half_blocks=True, lazy_rescale=True, mma_sums=True, two_ctas=True, mask_warps=True)
    assert set(flips) == {f.name for f in dataclasses.fields(FwdSm90Config)}
    for name, value in flips.items():
        needs = dict(cross_tile=dict(persistent=True), two_ctas=dict(overlap=False, block_n=64),
                     mask_warps=dict(persistent=True, dropout=True)).get(name, {})
        at = dataclasses.replace(base, **needs)  # what the knob needs besides itself
        assert codegen.render(dataclasses.replace(at, **{name: value})) != codegen.render(at), name


def test_cross_tile_needs_persistent_overlap_and_room_for_a_second_q():
    """cross_tile: its name (an `_xt` suffix, so every older name keeps its meaning and cache entry)
    parses back; it needs persistent CTAs and the overlap; its second Q stage must fit (d128 yes, d256
    no); the one-CTA-per-tile twin drops it."""
    cfg = FwdSm90Config("bf16", 128, persistent=True, cross_tile=True)
    assert not cfg.problems() and cfg.name.endswith("_xt") and config_from_name(cfg.name) == cfg
    # the second Q stage and its two barriers, and the store warp's barrier a Q stage and consumer warpgroup
    assert cfg.store_warp and not dataclasses.replace(cfg, cross_tile=False).store_warp
    assert cfg.smem_bytes - dataclasses.replace(cfg, cross_tile=False).smem_bytes == 2 * 128 * 128 + 16 + 8 * 2 * 2
    assert not config_from_name(dataclasses.replace(cfg, cross_tile=False).name).cross_tile
    for bad in (dict(persistent=False), dict(overlap=False, pingpong=False)):
        assert fwd_sm90.WHY_CROSS_TILE in dataclasses.replace(cfg, **bad).problems()
    assert any(fwd_sm90.WHY_SMEM in p for p in FwdSm90Config("bf16", 256, block_n=80, persistent=True,
                                                            cross_tile=True).problems())
    assert cfg.one_cta_per_tile() == FwdSm90Config("bf16", 128)
    assert cfg in dispatch.get_autotuning_kernel_configs("bf16", 128, False, exhaustive=True, arch="sm_90a")


def test_half_blocks_need_the_overlap_and_a_halvable_block():
    """half_blocks: an `_hb` suffix after `_xt` (older names keep their meaning); it needs the overlap
    (the steps it compiles a third time) and block_n 128 or 192 (the half widths wgmma_ss has); the
    tuner times it for causal rows."""
    cfg = FwdSm90Config("bf16", 128, persistent=True, causal=True, cross_tile=True, half_blocks=True,
                        lazy_rescale=True)
    assert not cfg.problems() and cfg.name.endswith("_xt_hb_lr") and config_from_name(cfg.name) == cfg
    assert cfg.smem_bytes == dataclasses.replace(cfg, half_blocks=False).smem_bytes
    for bad in (dict(overlap=False, pingpong=False, cross_tile=False), dict(block_n=96), dict(block_n=176)):
        assert fwd_sm90.WHY_HALF_BLOCKS in dataclasses.replace(cfg, **bad).problems(), bad
    assert not FwdSm90Config("bf16", 64, 192, 128, 4, half_blocks=True).problems()
    assert cfg in dispatch.get_autotuning_kernel_configs("bf16", 128, True, arch="sm_90a")
    assert not any(c.half_blocks for c in dispatch.get_autotuning_kernel_configs("bf16", 128, False, arch="sm_90a"))


def test_softmax_cuts_lazy_rescale_and_mma_sums():
    """lazy_rescale (`_lr`) and mma_sums (`_ms`): suffixes after `_hb`, so older names keep their meaning;
    mma_sums takes 1 KiB of ones (its n-tile of sums replaces l and the running sums: the register estimate
    stays, so d64's 192-row tile takes it), and not dropout (its sums would miss the dropped entries).
    mma_sums lost where the tensor cores are busy and is never picked; lazy rescaling is the dispatcher's
    where it was timed faster (dispatch.lazy_rescale), and the tuner's candidates follow it (both ways when
    exhaustive)."""
    cfg = FwdSm90Config("bf16", 128, persistent=True, causal=True, cross_tile=True, half_blocks=True,
                        lazy_rescale=True, mma_sums=True)
    assert not cfg.problems() and cfg.name.endswith("_xt_hb_lr_ms") and config_from_name(cfg.name) == cfg
    for knob in ("lazy_rescale", "mma_sums"):
        alone = FwdSm90Config("bf16", 64, **{knob: True})
        assert config_from_name(alone.name) == alone and not config_from_name(FwdSm90Config("bf16", 64).name).__dict__[knob]
    plain = dataclasses.replace(cfg, mma_sums=False)
    assert (cfg.smem_bytes - plain.smem_bytes, cfg.register_estimate() - plain.register_estimate()) == (1024, 0)
    assert not FwdSm90Config("bf16", 64, 192, 128, 4, persistent=True, cross_tile=True, mma_sums=True).problems()
    assert fwd_sm90.WHY_MMA_SUMS in dataclasses.replace(cfg, dropout=True).problems()
    assert not dataclasses.replace(cfg, dropout=True, mma_sums=False).problems()  # lazy rescaling takes dropout
    for d_head in (64, 128, 256):
        for causal in (False, True):
            lazy = dispatch.lazy_rescale(d_head, causal)
            space = dispatch.get_autotuning_kernel_configs("bf16", d_head, causal, arch="sm_90a")
            assert {c.lazy_rescale for c in space} == {lazy} and not any(c.mma_sums for c in space)
            whole = dispatch.get_autotuning_kernel_configs("bf16", d_head, causal, exhaustive=True, arch="sm_90a")
            assert set(whole) == set(space) | {dataclasses.replace(c, lazy_rescale=not lazy) for c in space}
            for seqlen in (1024, 4096):
                picked = dispatch.default_config("bf16", d_head, causal, seqlen, arch="sm_90a")
                assert (picked.lazy_rescale, picked.mma_sums) == (lazy, False)
    # measured (docs/perf-log.md, thirty-first, sixty-first and sixty-fourth sessions): faster non-causal and
    # above d64 causal; not at d64 causal (192 rows, -0.4 to -1.4%). By tile width: d96 as d128, d160 as d192;
    # but d72 / d80 causal stay eager (their one-CTA-a-tile lazy kernels are serialized by ptxas).
    dims = (32, 64, 72, 80, 88, 96, 128, 160, 192, 224, 256)
    on = {(d, c) for d in dims for c in (False, True) if dispatch.lazy_rescale(d, c)}
    assert on == {(d, False) for d in dims} | {(d, True) for d in dims if d > 80}


def test_dropout_mask_slots_with_mask_warps_where_they_fit_else_swap_buffers():
    """The forward's mask warps (mask_warps, `_mw` last; kernels/fwd_sm90.cuh, Config::kMaskWarps) fill two
    slots a K stage, a bit an entry of each consumer thread's in whole words: only with dropout, in
    persistent kernels (at one CTA a tile each tile's first block waited for its masks) and where the slots
    fit beside the tiles (not d256's 80-key one). Without them the consumer warps of a 32-row span swap
    halves of their Philox calls through buffers of their own where those fit (Config::kPairSwap);
    tests/test_jit_cache.py checks the compiled sizes."""
    for d_head, block_n, stages in ((64, 128, 4), (128, 128, 2), (128, 176, 2), (96, 128, 2)):
        plain = FwdSm90Config("bf16", d_head, 128, block_n, stages, persistent=True)
        words = (block_n // 16 + 3) // 4
        swap = 2 * 4 * (block_n // 16) * 32 * 8
        masked = dataclasses.replace(plain, dropout=True, mask_warps=True)
        assert masked.smem_bytes - plain.smem_bytes == 2 * stages * 256 * 4 * words
        assert not masked.problems() and masked.name.endswith("_mw") and config_from_name(masked.name) == masked
        for swapped in (dataclasses.replace(masked, mask_warps=False), masked.one_cta_per_tile()):
            tiles = dataclasses.replace(swapped, dropout=False).smem_bytes
            # (one CTA an SM here: the buffers go in where the CTA's 227 KiB hold them, counted independently)
            assert swapped.smem_bytes == (tiles + swap if tiles + swap <= 227 * 1024 else tiles)
            assert not swapped.problems()
        assert fwd_sm90.WHY_MASK_WARPS in dataclasses.replace(masked, persistent=False, cross_tile=False).problems()
        assert fwd_sm90.WHY_MASK_WARPS in dataclasses.replace(plain, mask_warps=True).problems()
    d256 = FwdSm90Config("bf16", 256, 128, 80, 2, persistent=True, dropout=True)
    assert fwd_sm90.WHY_MASK_WARPS in dataclasses.replace(d256, mask_warps=True).problems()
    assert d256.smem_bytes == dataclasses.replace(d256, dropout=False).smem_bytes <= 227 * 1024
    # the dispatcher's rule (flashjit/dispatch.py): causal rows up to MASK_WARPS_CAUSAL, or where the swap's
    # buffers do not fit (FlashAttention-3's 176-key tile: its consumers would make every call of a span each)
    n176 = FwdSm90Config("bf16", 128, 128, 176, 2, persistent=True, dropout=True)
    assert not n176.fits_beside_tiles(n176.pair_swap_bytes) and dispatch.with_mask_warps(n176, 4096).mask_warps
    assert not dispatch.with_mask_warps(dataclasses.replace(n176, block_n=128), 4096).mask_warps
    for d_head in (64, 96, 128):
        for causal in (False, True):
            for seqlen in (512, 1024, 2048, 4096):
                cfg = dispatch.default_config("bf16", d_head, causal, seqlen, arch="sm_90a", dropout=True)
                want = causal and seqlen <= dispatch.MASK_WARPS_CAUSAL and cfg.persistent
                assert cfg.mask_warps == want, cfg.name


def test_two_ctas_take_the_one_shape_that_fits_104_registers():
    """two_ctas: an `_x2` suffix last (older names keep their meaning); 104 registers a consumer thread
    (half a CTA's file at two an SM), so d_head <= 64, 64-key blocks, two consumer warpgroups and no
    overlap (ptxas spilled the overlap's second S and serialized its wgmmas: C7512); a persistent
    grid is two CTAs an SM (ctas_per_sm, which the causal tile walk is made for)."""
    cfg = FwdSm90Config("bf16", 64, 128, 64, 4, overlap=False, pingpong=False, persistent=True, causal=True,
                        two_ctas=True)
    assert not cfg.problems() and cfg.name.endswith("_causal1_x2") and config_from_name(cfg.name) == cfg
    assert (cfg.register_budget, cfg.ctas_per_sm, dataclasses.replace(cfg, two_ctas=False).ctas_per_sm) == (104, 2, 1)
    assert cfg.smem_bytes <= (228 - 2) * 1024 // 2  # two CTAs' tiles and reserved 1 KiB each in the SM's 228
    assert not dataclasses.replace(cfg, d_head=40, local=True, dropout=True).problems()
    for bad in (dict(overlap=True), dict(overlap=True, pingpong=True), dict(block_n=128), dict(d_head=96),
                dict(block_m=192), dict(d_head=128, d_v=64)):
        assert fwd_sm90.WHY_TWO_CTAS in dataclasses.replace(cfg, **bad).problems(), bad
    assert not any(c.two_ctas for d in (64, 128) for causal in (False, True)
                   for c in dispatch.get_autotuning_kernel_configs("bf16", d, causal, arch="sm_90a"))


def test_fa3_tiles_n176_n80_parse_fit_and_are_tuning_candidates_only():
    """block_n 176 (d128) and 80 (d256), FlashAttention-3's tiles: their names parse, they fit with two
    stages (209 and 225 KiB of 227) and no more; 176 does not fit d256's registers nor a 192-row tile;
    the tuner times them; d256 takes 80 by default past SHORT_CAUSAL causal queries (measured faster there),
    the build set with it, but 64 with dropout (the pair swap's room); d128's 176 (measured level) stays a
    tuning candidate."""
    for d, n, kib in ((128, 176, 209), (256, 80, 225)):
        for dtype, causal, pingpong, persistent in itertools.product(("bf16", "fp16"), (False, True), (False, True),
                                                                     (False, True)):
            cfg = FwdSm90Config(dtype, d, 128, n, 2, True, pingpong, persistent, causal)
            assert not cfg.problems() and config_from_name(cfg.name) == cfg and f"_n{n}_st2_" in cfg.name
            assert cfg.smem_bytes // 1024 == kib and f"/*block_n=*/{n}," in codegen.render(cfg)
        base = FwdSm90Config("bf16", d, 128, n, 2)
        for stages in (3, 4):
            assert any(fwd_sm90.WHY_SMEM in p for p in dataclasses.replace(base, stages=stages).problems())
        assert any(fwd_sm90.WHY_REGISTERS in p for p in dataclasses.replace(base, block_m=192, pingpong=False).problems())
        as_dispatched = dataclasses.replace(base, lazy_rescale=dispatch.lazy_rescale(d, False))
        assert as_dispatched in dispatch.get_autotuning_kernel_configs("bf16", d, False, arch="sm_90a")
    assert any(fwd_sm90.WHY_REGISTERS in p for p in FwdSm90Config("bf16", 256, block_n=176).problems())
    assert any(fwd_sm90.WHY_REGISTERS in p for p in FwdSm90Config("bf16", 128, block_n=176, local=True,
                                                                  softcap=True).problems())
    assert any(fwd_sm90.WHY_BLOCK_N in p for p in FwdSm90Config(block_n=112).problems())
    build = [c for c in flashjit.get_kernels_to_build(arch="sm_90a") if isinstance(c, FwdSm90Config)]
    assert 176 not in {c.block_n for c in build}
    assert {c.block_n for c in build if c.d_head == 256 and c.causal} == {64, 80}  # short causal: 64
    assert {c.block_n for c in build if c.d_head == 256 and not c.causal} == {80}
    long, short = (dispatch.default_config("bf16", 256, True, s, arch="sm_90a") for s in (4096, dispatch.SHORT_CAUSAL))
    assert (long.block_n, short.block_n) == (80, 64)
    # with every feature 80 does not fit the registers: the next preference, 64
    assert dispatch.default_config("bf16", 256, True, 4096, arch="sm_90a", local=True, softcap=True, alibi=True,
                                   dropout=True).block_n == 64
    # with dropout 64 at every length: only 64-key tiles leave room for the pair swap's buffers (+6-9%, H200)
    for d_head, causal, seqlen in itertools.product((200, 256), (False, True), (512, 4096, 16384)):
        cfg = dispatch.default_config("bf16", d_head, causal, seqlen, arch="sm_90a", dropout=True)
        assert cfg.block_n == 64 and cfg.fits_beside_tiles(cfg.pair_swap_bytes), cfg.name
    n80 = FwdSm90Config("bf16", 256, 128, 80, 2, dropout=True)
    assert not n80.fits_beside_tiles(n80.pair_swap_bytes)


def test_build_set_and_defaults_are_valid():
    build = flashjit.get_kernels_to_build()
    assert len(build) == len({c.name for c in build})
    assert {(c.dtype, c.d_head, c.causal) for c in build} == {
        (d, h, c) for d in common.DTYPES for h in common.HEAD_DIMS for c in (False, True)}
    for c in build:
        assert not c.problems(), c
        assert c.smem_bytes <= 227 * 1024
    for d in common.HEAD_DIMS:
        for seqlen in (1, 64, 65, 100000):
            flashjit.default_config("bf16", d, True, seqlen).validate()


def test_shared_memory_check_names_the_device():
    with pytest.raises(ValueError, match="RTX 3090 allows 99 KiB"):
        KernelConfig(d_head=256, B_c=128, B_r=128, n_warps=8, k_frag_depth=1, v_frag_depth=1,
                     mma_double_buffer_loads=False).check_shared_memory(99 * 1024, "RTX 3090")


def test_backward_configs():
    default_bwd_config = dispatch.default_bwd_config
    for dtype, d in itertools.product(common.DTYPES, common.HEAD_DIMS):
        for causal, det in itertools.product((False, True), (False, True)):
            cfg = default_bwd_config(dtype, d, causal, deterministic=det).validate()
            assert config_from_name(cfg.name) == cfg and "bwd_sm80.cuh" in codegen.render(cfg)
            assert cfg.deterministic == det and (cfg.d_split > 1 or d <= 128)
            for limit in (163 * 1024, 99 * 1024):  # sm_80, sm_86/sm_89
                if d == 256 and limit == 99 * 1024:
                    with pytest.raises(ValueError, match="d_head=256 fits 99 KiB"):
                        default_bwd_config(dtype, d, causal, deterministic=det, smem_limit=limit)
                else:
                    assert default_bwd_config(dtype, d, causal, deterministic=det, smem_limit=limit).smem_bytes \
                        <= limit
    assert any(bwd_sm80.WHY_BWD_REGISTERS in p for p in BwdConfig(d_head=128, n_warps=8, block_m=128).problems())
    assert any(bwd_sm80.WHY_BWD_REGISTERS in p for p in BwdConfig(d_head=256, n_warps=8, block_m=64).problems())
    assert not BwdConfig(d_head=256, n_warps=8, block_m=64, d_split=2).problems()
    assert any(bwd_sm80.WHY_BWD_STAGING in p for p in BwdConfig(n_warps=8, block_m=32).problems())
    assert any(bwd_sm80.WHY_BWD_DQ_TILING in p
               for p in BwdConfig(d_head=160, n_warps=8, block_m=32, d_split=2).problems())
    assert not BwdConfig(d_head=160, n_warps=8, block_m=32, d_split=2, deterministic=True).problems()
    assert any(bwd_sm80.WHY_BWD_SHARES in p for p in BwdConfig(n_warps=8, block_m=32, d_split=4).problems())
    assert any(bwd_sm80.WHY_BWD_COLUMNS in p
               for p in BwdConfig(d_head=160, n_warps=8, d_split=4, group_rows=32).problems())
    assert not BwdConfig(d_head=256, n_warps=8, block_m=64, d_split=4, group_rows=32).problems()
    with pytest.raises(ValueError, match="backward kernel name"):
        BwdConfig.from_name("bwd_bf16_d128")


def test_value_head_dim_configs():
    """d_v (MLA-style d_qk != d_v): 0 means d_head, so d_v == d_head is that same config; names carry
    it only when set (every older name stands); it must be a multiple of 8 up to d_head; kvcache
    kernels refuse it; the dispatcher keeps the arch's family (the wgmma backward has no d_v, so the
    sm_80 backward serves it on sm_90a) and sizes V's tiles by d_v."""
    assert KernelConfig(d_head=128, d_v=128) == KernelConfig() and "_dv" not in KernelConfig().name
    for cfg in (KernelConfig(d_head=192, B_r=64, B_c=64, mma_double_buffer_loads=False, d_v=128),
                BwdConfig("fp16", 192, 8, 64, 4, 32, deterministic=True, causal=True, dropout=True, d_v=128),
                FwdSm90Config("bf16", 128, causal=True, local=True, sink=True, d_v=64)):
        assert cfg.name.endswith("_dv" + str(cfg.d_v)) and config_from_name(cfg.name) == cfg
        assert not cfg.problems() and cfg.head_dim_v == cfg.d_v and "/*d_v=*/" + str(cfg.d_v) in codegen.render(cfg)
    for family_config in (KernelConfig, lambda **kw: BwdConfig(**kw), FwdSm90Config):
        for bad in (136, 12, -8):
            assert any(common.WHY_HEAD_DIM_V in p for p in family_config(d_head=128, d_v=bad).problems())
    assert any(fwd_sm80.WHY_KVCACHE_D_V in p for p in KernelConfig(d_v=64, kvcache=True).problems())
    # V's tile is d_v wide: less shared memory than d_v == d_head.
    assert KernelConfig(d_head=192, d_v=128).smem_bytes == ((128 + 64) * 192 + 64 * 128) * 2
    assert BwdConfig("bf16", 192, 8, 64, 4, 32, d_v=128).smem_bytes < BwdConfig("bf16", 192, 8, 64, 4, 32).smem_bytes
    fwd = dispatch.default_config("bf16", 192, True, 4096, arch="sm_90a", d_v=128)
    assert isinstance(fwd, FwdSm90Config) and fwd.d_v == 128
    assert isinstance(dispatch.default_config("bf16", 192, True, 4096, arch="sm_80", d_v=128), KernelConfig)
    for det in (False, True):
        bwd = dispatch.default_bwd_config("bf16", 128, False, deterministic=det, wgmma=True, d_v=64)
        assert isinstance(bwd, BwdConfig) and bwd.d_v == 64 and bwd.deterministic == det
    with pytest.raises(ValueError, match="d_v must be"):
        dispatch.default_config("bf16", 64, False, 4096, arch="sm_80", d_v=128)
    with pytest.raises(ValueError, match="wgmma backward needs d_v == d_head"), \
            pytest.warns(DeprecationWarning, match="BwdSm90Config"):  # the old spelling still checks its d_v
        BwdConfig(d_head=128, n_warps=8, d_v=64, wgmma=True)


@pytest.mark.parametrize("d_head, d_v, features, pads", [
    (128, 64, {}, True), (64, 32, {}, True), (40, 24, {}, True),     # d_head fills its wgmma tile
    (96, 64, {}, False),                                             # the 128 tile would be a quarter padding
    (128, 48, {}, False), (64, 16, {}, False),                       # d_v < d_head / 2: padding would double V's work
    (192, 128, {}, False),                                           # no wgmma kernel for 192
    (128, 128, {}, False),                                           # nothing to pad
    (64, 32, dict(softcap=True), False),                             # no d64 wgmma kernel with softcap
    (128, 64, dict(deterministic=True), False),                      # the wgmma kernel has no deterministic variant
    (128, 64, dict(wgmma=False), False),                             # not sm_90a
])
def test_backward_pads_value_where_the_wgmma_kernel_then_serves(d_head, d_v, features, pads):
    features = dict(dict(wgmma=True), **features)
    assert dispatch.backward_pads_value("bf16", d_head, d_v, False, **features) == pads


def test_sm90_backward_configs():
    """On sm_90a the Hopper kernel (BwdSm90Config) is the default where it exists; elsewhere the sm_80 one."""
    for dtype, d, causal, det, dropout, softcap in itertools.product(common.DTYPES, common.HEAD_DIMS, (False, True),
                                                                     (False, True), (False, True), (False, True)):
        cfg = dispatch.default_bwd_config(dtype, d, causal, softcap=softcap, dropout=dropout, deterministic=det,
                                          wgmma=True)
        expected = 32 < d <= 256 and not det and not (softcap and d <= 64)  # 96 in its 128 tile, 160 in 192
        assert isinstance(cfg, BwdSm90Config) == expected and config_from_name(cfg.name) == cfg and not cfg.problems()
        assert ("bwd_sm90.cuh" if expected else "bwd_sm80.cuh") in codegen.render(cfg)
        assert cfg.deterministic == det  # the Hopper kernel is never picked for a deterministic call
        assert isinstance(dispatch.default_bwd_config(dtype, d, causal, softcap=softcap, dropout=dropout,
                                                      deterministic=det), BwdConfig)
    assert [c for c in flashjit.get_kernels_to_build(arch="sm_90a") if isinstance(c, BwdSm90Config)]
    assert not [c for c in flashjit.get_kernels_to_build(arch="sm_80") if isinstance(c, BwdSm90Config)]
    for bad, reason in ((BwdSm90Config(d_head=128, block_m=128), bwd_sm90.WHY_WGMMA_SHAPES),
                        (BwdSm90Config(d_head=96, block_m=128), bwd_sm90.WHY_WGMMA_SHAPES),
                        (BwdSm90Config(d_head=32, block_m=128), bwd_sm90.WHY_WGMMA_SHAPES),
                        (BwdSm90Config(d_head=64, block_m=128, softcap=True), bwd_sm90.WHY_WGMMA_SOFTCAP),
                        (BwdSm90Config(d_head=256, block_m=128, tma=True), bwd_sm90.WHY_WGMMA_SHAPES),
                        (BwdSm90Config(d_head=192, block_m=64), bwd_sm90.WHY_WGMMA_WIDE_TMA)):
        assert any(reason in p for p in bad.problems()), bad
    # the wide kernel (d_head 129-256): 64-key CTAs, whole 64-column blocks (160 in 192), under 227 KiB
    for d_head, tile in ((136, 192), (160, 192), (192, 192), (200, 256), (256, 256)):
        wide = BwdSm90Config(d_head=d_head, block_m=64, tma=True, head_split=True, softcap=True, dropout=True)
        assert not wide.problems() and (wide.d_tile, wide.block_n) == (tile, 64) and wide.smem_bytes <= 227 * 1024
        assert config_from_name(wide.name) == wide
    assert not BwdSm90Config(d_head=64, block_m=128).problems() and not BwdSm90Config().problems()
    fixed = BwdSm90Config()
    assert (fixed.n_warps, fixed.d_split, fixed.group_rows, fixed.deterministic, fixed.block_n) == \
        (8, 1, 16, False, 128)
    assert {f.name for f in dataclasses.fields(BwdSm90Config)} == {
        "dtype", "d_head", "block_m", "causal", *common.FEATURES, "head_split", "tma"}
    with pytest.raises(ValueError, match="builds only for sm_90a, not sm_80"):
        jit.ensure_built(BwdSm90Config(d_head=128), "sm_80")
    # tma: a second dS^T buffer and 5 mbarriers more (Config::kSmemBytes; tests/test_jit_cache.py
    # reads the compiled value), within Hopper's 227 KiB for both tiles.
    for d_head, block_m in ((128, 64), (64, 128)):
        plain = BwdSm90Config(d_head=d_head, block_m=block_m)
        loaded = dataclasses.replace(plain, tma=True)
        assert loaded.smem_bytes == plain.smem_bytes + 2 * plain.block_n * block_m + 5 * 8 <= 227 * 1024
        assert not loaded.problems()


def test_old_wgmma_names_parse_to_bwd_sm90_config():
    """BwdSm90Config keeps the name BwdConfig(wgmma=True) gave, so cache entries, bundles and names
    users wrote down still resolve; names with other values of what the kernel fixes never existed."""
    name = "bwd_bf16_d128_w8_m64_s1_r16_det0_causal0_wgmma"
    assert config_from_name(name) == BwdSm90Config("bf16", 128, 64) == BwdSm90Config.from_name(name)
    assert BwdSm90Config("bf16", 128, 64).name == name
    featured = "bwd_fp16_d40_w8_m128_s1_r16_det0_causal1_local_alibi_dropout_wgmma"
    assert config_from_name(featured) == BwdSm90Config("fp16", 40, 128, True, local=True, alibi=True, dropout=True)
    assert config_from_name(featured).name == featured
    split = "bwd_fp16_d40_w8_m128_s1_r16_det0_causal1_local_alibi_dropout_hs_wgmma"  # one CTA per query head
    assert config_from_name(split) == BwdSm90Config("fp16", 40, 128, True, local=True, alibi=True, dropout=True,
                                                    head_split=True)
    assert config_from_name(split).name == split and split.replace("_hs", "") == featured
    loaded = split.replace("_hs_", "_hs_tma_")  # the producer-warpgroup (TMA) variant, after _hs
    assert config_from_name(loaded) == dataclasses.replace(config_from_name(split), tma=True)
    assert config_from_name(loaded).name == loaded
    assert config_from_name(featured.replace("_wgmma", "_tma_wgmma")).tma
    for never in (name.replace("_w8_", "_w4_"), name.replace("_det0_", "_det1_"), name.replace("_s1_", "_s2_")):
        with pytest.raises(ValueError, match="is not a flashjit backward kernel name"):
            config_from_name(never)
    with pytest.raises(ValueError, match="backward kernel name"):
        BwdConfig.from_name(name)


def test_deprecated_bwd_config_wgmma_gives_a_bwd_sm90_config():
    with pytest.warns(DeprecationWarning, match="BwdSm90Config"):
        cfg = BwdConfig("bf16", 128, 8, 64, causal=True, dropout=True, wgmma=True)
    assert cfg == BwdSm90Config("bf16", 128, 64, causal=True, dropout=True)
    with pytest.warns(DeprecationWarning):  # positionally, as the 13th argument
        assert BwdConfig("fp16", 64, 8, 128, 1, 16, False, False, False, False, True, False, True) == \
            BwdSm90Config("fp16", 64, 128, alibi=True)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=re.escape(bwd_sm90.WHY_WGMMA_WARPS)):
        BwdConfig(d_head=128, wgmma=True)  # n_warps=4: never a Hopper kernel
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=bwd_sm90.WHY_WGMMA_VARIANTS):
        BwdConfig(d_head=128, n_warps=8, deterministic=True, wgmma=True)
    plain = BwdConfig("bf16", 128, wgmma=False)
    assert type(plain) is BwdConfig and plain == BwdConfig()
    assert "wgmma" not in {f.name for f in dataclasses.fields(plain)}
    assert dataclasses.replace(plain, block_m=32) == BwdConfig(block_m=32)


# ---- the registry ----------------------------------------------------------------------------

def test_every_familys_build_set_names_round_trip():
    """Every family has kernels in some arch's build set; each name is parsed by exactly its own
    family, starts with the family's direction, and gives the config back."""
    seen = set()
    for arch in ("sm_80", "sm_86", "sm_90a", "sm_100a", "sm_120"):
        for config in dispatch.get_kernels_to_build(smem_limit_for_arch(arch), arch):
            family = family_of(config)
            seen.add(family.name)
            assert [f for f in FAMILIES if f.config.parse_name(config.name) is not None] == [family]
            assert config.name.startswith(family.direction + "_") and config_from_name(config.name) == config
            if family.arch is not None:
                assert arch == family.arch, f"{config.name} is in the {arch} build set"
    assert seen == {f.name for f in FAMILIES}


@pytest.mark.parametrize("bad, what", [("fwd_bf16_d128", "kernel name"), ("bwd_bf16_d128", "backward kernel name"),
                                       ("attention", "kernel name")])
def test_config_from_name_says_what_a_name_looks_like(bad, what):
    with pytest.raises(ValueError, match=f"is not a flashjit {what} \\(expected e.g. ") as info:
        config_from_name(bad)
    for family in FAMILIES:  # examples of the name's direction (all, for an unknown one)
        assert (family.config().name in str(info.value)) == (bad[:3] in (family.direction, "att"))


def test_family_of_and_register_refuse_what_is_not_a_family():
    assert [family_of(f.config()) for f in FAMILIES] == FAMILIES
    with pytest.raises(TypeError, match="not a flashjit kernel config"):
        family_of("fwd_bf16_d128")
    with pytest.raises(ValueError, match="registered twice"):
        register(FAMILIES[0])


@dataclass(frozen=True)
class _ToyConfig(ConfigBase):
    dtype: str = "bf16"
    d_head: int = 64
    smem_bytes = 0

    def problems(self) -> list[str]:
        return []

    @property
    def name(self) -> str:
        return f"fwd_toy_{self.dtype}_d{self.d_head}"

    @classmethod
    def parse_name(cls, name: str):
        match = re.fullmatch(r"fwd_toy_(fp16|bf16)_d(\d+)", name)
        return match and cls(match[1], int(match[2]))


def test_a_new_family_is_a_module_and_a_register_line():
    """A family registered at run time (as the Hopper forward will be) is parsed, rendered, checked
    for its arch, launched with its params and accepted by the forward call, with no other edit."""
    from flashjit import interface

    toy = Family("fwd_toy", _ToyConfig, template="fwd_toy.cuh", namespace="fwd_toy", params="FwdParams",
                 direction="fwd", arch="sm_90a")
    _ToyConfig.family = toy
    register(toy)
    try:
        config = config_from_name("fwd_toy_fp16_d64")
        assert config == _ToyConfig("fp16", 64) and family_of(config) is toy
        text = codegen.render(config)
        assert '#include "fwd_toy.cuh"' in text and "const flashjit::FwdParams*" in text
        assert "flashjit::fwd_toy::Config<\n    /*bf16=*/false,\n    /*d_head=*/64>;" in text
        assert "flashjit::fwd_toy::launch<Cfg>(*params" in text
        with pytest.raises(ValueError, match="fwd_toy kernel .* builds only for sm_90a, not sm_80"):
            jit._check(config, "sm_80")
        jit._check(config, "sm_90a")
        assert launch.PARAMS[toy.params] is launch.FwdParams
        interface._check_config_type(config, "fwd")
        with pytest.raises(TypeError, match="config must be a flashjit.BwdConfig or flashjit.BwdSm90Config, got _Toy"):
            interface._check_config_type(config, "bwd")
    finally:
        FAMILIES.remove(toy)


def test_flashjit_config_still_exports_what_it_did():
    """flashjit.config is a compatibility module: the same objects as their new homes."""
    assert cfgmod.KernelConfig is fwd_sm80.KernelConfig and cfgmod.BwdConfig is bwd_sm80.BwdConfig
    assert cfgmod.BwdSm90Config is bwd_sm90.BwdSm90Config and cfgmod.config_from_name is config_from_name
    for name in ("default_config", "default_bwd_config", "get_kernels_to_build", "get_autotuning_kernel_configs"):
        assert getattr(cfgmod, name) is getattr(dispatch, name) is getattr(flashjit, name, getattr(dispatch, name))
    for name in ("WGMMA_ARCH", "WGMMA_SHAPES", "wgmma_tile", "WHY_WGMMA_WARPS", "WHY_WGMMA_VARIANTS", "HEAD_DIMS",
                 "smem_limit_for_arch", "SMEM_LIMIT_SM90", "_Validated", "WHY_BWD_STAGING", "WHY_HEAD_DIM"):
        assert hasattr(cfgmod, name), name


def test_short_causal_d64_takes_two_ctas_an_sm():
    """Up to SHORT causal queries a d64 (and d32: the same 64 tile) forward on sm_90a runs two CTAs an SM of
    128 rows and 64-key blocks, persistent (313 against 289 TFLOP/s for the 128-row half-block tile at S = 1k
    on an H200, 256 against 221 at 512), with every score feature (ptxas: no spills); at 2k and longer, and
    non-causal, 192 rows (two CTAs: 359 against 369 at 2k); precompile's build set holds it and its twin."""
    for feature in ({}, dict(local=True), dict(softcap=True), dict(alibi=True), dict(dropout=True), dict(sink=True)):
        short = dispatch.default_config("bf16", 64, True, dispatch.SHORT, arch="sm_90a", **feature)
        assert (short.block_m, short.block_n, short.overlap, short.persistent, short.two_ctas) == \
            (128, 64, False, True, True), short.name
    for causal, seqlen in ((True, dispatch.SHORT + 1), (True, dispatch.SHORT_CAUSAL), (False, 1024)):
        longer = dispatch.default_config("bf16", 64, causal, seqlen, arch="sm_90a")
        assert (longer.block_m, longer.two_ctas) == (192, False), longer.name
    assert dispatch.default_config("fp16", 32, True, 1024, arch="sm_90a").two_ctas
    short = dispatch.default_config("bf16", 64, True, dispatch.SHORT, arch="sm_90a")
    built = dispatch.get_kernels_to_build(arch="sm_90a")
    assert short in built and short.one_cta_per_tile() in built


def test_causal_defaults_take_half_blocks_where_ptxas_keeps_their_wgmmas_pipelined():
    """Causal Hopper defaults from d64 up whose tile halves (block_n 128 or 192) run half blocks, with
    dropout too, and so does the tile walk's one-CTA twin. Not with a window, softcap, ALiBi, sinks or
    d_v != d_head, nor below d64, nor at d104-d120: ptxas serialized some of those kernels' wgmmas (C7511) or
    spilled more (scripts/ptxas_notes.py). Not non-causal rows (only a short last block would be half: by
    choice) nor d192/d256 (block_n 96, 80 or 64)."""
    for d_head, seqlen in itertools.product((64, 72, 96, 128), (512, 1024, 2048, 4096, 16384)):
        if d_head == 64 and seqlen <= dispatch.SHORT:
            continue  # two CTAs an SM (no overlap, so no half blocks): the test above
        for feature in ({}, dict(dropout=True)):
            cfg = dispatch.default_config("bf16", d_head, True, seqlen, arch="sm_90a", **feature)
            assert cfg.half_blocks and cfg.one_cta_per_tile().half_blocks, cfg.name
        for feature in (dict(local=True), dict(softcap=True), dict(alibi=True), dict(sink=True), dict(d_v=32)):
            assert not dispatch.default_config("bf16", d_head, True, seqlen, arch="sm_90a", **feature).half_blocks
        assert not dispatch.default_config("bf16", d_head, False, seqlen, arch="sm_90a").half_blocks
    for d_head in (8, 32, 48, 104, 112, 120, 192, 256):
        assert not dispatch.default_config("bf16", d_head, True, 4096, arch="sm_90a").half_blocks


def test_cross_tile_defaults():
    """The 128-wide Hopper tile (d 72-128) runs cross_tile at every length, causal or not (measured +3-6%
    non-causal at 2k-16k on an H100, +1-3% causal), and the 64-wide one non-causal (+2-4%) and causal past the
    short causal rows (+2-4% at 2k), except with a window (its cross-tile kernel spills) and, at d64, with a score
    feature other than sinks (the 192-row tile's registers: the 128-row fallback); the tile walk's twin
    drops both; precompile's build set holds the short kernel and that twin."""
    for d_head, causal, seqlen in itertools.product((96, 128), (False, True), (512, dispatch.SHORT, 4096, 16384)):
        cfg = dispatch.default_config("bf16", d_head, causal, seqlen, arch="sm_90a")
        assert (cfg.persistent, cfg.cross_tile) == (True, True), cfg.name
    assert not dispatch.default_config("bf16", 128, True, 4096, arch="sm_90a", local=True).cross_tile
    assert not dispatch.default_config("bf16", 128, False, 512, arch="sm_90a", local=True).cross_tile
    # d64's 192-row tile takes it with ping-pong, causal past SHORT (up to it the two-CTA 128-row tile)
    for seqlen in (512, dispatch.SHORT + 1, 16384):
        d64 = dispatch.default_config("bf16", 64, False, seqlen, arch="sm_90a")
        assert (d64.block_m, d64.pingpong, d64.cross_tile) == (192, True, True), d64.name
        causal = dispatch.default_config("bf16", 64, True, seqlen, arch="sm_90a")
        assert causal.cross_tile == (seqlen > dispatch.SHORT) and causal.two_ctas == (seqlen <= dispatch.SHORT)
        assert not dispatch.default_config("bf16", 64, False, seqlen, arch="sm_90a", softcap=True).cross_tile
        assert not dispatch.default_config("bf16", 64, True, seqlen, arch="sm_90a", softcap=True).cross_tile
    short = dispatch.default_config("fp16", 128, True, 1024, arch="sm_90a")
    twin = dispatch.with_tile_walk(short, None, 1024, lambda: 132)  # a varlen batch: one CTA per tile
    assert (twin.persistent, twin.cross_tile) == (False, False) and not twin.problems()
    built = dispatch.get_kernels_to_build(arch="sm_90a")
    assert short in built and twin in built

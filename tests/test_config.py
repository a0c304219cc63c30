"""KernelConfig: names round-trip, every rule rejects with its reason, and the C++ static_asserts
carry the same reasons; the build set and the tuning space are valid."""
import dataclasses
import itertools
import re

import pytest

import flashjit
from flashjit import BwdConfig, KernelConfig, codegen, config as cfgmod


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
    (dict(d_head=84), cfgmod.WHY_HEAD_DIM),
    (dict(d_head=264), cfgmod.WHY_HEAD_DIM),
    (dict(d_head=0), cfgmod.WHY_HEAD_DIM),
    (dict(B_r=32), "B_r must be one of"),
    (dict(B_c=16), "B_c must be one of"),
    (dict(n_warps=2), "n_warps must be one of"),
    (dict(B_r=64, n_warps=8), cfgmod.WHY_WARP_ROWS),
    (dict(q_frag_depth=3), cfgmod.WHY_DEPTH),
    (dict(d_head=96, k_frag_depth=4), cfgmod.WHY_DEPTH),
    (dict(async_copy=False, eager_load_blocks=True), cfgmod.WHY_EAGER),
    (dict(B_r=64, q_frag_depth=0, k_frag_depth=0, v_frag_depth=0, mma_double_buffer_loads=True),
     cfgmod.WHY_DOUBLE_BUFFER),
    (dict(q_frag_depth=0, k_frag_depth=0, v_frag_depth=0, mma_double_buffer_loads=False), cfgmod.WHY_REGISTERS),
])
def test_invalid_configs_say_why(changes, reason):
    config = dataclasses.replace(KernelConfig(), **changes)
    assert any(reason in p for p in config.problems()), config.problems()
    with pytest.raises(ValueError, match=re.escape(reason)):
        config.validate()


def test_static_asserts_carry_the_same_reasons():
    source = (codegen.kernels_dir() / "fwd_sm80.cuh").read_text()
    for reason in (cfgmod.WHY_WARP_ROWS, cfgmod.WHY_DEPTH, cfgmod.WHY_EAGER, cfgmod.WHY_DOUBLE_BUFFER,
                   cfgmod.WHY_REGISTERS, cfgmod.WHY_HEAD_DIM):
        assert f'"{reason}"' in source, reason
    assert f'"{cfgmod.WHY_HEAD_DIM}"' in (codegen.kernels_dir() / "bwd_sm80.cuh").read_text()


@pytest.mark.parametrize("d_head, tile", [(8, 32), (32, 32), (40, 64), (80, 96), (96, 96), (112, 128), (136, 160),
                                          (168, 192), (200, 256), (224, 256), (256, 256)])
def test_head_dims_run_in_the_next_tile(d_head, tile):
    """Any multiple of 8 up to 256 is a valid config whose geometry (shared memory, registers) is its
    tile's, and the kernels' head_dim_tile agrees with the Python one."""
    assert cfgmod.head_dim_tile(d_head) == tile
    fwd = flashjit.default_config("bf16", d_head, False)
    assert fwd.d_head == d_head and fwd.d_tile == tile and not fwd.problems()
    assert fwd.smem_bytes == dataclasses.replace(fwd, d_head=tile).smem_bytes
    for wgmma in (False, True):
        bwd = cfgmod.default_bwd_config("bf16", d_head, False, wgmma=wgmma)
        assert bwd.d_head == d_head and not bwd.problems()
        assert bwd.wgmma == (wgmma and 32 < d_head <= 128)
        assert bwd.d_tile == (cfgmod.wgmma_tile(d_head) if bwd.wgmma else tile)
    assert BwdConfig.from_name(bwd.name) == bwd and KernelConfig.from_name(fwd.name) == fwd
    source = (codegen.kernels_dir() / "common" / "params.cuh").read_text()
    assert "constexpr int head_dim_tile(int d) { return d <= 192 ? (d + 31) / 32 * 32 : 256; }" in source


def test_every_field_is_a_template_parameter():
    text = codegen.render(KernelConfig())
    for field in dataclasses.fields(KernelConfig):
        label = "bf16" if field.name == "dtype" else field.name
        assert f"/*{label}=*/" in text, field.name


def test_every_knob_changes_the_rendered_code():
    base = KernelConfig(B_r=64)  # 16 rows a warp: room to deepen every fragment depth
    flips = dict(dtype="fp16", d_head=64, B_r=128, B_c=32, n_warps=8, async_copy=False, eager_load_blocks=False,
                 swizzled=False, q_frag_depth=2, k_frag_depth=2, v_frag_depth=2, mma_double_buffer_loads=False,
                 optimized_softmax=False, causal=True, local=True, softcap=True, alibi=True,
                 dropout=True)
    assert set(flips) == {f.name for f in dataclasses.fields(KernelConfig)}
    for name, value in flips.items():
        changed = dataclasses.replace(base, **{name: value})
        if name == "async_copy":
            changed = dataclasses.replace(changed, eager_load_blocks=False)
        if name == "n_warps":
            changed = dataclasses.replace(changed, B_r=128)
        assert codegen.render(changed) != codegen.render(base), name


def test_build_set_and_defaults_are_valid():
    build = flashjit.get_kernels_to_build()
    assert len(build) == len({c.name for c in build})
    assert {(c.dtype, c.d_head, c.causal) for c in build} == {
        (d, h, c) for d in cfgmod.DTYPES for h in cfgmod.HEAD_DIMS for c in (False, True)}
    for c in build:
        assert not c.problems(), c
        assert c.smem_bytes <= 227 * 1024
    for d in cfgmod.HEAD_DIMS:
        for seqlen in (1, 64, 65, 100000):
            flashjit.default_config("bf16", d, True, seqlen).validate()


def test_shared_memory_check_names_the_device():
    with pytest.raises(ValueError, match="RTX 3090 allows 99 KiB"):
        KernelConfig(d_head=256, B_c=128, B_r=128, n_warps=8, k_frag_depth=1, v_frag_depth=1,
                     mma_double_buffer_loads=False).check_shared_memory(99 * 1024, "RTX 3090")


def test_backward_configs():
    from flashjit.config import BwdConfig, config_from_name, default_bwd_config

    for dtype, d in itertools.product(cfgmod.DTYPES, cfgmod.HEAD_DIMS):
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
    assert any(cfgmod.WHY_BWD_REGISTERS in p for p in BwdConfig(d_head=128, n_warps=8, block_m=128).problems())
    assert any(cfgmod.WHY_BWD_REGISTERS in p for p in BwdConfig(d_head=256, n_warps=8, block_m=64).problems())
    assert not BwdConfig(d_head=256, n_warps=8, block_m=64, d_split=2).problems()
    assert any(cfgmod.WHY_BWD_STAGING in p for p in BwdConfig(n_warps=8, block_m=32).problems())
    assert any(cfgmod.WHY_BWD_DQ_TILING in p for p in BwdConfig(d_head=160, n_warps=8, block_m=32, d_split=2).problems())
    assert not BwdConfig(d_head=160, n_warps=8, block_m=32, d_split=2, deterministic=True).problems()
    source = (codegen.kernels_dir() / "bwd_sm80.cuh").read_text()
    assert any(cfgmod.WHY_BWD_SHARES in p for p in BwdConfig(n_warps=8, block_m=32, d_split=4).problems())
    assert any(cfgmod.WHY_BWD_COLUMNS in p for p in BwdConfig(d_head=160, n_warps=8, d_split=4, group_rows=32).problems())
    assert not BwdConfig(d_head=256, n_warps=8, block_m=64, d_split=4, group_rows=32).problems()
    for reason in (cfgmod.WHY_BWD_REGISTERS, cfgmod.WHY_BWD_STAGING, cfgmod.WHY_BWD_DQ_TILING, cfgmod.WHY_BWD_SHARES,
                   cfgmod.WHY_BWD_COLUMNS):
        assert f'"{reason}"' in source, reason
    with pytest.raises(ValueError, match="backward kernel name"):
        BwdConfig.from_name("bwd_bf16_d128")


def test_wgmma_backward_configs():
    """On sm_90a the Hopper kernel is the default where it exists; elsewhere the sm_80 one."""
    from flashjit import jit
    from flashjit.config import BwdConfig, config_from_name, default_bwd_config

    for dtype, d, causal, det, dropout, softcap in itertools.product(cfgmod.DTYPES, cfgmod.HEAD_DIMS, (False, True),
                                                                     (False, True), (False, True), (False, True)):
        cfg = default_bwd_config(dtype, d, causal, softcap=softcap, dropout=dropout, deterministic=det, wgmma=True)
        expected = 32 < d <= 128 and not det and not (softcap and d <= 64)  # 96 runs in its 128 tile
        assert cfg.wgmma == expected and config_from_name(cfg.name) == cfg and not cfg.problems()
        assert ("bwd_sm90.cuh" if expected else "bwd_sm80.cuh") in codegen.render(cfg)
        assert not default_bwd_config(dtype, d, causal, softcap=softcap, dropout=dropout, deterministic=det).wgmma
    assert [c for c in flashjit.get_kernels_to_build(arch="sm_90a") if getattr(c, "wgmma", False)]
    assert not [c for c in flashjit.get_kernels_to_build(arch="sm_80") if getattr(c, "wgmma", False)]
    for bad, reason in ((BwdConfig(d_head=128, n_warps=4, wgmma=True), cfgmod.WHY_WGMMA_WARPS),
                        (BwdConfig(d_head=128, n_warps=8, block_m=128, wgmma=True), cfgmod.WHY_WGMMA_SHAPES),
                        (BwdConfig(d_head=96, n_warps=8, block_m=128, wgmma=True), cfgmod.WHY_WGMMA_SHAPES),
                        (BwdConfig(d_head=128, n_warps=8, deterministic=True, wgmma=True), cfgmod.WHY_WGMMA_VARIANTS),
                        (BwdConfig(d_head=64, n_warps=8, block_m=128, softcap=True, wgmma=True),
                         cfgmod.WHY_WGMMA_SOFTCAP)):
        assert any(reason in p for p in bad.problems()), bad
    source = (codegen.kernels_dir() / "bwd_sm90.cuh").read_text()
    for reason in (cfgmod.WHY_WGMMA_WARPS, cfgmod.WHY_WGMMA_SHAPES, cfgmod.WHY_WGMMA_VARIANTS, cfgmod.WHY_WGMMA_SOFTCAP):
        assert f'"{reason}"' in source, reason
    with pytest.raises(ValueError, match="builds only for sm_90a, not sm_80"):
        jit.ensure_built(BwdConfig(d_head=128, n_warps=8, wgmma=True), "sm_80")

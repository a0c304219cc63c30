"""Compatibility: everything flashjit.config used to define, from where it lives now.

The configs are one module a kernel family under flashjit/configs/ (fwd_sm80: KernelConfig,
bwd_sm80: BwdConfig, bwd_sm90: BwdSm90Config) with their registry; the dispatcher's defaults, the
build set and the tuning space are flashjit/dispatch.py. New code imports from those; this module
keeps `from flashjit.config import ...` in users' code, scripts and tests working.
"""
from .configs import config_from_name
from .configs.bwd_sm80 import (BWD_BLOCK_M, BWD_D_SPLIT, BWD_GROUP_ROWS, WHY_BWD_COLUMNS, WHY_BWD_DQ_TILING,
                               WHY_BWD_REGISTERS, WHY_BWD_SHARES, WHY_BWD_STAGING, BwdConfig)
from .configs.bwd_sm90 import (WGMMA_ARCH, WGMMA_SHAPES, WHY_WGMMA_SHAPES, WHY_WGMMA_SOFTCAP, WHY_WGMMA_VARIANTS,
                               WHY_WGMMA_WARPS, BwdSm90Config, wgmma_tile)
from .configs.common import (DTYPES, FEATURES, HEAD_DIMS, MAX_HEAD_DIM, REGISTER_LIMIT, SMEM_LIMIT_SM90, WARPS,
                             WHY_HEAD_DIM, _Validated, features_suffix, head_dim_problem, head_dim_tile,
                             smem_limit_for_arch)
from .configs.fwd_sm80 import (BLOCK_COLS, BLOCK_ROWS, WHY_DEPTH, WHY_DOUBLE_BUFFER, WHY_EAGER, WHY_REGISTERS,
                               WHY_WARP_ROWS, KernelConfig)
from .dispatch import (_BWD_LAST_RESORT, _BWD_PREFERENCES, _DB0, _PREFERENCES, default_bwd_config, default_config,
                       get_autotuning_kernel_configs, get_kernels_to_build)

__all__ = [
    "DTYPES", "HEAD_DIMS", "MAX_HEAD_DIM", "WARPS", "REGISTER_LIMIT", "FEATURES", "SMEM_LIMIT_SM90", "WHY_HEAD_DIM",
    "head_dim_tile", "head_dim_problem", "features_suffix", "smem_limit_for_arch", "_Validated",
    "KernelConfig", "BLOCK_ROWS", "BLOCK_COLS", "WHY_WARP_ROWS", "WHY_DEPTH", "WHY_EAGER", "WHY_DOUBLE_BUFFER",
    "WHY_REGISTERS",
    "BwdConfig", "BWD_BLOCK_M", "BWD_D_SPLIT", "BWD_GROUP_ROWS", "WHY_BWD_REGISTERS", "WHY_BWD_STAGING",
    "WHY_BWD_DQ_TILING", "WHY_BWD_SHARES", "WHY_BWD_COLUMNS",
    "BwdSm90Config", "WGMMA_ARCH", "WGMMA_SHAPES", "wgmma_tile", "WHY_WGMMA_SHAPES", "WHY_WGMMA_SOFTCAP",
    "WHY_WGMMA_WARPS", "WHY_WGMMA_VARIANTS",
    "config_from_name", "default_config", "default_bwd_config", "get_kernels_to_build",
    "get_autotuning_kernel_configs", "_DB0", "_PREFERENCES", "_BWD_PREFERENCES", "_BWD_LAST_RESORT",
]

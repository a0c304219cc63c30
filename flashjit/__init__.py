"""flashjit: FlashAttention for PyTorch, compiled just in time for your GPU.

Installing compiles nothing; the first call that needs a kernel specialization compiles it into a
per-user cache (see flashjit.cache), and every later call, in any process, reuses it.

`import flashjit` does not import torch (the CLI and build boxes stay fast); the tensor functions
load it on first use.
"""
from ._version import __version__
from .configs.bwd_sm80 import BwdConfig
from .configs.bwd_sm90 import BwdSm90Config
from .configs.fwd_sm80 import KernelConfig
from .configs.fwd_sm90 import FwdSm90Config
from .dispatch import default_config, get_autotuning_kernel_configs, get_kernels_to_build
from .toolchain import ToolchainError

_LAZY = {
    "forward": "interface", "forward_timed": "interface", "backward": "interface",
    "flash_attn_func": "flash_api", "flash_attn_qkvpacked_func": "flash_api", "flash_attn_kvpacked_func": "flash_api",
    "attention_reference": "reference", "CompileError": "jit",
    "flash_attn_varlen_func": "varlen", "flash_attn_varlen_qkvpacked_func": "varlen",
    "flash_attn_varlen_kvpacked_func": "varlen", "flash_attn_with_kvcache": "kvcache",
    "unpad_input": "bert_padding", "pad_input": "bert_padding", "install_flash_attn_alias": "alias",
}

__all__ = ["__version__", "KernelConfig", "FwdSm90Config", "BwdConfig", "BwdSm90Config", "default_config",
           "get_kernels_to_build", "get_autotuning_kernel_configs", "ToolchainError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flashjit' has no attribute {name!r}")

"""`import flash_attn` served by flashjit, for code written against flash-attn 2.x that you cannot edit.

    import flashjit
    flashjit.install_flash_attn_alias()
    from flash_attn import flash_attn_func                      # flashjit.flash_attn_func
    from flash_attn.bert_padding import unpad_input, pad_input  # flashjit.bert_padding

or, for a whole script: `python -m flashjit run script.py [args...]`.

It installs three modules into sys.modules: `flash_attn`, `flash_attn.flash_attn_interface` and
`flash_attn.bert_padding`. Their functions are looked up in flashjit when first asked for, so
flashjit's later additions (the varlen functions, flash_attn_with_kvcache) appear under the alias
as soon as flashjit has them; asking for one it lacks raises AttributeError (ImportError in a
`from ... import`) naming flashjit. The alias never shadows a real flash-attn: if one is importable,
install_flash_attn_alias() refuses and says so.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

from ._version import __version__ as _flashjit_version

# flash-attn 2.x's public names: interface functions (also exported by the top-level package) and
# the padding helpers. Code compares flash_attn.__version__ with packaging.version (e.g. >= 2.1 for
# bottom-right causal masks): a PEP 440 local version keeps that working and still says flashjit.
FLASH_ATTN_API_VERSION = "2.8.3"
VERSION = f"{FLASH_ATTN_API_VERSION}+flashjit.{_flashjit_version}"
INTERFACE = ("flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
             "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
             "flash_attn_with_kvcache")
PADDING = ("unpad_input", "pad_input", "index_first_axis", "index_put_first_axis", "index_first_axis_residual",
           "unpad_input_for_concatenated_sequences")


def _from_flashjit(name: str):
    """flashjit's function of that name now, or None: flashjit's exports first, then flash_api."""
    import flashjit

    value = getattr(flashjit, name, None)
    if value is None and name in INTERFACE:
        from . import flash_api

        value = getattr(flash_api, name, None)
    elif value is None:
        from . import bert_padding

        value = getattr(bert_padding, name, None)
    return value


def _alias_module(name: str, names: tuple[str, ...], doc: str) -> types.ModuleType:
    module = types.ModuleType(name, doc)
    # A spec, so importlib.util.find_spec(name) answers for it instead of raising ValueError.
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=name == "flash_attn")
    module.__flashjit__ = True  # how install_flash_attn_alias() recognises its own modules

    def __getattr__(attr):  # PEP 562: resolved on every miss, so flashjit's newer functions appear
        value = _from_flashjit(attr) if attr in names else None
        if value is None:
            lacking = f": flashjit {_flashjit_version} does not provide it yet" if attr in names else ""
            raise AttributeError(f"module {name!r} (flashjit's flash-attn alias) has no attribute {attr!r}{lacking}")
        return value

    module.__getattr__ = __getattr__
    module.__dir__ = lambda: sorted({*module.__dict__, *(n for n in names if _from_flashjit(n) is not None)})
    return module


def install_flash_attn_alias() -> types.ModuleType:
    """Make `import flash_attn` (and flash_attn.flash_attn_interface, flash_attn.bert_padding) give
    flashjit's functions; returns the `flash_attn` module. Idempotent. Raises RuntimeError if a real
    flash-attn is importable: the alias never hides an installed flash-attn."""
    present = sys.modules.get("flash_attn")
    if present is not None:
        if getattr(present, "__flashjit__", False):
            return present
        raise RuntimeError(f"flash_attn is already imported from {getattr(present, '__file__', None) or present!r}: "
                           "flashjit's alias never shadows a real flash-attn (use it, or call flashjit.flash_attn_func)")
    spec = importlib.util.find_spec("flash_attn")
    if spec is not None:
        where = spec.origin or ", ".join(spec.submodule_search_locations or ()) or "an importable location"
        raise RuntimeError(f"a real flash-attn is installed ({where}): flashjit's alias never shadows it, so "
                           "`import flash_attn` keeps giving flash-attn. Uninstall it (pip uninstall flash-attn) to "
                           "run flash-attn code on flashjit, or call flashjit.flash_attn_func directly")
    package = _alias_module("flash_attn", INTERFACE, f"flashjit {_flashjit_version} standing in for flash-attn "
                            f"{FLASH_ATTN_API_VERSION}'s functional API (flashjit.install_flash_attn_alias()).")
    package.__version__ = VERSION
    package.__path__ = []  # a package: `import flash_attn.layers` then fails plainly (not provided)
    interface = _alias_module("flash_attn.flash_attn_interface", INTERFACE, "flashjit's flash_attn_* functions.")
    padding = _alias_module("flash_attn.bert_padding", PADDING, "flashjit.bert_padding.")
    package.flash_attn_interface, package.bert_padding = interface, padding
    sys.modules.update({"flash_attn.flash_attn_interface": interface, "flash_attn.bert_padding": padding,
                        "flash_attn": package})
    return package

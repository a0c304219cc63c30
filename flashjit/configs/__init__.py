"""The kernel families and their registry.

One module a family (fwd_sm80, fwd_sm90, bwd_sm80, bwd_sm90: its config class, WHY_* reasons and Family
record) over common.py (what every config shares) and registry.py (Family, register, the lookups).
A new family is a new module plus one register() line below; codegen, launch, jit, the interface
and the CLI read its Family (template, namespace, params struct, direction, arch) and need no edit.
"""
from .registry import FAMILIES, Family, config_from_name, families, family_of, register
from . import bwd_sm80, bwd_sm90, fwd_sm80, fwd_sm90

# The order config_from_name tries them in (their names are disjoint, so only speed and error
# messages depend on it).
register(fwd_sm80.FAMILY)
register(fwd_sm90.FAMILY)
register(bwd_sm80.FAMILY)
register(bwd_sm90.FAMILY)

__all__ = ["FAMILIES", "Family", "config_from_name", "families", "family_of", "register"]

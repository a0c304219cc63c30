"""The kernel families and their registry.

common.py holds what every config shares; registry.py the Family record, register() and the lookups.
"""
from .registry import FAMILIES, Family, config_from_name, families, family_of, register

__all__ = ["FAMILIES", "Family", "config_from_name", "families", "family_of", "register"]

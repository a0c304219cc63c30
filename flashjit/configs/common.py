"""What every kernel family's config shares: dtypes, head-dim tiles, the score features and their
name suffix, the base class (validation, shared-memory check, from_name, template arguments) and the
GPU limits the configs are checked against.

Nothing here knows a family: the family modules import this, never the other way round.
"""
from __future__ import annotations

import functools
import re
from dataclasses import fields
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # only a hint: registry.py imports nothing from here at run time either
    from .registry import Family

DTYPES = ("fp16", "bf16")
HEAD_DIMS = (32, 64, 96, 128, 160, 192, 256)  # the tile widths; any multiple of 8 up to 256 runs in the next one
MAX_HEAD_DIM = 256
WARPS = (4, 8)  # both sm_80 kernels (forward and backward) run 4 or 8 warps a CTA
REGISTER_LIMIT = 255

# Shared verbatim with the static_asserts of the kernels that check the head dim.
WHY_HEAD_DIM = "d_head must be a multiple of 8 from 8 to 256"
WHY_HEAD_DIM_V = "d_v must be 0 (the same as d_head) or a multiple of 8 from 8 to d_head"


def head_dim_tile(d_head: int) -> int:
    """The tile width a head dim runs in (kernels/common/params.cuh: head_dim_tile): the next multiple
    of 32 up to 192, else 256. The kernels load and store only the real d_head columns (the rest of
    the tile is zero in shared memory), so q/k/v are never copied to a padded width."""
    return (d_head + 31) // 32 * 32 if d_head <= 192 else MAX_HEAD_DIM


def head_dim_problem(d_head) -> list[str]:
    ok = isinstance(d_head, int) and d_head % 8 == 0 and 8 <= d_head <= MAX_HEAD_DIM
    return [] if ok else [f"{WHY_HEAD_DIM}, got {d_head!r}"]


def head_dim_v_problem(d_head: int, d_v) -> list[str]:
    """The value head dim of the sm_80 families (MLA-style d_qk != d_v): 0 for d_head, else at most
    d_head, so O stages through the Q tile and V's tile is never the wider one."""
    ok = d_v == 0 or (isinstance(d_v, int) and d_v % 8 == 0 and 8 <= d_v <= d_head)
    return [] if ok else [f"{WHY_HEAD_DIM_V}, got d_v={d_v!r} with d_head={d_head}"]


def d_v_suffix(config) -> str:
    """The name's tail for a value head dim other than d_head (absent otherwise: old names stand)."""
    return f"_dv{config.d_v}" if getattr(config, "d_v", 0) else ""


D_V_RE = r"(?:_dv(?P<d_v>\d+))?"


# Run-time-specialised score features shared by every family; each appears in a name only when on,
# so the common kernels keep short names.
FEATURES = ("local", "softcap", "alibi", "dropout")
# The name's optional tail, in FEATURES order, for the families' name patterns.
FEATURES_RE = "".join(f"(?P<{f}>_{f})?" for f in FEATURES)


# The forward families have one more: learnable sinks, folded into each row's softmax denominator
# in the epilogue. The backward needs no variant (the forward's lse includes the sink).
FWD_FEATURES = FEATURES + ("sink",)
FWD_FEATURES_RE = FEATURES_RE + "(?P<sink>_sink)?"


def features_suffix(config) -> str:
    return "".join(f"_{f}" for f in FWD_FEATURES if getattr(config, f, False))


SMEM_LIMIT_SM90 = 227 * 1024


def smem_limit_for_arch(arch: str) -> int:
    """Opt-in shared memory per block: 227 KiB on sm_90 and datacenter Blackwell (sm_100/sm_103),
    163 KiB on sm_80/sm_87, 99 KiB on sm_86/sm_89 and consumer Blackwell (sm_120/sm_121: 100 KiB per
    SM, as CUTLASS's sm120_smem_capacity_bytes = 101376 records), and 99 KiB for any other arch."""
    number = int(re.match(r"sm_(\d+)", arch).group(1))
    return {80: 163, 87: 163, 90: 227, 100: 227, 103: 227}.get(number, 99) * 1024  # 120/121: the 99 default


class ConfigBase:
    """What every family's config class shares: problems() lists every reason a config cannot be
    built; validate() raises them (computed once per config); the shared-memory check against a
    device; from_name() over the class's parse_name(); template_args() for codegen.

    A subclass is a frozen dataclass with `name` and `parse_name`, and `family` set by its module."""

    family: ClassVar["Family"]
    _WHAT: ClassVar[str] = "kernel"  # what from_name's error calls this family's names

    def __post_init__(self):
        # d_v == d_head is the same kernel as d_v == 0: one config (and name, and cache entry) for it.
        if getattr(self, "d_v", 0) == self.d_head:
            object.__setattr__(self, "d_v", 0)

    @property
    def head_dim_v(self) -> int:
        """The head dim of v and of the output: d_v where a family has it and it is set, else d_head."""
        return getattr(self, "d_v", 0) or self.d_head

    @property
    def loads_with_tma(self) -> bool:
        """Whether the kernel reads q/k/v (and the backward's dout) through TMA maps, which cannot
        address a zero stride (interface._tma_unaddressable): the Hopper families (arch set), unless
        a config says otherwise (BwdSm90Config.tma)."""
        return self.family.arch is not None

    def _choices(self, **allowed: tuple) -> list[str]:
        return [f"{name} must be one of {values}, got {getattr(self, name)!r}"
                for name, values in allowed.items() if getattr(self, name) not in values]

    @functools.cached_property  # frozen dataclasses: stored in the instance dict, not a field
    def _problems_cached(self) -> tuple:
        return tuple(self.problems())

    def validate(self):
        if self._problems_cached:
            raise ValueError(f"invalid {type(self).__name__} {self}:\n  - " + "\n  - ".join(self._problems_cached))
        return self

    def plain(self) -> "ConfigBase | None":
        """This config with its speed-only knobs that ptxas may serialize turned off (a C75xx note: too
        few registers for the wgmma pipeline), or None where it has none on: jit.unserialized's fallback
        for a dispatcher's choice that this machine's ptxas serialized."""
        return None

    def check_shared_memory(self, limit_bytes: int, device: str) -> None:
        if self.smem_bytes > limit_bytes:
            raise ValueError(
                f"config {self.name} needs {self.smem_bytes // 1024} KiB of shared memory per block, "
                f"but {device} allows {limit_bytes // 1024} KiB: choose a smaller tile")

    @classmethod
    def from_name(cls, name: str):
        """The config whose canonical name is `name`: cls.from_name(c.name) == c."""
        config = cls.parse_name(name)
        if config is None:
            raise ValueError(f"{name!r} is not a flashjit {cls._WHAT} name (expected e.g. {cls().name!r})")
        return config

    def template_args(self) -> list[tuple[str, object]]:
        """(name, value) for each parameter of flashjit::<namespace>::Config, in order: the fields
        one-to-one, dtype passed as bf16 (a bool). codegen renders them as /*name=*/value."""
        return [("bf16", self.dtype == "bf16")] + [(f.name, getattr(self, f.name)) for f in fields(self)
                                                    if f.name != "dtype"]


_Validated = ConfigBase  # its name before the family registry (flashjit.config still exports it)

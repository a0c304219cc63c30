"""The kernel families: one Family record per (pass, arch) template in kernels/, and the registry
codegen, launch, jit, the interface and the CLI read instead of branching on names or flags.

A family's module (flashjit/configs/<family>.py) defines its config class and its Family; the
package's __init__ registers it. Names carry their family: every name starts with the family's
direction ("fwd_"/"bwd_"), and no two families parse the same name (tests/test_config.py checks both).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """One kernel family: the config class and what the rest of flashjit needs to render, build,
    launch and dispatch its kernels."""

    name: str                # "fwd_sm80": also its module under flashjit/configs/
    config: type             # the frozen dataclass of its knobs; config.family is this record
    template: str            # kernels/<template>: the header the rendered TU includes
    namespace: str           # flashjit::<namespace>::Config<...> and ::launch<Cfg>
    params: str              # the struct flashjit_run takes: "FwdParams" or "BwdParams" (launch.py mirrors both)
    direction: str           # "fwd" or "bwd": which public call may run it
    arch: str | None = None  # the one arch it builds for ("sm_90a": wgmma, TMA), or None for any
    reasons: tuple[str, ...] = ()  # WHY_* strings that its template's static_asserts carry verbatim

    def check_arch(self, arch: str, name: str) -> None:
        """ValueError when the kernel `name` of this family cannot be built for `arch`."""
        if self.arch is not None and arch != self.arch:
            raise ValueError(f"config {name} is a {self.name} kernel ({self.template}) and builds only for "
                             f"{self.arch}, not {arch}; without a config the dispatcher picks one for {arch}")


# Registration order is the order config_from_name tries them in and the order of the build set's
# families; families mutate nothing after registration.
FAMILIES: list[Family] = []


def register(family: Family) -> Family:
    """Add a family (its module's FAMILY) to the registry; once per family."""
    if any(f.name == family.name for f in FAMILIES):
        raise ValueError(f"kernel family {family.name} is registered twice")
    if getattr(family.config, "family", None) is not family:
        raise ValueError(f"{family.config.__name__}.family must be the {family.name} Family being registered")
    if family.direction not in ("fwd", "bwd") or not family.config().name.startswith(family.direction + "_"):
        raise ValueError(f"{family.name}: direction must be 'fwd' or 'bwd' and start every name it gives")
    FAMILIES.append(family)
    return family


def families(direction: str | None = None) -> list[Family]:
    """The registered families, or those of one direction ("fwd" or "bwd")."""
    return [f for f in FAMILIES if direction in (None, f.direction)]


def family_of(config) -> Family:
    """The family of a config object (TypeError for anything else)."""
    family = getattr(type(config), "family", None)
    if family not in FAMILIES:
        raise TypeError(f"{type(config).__name__} is not a flashjit kernel config (the families' classes: "
                        f"{', '.join(f.config.__name__ for f in FAMILIES)})")
    return family


def config_from_name(name: str):
    """The config of any family from its canonical name (a cache entry's, a bundle's, a user's)."""
    for family in FAMILIES:
        config = family.config.parse_name(name)
        if config is not None:
            return config
    # No family parses it: say what a name of its direction looks like.
    direction = name.split("_", 1)[0]
    candidates = families(direction) or FAMILIES
    what = "backward kernel" if direction == "bwd" else "kernel"
    examples = " or ".join(f"{f.config().name!r} ({f.name})" for f in candidates)
    raise ValueError(f"{name!r} is not a flashjit {what} name (expected e.g. {examples})")

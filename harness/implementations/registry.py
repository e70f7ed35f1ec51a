"""The registry: every built-in implementation by name, and how a list of names becomes implementations."""

from __future__ import annotations

import dataclasses

from . import canary, compiled, flex, rocm, sdpa, thirdparty, varlen
from .base import DeviceFacts, Implementation, RegistryError, SdpaCall
from .user import load_user_implementation


def builtin_implementations() -> dict[str, Implementation]:
    impls = [*sdpa.implementations(), *compiled.implementations(), *flex.implementations(),
             *rocm.implementations(), *thirdparty.implementations(), *varlen.implementations(),
             *canary.implementations()]
    return {impl.name: impl for impl in impls}


def by_name(name: str, builtins: dict[str, Implementation] | None = None) -> Implementation:
    """A built-in by its name, or a user kernel by `package.module:function` (imported here)."""
    builtins = builtin_implementations() if builtins is None else builtins
    if name in builtins:
        return builtins[name]
    if name.startswith(EXPANDED_USER) and ":" in name:
        return expanded_user(load_user_implementation(name.removeprefix(EXPANDED_USER)))
    if ":" in name:
        return load_user_implementation(name)
    known = ", ".join(sorted(n for n, i in builtins.items() if not i.canary))
    raise RegistryError(f"unknown implementation {name!r} (built-ins: {known}; or module:function)")


EXPANDED_USER = "expanded-kv-"  # expanded-kv-pkg.mod:fn: a user kernel on hand-expanded K/V (gqa-vs-expanded)


def expanded_user(impl: Implementation) -> Implementation:
    """`impl` called with K/V expanded to the query heads (repeat_interleave) and enable_gqa=False."""

    def forward(call: SdpaCall):
        key, value = sdpa.expand_kv(call)
        return impl.forward(dataclasses.replace(call, key=key, value=value, enable_gqa=False))

    return dataclasses.replace(impl, name=EXPANDED_USER + impl.name, forward=forward,
                               description=f"{impl.name} on K/V expanded by hand to the query heads")


def resolve(names: list[str], facts: DeviceFacts) -> tuple[list[Implementation], dict[str, str]]:
    """Implementations to run and, for built-ins left out, why. No names: every available built-in."""
    builtins = builtin_implementations()
    chosen: list[Implementation] = []
    unavailable: dict[str, str] = {}
    if not names:
        for impl in builtins.values():
            if impl.canary:
                continue
            reason = impl.available(facts)
            if reason is None and impl.opt_in:
                unavailable[impl.name] = f"opt-in, name it with --impl: {impl.opt_in}"
            elif reason is None:
                chosen.append(impl)
            else:
                unavailable[impl.name] = reason
        return chosen, unavailable
    for name in names:
        impl = by_name(name, builtins)
        reason = impl.available(facts) if impl.family != "user" else None
        if reason is not None:
            raise RegistryError(f"implementation {name!r} is not available on {facts.device}: {reason}")
        chosen.append(impl)
    return chosen, unavailable


def canaries(facts: DeviceFacts) -> list[Implementation]:
    return [i for i in builtin_implementations().values() if i.canary and i.available(facts) is None]

"""User kernels: `--impl package.module:function` with F.scaled_dot_product_attention's signature."""

from __future__ import annotations

import importlib
import inspect
import os
import sys

from .base import Implementation, RegistryError, SdpaCall

SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def check_signature(fn, spec: str) -> None:
    """SDPA's parameter names, or **kwargs. A built-in function or a torch.ops callable has no readable
    signature: it is taken as is and called with SDPA's keyword names (a mismatch is then its ERROR)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    names = tuple(params)
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [n for n in SDPA_PARAMETERS if n not in names]
    if missing and not accepts_kwargs:
        raise RegistryError(
            f"--impl {spec}: signature ({', '.join(names)}) lacks {', '.join(missing)}; "
            f"it must be ({', '.join(SDPA_PARAMETERS)}) like F.scaled_dot_product_attention"
        )


def load_user_implementation(spec: str) -> Implementation:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RegistryError(f"--impl {spec!r} is not of the form package.module:function")
    if not all(part.isidentifier() for part in (*module_name.split("."), *attr.split("."))):
        raise RegistryError(f"--impl {spec!r}: module and function must be Python identifiers (package.module:function)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a user's module next to where they run us, as pytest does
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any import failure is the user's module's, sys.exit too
        raise RegistryError(f"--impl {spec}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise RegistryError(f"--impl {spec}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise RegistryError(f"--impl {spec}: {attr!r} is not callable")
    check_signature(fn, spec)
    return implementation_from_callable(fn, spec)


def implementation_from_callable(fn, name: str) -> Implementation:
    """Wrap a callable with F.scaled_dot_product_attention's signature as an implementation."""

    def forward(call: SdpaCall):
        return fn(query=call.query, key=call.key, value=call.value, attn_mask=call.attn_mask, dropout_p=0.0,
                  is_causal=call.is_causal, scale=call.scale, enable_gqa=call.enable_gqa)

    return Implementation(
        name=name, family="user", forward=forward, materialise_causal_bias=True,
        description=f"user kernel {name} (bottom-right causal arrives as a bool attn_mask)",
    )

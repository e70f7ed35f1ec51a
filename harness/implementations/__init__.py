"""Implementations under test: one small interface (base.py), a registry (registry.py), one file per family."""

from .base import DeviceFacts, ForwardFn, Implementation, RegistryError, SdpaCall
from .registry import builtin_implementations, by_name, canaries, resolve

__all__ = ["DeviceFacts", "ForwardFn", "Implementation", "RegistryError", "SdpaCall", "builtin_implementations",
           "by_name", "canaries", "resolve"]

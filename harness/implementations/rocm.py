"""ROCm: the flash and efficient SDPA backends under each flash library the torch offers (CK, AOTriton).

`torch.backends.cuda.preferred_rocm_fa_library` is process-global and is read when a
kernel is dispatched, in the forward and again in the backward. The backward runs
after the implementation's forward has returned, so the library is set around both:
set for the forward, restored, set again when the backward reaches the attention
node and restored when it has left it (identity autograd nodes on the output and on
the inputs bracket the attention backward). The library in force is recorded in the
result's notes; a torch that does not take the requested library is UNSUPPORTED.

Written to PyTorch's documented API and tested with injected device facts and a fake
setter; it has not run on AMD hardware.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import DeviceFacts, Implementation, SdpaCall
from .sdpa import sdpa

# torch's _ROCmFABackend member -> the string preferred_rocm_fa_library takes
LIBRARY_NAMES = {"Ck": "ck", "AOTriton": "aotriton"}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
Kernel = Callable[[SdpaCall], torch.Tensor]


def offered_libraries() -> tuple[str, ...]:
    """The libraries this torch can be asked for (empty when it has no preferred_rocm_fa_library)."""
    if getattr(torch.backends.cuda, "preferred_rocm_fa_library", None) is None:
        return ()
    members = getattr(getattr(torch._C, "_ROCmFABackend", None), "__members__", {})
    return tuple(LIBRARY_NAMES[m] for m in members if m in LIBRARY_NAMES)


def library_name(value: object) -> str:
    """'ck' from torch._C._ROCmFABackend.Ck (or from a plain string)."""
    text = str(value).rsplit(".", 1)[-1]
    return LIBRARY_NAMES.get(text, text.lower())


def _preferred(library: str | None = None):
    return torch.backends.cuda.preferred_rocm_fa_library(library)


class _SetLibraryOnBackward(torch.autograd.Function):
    """Identity forward; its backward sets the preferred library before the gradients flow on."""

    @staticmethod
    def forward(ctx, library: str, *tensors: torch.Tensor):
        ctx.library = library
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        _preferred(ctx.library)
        return (None, *grads)


def pinned_kernel(backend: SDPBackend) -> Kernel:
    def kernel(call: SdpaCall) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return sdpa(call)
    return kernel


def library_forward(library: str, kernel: Kernel) -> Kernel:
    def forward(call: SdpaCall) -> torch.Tensor:
        previous = library_name(_preferred())
        _preferred(library)
        try:
            got = library_name(_preferred())
            if got != library:
                raise RuntimeError(f"preferred_rocm_fa_library({library!r}) not supported by this torch build: "
                                   f"it reports {got!r}")
            call.notes["rocm_fa_library"] = got
            # Runs last in the backward: restores the library once the attention backward is done.
            call.query, call.key, call.value = _SetLibraryOnBackward.apply(previous, call.query, call.key, call.value)
            out = kernel(call)
            # Runs first in the backward: the attention backward dispatches under `library` too.
            (out,) = _SetLibraryOnBackward.apply(library, out)
            return out
        finally:
            _preferred(previous)
    return forward


def _available(library: str) -> Callable[[DeviceFacts], str | None]:
    def check(facts: DeviceFacts) -> str | None:
        if facts.kind != "rocm":
            return f"the flash library choice exists only on ROCm devices, not {facts.kind}"
        offered = offered_libraries()
        if library not in offered:
            return (f"this torch ({facts.torch_version}) does not offer preferred_rocm_fa_library({library!r})"
                    + (f"; it offers {', '.join(offered)}" if offered else ""))
        return None
    return check


def implementations() -> list[Implementation]:
    return [
        Implementation(
            name=f"sdpa-{suffix}-{library}", family="rocm-fa-library",
            forward=library_forward(library, pinned_kernel(backend)), available=_available(library),
            description=f"ROCm: SDPA pinned to {backend.name} with preferred_rocm_fa_library({library!r}) "
                        "for forward and backward, enable_gqa=True",
        )
        for library in LIBRARY_NAMES.values()
        for suffix, backend in BACKENDS.items()
    ]

"""PyTorch SDPA, each backend pinned, the unpinned default, and the hand-expanded kv path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import DeviceFacts, Implementation, SdpaCall

# name suffix -> (backend, device kinds that have a kernel for it)
BACKENDS: dict[str, tuple[SDPBackend, tuple[str, ...]]] = {
    "math": (SDPBackend.MATH, ("cpu", "cuda", "rocm")),
    "flash": (SDPBackend.FLASH_ATTENTION, ("cpu", "cuda", "rocm")),
    "efficient": (SDPBackend.EFFICIENT_ATTENTION, ("cuda", "rocm")),
    "cudnn": (SDPBackend.CUDNN_ATTENTION, ("cuda",)),
}


def sdpa(call: SdpaCall, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
         enable_gqa: bool | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        call.query, call.key if key is None else key, call.value if value is None else value,
        attn_mask=call.attn_mask, is_causal=call.is_causal, scale=call.scale,
        enable_gqa=call.enable_gqa if enable_gqa is None else enable_gqa,
    )


def expand_kv(call: SdpaCall) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's repeat_kv: each kv head repeated for its group of query heads."""
    group = call.query.shape[1] // call.key.shape[1]
    return call.key.repeat_interleave(group, dim=1), call.value.repeat_interleave(group, dim=1)


def dispatch_choice(call: SdpaCall) -> str:
    """The backend unpinned dispatch picks; private API, so guarded."""
    mask = call.attn_mask
    if mask is not None and type(mask) is not torch.Tensor:  # CausalBias is a Tensor subclass the choice refuses
        return "n/a (CausalBias dispatches itself)"
    try:
        index = torch._fused_sdp_choice(call.query, call.key, call.value, mask, 0.0, call.is_causal,
                                        scale=call.scale, enable_gqa=call.enable_gqa)
        return SDPBackend(index).name
    except Exception as exc:  # noqa: BLE001 - private API may change shape between releases
        return f"unknown ({type(exc).__name__})"


def _available(kinds: tuple[str, ...], backend: str):
    def check(facts: DeviceFacts) -> str | None:
        if facts.kind in kinds:
            return None
        return f"torch has no {backend} SDPA kernel for {facts.kind} devices"
    return check


def _pinned(backend: SDPBackend):
    def forward(call: SdpaCall) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return sdpa(call)
    return forward


def _expanded(backend: SDPBackend):
    def forward(call: SdpaCall) -> torch.Tensor:
        key, value = expand_kv(call)
        with sdpa_kernel([backend]):
            return sdpa(call, key, value, enable_gqa=False)
    return forward


def _default(call: SdpaCall) -> torch.Tensor:
    call.notes["dispatch"] = dispatch_choice(call)
    return sdpa(call)


def implementations() -> list[Implementation]:
    impls = []
    for suffix, (backend, kinds) in BACKENDS.items():
        impls.append(Implementation(
            name=f"sdpa-{suffix}", family="sdpa", forward=_pinned(backend), available=_available(kinds, suffix),
            description=f"F.scaled_dot_product_attention pinned to {backend.name}, enable_gqa=True",
        ))
    impls.append(Implementation(
        name="sdpa-default", family="sdpa", forward=_default,
        description="F.scaled_dot_product_attention unpinned; the backend dispatch chose is recorded",
    ))
    for suffix, (backend, kinds) in BACKENDS.items():
        impls.append(Implementation(
            name=f"expanded-kv-{suffix}", family="expanded-kv", forward=_expanded(backend),
            available=_available(kinds, suffix),
            description=f"K/V expanded with repeat_interleave (HF repeat_kv), then {backend.name} with Hq heads",
        ))
    return impls

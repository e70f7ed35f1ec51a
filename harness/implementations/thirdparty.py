"""Third-party kernels, used when their package is installed: flash-attn (FA2, FA3) and xformers.

Each adapter maps the case to the package's own API and refuses (UNSUPPORTED, with
the reason) what that API cannot express faithfully:
- flash-attn `flash_attn_func(q, k, v, softmax_scale=, causal=)`: (B, L, H, D) tensors,
  Hq a multiple of Hkv natively, and causal aligned bottom-right (query i sees keys
  <= i + Lk - Lq). So bottom-right causal maps to causal=True, top-left only when
  Lq == Lk (the two agree there); top-left with Lq != Lk and any attention mask are refused.
- xformers `memory_efficient_attention(q, k, v, attn_bias=, scale=)`: GQA as the
  5-D (B, L, G=Hkv, H=group, D) layout with K/V broadcast (stride 0) over the group,
  causal as `LowerTriangularMask` (top-left) or `LowerTriangularFromBottomRightMask`;
  masks are refused (this adapter does not build xformers' aligned bias tensors).
The packages are imported on first use, so a test can inject a fake module.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Callable

import torch

from ..core.case import Case
from .base import DeviceFacts, Implementation, SdpaCall

GPU_KINDS = ("cuda", "rocm")
# implementation name -> module holding flash_attn_func
FLASH_MODULES = {"flash-attn": "flash_attn", "flash-attn3": "flash_attn_interface"}


def installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _available(module: str, package: str) -> Callable[[DeviceFacts], str | None]:
    def check(facts: DeviceFacts) -> str | None:
        if not installed(module):
            return f"{package} is not installed (no module {module!r})"
        if facts.kind not in GPU_KINDS:
            return f"{package} has kernels for CUDA/ROCm GPUs only, not {facts.kind}"
        return None
    return check


# --- flash-attn -----------------------------------------------------------------------------


def flash_supports(case: Case, facts: DeviceFacts) -> str | None:
    if case.has_mask:
        return "flash_attn_func takes no attention mask (only causal and windows)"
    if case.causal == "top-left" and case.q_len != case.kv_len:
        return ("flash_attn_func aligns causal bottom-right; top-left causal with "
                f"Lq={case.q_len} != Lk={case.kv_len} cannot be expressed")
    if case.dtype == "fp32":
        return "flash_attn_func takes fp16/bf16 only"
    return None


def flash_causal(case: Case) -> bool:
    """FA's causal=True is bottom-right; top-left reaches here only with Lq == Lk, where they agree."""
    return case.causal != "none"


def flash_forward(module: str, causal_fn: Callable[[Case], bool] = flash_causal) -> Callable[[SdpaCall], torch.Tensor]:
    def forward(call: SdpaCall) -> torch.Tensor:
        fn = importlib.import_module(module).flash_attn_func
        q, k, v = (t.transpose(1, 2) for t in (call.query, call.key, call.value))  # (B, L, H, D) views
        out = fn(q, k, v, softmax_scale=call.scale, causal=causal_fn(call.case))
        if isinstance(out, tuple):  # some FA3 releases return (out, softmax_lse)
            out = out[0]
        call.notes["flash_attn"] = str(getattr(sys.modules.get(module.split(".")[0]), "__version__", "unknown"))
        return out.transpose(1, 2)
    return forward


# --- xformers -------------------------------------------------------------------------------


def xformers_supports(case: Case, facts: DeviceFacts) -> str | None:
    if case.has_mask:
        return "the xformers adapter passes no attention masks (causal only)"
    return None


def xformers_bias(xops, case: Case):
    bias = xops.fmha.attn_bias
    if case.causal == "top-left":
        return bias.LowerTriangularMask()
    if case.causal == "bottom-right":
        return bias.LowerTriangularFromBottomRightMask()
    return None


def to_bmghk(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """(B, H, L, D) -> xformers' 5-D GQA layout; query head h belongs to kv head h // group."""
    b, hq, lq, d = query.shape
    hkv = key.shape[1]
    group = hq // hkv
    q = query.transpose(1, 2).reshape(b, lq, hkv, group, d)
    k, v = (t.transpose(1, 2).unsqueeze(3).expand(b, t.shape[2], hkv, group, t.shape[3]) for t in (key, value))
    return q, k, v


def xformers_forward(call: SdpaCall) -> torch.Tensor:
    xops = importlib.import_module("xformers.ops")
    q, k, v = to_bmghk(call.query, call.key, call.value)
    out = xops.memory_efficient_attention(q, k, v, attn_bias=xformers_bias(xops, call.case), scale=call.scale)
    b, lq, hkv, group, dv = out.shape
    call.notes["xformers"] = str(getattr(sys.modules.get("xformers"), "__version__", "unknown"))
    return out.reshape(b, lq, hkv * group, dv).transpose(1, 2)


def implementations() -> list[Implementation]:
    impls = [
        Implementation(
            name=name, family="thirdparty", forward=flash_forward(module), available=_available(module, name),
            supports=flash_supports,
            description=f"{module}.flash_attn_func: (B, L, H, D), native GQA, causal bottom-right "
                        "(top-left only when Lq == Lk), no masks",
        )
        for name, module in FLASH_MODULES.items()
    ]
    impls.append(Implementation(
        name="xformers", family="thirdparty", forward=xformers_forward, available=_available("xformers", "xformers"),
        supports=xformers_supports,
        description="xformers.ops.memory_efficient_attention: 5-D (B, L, Hkv, group, D) GQA, "
                    "causal either alignment via its attn_bias classes, no masks",
    ))
    return impls

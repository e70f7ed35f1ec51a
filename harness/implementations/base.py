"""The one small interface every implementation under test has.

An implementation is a forward function over an `SdpaCall` (kernel-facing
tensors already on the device, in the case's layout) plus two questions:
is it available on this device at all, and does it support this case. The
runner does autograd, so a kernel without backward is simply forward-only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..core.case import Case


@dataclass(frozen=True)
class DeviceFacts:
    """What the code needs to know about a device; injected in tests to fake a GPU."""

    device: str  # "cpu", "cuda:0", ...
    kind: str  # "cpu" | "cuda" | "rocm"
    name: str = ""
    arch: str = ""  # "sm_90", "gfx942", or the CPU's ISA
    torch_version: str = torch.__version__


@dataclass
class SdpaCall:
    """Arguments exactly as F.scaled_dot_product_attention takes them, plus the case."""

    case: Case
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: object = None  # a tensor, a CausalBias, or None
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False
    # Filled in by the implementation: which fused backend dispatch chose, and anything else worth a report line.
    notes: dict[str, str] = field(default_factory=dict)


ForwardFn = Callable[[SdpaCall], torch.Tensor]


@dataclass(frozen=True)
class Implementation:
    name: str
    family: str  # "sdpa", "expanded-kv", "user", "canary", ...
    forward: ForwardFn
    description: str = ""
    # None when usable on this device; else the reason it is not.
    available: Callable[[DeviceFacts], str | None] = lambda facts: None
    # None when this case can be expressed faithfully; else the reason (UNSUPPORTED, never FAIL).
    supports: Callable[[Case, DeviceFacts], str | None] = lambda case, facts: None
    # Materialise causal as a bool mask for kernels that do not take torch's CausalBias object.
    materialise_causal_bias: bool = False
    # True for the canary: its expected FAIL is reported apart and does not count.
    canary: bool = False
    # Why a run without --impl leaves it out (e.g. compiles per case: too slow for the default run); None: included.
    opt_in: str | None = None


class RegistryError(ValueError):
    pass

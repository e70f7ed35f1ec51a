"""The canary: a deliberately wrong kernel that must FAIL on every device it runs on.

If it passes, the pipeline on that device cannot fail and its PASSes mean nothing.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..core.case import Case
from .base import Implementation, SdpaCall
from .sdpa import sdpa

# Small GQA case the canary runs on (group size 4, two batches); its id appears in every report.
CANARY_CASE = Case(batch=2, q_heads=8, kv_heads=2, q_len=64, kv_len=64, head_dim=64, seed=7)


def tiled_kv_heads(call: SdpaCall) -> torch.Tensor:
    """kv head for query head h taken as h % Hkv (tiled) instead of h // group (interleaved)."""
    group = call.query.shape[1] // call.key.shape[1]
    with sdpa_kernel([SDPBackend.MATH]):
        return sdpa(call, call.key.repeat(1, group, 1, 1), call.value.repeat(1, group, 1, 1), enable_gqa=False)


def implementations() -> list[Implementation]:
    return [Implementation(
        name="canary-tiled-kv", family="canary", forward=tiled_kv_heads, canary=True,
        description="deliberately wrong: kv heads tiled (h % Hkv) instead of interleaved (h // group)",
    )]

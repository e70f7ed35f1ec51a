"""The low-precision reference: what a correct tensor-core kernel can reach.

fp32 accumulation with the roundings a correct bf16/fp16 kernel must make, in a
few accepted designs; the envelope (largest error per element region) of these
designs is the yardstick beside the dtype floor. It answers the maintainers'
question "is this beyond normal bf16 noise?" where the floor cannot: on
ill-conditioned inputs (all logits near -120) the true dQ is the result of
cancellation and rounding dS to bf16 alone costs ~1,000x the floor.

A group sum accumulated in the dtype is never an accepted design.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .inputs import Inputs, torch_dtype
from .oracle import AttentionResult, Rounding, attention


def designs(dtype: torch.dtype) -> tuple[Rounding, ...]:
    """Accepted kernel designs for `dtype`; every one accumulates in fp32."""
    flash = Rounding(
        name="flash-fp32acc", dtype=dtype,
        p_before_pv=True, p_before_dv=True, ds_before_gemm=True, o_as_stored=True,
    )
    return (
        flash,
        # CUDA flash's expanded path: per-query-head dK/dV stored in the dtype, then summed in fp32.
        Rounding(
            name="flash-per-head-dkdv", dtype=dtype,
            p_before_pv=True, p_before_dv=True, ds_before_gemm=True, o_as_stored=True, per_head_dkdv=True,
        ),
        # fp32 softmax path (no P/dS rounding): only inputs and the stored results are in the dtype.
        Rounding(name="fp32-softmax", dtype=dtype, o_as_stored=True),
        # D = rowsum(dO∘O) from the fp32 O (kept from the forward) instead of O as stored: on rows that see
        # few keys dS is pure cancellation and the two choices differ by far more than the floor there.
        Rounding(name="flash-fp32-delta", dtype=dtype, p_before_pv=True, p_before_dv=True, ds_before_gemm=True),
    )


@dataclass(frozen=True)
class LowPrecReference:
    """Each design's result in fp64 (values exactly as the design produced them)."""

    results: dict[str, AttentionResult]

    def tensors(self) -> dict[str, list[torch.Tensor]]:
        named: dict[str, list[torch.Tensor]] = {}
        for result in self.results.values():
            for name, t in result.tensors().items():
                named.setdefault(name, []).append(t.double())
        return named


def lowprec_reference(inputs: Inputs, rows: torch.Tensor | None = None) -> LowPrecReference:
    """`rows`: only those query rows' output and dQ (a long case's row-sampled references)."""
    dtype = torch_dtype(inputs.case)
    return LowPrecReference({d.name: attention(inputs, torch.float32, d, rows=rows) for d in designs(dtype)})

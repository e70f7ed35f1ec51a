"""`--repeat N`: the same inputs through the same kernel N times; bitwise differences per tensor.

Information, separate from the verdict: the first run is the one judged. Some kernels are
legitimately non-deterministic (flash backward dQ accumulates with atomics on some
backends), so a difference is reported, never failed.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..core.results import Outputs


def compare_runs(first: dict[str, torch.Tensor | None], later: list[dict[str, torch.Tensor | None]]) -> dict[str, Any]:
    """Per tensor: how many later runs differ bitwise from the first, and by how much at most."""
    out: dict[str, Any] = {}
    for name, ref in first.items():
        if not isinstance(ref, torch.Tensor):
            continue
        differing, max_abs = 0, 0.0
        for run in later:
            other = run.get(name)
            if not isinstance(other, torch.Tensor) or other.shape != ref.shape or other.dtype != ref.dtype:
                differing += 1
                max_abs = float("inf")
                continue
            if not torch.equal(_bits(ref), _bits(other)):
                differing += 1
                diff = (ref.double() - other.double()).abs()
                max_abs = max(max_abs, float(torch.nan_to_num(diff, nan=float("inf")).max()))
        out[name] = {"runs": len(later) + 1, "differing_runs": differing, "deterministic": differing == 0,
                     "max_abs_diff": max_abs}
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bytes of `t`: bitwise equality (NaN == NaN with the same payload, -0.0 != 0.0)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def run_repeated(run: Callable[[], Outputs], repeat: int) -> Outputs:
    """The first run's outputs, with notes["determinism"] when repeat > 1."""
    first = run()
    if repeat <= 1:
        return first
    later = [run().tensors for _ in range(repeat - 1)]
    first.notes["determinism"] = compare_runs(first.tensors, later)
    return first

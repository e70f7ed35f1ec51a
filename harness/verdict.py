"""The one place that decides: PASS / FAIL / OUT_OF_RANGE for one tensor of one result.

Rules, in order (the first that applies decides):
  1. contract  — missing gradient, wrong shape, dtype or device: FAIL.
  2. range     — the oracle itself exceeds finfo.max / 2: OUT_OF_RANGE (no kernel can be judged).
  3. nonfinite — NaN/Inf where the oracle is finite, or finite where the oracle is not: FAIL (gross).
  4. levels    — error / scale beyond the level's factor at the tensor, slice or row level
                 (each level judged only with at least its minimum element count): FAIL.
Factors live in tolerances.toml with their provenance. The message is one line a
kernel engineer can act on: tensor, level, how far beyond a correct kernel, which heads.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from typing import Any

import torch

from .metrics import LEVELS, TensorMetrics


class Status(str, Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    KNOWN = "KNOWN"
    FIXED = "FIXED"  # matched a known-failure entry but passes now
    UNSUPPORTED = "UNSUPPORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    ERROR = "ERROR"

    def __str__(self) -> str:
        return self.value


# Worst first: a result's status is the worst of its tensors'.
STATUS_ORDER = [Status.ERROR, Status.FAIL, Status.KNOWN, Status.OUT_OF_RANGE, Status.FIXED, Status.UNSUPPORTED, Status.PASS]


def worst_status(statuses: list[Status]) -> Status:
    return min(statuses, key=STATUS_ORDER.index) if statuses else Status.PASS


@dataclass(frozen=True)
class LevelRule:
    factor: float
    min_count: int


@dataclass(frozen=True)
class Tolerances:
    levels: dict[str, dict[str, LevelRule]]  # dtype -> level -> rule
    gross_rel_err: float
    provenance: dict[str, Any] = field(default_factory=dict)

    def rule(self, dtype: str, level: str) -> LevelRule:
        return self.levels[dtype][level]

    def as_dict(self) -> dict[str, Any]:
        return {"levels": {d: {lv: {"factor": r.factor, "min_count": r.min_count} for lv, r in rules.items()}
                           for d, rules in self.levels.items()},
                "gross_rel_err": self.gross_rel_err, "provenance": self.provenance}


def load_tolerances(text: str | None = None) -> Tolerances:
    if text is None:
        text = resources.files("harness").joinpath("tolerances.toml").read_text()
    data = tomllib.loads(text)
    levels = {
        dtype: {lv: LevelRule(float(r["factor"]), int(r["min_count"])) for lv, r in data["dtype"][dtype].items()}
        for dtype in data["dtype"]
    }
    return Tolerances(levels=levels, gross_rel_err=float(data["severity"]["gross_rel_err"]),
                      provenance=data.get("provenance", {}))


@dataclass(frozen=True)
class TensorVerdict:
    tensor: str
    status: Status
    rule: str = ""  # contract | range | nonfinite | tensor | slice | row | forward-only | backward-error
    reason: str = ""
    severity: str = ""  # "gross" (O(1) error, NaN) or "beyond" (k x beyond a correct kernel)
    excess: float = 0.0  # worst ratio / factor at the failing level (> 1 fails)
    failing_heads: tuple[tuple[int, int], ...] = ()
    metrics: TensorMetrics | None = None
    known_entry: str = ""  # id of the known-failures entry that matched this result, if any

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": str(self.status), "rule": self.rule, "reason": self.reason, "severity": self.severity,
            "excess": _finite_or_none(self.excess), "known_entry": self.known_entry, "failing_heads": [list(h) for h in self.failing_heads],
            "metrics": self.metrics.to_dict() if self.metrics is not None else None,
        }


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def contract_problem(name: str, actual: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                     device: str, produced_on: str | None = None) -> str | None:
    """`produced_on`: the device the kernel returned the tensor on (results are copied to the CPU)."""
    if actual is None:
        return f"{name} is missing: no gradient reached the input"
    if not isinstance(actual, torch.Tensor):
        return f"{name} is a {type(actual).__name__}, not a tensor"
    if tuple(actual.shape) != tuple(shape):
        return f"{name} has shape {tuple(actual.shape)}, expected {tuple(shape)}"
    if actual.dtype != dtype:
        return f"{name} has dtype {actual.dtype}, expected {dtype}"
    where = torch.device(produced_on) if produced_on else actual.device
    if device and where.type != torch.device(device).type:
        return f"{name} is on {where}, expected {device}"
    return None


def _heads(mask: torch.Tensor) -> tuple[tuple[int, int], ...]:
    return tuple((int(b), int(h)) for b, h in mask.nonzero().tolist())


def judge_metrics(m: TensorMetrics, dtype: str, tol: Tolerances) -> TensorVerdict:
    """Rules 2-4 on computed metrics."""
    finfo_max = torch.finfo({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]).max
    name = m.tensor
    if m.oracle_absmax > finfo_max / 2:
        return TensorVerdict(name, Status.OUT_OF_RANGE, "range",
                             f"{name}: the oracle reaches |{m.oracle_absmax:.3g}| > {dtype} max/2; no kernel can be judged",
                             metrics=m)
    if m.nonfinite_where_oracle_finite:
        where = f" first at {list(m.worst_index)}" if m.worst_index else ""
        return TensorVerdict(name, Status.FAIL, "nonfinite",
                             f"{name}: {m.nan_count} NaN and {m.inf_count} Inf where the oracle is finite{where}",
                             severity="gross", excess=math.inf, metrics=m)
    if not m.nonfinite_pattern_matches:
        return TensorVerdict(name, Status.FAIL, "nonfinite",
                             f"{name}: finite where the oracle is non-finite ({m.oracle_nonfinite} elements): "
                             "a NaN/Inf in the inputs was swallowed",
                             severity="gross", excess=math.inf, metrics=m)
    for level in LEVELS:
        rule = tol.rule(dtype, level)
        lv = m.levels[level]
        if lv.count < rule.min_count:
            continue
        ratio = torch.nan_to_num(lv.ratio, nan=math.inf)
        over = ratio > rule.factor
        if not bool(over.any()):
            continue
        worst = m.summary(level)
        if level == "tensor":
            heads = _heads(m.levels["slice"].ratio > tol.rule(dtype, "slice").factor)
        else:
            heads = _heads(over if level == "slice" else over.any(-1))
        slice_rel = m.levels["slice"].err / m.levels["slice"].truth.clamp_min(1e-300)
        gross = bool(((slice_rel > tol.gross_rel_err) & (m.levels["slice"].truth > 0)).any()) or m.nan_count > 0
        units = {"tensor": "", "slice": f" in {int(over.sum())}/{over.numel()} (batch, head) slices",
                 "row": f" in {int(over.sum())}/{over.numel()} rows"}[level]
        where = f"; worst at {level} {worst['index']}" if level != "tensor" else ""
        reason = (f"{name}: {level} error {worst['ratio']:.3g}x the correct-kernel scale (factor {rule.factor:g}){units}"
                  f"{where}; rel-L2 {worst['rel_err']:.2e}, floor {worst['floor']:.2e}, "
                  f"low-precision ref {worst['lowprec']:.2e}, err {worst['err']:.2e}")
        if m.worst_index is not None:
            reason += f"; worst element {name}{list(m.worst_index)} = {m.worst_actual:.5g} vs oracle {m.worst_oracle:.5g}"
        return TensorVerdict(name, Status.FAIL, level, reason, "gross" if gross else "beyond",
                             worst["ratio"] / rule.factor, heads, m)
    tensor_ratio = float(m.levels["tensor"].ratio)
    return TensorVerdict(name, Status.PASS, "", "", excess=tensor_ratio / tol.rule(dtype, "tensor").factor, metrics=m)

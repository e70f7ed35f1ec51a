"""What a judged run produces: statuses, per-tensor verdicts, one (case, implementation) result,
and the outputs a kernel returned. Plain data, shared by every layer above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from .metrics import TensorMetrics

TENSORS = ("out", "dq", "dk", "dv")
FAILING_HEADS_MAX = 4096  # a report lists this many failing (batch, head) slices, then their count


class Status(str, Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    KNOWN = "KNOWN"
    UNSUPPORTED = "UNSUPPORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    ERROR = "ERROR"

    def __str__(self) -> str:
        return self.value


# Worst first: a result's status is the worst of its tensors'.
STATUS_ORDER = [Status.ERROR, Status.FAIL, Status.KNOWN, Status.OUT_OF_RANGE, Status.UNSUPPORTED, Status.PASS]


def worst_status(statuses: list[Status]) -> Status:
    return min(statuses, key=STATUS_ORDER.index) if statuses else Status.PASS


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
            "excess": self.excess if math.isfinite(self.excess) else None, "known_entry": self.known_entry,
            "failing_heads": [list(h) for h in self.failing_heads[:FAILING_HEADS_MAX]],
            **({"failing_heads_total": len(self.failing_heads)} if len(self.failing_heads) > FAILING_HEADS_MAX else {}),
            "metrics": self.metrics.to_dict() if self.metrics is not None else None,
        }


@dataclass(frozen=True)
class ImplResult:
    case_id: str
    impl: str
    status: Status
    tensors: dict[str, TensorVerdict] = field(default_factory=dict)
    error: str = ""  # ERROR/UNSUPPORTED: the one-line reason
    error_kind: str = ""  # exception | oom | harness | unsupported | crash | timeout | memory
    notes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    canary: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id, "impl": self.impl, "status": str(self.status), "error": self.error,
            "error_kind": self.error_kind, "notes": self.notes, "seconds": round(self.seconds, 4),
            "canary": self.canary, "tensors": {k: v.to_dict() for k, v in self.tensors.items()},
        }


@dataclass
class Outputs:
    """What one kernel call returned, on the CPU in its own dtype."""

    tensors: dict[str, torch.Tensor | None]
    forward_only: str | None = None  # why gradients were not produced, if the kernel has no backward
    backward_error: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    strides: dict[str, list[int]] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)  # where the kernel returned each tensor
    # Guarded cases (run/guards.py): mode, findings (oob-write, input-modified) and the unguarded call's
    # tensors ("baseline") that verdict.py's oob-read rule compares against; empty without guards.
    guard: dict[str, Any] = field(default_factory=dict)

"""What correct kernels reach, from the committed measurements: the gate's default noise band and its
correct-kernel envelope (`gqa-harness diff`, harness/reports/diff.py).

reports/calibration/cpu.json (`gqa-harness calibrate`, the data the tolerance factors come from)
holds error / scale of the low-precision designs and known-good kernels over 5 seeds of every case;
reports/audit/audit-cpu-x86_64.json (`gqa-harness audit`) the peaks of known-good kernels over
~1,000 more runs of the same cases. From them:

* the default noise band of a level: the largest spread (max/min across seeds) of a known-good
  kernel's error / scale on one (case, tensor), each ratio floored at 1. Error under the scale is
  what a correct low-precision design makes; movement down there is not a regression (sdpa-math's
  dK on outlier channels moves 0.1 -> 0.34 between seeds, a spread of 3.4 that says nothing), so
  the gate measures growth the same way, floored at 1 (diff.growth). On cpu.json: tensor x1.16,
  slice x1.39, row x1.92.
* the envelope of a (dtype, level): the largest error / scale any correct design or known-good
  kernel reached (bf16: tensor 1.565, slice 1.729; fp16: 1.619, 1.909). A PASS row that grew
  but stays under it looks like another correct kernel and does not fail the gate (docs/ci.md).

Both were measured on the CPU; the designs are device-independent, and a GPU kernel that is correct
but beyond the CPU's envelope fails the gate on growth, the safe side, until that device has its own.
"""

from __future__ import annotations

import re
from collections import defaultdict
from functools import lru_cache
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.metrics import LEVELS
from ..core.suites import CASES_DIR
from .store import ReportError, load_json

REPO = CASES_DIR.parent
CALIBRATION = REPO / "reports" / "calibration" / "cpu.json"
AUDITS = (REPO / "reports" / "audit" / "audit-cpu-x86_64.json",)
CORRECT_KINDS = ("design", "kernel")  # not "counter-example": the calibration's known-buggy rows


@lru_cache(maxsize=8)  # committed files, read (and validated) once per process
def _committed(path: Path, kind: str) -> dict[str, Any]:
    return load_json(path, kind)


def floored_spread(ratios: list[float]) -> float | None:
    """max/min of error / scale across seeds, each floored at 1 (None with fewer than two seeds)."""
    return max(max(ratios), 1.0) / max(min(ratios), 1.0) if len(ratios) >= 2 else None


def calibration_bands(calibration: dict[str, Any]) -> dict[str, float]:
    """Per level, the largest floored seed spread of a known-good kernel on one (case, tensor)."""
    seeds: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for s in calibration["samples"]:
        if s["kind"] == "kernel":
            seeds[(re.sub(r"-s[0-9]+$", "", s["case_id"]), s["source"], s["tensor"])].append(s["ratio"])
    bands = {}
    for level in LEVELS:
        spreads = [sp for ratios in seeds.values()
                   if (sp := floored_spread([r[level] for r in ratios if r.get(level) is not None])) is not None]
        if not spreads:
            raise ReportError(f"the calibration has no known-good kernel at two or more seeds at the {level} level")
        bands[level] = max(spreads)
    return bands


@lru_cache(maxsize=4)
def default_bands(path: Path = CALIBRATION) -> tuple[dict[str, float], dict[str, Any]] | None:
    """The default noise bands and their provenance, or None without a committed calibration."""
    if not path.is_file():
        return None
    calibration = _committed(path, "calibration")
    provenance = {"source": "calibration", "calibration": _shown(path),
                  "command": calibration["settings"].get("command"),
                  "rule": "band = max over (case without seed, known-good kernel, tensor) of max/min error/scale "
                          "across the calibration's seeds, each ratio floored at 1"}
    return calibration_bands(calibration), provenance


@dataclass(frozen=True)
class Envelope:
    """Per dtype and level, the largest error / scale correct designs and known-good kernels reached."""

    limits: dict[str, dict[str, float]] = field(default_factory=dict)
    sources: tuple[str, ...] = ()

    def limit(self, dtype: str | None, level: str) -> float | None:
        return self.limits.get(dtype or "", {}).get(level)


@lru_cache(maxsize=4)
def default_envelope(calibration: Path = CALIBRATION, audits: tuple[Path, ...] = AUDITS) -> Envelope:
    """The envelope from the committed calibration and audits (empty when none is committed)."""
    limits: dict[str, dict[str, float]] = defaultdict(dict)

    def widen(dtype: str, level: str, value: float | None) -> None:
        if value is not None:
            limits[dtype][level] = max(limits[dtype].get(level, 0.0), value)

    sources = []
    if calibration.is_file():
        for row in _committed(calibration, "calibration")["distribution"]:
            if row["kind"] in CORRECT_KINDS:
                widen(row["dtype"], row["level"], row["max"])
        sources.append(_shown(calibration))
    for audit in (a for a in audits if a.is_file()):
        for peak in _committed(audit, "audit")["peaks"]:
            widen(peak["dtype"], peak["level"], peak["max_ratio"])
        sources.append(_shown(audit))
    return Envelope(dict(limits), tuple(sources))


def _shown(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(path)

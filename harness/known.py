"""Known failures: cases/known-failures.toml turns a matching FAIL under its ceiling into KNOWN.

    [[known]]
    id = "cpu-flash-gqa-dkdv"    # short name, shown in reports
    case = "*-h*x*-*"            # fnmatch pattern on the case id
    impl = ["sdpa-flash"]        # fnmatch pattern(s) on the implementation name
    tensors = ["dk", "dv"]
    min_group_size = 8           # only cases with at least this group size
    device = "cpu*"              # fnmatch pattern on the device label (cpu-x86_64, cuda-sm_90, rocm-gfx942)
    torch = "2.13*"              # fnmatch pattern on torch.__version__
    max_ratio = 1.2              # ceiling on the tensor-level error/scale ...
    ratio_per_sqrt_group = true  # ... times sqrt(group_size), for a bug that grows like a low-precision group sum
    max_slice_ratio = 1.5        # optional ceilings at the other levels (same scaling)
    max_row_ratio = 3.0
    evidence = "why this is a real backend bug, with the figures or the upstream link"

A FAIL beyond any ceiling stays FAIL (a known entry never hides a worse failure);
a gross failure (NaN, O(1) error) is never absorbed. An entry that matched results
in a run but absorbed no failure is reported FIXED so the entry can be removed.
"""

from __future__ import annotations

import fnmatch
import math
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from .suites import CASES_DIR
from .verdict import Status, TensorVerdict

KNOWN_FILE = CASES_DIR / "known-failures.toml"
_KEYS = {"id", "case", "impl", "min_group_size", "tensors", "device", "torch", "max_ratio", "ratio_per_sqrt_group", "max_slice_ratio",
         "max_row_ratio", "evidence"}


class KnownFailuresError(ValueError):
    pass


@dataclass(frozen=True)
class KnownFailure:
    id: str
    case: str
    impl: tuple[str, ...]
    tensors: tuple[str, ...]
    device: str
    torch: str
    max_ratio: float
    evidence: str
    ratio_per_sqrt_group: bool = False
    max_slice_ratio: float | None = None
    max_row_ratio: float | None = None
    min_group_size: int = 1

    def matches(self, case_id: str, impl: str, tensor: str, device_label: str, torch_version: str,
                group_size: int = 1) -> bool:
        return (group_size >= self.min_group_size and fnmatch.fnmatchcase(case_id, self.case) and any(fnmatch.fnmatchcase(impl, p) for p in self.impl)
                and tensor in self.tensors and fnmatch.fnmatchcase(device_label, self.device)
                and fnmatch.fnmatchcase(torch_version, self.torch))

    def ceilings(self, group_size: int) -> dict[str, float]:
        k = math.sqrt(group_size) if self.ratio_per_sqrt_group else 1.0
        out = {"tensor": self.max_ratio * k}
        if self.max_slice_ratio is not None:
            out["slice"] = self.max_slice_ratio * k
        if self.max_row_ratio is not None:
            out["row"] = self.max_row_ratio * k
        return out

    def absorbs(self, verdict: TensorVerdict, group_size: int) -> bool:
        if verdict.severity == "gross" or verdict.rule not in ("tensor", "slice", "row") or verdict.metrics is None:
            return False
        ceilings = self.ceilings(group_size)
        if verdict.rule not in ceilings:
            return False
        return all(float(verdict.metrics.levels[lv].ratio.max()) <= c for lv, c in ceilings.items())


def load_known(path: Path | None = None) -> list[KnownFailure]:
    path = path or KNOWN_FILE
    if not path.exists():
        return []
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise KnownFailuresError(f"{path}: malformed TOML: {exc}") from None
    out = []
    for i, entry in enumerate(data.get("known", [])):
        unknown = set(entry) - _KEYS
        if unknown:
            raise KnownFailuresError(f"{path}: entry {i + 1}: unknown key(s) {', '.join(sorted(unknown))}")
        missing = {"id", "case", "impl", "tensors", "max_ratio", "evidence"} - set(entry)
        if missing:
            raise KnownFailuresError(f"{path}: entry {i + 1}: missing {', '.join(sorted(missing))}")
        out.append(KnownFailure(
            id=str(entry["id"]), case=entry["case"],
            impl=tuple(entry["impl"]) if isinstance(entry["impl"], list) else (entry["impl"],), tensors=tuple(entry["tensors"]), device=entry.get("device", "*"),
            torch=entry.get("torch", "*"), max_ratio=float(entry["max_ratio"]), evidence=entry["evidence"],
            ratio_per_sqrt_group=bool(entry.get("ratio_per_sqrt_group", False)),
            max_slice_ratio=entry.get("max_slice_ratio"), max_row_ratio=entry.get("max_row_ratio"),
            min_group_size=int(entry.get("min_group_size", 1)),
        ))
    return out


def apply_known(verdict: TensorVerdict, known: list[KnownFailure], *, case_id: str, impl: str, group_size: int,
                device_label: str, torch_version: str) -> tuple[TensorVerdict, KnownFailure | None]:
    """KNOWN for a FAIL under a matching ceiling. The entry that matched is returned so the report can
    tell entries that matched results but no failure (FIXED: the entry can go)."""
    entries = [k for k in known if k.matches(case_id, impl, verdict.tensor, device_label, torch_version, group_size)]
    if not entries:
        return verdict, None
    verdict = replace(verdict, known_entry=entries[0].id)
    if verdict.status is Status.FAIL:
        for entry in entries:
            if entry.absorbs(verdict, group_size):
                return _with_status(replace(verdict, known_entry=entry.id), Status.KNOWN, f"known ({entry.id}): {verdict.reason}"), entry
        return _with_status(verdict, Status.FAIL, verdict.reason + " (worse than its known-failure ceiling)"), entries[0]
    return verdict, entries[0]


def _with_status(v: TensorVerdict, status: Status, reason: str) -> TensorVerdict:
    return replace(v, status=status, reason=reason)

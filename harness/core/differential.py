"""Differential verdicts: the one place that decides rules judging several results together.

A correct kernel is invariant under transformations a subtle precision bug is not; these rules
use that where one (case, implementation) judged against `factor x scale` cannot see a loss
smaller than ~2x the best correct design. Pure: they take ratios and tensors, never run a kernel.

  * group-trend  — a family of cases differing only in group size: the least-squares slope of
                   log(error/scale) vs log(G) per implementation and tensor. A correct kernel is flat;
                   a group reduction in low precision grows like sqrt(G). FAIL beyond the slope the
                   calibrated known-good kernels and designs show.
  * length-trend — the same over a family differing only in key length (a low-precision
                   accumulation over key blocks grows with Lk).
  * gqa-vs-expanded — one backend on native GQA and on hand-expanded K/V, same inputs: out and dQ
                   must agree, and the expanded dK/dV summed over each group in fp64 must agree with the
                   native dK/dV, within the backend's noise, in units of the dtype floor; for `out`,
                   where the expanded run is itself off the oracle's rounding, a pair further apart
                   FAILs only if native GQA is also that much further from the fp64 oracle than the
                   expanded run (different kernels round differently; a native loss shows as error
                   of its own).
Allowed slopes and the pair factor live in tolerances.toml [differential] with their provenance.
A differential FAIL carries its rule, evidence and a command reproducing the whole family;
a known-failure entry with a ceiling for the rule (`differential = {group-trend = 0.6}`) absorbs it.
"""

from __future__ import annotations

import math
import tomllib
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Iterable

import torch

from .case import Case, case_spec
from .inputs import TORCH_DTYPES
from .known import KnownFailure
from .results import Status
from .sampling import sample_rows

TREND_AXES = {"group-trend": "group_size", "length-trend": "kv_len"}
PAIR_RULE = "gqa-vs-expanded"
EXPANDED_OFF_ROUNDING = 1.05  # floor units: an expanded `out` further than this from the oracle is not its rounding
EXPANDED_PREFIX = "expanded-kv-"


@dataclass(frozen=True)
class DiffRules:
    max_slope: dict[str, float]  # trend rule -> largest allowed log-log slope of error/scale
    min_points: int  # distinct axis values a family needs before its slope is judged
    pair_factor: dict[str, float]  # gqa-vs-expanded, per tensor: largest allowed difference in dtype-floor units
    provenance: dict[str, Any] = field(default_factory=dict)


def load_rules(text: str | None = None) -> DiffRules:
    if text is None:
        text = resources.files("harness.core").joinpath("tolerances.toml").read_text()
    data = tomllib.loads(text)["differential"]
    return DiffRules({rule: float(data[rule]["max_slope"]) for rule in TREND_AXES}, int(data["min_points"]),
                     {t: float(data[PAIR_RULE]["grad_factor" if t in ("dk", "dv") else "forward_factor"])
                      for t in ("out", "dq", "dk", "dv")}, data.get("provenance", {}))


@dataclass(frozen=True)
class DiffVerdict:
    """One differential judgement: a family (or a case pair), an implementation, a tensor."""

    rule: str
    family: str  # the family's label (the case id with the varied axis written as *)
    impl: str
    tensor: str
    status: Status
    value: float  # the slope, or the difference in floor units
    allowed: float
    evidence: dict[str, Any]
    reason: str
    reproduce: str
    case_ids: tuple[str, ...] = ()
    known_entry: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "family": self.family, "impl": self.impl, "tensor": self.tensor,
                "status": str(self.status), "value": round(self.value, 4), "allowed": self.allowed,
                "evidence": self.evidence, "reason": self.reason, "reproduce": self.reproduce,
                "case_ids": list(self.case_ids), "known_entry": self.known_entry}


# --- families -----------------------------------------------------------------------------------


def axis_value(case: Case, rule: str) -> int:
    return case.group_size if rule == "group-trend" else case.kv_len


def family_label(case: Case, rule: str) -> str:
    """The case id with the varied axis as `*`: what every member of the family shares."""
    if rule == "group-trend":
        return case.replace(q_heads=case.kv_heads).id.replace(f"-h{case.kv_heads}x{case.kv_heads}-", f"-h*x{case.kv_heads}-")
    return case.replace(kv_len=case.q_len).id + "-lk*"


def family_key(case: Case, rule: str) -> tuple:
    """Members differ only in the axis: every other field equal (group: kv heads fixed, q heads vary)."""
    fields = case.to_dict()
    fields.pop("q_heads" if rule == "group-trend" else "kv_len")
    return tuple(sorted((k, repr(v)) for k, v in fields.items()))


def loglog_slope(points: Iterable[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(y) against log(x): ~0 flat, 0.5 grows like sqrt(x)."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


@dataclass(frozen=True)
class Point:
    """One judged tensor: its case, implementation and tensor-level error / scale."""

    case: Case
    impl: str
    tensor: str
    ratio: float


def families(points: Iterable[Point], rule: str, min_points: int) -> dict[tuple, list[Point]]:
    """(family key, impl, tensor) -> points, for families with at least `min_points` axis values."""
    groups: dict[tuple, list[Point]] = defaultdict(list)
    for p in points:
        if math.isfinite(p.ratio) and p.ratio > 0:
            groups[(family_key(p.case, rule), p.impl, p.tensor)].append(p)
    return {k: sorted(v, key=lambda p: axis_value(p.case, rule)) for k, v in groups.items()
            if len({axis_value(p.case, rule) for p in v}) >= min_points}


def reproduce_command(cases: Iterable[Case], impl: str) -> str:
    specs = " ".join(f"--case '{case_spec(c)}'" for c in cases)
    return f"gqa-harness run --impl {impl} {specs}"


def trend_verdict(members: list[Point], rule: str, allowed: float) -> DiffVerdict:
    axis = "G" if rule == "group-trend" else "Lk"
    by_x = {axis_value(p.case, rule): p.ratio for p in members}
    slope = loglog_slope((float(x), r) for x, r in by_x.items()) or 0.0
    first = members[0]
    ratios = {str(x): round(r, 4) for x, r in sorted(by_x.items())}
    growth = ", ".join(f"{r:.2f} at {axis}={x}" for x, r in ratios.items())
    failing = slope > allowed
    reason = (f"{first.tensor}: error/scale {'grows' if failing else 'stays within'} with {axis}: log-log slope "
              f"{slope:.3f} (allowed {allowed:g}); {growth}")
    return DiffVerdict(rule, family_label(first.case, rule), first.impl, first.tensor,
                       Status.FAIL if failing else Status.PASS, slope, allowed,
                       {"slope": round(slope, 4), "allowed_slope": allowed, "ratios": ratios}, reason,
                       reproduce_command([p.case for p in members], first.impl), tuple(p.case.id for p in members))


def trend_verdicts(points: Iterable[Point], rules: DiffRules) -> list[DiffVerdict]:
    points = list(points)
    out = []
    for rule in TREND_AXES:
        for members in families(points, rule, rules.min_points).values():
            out.append(trend_verdict(members, rule, rules.max_slope[rule]))
    return sorted(out, key=lambda v: (v.rule, v.family, v.impl, v.tensor))


# --- native GQA vs the same backend on hand-expanded K/V ----------------------------------------------


def expanded_partner(impl: str) -> str | None:
    """The implementation that runs `impl`'s backend on hand-expanded K/V: sdpa-X -> expanded-kv-X,
    a user kernel NAME -> expanded-kv-NAME (its expanded form, when the run has it)."""
    if impl.startswith(EXPANDED_PREFIX):
        return None
    return EXPANDED_PREFIX + impl.removeprefix("sdpa-")


def group_sum(expanded: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, L, D) per query head -> (B, Hkv, L, D), summed over each group in fp64 (repeat_interleave order)."""
    b, hq = expanded.shape[:2]
    return expanded.double().reshape(b, kv_heads, hq // kv_heads, *expanded.shape[2:]).sum(2)


def floor_norm(truth: torch.Tensor, dtype: str) -> float:
    """L2 norm of the oracle's own rounding to the dtype: what one correct rounding costs."""
    t = truth.double()
    return float((t.to(TORCH_DTYPES[dtype]).double() - t).nan_to_num(0.0).norm())


@dataclass(frozen=True)
class PairDifference:
    """One tensor of a gqa-vs-expanded pair, in dtype-floor units: how far apart the two runs are, and how
    far each is from the fp64 oracle."""

    difference: float
    native_error: float
    expanded_error: float

    @property
    def native_excess(self) -> float:
        """The error native GQA has beyond the expanded run's, taking the two as independent:
        sqrt(max(0, native^2 - expanded^2)). Two correct roundings of the same values give ~0."""
        if not math.isfinite(self.native_error):
            return math.inf
        return math.sqrt(max(0.0, self.native_error ** 2 - self.expanded_error ** 2))


def pair_differences(case: Case, native: dict[str, torch.Tensor | None], expanded: dict[str, torch.Tensor | None],
                     oracle: dict[str, torch.Tensor]) -> dict[str, PairDifference]:
    """Per tensor: ||native - expanded|| and each one's distance to the oracle, over the dtype floor;
    dK/dV of the expanded run group-summed in fp64 first."""
    out = {}
    for name, truth in oracle.items():
        a, b = native.get(name), expanded.get(name)
        if a is None or b is None:
            continue
        if case.long and name in ("out", "dq"):  # the oracle holds only the checked rows: compare those
            rows = sample_rows(case).checked
            a, b = a.index_select(2, rows.to(a.device)), b.index_select(2, rows.to(b.device))
        b = group_sum(b, case.kv_heads) if name in ("dk", "dv") and b.shape != a.shape else b.double()
        if b.shape != a.shape:
            continue
        a, t = a.double(), truth.to(a.device).double()
        floor = floor_norm(truth, case.dtype)
        if t.shape != a.shape:  # no oracle to split the difference with: judged on the difference alone
            out[name] = PairDifference(_floor_units(a - b, floor), math.inf, 0.0)
            continue
        out[name] = PairDifference(_floor_units(a - b, floor), _floor_units(a - t, floor), _floor_units(b - t, floor))
    return out


def _floor_units(delta: torch.Tensor, floor: float) -> float:
    """||delta|| over the dtype floor (non-finite entries ignored, as the single-case rules count them);
    with a zero floor, 0 when delta is, else inf."""
    norm = float(delta.nan_to_num(0.0, posinf=0.0, neginf=0.0).norm())
    if floor > 0:
        return norm / floor
    return 0.0 if norm == 0 else math.inf


def pair_verdicts(case: Case, impl: str, partner: str, differences: dict[str, PairDifference],
                  factors: dict[str, float]) -> list[DiffVerdict]:
    """FAIL when the two runs differ by more than the factor. One exception, measured on GPU decode
    (tolerances.toml): for `out`, when the expanded run is itself off the oracle's rounding (another kernel,
    rounding its own way), the pair fails only if native GQA carries error of its own beyond the expanded
    run's by more than the factor. Where the expanded run is the oracle's rounding, the plain rule keeps its
    full sensitivity."""
    out = []
    for name, pair in differences.items():
        factor, d = factors[name], pair.difference
        excess = pair.native_excess
        escape = name == "out" and pair.expanded_error > EXPANDED_OFF_ROUNDING and excess <= factor
        failing = not d <= factor and not escape
        how = "group-summed in fp64 " if name in ("dk", "dv") else ""
        reason = (f"{name}: native GQA vs {partner} ({how}on the same inputs) differ by {d:.3g}x the {case.dtype} floor "
                  f"(allowed {factor:g})")
        if d > factor:
            reason += (f"; from the fp64 oracle native is {pair.native_error:.3g}, {partner} {pair.expanded_error:.3g} "
                       f"floor units: native's own excess {excess:.3g}" +
                       (" (native GQA no further from the oracle than the expanded run: their kernels round "
                        "differently)" if escape else ""))
        out.append(DiffVerdict(PAIR_RULE, case.id, impl, name, Status.FAIL if failing else Status.PASS, d, factor,
                               {"difference_floor_units": _finite(d), "native_error_floor_units": _finite(pair.native_error),
                                "expanded_error_floor_units": _finite(pair.expanded_error),
                                "native_excess_floor_units": _finite(excess),
                                "allowed": factor, "partner": partner, "group_size": case.group_size},
                               reason, f"gqa-harness run --impl {impl} --impl {partner} --case '{case_spec(case)}'",
                               (case.id,)))
    return out


def _finite(x: float) -> float | None:
    return round(x, 4) if math.isfinite(x) else None


# --- known failures ---------------------------------------------------------------------------------


def absorb(verdict: DiffVerdict, known: Iterable[KnownFailure], device_label: str,
           versions: dict[str, str | None], group_size: int) -> DiffVerdict:
    """A FAIL under a matching entry's ceiling for this rule becomes KNOWN; beyond it, it stays FAIL."""
    if verdict.status is not Status.FAIL:
        return verdict
    case_id = verdict.case_ids[-1] if verdict.case_ids else verdict.family
    for entry in known:
        ceiling = entry.differential.get(verdict.rule)
        if ceiling is None or not entry.matches(case_id, verdict.impl, verdict.tensor, device_label, versions, group_size):
            continue
        if verdict.rule == PAIR_RULE and entry.ratio_per_sqrt_group:  # a difference that grows like a group sum
            ceiling *= math.sqrt(group_size)
        if verdict.value <= ceiling:
            return DiffVerdict(**{**verdict.__dict__, "status": Status.KNOWN, "known_entry": entry.id,
                                  "reason": f"known ({entry.id}): {verdict.reason}"})
        return DiffVerdict(**{**verdict.__dict__, "known_entry": entry.id,
                              "reason": verdict.reason + f" (beyond its known-failure ceiling {ceiling:g})"})
    return verdict

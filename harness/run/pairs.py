"""Glue between a run and the differential verdicts (core/differential.py decides; this collects).

  * the CaseRunner keeps the current case's outputs (execute.capturing) until the case ends: the only raw
    outputs a run holds after judging (sdpa-X and expanded-kv-X pair up);
  * `pair_judgements` judges native GQA against the same backend on expanded K/V for the case that ended;
  * `family_judgements` judges the trend rules over every result of the run (plan level).
Each verdict is a stream record {"type": "differential", ...}; known failures absorb them here.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..core.case import Case
from ..core.differential import (DiffRules, DiffVerdict, Point, absorb, expanded_partner,
                                 pair_differences, pair_verdicts, trend_verdicts)
from ..core.references import References
from ..core.results import ImplResult, Outputs
from .session import Session


def record(verdict: DiffVerdict) -> dict[str, Any]:
    return {"type": "differential", **verdict.to_dict()}


def pair_judgements(session: Session, rules: DiffRules, refs: References,
                    outputs: dict[str, Outputs]) -> list[DiffVerdict]:
    """gqa-vs-expanded for every (native, expanded partner) pair that ran on this case (G > 1 only)."""
    case = refs.case
    if case.group_size == 1:
        return []
    out = []
    for name in sorted(outputs):
        partner = expanded_partner(name)
        if partner not in outputs:
            continue
        diffs = pair_differences(case, outputs[name].tensors, outputs[partner].tensors, refs.oracle)
        out += [absorb(v, session.known, session.label, session.versions, case.group_size)
                for v in pair_verdicts(case, name, partner, diffs, rules.pair_factor)]
    return out


def points(results: Iterable[ImplResult], cases: dict[str, Case]) -> list[Point]:
    """Tensor-level error/scale of every judged tensor of non-canary results."""
    out = []
    for r in results:
        case = cases.get(r.case_id)
        if case is None or r.canary:
            continue
        out += [Point(case, r.impl, name, float(v.metrics.levels["tensor"].ratio))
                for name, v in r.tensors.items() if v.metrics is not None]
    return out


def family_judgements(session: Session, rules: DiffRules, results: Iterable[ImplResult],
                      cases: Iterable[Case]) -> list[DiffVerdict]:
    by_id = {c.id: c for c in cases}
    verdicts = trend_verdicts(points(results, by_id), rules)
    return [absorb(v, session.known, session.label, session.versions,
                   max(by_id[c].group_size for c in v.case_ids)) for v in verdicts]

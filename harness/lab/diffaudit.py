"""False-alarm audit of the differential rules (`gqa-harness audit --differential`).

Known-good sources over a family suite (cases/families.toml) at audit seeds, judged by
core/differential.py exactly as a run judges them:
  * trend rules: known-good kernels (CPU: expanded-kv-flash, sdpa-math; native flash at G = 1 is in
    every group family's first member only, so it is left out) and each low-precision design scored
    leave-one-out against the others, one slope per (family, seed, source, tensor);
  * gqa-vs-expanded: math on native GQA vs math on expanded K/V; native CPU flash vs expanded-kv-flash is
    a real backend with a recorded dK/dV bug: its verdicts count as findings (KNOWN), never as alarms.
The margin per rule is the allowed value over the largest value a known-good source reached.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.case import Case
from ..core.differential import PAIR_RULE, DiffRules, DiffVerdict, Point, absorb, load_rules, trend_verdicts
from ..core.references import references
from ..core.results import Status
from ..core.suites import load_suite
from ..implementations import Implementation, builtin_implementations
from ..reports.store import clean_json
from ..run.execute import execute
from ..run.execute import capturing
from ..run.pairs import pair_judgements
from ..run.session import Session, run_one
from .audit import audit_cases, design_verdicts

CPU_TREND_GOOD = ("expanded-kv-flash", "sdpa-math")
CPU_PAIRS = ("sdpa-math", "expanded-kv-math", "sdpa-flash", "expanded-kv-flash")
CPU_FINDINGS = ("sdpa-flash",)  # native CPU flash at G > 1: cases/known-failures.toml cpu-flash-gqa-dkdv-group-sum


def rule_key(rule: str, tensor: str) -> str:
    """Margins are kept per rule, and for gqa-vs-expanded per factor (forward: out, dQ; gradients: dK/dV)."""
    if rule != PAIR_RULE:
        return rule
    return f"{rule} {'dk+dv' if tensor in ('dk', 'dv') else 'out+dq'}"


@dataclass
class DiffTally:
    judged: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    peak: dict[str, tuple[float, str]] = field(default_factory=dict)  # rule -> (largest value, where)
    alarms: list[dict[str, Any]] = field(default_factory=list)
    known: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    findings: dict[str, float] = field(default_factory=dict)  # "rule impl tensor" -> largest value (KNOWN)
    runs: int = 0  # (family, seed) trend runs + (case, seed) pair runs

    def add(self, v: DiffVerdict, finding: bool = False) -> None:
        """`finding`: a real backend with a recorded bug (its verdicts are findings, whatever their status)."""
        if v.status is Status.KNOWN or finding:
            self.known[v.known_entry or "not absorbed"] += 1
            key = f"{v.rule} {v.impl} {v.tensor}"
            self.findings[key] = max(self.findings.get(key, 0.0), v.value)
            return
        rule = rule_key(v.rule, v.tensor)
        self.judged[rule] += 1
        if v.status is Status.FAIL:
            self.alarms.append({"rule": v.rule, "family": v.family, "impl": v.impl, "tensor": v.tensor,
                                "value": v.value, "reason": v.reason})
        if not math.isfinite(v.value) or v.value > self.peak.get(rule, (-math.inf, ""))[0]:
            self.peak[rule] = (v.value, f"{v.impl} {v.tensor} {v.family}")


def _points(case: Case, session: Session, impls: list[Implementation], tally: DiffTally,
            rules: DiffRules) -> list[Point]:
    refs = references(case)
    kept: dict = {}
    pts = []
    for impl in impls:
        result = run_one(session, refs, impl, capturing(execute, kept))
        if impl.name in CPU_TREND_GOOD:
            pts += [Point(case, impl.name, n, float(v.metrics.levels["tensor"].ratio))
                    for n, v in result.tensors.items() if v.metrics is not None]
    pts += [Point(case, source, v.tensor, float(v.metrics.levels["tensor"].ratio))
            for source, v in design_verdicts(refs, session.tolerances) if v.metrics is not None]
    pairs = pair_judgements(session, rules, refs, kept)
    for v in pairs:
        tally.add(v, finding=v.impl in CPU_FINDINGS)
    tally.runs += bool(pairs)
    return pts


def run_differential_audit(cases: list[Case], session: Session, progress: Callable[[int, int], None] | None = None,
                           rules: DiffRules | None = None) -> tuple[DiffTally, DiffRules]:
    """`cases`: family members with audit seeds; the trend rules judge each seed's families."""
    rules = rules or load_rules()
    builtins = builtin_implementations()
    names = [n for n in (*CPU_TREND_GOOD, *CPU_PAIRS) if n in builtins and builtins[n].available(session.facts) is None]
    impls = [builtins[n] for n in dict.fromkeys(names)]
    tally = DiffTally()
    by_seed: dict[int, list[Point]] = defaultdict(list)
    for i, case in enumerate(cases):
        by_seed[case.seed] += _points(case, session, impls, tally, rules)
        if progress:
            progress(i + 1, len(cases))
    for pts in by_seed.values():
        verdicts = trend_verdicts(pts, rules)
        tally.runs += len({(v.rule, v.family) for v in verdicts})
        for v in verdicts:
            group = max(c.group_size for c in cases if c.id in v.case_ids)
            tally.add(absorb(v, session.known, session.label, session.versions, group))
    return tally, rules


def differential_summary(tally: DiffTally, rules: DiffRules) -> dict[str, Any]:
    allowed = {**rules.max_slope, rule_key(PAIR_RULE, "out"): rules.pair_factor["out"],
               rule_key(PAIR_RULE, "dk"): rules.pair_factor["dk"]}
    per_rule = [{"rule": r, "judged": tally.judged.get(r, 0), "allowed": a,
                 "max_value": tally.peak[r][0] if r in tally.peak else None,
                 "where": tally.peak[r][1] if r in tally.peak else "",
                 "margin": (a / tally.peak[r][0] if r in tally.peak and tally.peak[r][0] > 0 else None)}
                for r, a in allowed.items()]
    return {"runs": tally.runs, "alarms": tally.alarms, "rules": per_rule, "known": dict(tally.known),
            "findings": [{"key": k, "max_value": round(v, 4)} for k, v in sorted(tally.findings.items())]}


def render_differential(summary: dict[str, Any]) -> list[str]:
    lines = ["## Differential rules", "",
             f"{summary['runs']} (family or case, seed) runs; **{len(summary['alarms'])} alarms**. "
             "Margin = allowed value / largest value a known-good source reached.", "",
             "| rule | judged | allowed | max value | margin | where |", "|---|---|---|---|---|---|"]
    for r in summary["rules"]:
        mv = "n/a" if r["max_value"] is None else f"{r['max_value']:.3f}"
        mg = "n/a" if r["margin"] is None else f"{r['margin']:.2f}"
        lines.append(f"| {r['rule']} | {r['judged']} | {r['allowed']:g} | {mv} | {mg} | {r['where']} |")
    if summary["findings"]:
        lines += ["", "Real backend findings absorbed by known-failure entries (not alarms): "
                  + "; ".join(f"{f['key']} up to {f['max_value']:.3f}" for f in summary["findings"])]
    for a in summary["alarms"][:50]:
        lines.append(f"- ALARM {a['rule']} {a['impl']} {a['tensor']} {a['family']}: {a['reason'][:200]}")
    return lines + [""]


def differential_audit_command(device: str | None, suite: str, seeds: int, first_seed: int, out: Path, quiet: bool,
                               threads: int = 1) -> int:
    """`gqa-harness audit --differential`: writes differential-audit-<device>.json/.md; 1 on any alarm."""
    cases = sorted(audit_cases([sc.case for sc in load_suite(suite)], seeds, first_seed), key=lambda c: c.seed)
    session = Session.open(device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # many small cases: one intra-op thread (see audit.py)
    start = time.monotonic()

    def progress(done: int, total: int) -> None:
        if not quiet and (done == total or done % 50 == 0):
            print(f"[{done}/{total}] {time.monotonic() - start:.0f}s", file=sys.stderr, flush=True)
    try:
        tally, rules = run_differential_audit(cases, session, progress)
    finally:
        torch.set_num_threads(previous)
    summary = differential_summary(tally, rules)
    settings = {"device_label": session.label, "torch": torch.__version__, "suite": suite, "seeds": seeds,
                "first_seed": first_seed, "threads": threads, "seconds": round(time.monotonic() - start, 1),
                "command": " ".join(["gqa-harness", *sys.argv[1:]])}
    report = clean_json({"settings": settings, **summary})
    out.mkdir(parents=True, exist_ok=True)
    stem = f"differential-audit-{session.label}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    head = [f"# Differential false-alarm audit: {session.label}, torch {torch.__version__}", "",
            f"Suite `{suite}`, seeds {first_seed}..{first_seed + seeds - 1}, {settings['seconds']} s; "
            f"`{settings['command']}`.", ""]
    (out / f"{stem}.md").write_text("\n".join(head + render_differential(summary)))
    margins = ", ".join(f"{r['rule']} {r['margin']:.2f}" for r in summary["rules"] if r["margin"])
    print(f"differential audit {session.label}: {tally.runs} runs, {len(tally.alarms)} alarms; margins {margins}; "
          f"report {out / (stem + '.md')}")
    return 1 if tally.alarms else 0

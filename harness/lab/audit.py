"""False-alarm audit: known-good implementations over many seeds; the largest error/scale vs the factor.

A harness that cries wolf is as useless as one that crashes. The audit runs what is
believed correct over a corpus suite (smoke by default; cases/audit.toml is small and heavy
in ill-conditioned inputs) with seeds distinct from those the factors were chosen on, and reports, per dtype x tensor x level, the largest
ratio seen against the factor in force: the margin. Math scores exactly the floor and
proves nothing, so it is not here. What is:
  * real fused kernels believed correct: on the CPU flash behind hand-expanded kv at every
    group size, and native flash at group size 1 only (at G > 1 it has a known dK/dV bug,
    cases/known-failures.toml); on a GPU the fused backends, pinned and expanded;
  * each low-precision reference design scored leave-one-out against the envelope of the
    others (lowprec.py): the spread the factors were derived from, on fresh seeds.
A FAIL here is an alarm to report with its numbers (a false alarm, or a real backend bug),
never a reason to loosen a factor. A result a known-failure entry absorbs is counted apart.
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
from tabulate import tabulate

from ..core.case import Case
from ..core.inputs import torch_dtype
from ..core.lowprec import designs
from ..core.metrics import LEVELS, tensor_metrics
from ..core.references import References, references
from ..core.results import Status, TensorVerdict
from ..core.suites import load_suite
from ..core.verdict import Tolerances, judge_metrics
from ..implementations import DeviceFacts, Implementation, RegistryError, builtin_implementations
from ..reports.store import clean_json
from ..run.session import Session, run_one

AUDIT_SEED_BASE = 10_000  # calibration and the suites use small seeds; the audit never does
CPU_KNOWN_GOOD = ("expanded-kv-flash",)
CPU_KNOWN_GOOD_G1 = ("sdpa-flash",)  # native CPU flash is known-good only without GQA
GPU_KNOWN_GOOD = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "expanded-kv-flash", "expanded-kv-efficient",
                  "expanded-kv-cudnn")


def known_good(facts: DeviceFacts, case: Case) -> list[str]:
    if facts.kind == "cpu":
        return [*CPU_KNOWN_GOOD, *(CPU_KNOWN_GOOD_G1 if case.group_size == 1 else ())]
    return list(GPU_KNOWN_GOOD)


def audit_cases(cases: list[Case], seeds: int, first_seed: int = AUDIT_SEED_BASE) -> list[Case]:
    """Every case with each audit seed (the case's own seed is replaced)."""
    return [c.replace(seed=first_seed + i) for c in cases for i in range(seeds)]


@dataclass
class Peak:
    ratio: float = 0.0
    case_id: str = ""
    source: str = ""


@dataclass
class Tally:
    """Largest ratio per (dtype, tensor, level), per source, and every alarm."""

    peaks: dict[tuple[str, str, str], Peak] = field(default_factory=dict)
    # the same, kernels and designs apart: (kernel|design, dtype, tensor, level)
    peaks_by_kind: dict[tuple[str, str, str, str], Peak] = field(default_factory=dict)
    by_source: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    # (value distribution, kernel|design, level) -> largest ratio: ill-conditioned classes apart
    by_class: dict[tuple[str, str, str], float] = field(default_factory=lambda: defaultdict(float))
    alarms: list[dict[str, Any]] = field(default_factory=list)
    known: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    runs: int = 0
    judged: int = 0

    def add(self, case: Case, source: str, verdict: TensorVerdict, tol: Tolerances) -> None:
        if verdict.status is Status.KNOWN:
            self.known[verdict.known_entry] += 1
            return
        if verdict.status in (Status.FAIL, Status.ERROR):
            self.alarms.append({"case_id": case.id, "source": source, "tensor": verdict.tensor,
                                "status": str(verdict.status), "reason": verdict.reason})
        m = verdict.metrics
        if m is None:
            return
        self.judged += 1
        for level in LEVELS:
            if m.levels[level].count < tol.rule(case.dtype, level).min_count:
                continue  # a level the verdict does not judge cannot raise an alarm
            ratio = float(torch.nan_to_num(m.levels[level].ratio, nan=math.inf).max())
            key = (case.dtype, verdict.tensor, level)
            if key not in self.peaks or ratio > self.peaks[key].ratio:
                self.peaks[key] = Peak(ratio, case.id, source)
            self.by_source[(source, level)] = max(self.by_source[(source, level)], ratio)
            kind = "design" if source.startswith("lowprec:") else "kernel"
            self.by_class[(case.values, kind, level)] = max(self.by_class[(case.values, kind, level)], ratio)
            split = (kind, *key)
            if split not in self.peaks_by_kind or ratio > self.peaks_by_kind[split].ratio:
                self.peaks_by_kind[split] = Peak(ratio, case.id, source)

    def error(self, case: Case, source: str, message: str) -> None:
        self.alarms.append({"case_id": case.id, "source": source, "tensor": "", "status": "ERROR", "reason": message})


def design_verdicts(refs: References, tol: Tolerances) -> list[tuple[str, TensorVerdict]]:
    """Each low-precision design judged against the envelope of the others (leave-one-out)."""
    case = refs.inputs.case
    names = [d.name for d in designs(torch_dtype(case))]
    out = []
    for tensor, truth in refs.oracle.items():
        lowprec = refs.lowprec[tensor]
        for i, name in enumerate(names):
            others = lowprec[:i] + lowprec[i + 1:]
            m = tensor_metrics(tensor, lowprec[i], truth, others, refs.inputs, refs.row_noise.get(tensor))
            out.append((f"lowprec:{name}", judge_metrics(m, case.dtype, tol)))
    return out


def audit_one(case: Case, impls: list[Implementation], session: Session, tally: Tally) -> None:
    refs = references(case)
    tol = session.tolerances
    for impl in impls:
        result = run_one(session, refs, impl)
        if result.status is Status.UNSUPPORTED:
            continue
        if result.status is Status.ERROR and not result.tensors:
            tally.error(case, impl.name, result.error)
        for verdict in result.tensors.values():
            tally.add(case, impl.name, verdict, tol)
    for source, verdict in design_verdicts(refs, tol):
        tally.add(case, source, verdict, tol)
    tally.runs += 1


def run_audit(cases: list[Case], session: Session, impl_names: list[str] | None = None,
              progress: Callable[[int, int, Tally], None] | None = None) -> Tally:
    builtins = builtin_implementations()
    tally = Tally()
    for i, case in enumerate(cases):
        names = impl_names or known_good(session.facts, case)
        impls = [builtins[n] for n in names if n in builtins and builtins[n].available(session.facts) is None]
        audit_one(case, impls, session, tally)
        if progress:
            progress(i + 1, len(cases), tally)
    return tally


def summary(tally: Tally, tol: Tolerances, kind: str | None = None) -> list[dict[str, Any]]:
    """Peaks with their margins; `kind` ("kernel" or "design") keeps only that kind's."""
    peaks = tally.peaks if kind is None else {k[1:]: p for k, p in tally.peaks_by_kind.items() if k[0] == kind}
    rows = []
    for (dtype, tensor, level), peak in sorted(peaks.items()):
        factor = tol.rule(dtype, level).factor
        rows.append({"dtype": dtype, "tensor": tensor, "level": level, "factor": factor, "max_ratio": peak.ratio,
                     "margin": factor / peak.ratio if peak.ratio > 0 else math.inf, "case_id": peak.case_id,
                     "source": peak.source})
    return rows


def audit_report(tally: Tally, tol: Tolerances, settings: dict[str, Any]) -> dict[str, Any]:
    rows = summary(tally, tol)
    return clean_json({
        "settings": settings, "runs": tally.runs, "judged_tensors": tally.judged,
        "false_alarm_candidates": len(tally.alarms), "alarms": tally.alarms, "known": dict(tally.known),
        "min_margin": min((r["margin"] for r in rows), default=None), "peaks": rows,
        "peaks_kernels": summary(tally, tol, "kernel"), "peaks_designs": summary(tally, tol, "design"),
        "by_source": [{"source": s, "level": lv, "max_ratio": r} for (s, lv), r in sorted(tally.by_source.items())],
        "by_class": [{"values": v, "kind": k, "level": lv, "max_ratio": r}
                     for (v, k, lv), r in sorted(tally.by_class.items())],
    })


def render_audit(report: dict[str, Any]) -> str:
    s = report["settings"]
    margin = f"{report['min_margin']:.2f}x" if report["min_margin"] else "n/a"
    lines = [f"# False-alarm audit: {s['device_label']}, torch {s['torch']}", "",
             f"{report['runs']} (case, seed) runs of suite `{s['suite']}`, seeds {s['first_seed']}.."
             f"{s['first_seed'] + s['seeds'] - 1} ({s['seconds']} s); {report['judged_tensors']} judged tensors; "
             f"**{report['false_alarm_candidates']} alarms**; smallest margin {margin}.", "",
             "Margin = factor in force / largest error-to-scale ratio seen (> 1: no alarm).", ""]
    lines.append(tabulate([[r["dtype"], r["tensor"], r["level"], r["factor"], f"{r['max_ratio']:.2f}",
                            f"{r['margin']:.2f}", r["source"], r["case_id"]] for r in report["peaks"]],
                          headers=["dtype", "tensor", "level", "factor", "max ratio", "margin", "from", "case"],
                          tablefmt="github"))
    by_source: dict[str, dict[str, float]] = defaultdict(dict)
    for r in report["by_source"]:
        by_source[r["source"]][r["level"]] = r["max_ratio"]
    lines += ["", tabulate([[src, *(f"{v.get(lv, 0):.2f}" for lv in LEVELS)] for src, v in sorted(by_source.items())],
                           headers=["source", *(f"max {lv}" for lv in LEVELS)], tablefmt="github"), ""]
    by_class: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for r in report.get("by_class", []):
        by_class[(r["values"], r["kind"])][r["level"]] = r["max_ratio"]
    lines += [tabulate([[v, k, *(f"{x.get(lv, 0):.2f}" for lv in LEVELS)] for (v, k), x in sorted(by_class.items())],
                       headers=["values", "kernels / designs", *(f"max {lv}" for lv in LEVELS)], tablefmt="github"), ""]
    if report["known"]:
        lines += ["Absorbed by known-failure entries (real CPU backend findings, not counted above): "
                  + ", ".join(f"{k} x{v}" for k, v in sorted(report["known"].items())), ""]
    if report["alarms"]:
        lines += ["## Alarms", "", tabulate([[a["case_id"], a["source"], a["tensor"], a["status"], a["reason"][:220]]
                                              for a in report["alarms"]],
                                             headers=["case", "source", "tensor", "status", "reason"],
                                             tablefmt="github"), ""]
    return "\n".join(lines)


def audit_command(device: str | None, suite: str, seeds: int, first_seed: int, impls: list[str], out: Path,
                  quiet: bool, threads: int = 1) -> int:
    for name in impls:
        if name not in builtin_implementations():
            raise RegistryError(f"audit --impl {name!r}: the audit runs built-in implementations only")
    cases = audit_cases([sc.case for sc in load_suite(suite)], seeds, first_seed)  # bad input fails first
    session = Session.open(device)
    # Thousands of small cases: one intra-op thread avoids OpenMP oversubscription on a shared CPU
    # (measured 36x faster on a loaded 2-core machine); the thread count is recorded.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _audit(session, cases, suite, seeds, first_seed, impls, out, quiet, threads)
    finally:
        torch.set_num_threads(previous_threads)


def _audit(session: Session, cases: list[Case], suite: str, seeds: int, first_seed: int, impls: list[str], out: Path,
           quiet: bool, threads: int) -> int:
    label, tol = session.label, session.tolerances
    start = time.monotonic()

    def progress(done: int, total: int, tally: Tally) -> None:
        if not quiet and (done == total or done % 50 == 0):
            print(f"[{done}/{total}] {time.monotonic() - start:.0f}s, alarms {len(tally.alarms)}", file=sys.stderr,
                  flush=True)

    tally = run_audit(cases, session, impls or None, progress)
    settings = {"device_label": label, "torch": torch.__version__, "suite": suite, "seeds": seeds,
                "first_seed": first_seed, "threads": threads, "implementations": impls or "known-good", "seconds": round(time.monotonic() - start, 1),
                "tolerances": tol.as_dict()}
    report = audit_report(tally, tol, settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"audit-{label}.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    (out / f"audit-{label}.md").write_text(render_audit(report))
    margin = report["min_margin"]
    print(f"audit {label}: {tally.runs} runs, {len(tally.alarms)} alarms, smallest margin "
          f"{margin:.2f}x; report {out / f'audit-{label}.md'}" if margin else f"audit {label}: nothing judged")
    return 1 if tally.alarms else 0

"""Failures grouped by bug: one block per (backend that actually ran, case, rule), naming the tensors and
the implementations in it (aliases that reached the same backend: `sdpa-cudnn`, `sdpa-default` that
dispatched to cuDNN, K/V expanded by hand on cuDNN). Gross first, then by how far beyond. Each block
fits on one screen; the full per-tensor figures stay in the JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tabulate import tabulate

from .explain import cell, failing_heads_text, nonfinite_text, reproduce_command

BACKENDS = {"MATH": "math", "FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient", "CUDNN_ATTENTION": "cudnn"}
JUDGED_LEVELS = ("tensor", "slice", "row")
MAX_ROWS = 12  # per block; the rest is in the JSON
RULE_TEXT = {"tensor": "wrong over the whole tensor", "slice": "wrong in some (batch, head) slices",
             "row": "wrong in some rows", "nonfinite": "NaN/Inf where the oracle is finite",
             "contract": "break the call's contract"}


def backend_ran(result: dict[str, Any]) -> str:
    """The SDPA backend a built-in reached (an unpinned call's dispatch included), else the implementation."""
    impl = result["impl"]
    if impl == "sdpa-default":
        dispatch = str((result.get("notes") or {}).get("dispatch", ""))
        return BACKENDS.get(dispatch, impl)
    for prefix in ("sdpa-", "expanded-kv-"):
        if impl.startswith(prefix) and impl[len(prefix):] in BACKENDS.values():
            return impl[len(prefix):]
    return impl


@dataclass(frozen=True)
class Failure:
    """One failing tensor of one result, with the figures a block shows."""

    result: dict[str, Any]
    tensor: str
    verdict: dict[str, Any]

    @property
    def excess(self) -> float:
        x = self.verdict.get("excess")
        return math.inf if x is None else x

    @property
    def level(self) -> dict[str, Any]:
        rule = self.verdict.get("rule")
        return ((self.verdict.get("metrics") or {}).get("levels") or {}).get(rule, {}) if rule in JUDGED_LEVELS else {}


@dataclass(frozen=True)
class Bug:
    backend: str
    case_id: str
    rule: str
    failures: tuple[Failure, ...]

    @property
    def gross(self) -> bool:
        return any(f.verdict.get("severity") == "gross" for f in self.failures)

    @property
    def excess(self) -> float:
        return max(f.excess for f in self.failures)

    @property
    def impls(self) -> list[str]:
        return list(dict.fromkeys(f.result["impl"] for f in self.failures))

    @property
    def reproducer(self) -> Failure:
        """The most direct call of the bug: the pinned backend, then the unpinned one, then the rest."""
        rank = {f"sdpa-{self.backend}": 0, "sdpa-default": 1}
        return min(self.failures, key=lambda f: (rank.get(f.result["impl"], 2), -f.excess))

    @property
    def tensors(self) -> list[str]:
        return sorted({f.tensor for f in self.failures}, key=("out", "dq", "dk", "dv").index)


def group_bugs(report: dict[str, Any], statuses: tuple[str, ...] = ("FAIL",)) -> list[Bug]:
    groups: dict[tuple[str, str, str], list[Failure]] = {}
    for r in report["results"]:
        if r.get("canary"):
            continue
        for name, t in r["tensors"].items():
            if t["status"] in statuses:
                groups.setdefault((backend_ran(r), r["case_id"], t["rule"]), []).append(Failure(r, name, t))
    bugs = [Bug(*key, tuple(fs)) for key, fs in groups.items()]
    return sorted(bugs, key=lambda b: (not b.gross, -b.excess, b.case_id, b.backend))


def bug_summaries(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One line of data per bug, for `run --json`."""
    return [{"backend": b.backend, "case_id": b.case_id, "rule": b.rule, "gross": b.gross,
             "excess": None if math.isinf(b.excess) else round(b.excess, 4), "tensors": b.tensors,
             "implementations": b.impls} for b in group_bugs(report)]


def _fmt(x: Any, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec)


def _rel(level: dict[str, Any], key: str) -> str:
    truth = level.get("truth")
    value = level.get(key)
    return "—" if value is None or not truth else f"{value / truth:.2e}"


def _factor(report: dict[str, Any], case_id: str, level: str) -> str:
    dtype = ((report["cases"].get(case_id) or {}).get("case") or {}).get("dtype")
    rules = (((report.get("settings") or {}).get("tolerances") or {}).get("levels") or {}).get(dtype) or {}
    return _fmt((rules.get(level) or {}).get("factor"), "g")


def _worst(verdict: dict[str, Any]) -> str:
    w = (verdict.get("metrics") or {}).get("worst")
    return "—" if not w else f"{w['index']}: {_fmt(w['actual'], '.4g')} vs {_fmt(w['oracle'], '.4g')}"


def _row(report: dict[str, Any], f: Failure) -> list[str]:
    lv = f.level
    rule = f.verdict.get("rule", "")
    return [f.tensor, f.result["impl"], rule, _fmt(lv.get("ratio")), _factor(report, f.result["case_id"], rule),
            _rel(lv, "err"), _rel(lv, "floor"), _rel(lv, "lowprec"), _fmt(lv.get("err"), ".2e"), _worst(f.verdict),
            failing_heads_text(f.verdict, f.tensor)]


def _merged(rows: list[list[str]]) -> list[list[str]]:
    """Rows that differ only in the implementation (aliases measured alike) become one."""
    out: dict[tuple[str, ...], list[str]] = {}
    for row in rows:
        key = (row[0], *row[2:])
        if key in out:
            out[key][1] += f", {row[1]}"
        else:
            out[key] = list(row)
    return list(out.values())


HEADERS = ["tensor", "implementations", "level", "error / scale", "factor", "rel. error", "rel. dtype floor",
           "rel. low-prec ref", "abs. error", "worst element (actual vs oracle)", "failing heads"]


def render_bug(report: dict[str, Any], number: int, bug: Bug) -> list[str]:
    """At most one screen: title, what ran, a row per (tensor, implementation), NaN/Inf where they sit,
    the command that reproduces it."""
    severity = "gross" if bug.gross else f"{bug.excess:.3g}x its level's factor"
    case = report["cases"].get(bug.case_id) or {}
    dispatch = [f"{i} (dispatched to {bug.backend})" if i == "sdpa-default" else i for i in bug.impls]
    what = RULE_TEXT.get(bug.rule, bug.rule)
    lines = [f"### {number}. {bug.backend}: {', '.join(bug.tensors)} {what} on `{bug.case_id}` ({severity})", "",
             f"Implementations: {', '.join(dispatch)}. Case: `{case.get('spec', bug.case_id)}`.", ""]
    failures = sorted(bug.failures, key=lambda f: -f.excess)
    body = _merged([_row(report, f) for f in failures])
    lines.append(tabulate([[cell(x) for x in row] for row in body[:MAX_ROWS]], headers=HEADERS, tablefmt="github"))
    if len(body) > MAX_ROWS:
        lines.append(f"\n({len(body) - MAX_ROWS} more rows of this bug in the JSON report)")
    nonfinite = list(dict.fromkeys(t for f in failures if (t := nonfinite_text(f.tensor, f.verdict))))
    if nonfinite:
        lines += ["", *(f"- NaN/Inf {text}" for text in nonfinite[:4])]
    other = list(dict.fromkeys(cell(f.verdict.get("reason", "")) for f in failures
                               if f.verdict.get("rule") not in (*JUDGED_LEVELS, "nonfinite")))
    if other:  # contract breaks: the reason is the evidence
        lines += ["", *(f"- {text}" for text in other[:4])]
    first = bug.reproducer.result
    lines += ["", "Reproduce:", "",
              f"    {reproduce_command(case.get('spec', ''), first['impl'], report['fingerprint'].get('device', 'cpu'), first.get('notes'))}",
              ""]
    return lines


def bugs_section(report: dict[str, Any]) -> list[str]:
    bugs = group_bugs(report)
    if not bugs:
        return []
    tensors = sum(len(b.failures) for b in bugs)
    lines = [f"{len(bugs)} bug(s) in {tensors} failing tensor(s), gross first. Error / scale is the L2 error at the "
             "failing level over scale = max(dtype floor, low-precision reference, fp32 eps term); a correct kernel "
             "stays under the level's factor. The rel. columns are L2 norms over the oracle's norm at the same place "
             "(the worst unit of that level); abs. error is the same error unscaled.", ""]
    for i, bug in enumerate(bugs, 1):
        lines += render_bug(report, i, bug)
    return lines

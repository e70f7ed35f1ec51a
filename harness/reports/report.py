"""The per-device report: a self-describing JSON and a Markdown summary for people.

JSON (schema_version 1): fingerprint, settings, cases (with input SHA-256s), results.
Markdown: what failed first, one block per bug (bugs.py), gross before subtle, with the
evidence that it is beyond a correct kernel and the command that reproduces it; then the
known failures, the canary, a compact pass table, unsupported cases and the reliability checks.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any

from tabulate import tabulate

from .bugs import bugs_section
from .explain import FAILING, cell
from .ledger import entry_states_in_run
from .store import SCHEMA_VERSION, clean_json
from .trends import differential_verdicts, failing, trends_section


def build_report(records: list[dict[str, Any]], fingerprint: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    cases: dict[str, Any] = {}
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in records:
        if rec.get("type") == "case":
            cases[rec["case_id"]] = {k: rec[k] for k in ("case", "spec", "input_sha256", "oracle_seconds", "source",
                                                                   "sampling")
                                     if k in rec}
        elif rec.get("type") == "result":
            results[(rec["case_id"], rec["impl"])] = {k: v for k, v in rec.items() if k != "type"}
    ordered = sorted(results.values(), key=lambda r: (r["case_id"], r["impl"]))
    counted = [r for r in ordered if not r.get("canary")]
    counts: dict[str, int] = defaultdict(int)
    for r in counted:
        counts[r["status"]] += 1
    canary = [r for r in ordered if r.get("canary")]
    return clean_json({
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "settings": settings,
        "summary": {"counts": dict(counts), "results": len(counted),
                    "canary_failed_as_expected": bool(canary) and all(r["status"] == "FAIL" for r in canary)},
        "cases": cases,
        "results": ordered,
        "differential": differential_verdicts(records),
    })


def exit_status(report: dict[str, Any], strict: bool = False) -> int:
    bad = set(FAILING) | ({"KNOWN"} if strict else set())
    if not report["summary"]["canary_failed_as_expected"] and any(r.get("canary") for r in report["results"]):
        return 1
    if failing(report, tuple(bad)):
        return 1
    return 1 if any(r["status"] in bad for r in report["results"] if not r.get("canary")) else 0


def _fmt(x: Any, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec)


def failure_rows(report: dict[str, Any], statuses: tuple[str, ...] = ("FAIL",)) -> list[dict[str, Any]]:
    """One row per failing (case, implementation, tensor), gross first, then by how far beyond."""
    rows = []
    for r in report["results"]:
        if r.get("canary"):
            continue
        for tname, t in r["tensors"].items():
            if t["status"] not in statuses:
                continue
            m = t.get("metrics") or {}
            level = m.get("levels", {}).get(t["rule"], {}) if t["rule"] in ("tensor", "slice", "row") else {}
            rows.append({
                "case_id": r["case_id"], "impl": r["impl"], "tensor": tname, "status": t["status"],
                "severity": t["severity"], "rule": t["rule"], "ratio": level.get("ratio"), "excess": t.get("excess"),
                "rel_err": level.get("rel_err"), "floor": level.get("floor"), "lowprec": level.get("lowprec"),
                "err": level.get("err"), "worst": m.get("worst"), "heads": t.get("failing_heads", []),
                "reason": t["reason"],
            })
    return sorted(rows, key=lambda x: (x["severity"] != "gross", -(x["excess"] if x["excess"] is not None else math.inf)))


def _clip(text: str, limit: int = 160) -> str:
    """Cut on the right, at a word: the full text is in the JSON."""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def render_markdown(report: dict[str, Any]) -> str:
    fp = report["fingerprint"]
    counts = report["summary"]["counts"]
    lines = [
        f"# gqa-harness report: {fp.get('device_name') or fp.get('device')} ({fp.get('device_label')})",
        "",
        f"torch {fp.get('torch')} · CUDA {fp.get('cuda')} · HIP {fp.get('hip')} · cuDNN {fp.get('cudnn')} · "
        f"harness {fp.get('harness')} · {report['summary']['results']} results: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        "",
    ]
    partial = (report.get("settings") or {}).get("partial")
    if partial:
        lines += [f"> **PARTIAL REPORT**: {partial['reason']}: {partial['results']} of {partial['planned']} results; "
                  f"the canary {'ran' if partial['canary_ran'] else 'did not run'}. Continue with `--resume`.", ""]
    bugs = bugs_section(report)
    errors = [r for r in report["results"]
              if (r["status"] == "ERROR" or r.get("error_kind") == "global-state") and not r.get("canary")]
    lines += ["## Failures" if bugs or errors or failing(report) else "## No failures", "", *bugs]
    if errors:
        lines += ["### Errors (the call itself failed: crash, hang, exception, out of memory; or it changed "
                  "process-global settings later results depend on)", ""]
        lines.append(tabulate([[cell(r["case_id"]), cell(r["impl"]), r.get("error_kind", ""), cell(r["error"][:200])]
                               for r in errors], headers=["case", "impl", "kind", "error"], tablefmt="github"))
        lines.append("")
    known = failure_rows(report, ("KNOWN",))
    if known:
        lines += ["## Known failures (do not fail the run unless --strict)", ""]
        lines.append(tabulate([[x["case_id"], x["impl"], x["tensor"], x["rule"], _fmt(x["ratio"]), cell(_clip(x["reason"]))]
                               for x in known], headers=["case", "impl", "tensor", "level", "error/scale", "evidence"],
                              tablefmt="github"))
        lines.append("")
    lines += trends_section(report)
    lines += _known_entries(report) + _canary_section(report) + _pass_table(report) + _unsupported(report)
    lines += _reliability(report) + _sampled(report)
    lines += ["## Fingerprint", "", "```json", json.dumps(fp, indent=1), "```", ""]
    return "\n".join(lines)


def _sampled(report: dict[str, Any]) -> list[str]:
    """Long cases: which rows the row-sampled oracle checked and which output rows it left unchecked."""
    rows = [[cell(cid), cell(c["sampling"])] for cid, c in sorted(report["cases"].items()) if c.get("sampling")]
    if not rows:
        return []
    return ["## Row-sampled cases (long): what was checked", "",
            tabulate(rows, headers=["case", "checked"], tablefmt="github"), ""]


def _known_entries(report: dict[str, Any]) -> list[str]:
    states = entry_states_in_run(report)
    if not states:
        return []
    rows = [[entry, v["matched"], v["known"], v["beyond"], v["passed"], state] for entry, (v, state) in states.items()]
    return ["## Known-failure entries", "", tabulate(rows, headers=["entry", "matched", "absorbed (KNOWN)",
                                                                    "beyond its ceiling (FAIL)", "passed", "state"],
                                                     tablefmt="github"), ""]


def _canary_section(report: dict[str, Any]) -> list[str]:
    canary = [r for r in report["results"] if r.get("canary")]
    if not canary:
        return []
    ok = report["summary"]["canary_failed_as_expected"]
    head = ("## Canary: failed as expected (the pipeline can fail on this device)" if ok else
            ("## CANARY ERRORED: the pipeline was not shown able to fail on this device; its PASSes mean nothing"
             if any(r["status"] == "ERROR" for r in canary) else
             "## CANARY PASSED: this pipeline cannot fail on this device; its PASSes mean nothing"))
    rows = [[r["case_id"], r["impl"], r["status"]] for r in canary]
    return [head, "", tabulate(rows, headers=["case", "canary", "status"], tablefmt="github"), ""]


def _pass_table(report: dict[str, Any]) -> list[str]:
    """Worst tensor-level error/scale per implementation x dtype x tensor, over judged results."""
    worst: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for r in report["results"]:
        if r.get("canary"):
            continue
        dtype = report["cases"].get(r["case_id"], {}).get("case", {}).get("dtype", "?")
        for tname, t in r["tensors"].items():
            ratio = ((t.get("metrics") or {}).get("levels", {}).get("tensor", {}) or {}).get("ratio")
            if ratio is not None:
                key = (r["impl"], dtype)
                worst[key][tname] = max(worst[key].get(tname, 0.0), ratio)
    if not worst:
        return []
    rows = [[impl, dtype, *(_fmt(v.get(t), ".2f") for t in ("out", "dq", "dk", "dv"))]
            for (impl, dtype), v in sorted(worst.items())]
    return ["## Worst tensor-level error/scale per implementation", "",
            tabulate(rows, headers=["impl", "dtype", "out", "dq", "dk", "dv"], tablefmt="github"), ""]


def _unsupported(report: dict[str, Any]) -> list[str]:
    reasons: dict[tuple[str, str], int] = defaultdict(int)
    for r in report["results"]:
        if r["status"] == "UNSUPPORTED":
            reasons[(r["impl"], cell(r["error"][:160]))] += 1
    unavailable = report["settings"].get("unavailable", {})
    if not reasons and not unavailable:
        return []
    rows = [[impl, n, why] for (impl, why), n in sorted(reasons.items())]
    rows += [[impl, "all", f"not available on this device: {why}"] for impl, why in sorted(unavailable.items())]
    return ["## Unsupported (torch's reason)", "", tabulate(rows, headers=["impl", "cases", "reason"], tablefmt="github"), ""]


def _reliability(report: dict[str, Any]) -> list[str]:
    """Order dependence of FAILs (re-run alone) and --repeat determinism."""
    return order_section(report) + determinism_section(report)


def order_section(report: dict[str, Any]) -> list[str]:
    rows = [[r["case_id"], r["impl"], order.get("alone", "—"), order["summary"]]
            for r in report["results"] if (order := (r.get("notes") or {}).get("order"))]
    if not rows:
        return []
    return ["## Order dependence: each FAIL re-run alone in a fresh process", "",
            tabulate(rows, headers=["case", "impl", "alone", "finding"], tablefmt="github"), ""]


def determinism_section(report: dict[str, Any]) -> list[str]:
    """Only when the run repeated kernels (`--repeat N`): information, not a verdict."""
    repeated = [r for r in report["results"] if (r.get("notes") or {}).get("determinism")]
    if not repeated:
        return []
    rows = [[r["case_id"], r["impl"], tensor, f"{d['differing_runs']}/{d['runs'] - 1}",
             "inf" if d["max_abs_diff"] is None else f"{d['max_abs_diff']:.3g}"]
            for r in repeated for tensor, d in sorted(r["notes"]["determinism"].items()) if not d["deterministic"]]
    head = "## Determinism (--repeat): information, not a verdict"
    if not rows:
        return [head, "", "Every repeated kernel gave bitwise identical results on every run.", ""]
    return [head, "", tabulate(rows, headers=["case", "impl", "tensor", "runs differing", "max |diff|"],
                               tablefmt="github"), ""]

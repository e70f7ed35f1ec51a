"""The differential verdicts of a report (core/differential.py decides them; a run streams them as
`differential` records): collected into the report JSON and rendered as the "Trends" and
"GQA vs expanded" sections of the Markdown.
"""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from .explain import cell

TREND_RULES = ("group-trend", "length-trend")
PAIR_RULE = "gqa-vs-expanded"


def differential_verdicts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stream's differential records, the last of each (rule, family, impl, tensor), failures first."""
    found = {(r["rule"], r["family"], r["impl"], r["tensor"]): {k: v for k, v in r.items() if k != "type"}
             for r in records if r.get("type") == "differential"}
    return sorted(found.values(), key=lambda v: (v["status"] != "FAIL", v["rule"], v["family"], v["impl"], v["tensor"]))


def failing(report: dict[str, Any], statuses: tuple[str, ...] = ("FAIL",)) -> list[dict[str, Any]]:
    return [v for v in report.get("differential", []) if v["status"] in statuses]


def _value(v: dict[str, Any]) -> str:
    return "n/a" if v["value"] is None else f"{v['value']:.3g}"


def trends_section(report: dict[str, Any]) -> list[str]:
    verdicts = report.get("differential", [])
    trends = [v for v in verdicts if v["rule"] in TREND_RULES]
    pairs = [v for v in verdicts if v["rule"] == PAIR_RULE]
    lines: list[str] = []
    if trends:
        lines += ["## Trends (families judged together: error/scale against group size or key length)", "",
                  "Slope = least-squares slope of log(error/scale) against log(G) or log(Lk); a correct kernel is flat. "
                  "Failures carry the command that reruns the whole family.", ""]
        shown = [v for v in trends if v["status"] != "PASS"]
        rows = [[v["status"], v["rule"], cell(v["impl"]), v["tensor"], cell(v["family"]), _value(v), f"{v['allowed']:g}",
                 ", ".join(f"{x}: {r:.2f}" for x, r in v.get("evidence", {}).get("ratios", {}).items())]
                for v in shown]
        passed = len(trends) - len(shown)
        if rows:
            lines += [tabulate(rows, headers=["status", "rule", "impl", "tensor", "family", "slope", "allowed",
                                              "error/scale per axis value"], tablefmt="github"), ""]
            commands = dict.fromkeys(v["reproduce"] for v in shown if v["status"] == "FAIL")  # one per family
            lines += [f"- `{c}`" for c in list(commands)[:20]] + [""]
        lines += [f"{passed} (family, implementation, tensor) trends within their allowed slope "
                  f"(largest {max((v['value'] for v in trends if v['status'] == 'PASS'), default=0):.3f}).", ""]
    if pairs:
        bad = [v for v in pairs if v["status"] != "PASS"]
        lines += ["## GQA vs expanded (native GQA against the same backend on hand-expanded K/V)", "",
                  "Difference in dtype-floor units; dK/dV of the expanded run group-summed in fp64.", ""]
        if bad:
            lines += [tabulate([[v["status"], cell(v["impl"]), v["tensor"], cell(v["family"]), _value(v),
                                 f"{v['allowed']:g}", cell(v.get("known_entry", ""))] for v in bad],
                               headers=["status", "impl", "tensor", "case", "difference", "allowed", "known entry"],
                               tablefmt="github"), ""]
        lines += [f"{len(pairs) - len(bad)} (case, implementation, tensor) pairs agree within their backend's noise.", ""]
    return lines

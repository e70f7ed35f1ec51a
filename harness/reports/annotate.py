"""GitHub annotations from a report: `::error` workflow commands for the worst failures, each pointing at
the suite TOML line that defines its case, and `::warning`s at the known-failures entries a run found
FIXED. `gqa-harness summary` prints them, and `gqa-harness run` too when GITHUB_ACTIONS=true; GitHub
shows at most 10 error and 10 warning annotations of a step, so the worst 10 are kept (gross first,
then by how far beyond the factor: the Markdown report's order), one per (case, implementation).

    ::error file=cases/smoke.toml,line=42,title=FAIL sdpa-flash dk (beyond)::b2-h8x1-... dk: ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.known import KNOWN_FILE, entry_lines
from ..core.suites import display_path
from .explain import reproduce_command
from .ledger import entry_states_in_run, fixed_advice
from .report import failure_rows

MAX_ANNOTATIONS = 10  # GitHub's per-step limit for each of error and warning annotations


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def command(kind: str, message: str, file: str = "", line: int = 0, title: str = "") -> str:
    """One workflow command line: `::error file=F,line=N,title=T::message`."""
    props = [f"file={escape_property(file)}"] if file else []
    props += [f"line={line}"] if file and line else []
    props += [f"title={escape_property(title)}"] if title else []
    return f"::{kind} {','.join(props)}::{escape_data(message)}" if props else f"::{kind}::{escape_data(message)}"


def _where(report: dict[str, Any], case_id: str) -> tuple[str, int]:
    source = (report["cases"].get(case_id) or {}).get("source") or {}
    return str(source.get("file") or ""), int(source.get("line") or 0)


def failure_annotations(report: dict[str, Any], limit: int = MAX_ANNOTATIONS) -> list[str]:
    """`::error` for the worst FAIL and ERROR results, one per (case, implementation)."""
    device = report["fingerprint"].get("device", "cpu")
    picked: dict[tuple[str, str], tuple[str, str]] = {}
    for row in failure_rows(report):
        key = (row["case_id"], row["impl"])
        if key not in picked:
            picked[key] = (f"FAIL {row['impl']} {row['tensor']} ({row['severity']})", row["reason"])
    for r in report["results"]:
        if r["status"] == "ERROR" and not r.get("canary"):
            picked.setdefault((r["case_id"], r["impl"]), (f"ERROR {r['impl']}", r.get("error") or "ERROR"))
    out = []
    for (case_id, impl), (title, why) in list(picked.items())[:limit]:
        spec = (report["cases"].get(case_id) or {}).get("spec", "")
        notes = next((r.get("notes") for r in report["results"] if r["case_id"] == case_id and r["impl"] == impl), None)
        file, line = _where(report, case_id)
        out.append(command("error", f"{case_id} [{impl}] {why}\nReproduce: {reproduce_command(spec, impl, device, notes)}",
                           file, line, title))
    return out


def fixed_annotations(report: dict[str, Any], known_file: Path = KNOWN_FILE,
                      limit: int = MAX_ANNOTATIONS) -> list[str]:
    """`::warning` at each known-failures entry this report matched without absorbing a failure (FIXED)."""
    lines = entry_lines(known_file) if known_file.is_file() else {}
    out = []
    for entry, (counts, state) in entry_states_in_run(report).items():
        if state.startswith("FIXED"):
            where = f" on {report['fingerprint'].get('device_label')}"
            out.append(command("warning", fixed_advice(entry, counts["matched"], state, where),
                               display_path(str(known_file)), lines.get(entry, 0), f"FIXED known failure {entry}"))
    return out[:limit]


def annotations(reports: list[dict[str, Any]], limit: int = MAX_ANNOTATIONS) -> list[str]:
    """Errors then warnings for `reports`, each kind within GitHub's per-step `limit`."""
    errors = [a for r in reports for a in failure_annotations(r, limit)][:limit]
    warnings = [a for r in reports for a in fixed_annotations(r, limit=limit)][:limit]
    return errors + warnings

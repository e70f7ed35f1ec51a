"""Which known-failure entries saved reports matched: FIXED entries and stale ones, so the file stays true.

An entry is
  * active  — the latest report it matched still had a failure it absorbed (KNOWN);
  * FIXED   — the latest report it matched had results it matched but no failure: remove it (for an
              entry whose `case` is a pattern, once a full run of its suites confirms it);
  * stale   — no report in the window matched it at all (its backend, version range or cases
              no longer run anywhere): check whether it still describes anything.
`gqa-harness known [REPORTS...]` prints the table; reports are the JSON files runs write
(directories are searched recursively), e.g. CI artifacts from every device.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from tabulate import tabulate

from ..core.known import KnownFailure, KnownFailuresError, load_known, names_cases_by_pattern
from .store import find_reports


@dataclass(frozen=True)
class EntryState:
    id: str
    state: str  # active | FIXED | stale
    last_matched: str  # ISO time of the latest report that matched it, "" if none
    where: str  # that report's device label and path
    matched: int  # tensors it matched in that report
    absorbed: int  # of which KNOWN


def known_entry_summary(report: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per known-failures entry, the tensors it matched: absorbed (KNOWN), failing beyond its ceiling
    (FAIL), passed."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"matched": 0, "known": 0, "beyond": 0, "passed": 0})
    for r in report["results"]:
        for t in r["tensors"].values():
            if t.get("known_entry"):
                counts = out[t["known_entry"]]
                counts["matched"] += 1
                counts["known"] += t["status"] == "KNOWN"
                counts["beyond"] += t["status"] == "FAIL"
                counts["passed"] += t["status"] == "PASS"
    return dict(out)


FIXED = "FIXED: every matching tensor passed, the entry can go"
PATTERN_ADVICE = "its case is a pattern: check that the run covered the suites it came from before removing it"
FIXED_HERE = f"FIXED here: every matching tensor passed; {PATTERN_ADVICE}"


def entry_state(counts: dict[str, int], by_pattern: bool = False) -> str:
    """FIXED only when every matching tensor passed: an entry whose failures went past its ceiling is
    not fixed, it is worse. A pattern entry is only FIXED 'here': a small selection that passed says
    little about the cases it did not select."""
    if counts["beyond"]:
        return "failing beyond its ceiling"
    if counts["known"]:
        return "absorbed"
    if not counts["passed"]:
        return "matched, not judged"
    return FIXED_HERE if by_pattern else FIXED


def entry_states_in_run(report: dict[str, Any]) -> dict[str, tuple[dict[str, int], str]]:
    """Every entry of the run: its counts and state; entries the run loaded but never matched are
    'not exercised'."""
    summary = known_entry_summary(report)
    settings = report.get("settings") or {}
    loaded = settings.get("known_entries") or []
    by_pattern = set(settings["known_by_pattern"] if "known_by_pattern" in settings else _pattern_ids())
    zero = {"matched": 0, "known": 0, "beyond": 0, "passed": 0}
    states = {e: (summary.get(e, zero), entry_state(summary[e], e in by_pattern) if e in summary else "not exercised")
              for e in [*loaded, *summary]}
    return dict(sorted(states.items()))


def _pattern_ids() -> list[str]:
    """For a report saved before runs recorded known_by_pattern: today's known-failures file decides."""
    try:
        return [k.id for k in load_known() if names_cases_by_pattern(k)]
    except (KnownFailuresError, OSError):
        return []


def fixed_advice(entry: str, matched: int, state: str, where: str = "") -> str:
    """The one line a run prints (and CI annotates) for an entry it found FIXED."""
    head = f"known-failure entry {entry} matched {matched} result tensors{where} and every one passed"
    if state == FIXED_HERE:
        return f"{head}; {PATTERN_ADVICE} (cases/known-failures.toml)"
    return head + ": FIXED, remove it from cases/known-failures.toml"


def fixed_in_run(report: dict[str, Any]) -> list[str]:
    """One line per entry this run matched where every matching tensor passed."""
    return [fixed_advice(entry, v["matched"], state) for entry, (v, state) in entry_states_in_run(report).items()
            if state.startswith("FIXED")]


def report_time(report: dict[str, Any]) -> datetime | None:
    stamp = report.get("settings", {}).get("finished") or report.get("settings", {}).get("started")
    try:
        when = datetime.fromisoformat(stamp)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def load_reports(paths: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """Every saved report under `paths` (directories searched recursively)."""
    return [(run.json, run.report) for run in find_reports(paths, recursive=True)]


def entry_states(known: list[KnownFailure], reports: list[tuple[Path, dict[str, Any]]], now: datetime,
                 days: float) -> list[EntryState]:
    since = now - timedelta(days=days)
    latest: dict[str, tuple[datetime, Path, dict[str, Any], dict[str, int]]] = {}
    for path, report in reports:
        when = report_time(report)
        if when is None or when < since:
            continue
        for entry, counts in known_entry_summary(report).items():
            if counts["matched"] and (entry not in latest or when > latest[entry][0]):
                latest[entry] = (when, path, report, counts)
    states = []
    for k in known:
        if k.id not in latest:
            states.append(EntryState(k.id, "stale", "", "", 0, 0))
            continue
        when, path, report, counts = latest[k.id]
        label = report.get("fingerprint", {}).get("device_label", "?")
        state = entry_state(counts, names_cases_by_pattern(k))
        states.append(EntryState(k.id, state.split(":")[0] if state.startswith("FIXED") else "active",
                                 when.isoformat(timespec="seconds"),
                                 f"{label} ({path})", counts["matched"], counts["known"]))
    return states


def render_states(states: list[EntryState], days: float, reports: int) -> str:
    rows = [[s.id, s.state, s.last_matched or f"not in the last {days:g} days", s.where, s.matched, s.absorbed]
            for s in states]
    head = f"{len(states)} known-failure entries against {reports} report(s) from the last {days:g} days"
    return head + "\n\n" + tabulate(rows, headers=["entry", "state", "last matched", "where", "matched", "known"],
                                    tablefmt="github")


def known_command(paths: list[Path], days: float, known_file: Path | None, fail_on_stale: bool) -> int:
    known = load_known(known_file)
    reports = load_reports(paths)
    states = entry_states(known, reports, datetime.now(timezone.utc), days)
    print(render_states(states, days, len(reports)))
    return 1 if fail_on_stale and any(s.state != "active" for s in states) else 0

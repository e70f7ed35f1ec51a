"""What a search leaves: the report of `run`'s form with a "search" section, and found.toml.

The report is `reports.report.build_report` over the search's stream (every example's results,
the canary, each finding's confirmation run), plus a top-level "search" object (examples, rounds,
budget, seed, replays, findings). Its Markdown is `run`'s with a "Findings" section first, so
`compare`, `diff` and `summary` read it as they read a run's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tabulate import tabulate

from ..reports.report import build_report, render_markdown
from ..reports.store import clean_json, write_report
from .engine import Limits, Tally
from .findings import Finding, found_toml, repro_command, subsumed
from .space import SearchSpace, class_text

FOUND = "found.toml"


def search_section(tally: Tally, limits: Limits, space: SearchSpace, seed: int, elapsed: float,
                   interrupted: bool) -> dict[str, Any]:
    return {
        "examples": tally.examples, "rounds": tally.rounds, "elapsed_s": round(elapsed, 1),
        "examples_per_minute": round(60 * tally.examples / elapsed, 2) if elapsed > 0 else None,
        "budget_s": limits.budget, "max_examples": limits.max_examples, "shrink_budget_s": limits.shrink_budget,
        "max_findings": limits.max_findings, "seed": seed, "profile": space.profile, "memory_bytes": space.memory,
        "dtypes": list(space.dtypes), "max_tokens": space.max_tokens, "max_batch": space.max_batch,
        "max_kv_heads": space.max_kv_heads,
        "replayed": tally.replayed, "replay_still_failing": tally.replay_still_failing,
        "replay_passing": tally.replay_passing, "interrupted": interrupted, "found_toml": FOUND,
        "findings": [f.to_record() for f in tally.findings],
        "confirmed": sum(f.confirmed for f in tally.findings), "within_another": subsumed(tally.findings),
    }


def _row(f: Finding, within_other: dict[int, int]) -> list[Any]:
    alone = f"{f.confirm_status} ({'confirmed' if f.confirmed else 'NOT reproduced alone'})"
    if f.number in within_other:
        alone += f"; the failure of #{within_other[f.number]}, whose class is wider"
    shrink = f"{f.shrink_evaluations} runs, {f.shrink_s:.0f} s" + ("" if f.shrink_complete else ", budget reached")
    found = ("database replay" if f.replayed else f"{f.found_after_examples} examples, {f.found_after_s:.0f} s")
    return [f.number, f.impl, str(f.signature), class_text(f.case_class), f.case.id, f.start.id, found, shrink, alone]


def findings_lines(section: dict[str, Any], device: str, findings: list[Finding]) -> list[str]:
    s = section
    rate = f"{s['examples_per_minute']:.1f}" if s["examples_per_minute"] is not None else "—"
    within_other = subsumed(findings)
    head = (f"## Findings: {len(findings) - len(within_other)} distinct ({s['confirmed']} of {len(findings)} "
            f"confirmed alone in a fresh process)" if findings else "## Findings: none")
    limit = f", at most {s['max_examples']} examples" if s["max_examples"] else ""
    lines = [head, "",
             f"Search: {s['examples']} examples in {s['elapsed_s']:.0f} s ({rate} per minute), {s['rounds']} rounds, "
             f"seed {s['seed']}, profile {s['profile']} ({s['memory_bytes'] >> 20} MiB fp64 per case), dtypes "
             f"{', '.join(s['dtypes'])}, lengths up to {s['max_tokens']}, batch up to {s['max_batch']}, kv heads up to "
             f"{s['max_kv_heads']}; budget {s['budget_s']:g} s{limit}"
             + ("; INTERRUPTED" if s["interrupted"] else "") + "."]
    if s["replayed"]:
        lines += ["", f"Replayed first from the example database: {s['replayed']} earlier failure(s), "
                      f"{s['replay_still_failing']} still failing, {s['replay_passing']} passing now (dropped)."]
    if findings:
        lines += ["", tabulate([_row(f, within_other) for f in findings], tablefmt="github",
                               headers=["#", "implementation", "failure", "class", "shrunk case", "first met as",
                                        "found after", "shrink", "alone, fresh process"]),
                  "", f"Each confirmed finding is an entry of `{FOUND}` (suite format, for cases/regressions/); "
                      "its standalone script and issue body:", ""]
        lines += [f"    {repro_command(f, device)}" for f in findings]
    return [*lines, ""]


def render_search_markdown(report: dict[str, Any], findings: list[Finding]) -> str:
    """`run`'s Markdown with the Findings section before its first section."""
    text = render_markdown(report)
    head, sep, rest = text.partition("\n## ")
    found = findings_lines(report["search"], report["fingerprint"].get("device", "cpu"), findings)
    return head + "\n" + "\n".join(found) + sep + rest


def write_search_report(out: Path, records: list[dict[str, Any]], fingerprint: dict[str, Any],
                        settings: dict[str, Any], section: dict[str, Any],
                        findings: list[Finding]) -> tuple[Path, dict[str, Any]]:
    """<label>.json/.md and found.toml in `out`; returns the Markdown's path and the report."""
    report = build_report(records, fingerprint, settings)
    report["search"] = clean_json(section)
    md = write_report(out, report, render_search_markdown(report, findings))
    (out / FOUND).write_text(found_toml(findings, fingerprint.get("device_label", "?"), fingerprint.get("torch", "?"),
                                       fingerprint.get("device", "cpu")))
    return md, report

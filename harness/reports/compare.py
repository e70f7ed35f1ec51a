"""Saved per-device reports merged into one cross-vendor matrix.

Rows are (case, implementation, tensor); there is one column per device (named from the
report's fingerprint); each cell is the verdict with error / scale at the level that
decides (the failing level for a failure, the whole tensor otherwise). Rows where the
devices disagree ("fails on gfx942, passes on sm_90") come first.

Two things make a row incomparable, and those rows are refused with a message rather
than shown: a report of another schema version (its fields may mean something else),
and a case whose input SHA-256s differ between reports (torch's RNG stream changed, so
the devices did not see the same inputs). `report_rows` is also what diff.py reads.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

from ..core.metrics import LEVELS
from ..core.results import TENSORS
from .explain import cell as escape
from .store import SCHEMA_VERSION, ReportError, load_report

FAILS = ("FAIL", "ERROR", "KNOWN")  # the kernel is wrong there (KNOWN: wrong, and on file)
PASSES = ("PASS",)
# Passing everywhere, but error / scale this many times larger on one device: worth a look (a correct
# kernel's ratio is about 1; twice the noise band across seeds, which is x1.14 at the tensor level).
APART = 1.5


RowKey = tuple[str, str, str]  # (case_id, impl, tensor)


@dataclass(frozen=True)
class Cell:
    """One (case, implementation, tensor) on one device."""

    status: str
    level: str = ""  # the level `ratio` is read at
    ratio: float | None = None  # error / scale at `level`
    ratios: dict[str, float] = field(default_factory=dict)  # every level's worst error / scale
    reason: str = ""

    @property
    def outcome(self) -> str:
        return "fails" if self.status in FAILS else "passes" if self.status in PASSES else "n/a"

    def text(self) -> str:
        if self.level == "nonfinite":
            return f"{self.status} NaN/Inf"
        if self.ratio is None:
            return self.status
        where = "" if self.level == "tensor" else f" {self.level}"
        return f"{self.status} {self.ratio:.3g}×{where}"


def _cell(result: dict[str, Any], tensor: dict[str, Any] | None) -> Cell:
    if tensor is None:  # the whole result is ERROR / UNSUPPORTED: no tensor was judged
        return Cell(result["status"], reason=result.get("error", ""))
    levels = ((tensor.get("metrics") or {}).get("levels") or {})
    ratios = {lv: levels[lv]["ratio"] for lv in LEVELS if lv in levels and levels[lv].get("ratio") is not None}
    if tensor.get("rule") == "nonfinite":  # the finite-element ratio would read as a clean 0x
        return Cell(tensor["status"], "nonfinite", None, ratios, tensor.get("reason", ""))
    level = tensor.get("rule") if tensor.get("rule") in ratios else "tensor"
    return Cell(tensor["status"], level if level in ratios else "", ratios.get(level), ratios, tensor.get("reason", ""))


def report_rows(report: dict[str, Any]) -> dict[RowKey, Cell]:
    """Every judged (case, implementation, tensor) of a report, canaries left out."""
    rows: dict[RowKey, Cell] = {}
    for result in report["results"]:
        if result.get("canary"):
            continue
        tensors = result.get("tensors") or {}
        if tensors:
            for name, t in tensors.items():
                rows[(result["case_id"], result["impl"], name)] = _cell(result, t)
            continue
        case = (report["cases"].get(result["case_id"]) or {}).get("case") or {}
        for name in TENSORS if case.get("grads", True) else ("out",):
            rows[(result["case_id"], result["impl"], name)] = _cell(result, None)
    return rows


@dataclass(frozen=True)
class Device:
    column: str
    path: str
    fingerprint: dict[str, Any]
    canary: str  # failed as expected | DID NOT FAIL | not run


def _canary(report: dict[str, Any]) -> str:
    if not any(r.get("canary") for r in report["results"]):
        return "not run"
    return "failed as expected" if report.get("summary", {}).get("canary_failed_as_expected") else "DID NOT FAIL"


def _identity(fp: dict[str, Any]) -> tuple:
    """Reports of one device and software stack share a column (a suite split over several runs)."""
    return tuple(fp.get(k) for k in ("device_label", "device_name", "torch", "cuda", "hip", "cudnn"))


def _columns(reports: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The device label; the device name, then torch, then a counter where labels of different
    devices collide (H100 and H200 are both cuda-sm_90)."""
    firsts: dict[tuple, dict[str, Any]] = {}
    for _, r in reports:
        firsts.setdefault(_identity(r["fingerprint"]), r["fingerprint"])
    fps = list(firsts.values())
    names = [str(fp.get("device_label") or fp.get("device") or "device") for fp in fps]
    for extra in ("device_name", "torch"):
        counts = defaultdict(int)
        for n in names:
            counts[n] += 1
        names = [f"{n} {fp.get(extra)}" if counts[n] > 1 and fp.get(extra) else n for n, fp in zip(names, fps)]
    seen: dict[str, int] = defaultdict(int)
    by_identity = {}
    for identity, n in zip(firsts, names):
        seen[n] += 1
        by_identity[identity] = n if seen[n] == 1 else f"{n} #{seen[n]}"
    return [by_identity[_identity(r["fingerprint"])] for _, r in reports]


@dataclass(frozen=True)
class Row:
    key: RowKey
    cells: dict[str, Cell]  # column -> cell (absent: not run on that device)
    group: str  # disagree | fails | apart | passes | other
    note: str


@dataclass(frozen=True)
class Matrix:
    devices: list[Device]
    rows: list[Row]
    refused: list[str]
    dispatch: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # column -> impl -> backends it reached

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "devices": [asdict(d) for d in self.devices],
            "refused": self.refused,
            "rows": [{"case_id": r.key[0], "impl": r.key[1], "tensor": r.key[2], "group": r.group, "note": r.note,
                      "cells": {c: asdict(cell) for c, cell in r.cells.items()}} for r in self.rows],
        }


def _classify(cells: dict[str, Cell]) -> tuple[str, str]:
    by = defaultdict(list)
    for column, cell in cells.items():
        by[cell.outcome].append(column)
    if by["fails"] and by["passes"]:
        return "disagree", f"fails on {', '.join(by['fails'])}, passes on {', '.join(by['passes'])}"
    if by["fails"]:
        return "fails", f"fails on {', '.join(by['fails'])}"
    if by["passes"]:
        ratios = {c: cell.ratio for c, cell in cells.items() if cell.outcome == "passes" and cell.ratio}
        if len(ratios) > 1 and max(ratios.values()) >= APART * min(ratios.values()):
            hi, lo = max(ratios, key=ratios.get), min(ratios, key=ratios.get)
            return "apart", f"{ratios[hi]:.3g}× on {hi} vs {ratios[lo]:.3g}× on {lo}"
        return "passes", ""
    return "other", ", ".join(sorted({c.status for c in cells.values()}))


def _hash_conflicts(reports: list[tuple[str, dict[str, Any]]], columns: list[str]) -> dict[str, str]:
    """case_id -> why its rows are refused, for cases whose inputs differ between reports."""
    seen: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for column, (_, report) in zip(columns, reports):
        for case_id, info in report["cases"].items():
            hashes = json.dumps(info.get("input_sha256") or {}, sort_keys=True)
            seen[case_id][hashes].append(f"{column} (torch {report['fingerprint'].get('torch')})")
    out = {}
    for case_id, groups in seen.items():
        if len(groups) > 1:
            parts = list(groups.values())
            differing = sorted({k for h in groups for k, v in json.loads(h).items()
                                if any(json.loads(o).get(k) != v for o in groups)})
            out[case_id] = (f"{case_id}: input SHA-256 differ ({', '.join(differing)}) between "
                            + " vs ".join(", ".join(p) for p in parts)
                            + "; the devices did not see the same inputs (torch RNG stream changed?), rows refused")
    return out


def build_matrix(paths: list[str | Path]) -> Matrix:
    loaded = [(str(p), load_report(p)) for p in paths]
    refused: list[str] = []
    usable = []
    for path, report in loaded:
        if report["schema_version"] != SCHEMA_VERSION:
            refused.append(f"{path}: schema_version {report['schema_version']}, this harness reads {SCHEMA_VERSION}; "
                           "all its rows refused (re-run it with this harness version)")
        else:
            usable.append((path, report))
    if not usable:
        raise ReportError("no report could be compared: " + "; ".join(refused))
    columns = _columns(usable)
    conflicts = _hash_conflicts(usable, columns)
    refused += sorted(conflicts.values())
    cells: dict[RowKey, dict[str, Cell]] = defaultdict(dict)
    for column, (path, report) in zip(columns, usable):
        twice = 0
        for key, cell in report_rows(report).items():
            if key[0] in conflicts:
                continue
            if column in cells[key]:
                twice += 1
                continue
            cells[key][column] = cell
        if twice:
            refused.append(f"{path}: {twice} row(s) already given for {column} by an earlier report; the first kept")
    order = {"disagree": 0, "fails": 1, "apart": 2, "other": 3, "passes": 4}
    rows = [Row(key, c, *_classify(c)) for key, c in cells.items()]
    worst = lambda r: max((c.ratio or 0.0) for c in r.cells.values())  # noqa: E731
    rows.sort(key=lambda r: (order[r.group], -worst(r), r.key))
    states: dict[str, list[str]] = defaultdict(list)
    paths: dict[str, list[str]] = defaultdict(list)
    fps: dict[str, dict[str, Any]] = {}
    for col, (path, rep) in zip(columns, usable):  # further reports of a device share its column
        states[col].append(_canary(rep))
        paths[col].append(path)
        fps.setdefault(col, rep["fingerprint"])
    devices = [Device(col, ", ".join(paths[col]), fps[col],
                      next((s for s in ("DID NOT FAIL", "failed as expected") if s in states[col]), "not run"))
               for col in fps]
    dispatch: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for col, (_, rep) in zip(columns, usable):
        for r in rep["results"]:
            if (r.get("notes") or {}).get("dispatch"):
                dispatch[col][r["impl"]].add(str(r["notes"]["dispatch"]))
    return Matrix(devices, rows, refused, {c: {i: sorted(b) for i, b in v.items()} for c, v in dispatch.items()})


def impl_summary(m: Matrix) -> list[list[str]]:
    """Per implementation, per device: judged rows passing / failing, the worst error / scale, and for an
    unpinned call the backends dispatch chose there."""
    columns = [d.column for d in m.devices]
    tally: dict[str, dict[str, dict[str, Any]]] = defaultdict(lambda: defaultdict(lambda: {"pass": 0, "fail": 0,
                                                                                             "worst": 0.0}))
    for row in m.rows:
        for col, c in row.cells.items():
            t = tally[row.key[1]][col]
            t["pass"] += c.outcome == "passes"
            t["fail"] += c.outcome == "fails"
            t["worst"] = max(t["worst"], c.ratio or 0.0) if c.level != "nonfinite" else math.inf
    out = []
    for impl in sorted(tally):
        cells = []
        for col in columns:
            t = tally[impl].get(col)
            if t is None:
                cells.append("—")
                continue
            via = m.dispatch.get(col, {}).get(impl)
            worst = "NaN/Inf" if t["worst"] == math.inf else f"{t['worst']:.3g}×"
            cells.append(f"{t['pass']} pass, {t['fail']} fail, worst {worst}" + (f" (ran {'/'.join(via)})" if via else ""))
        out.append([impl, *cells])
    return out


def _table(rows: list[Row], columns: list[str], note: bool) -> str:
    body = [[r.key[0], r.key[1], r.key[2], *(r.cells[c].text() if c in r.cells else "—" for c in columns),
             *([r.note] if note else [])] for r in rows]
    return tabulate([[escape(x) for x in row] for row in body],
                    headers=["case", "impl", "tensor", *columns, *(["devices"] if note else [])], tablefmt="github")


def render_matrix(m: Matrix) -> str:
    columns = [d.column for d in m.devices]
    fp_rows = [[d.column, d.fingerprint.get("device_name"), d.fingerprint.get("torch"),
                d.fingerprint.get("cuda") or d.fingerprint.get("hip") or "—", d.fingerprint.get("cudnn") or "—",
                d.canary + (": this column cannot be trusted" if d.canary == "DID NOT FAIL" else ""), d.path]
               for d in m.devices]
    lines = ["# gqa-harness cross-device matrix", "",
             tabulate([[escape(x) for x in row] for row in fp_rows], headers=["column", "device", "torch", "CUDA/HIP", "cuDNN", "canary", "report"],
                      tablefmt="github"), "",
             "Cell: verdict and error / scale, where scale = max(dtype floor, low-precision reference, fp32 eps × "
             "magnitude); read at the failing level (slice, row) for a failure, the whole tensor otherwise. "
             "A correct kernel stays under the level's factor (tensor 2, slice 2.5, row 5). — = not run there.", ""]
    lines += ["## Summary: device × implementation", "", "Judged (case, tensor) rows per implementation and device.", "",
              tabulate([[escape(x) for x in row] for row in impl_summary(m)], headers=["implementation", *columns], tablefmt="github"), ""]
    if m.refused:
        lines += ["## Refused", "", *(f"- {r}" for r in m.refused), ""]
    sections = [("disagree", "Devices disagree", True), ("fails", "Fail on every device that judged them", True),
                ("apart", f"Pass everywhere, but error / scale differs {APART:g}× or more between devices", True),
                ("other", "Not judged anywhere (unsupported, out of range)", True),
                ("passes", "Pass on every device that judged them", False)]
    for group, title, note in sections:
        rows = [r for r in m.rows if r.group == group]
        if not rows:
            continue
        lines += [f"## {title} ({len(rows)})", ""]
        if group != "disagree" and len(rows) > 40:
            lines += ["<details><summary>show</summary>", "", _table(rows, columns, note), "", "</details>", ""]
        else:
            lines += [_table(rows, columns, note), ""]
    return "\n".join(lines)


def write_matrix(m: Matrix, out: Path) -> tuple[Path, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    md, js = out.with_suffix(".md"), out.with_suffix(".json")
    md.write_text(render_matrix(m))
    js.write_text(json.dumps(m.to_dict(), indent=1, allow_nan=False))
    return md, js

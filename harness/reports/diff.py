"""The CI gate: a new report against a baseline report of the same device.

Rows are (case, implementation, tensor); `--rename OLD=NEW` maps a baseline implementation to its new
name (a renamed user module), and where both reports record the backend that ran (sdpa-default's
dispatch) and it changed, the row is compared on its status only. The gate fails (exit 1) when
  * a (case, implementation, tensor) that passed in the baseline fails now (KNOWN counts as
    failing: a known-failures entry must not hide a new regression), or a KNOWN one is now
    beyond its ceiling (FAIL/ERROR): always, whatever the bands;
  * a baseline row disappeared, or is no longer judged (UNSUPPORTED): a dropped case or
    backend must not pass silently (`--partial`: only the cases the new report ran are compared,
    so one shard can gate its own job);
  * error / scale of a row the baseline accepted (PASS, KNOWN) grew, at the tensor or slice level,
    by more than the noise band of that level AND to beyond what any correct design or known-good
    kernel reached at that dtype and level (the envelope, reports/envelope.py). Growth is
    measured with ratios floored at 1 (movement under the scale is what correct designs do).
    Growth inside the envelope, or at the row level, is listed as drift and does not gate: a
    switch between two correct kernels (an fp32 reference and hand-expanded K/V on flash: 453
    (row, level) pairs beyond the band, none beyond the envelope) must pass, and a kernel whose
    group sum rounds to bf16 (dK/dV 1.65-1.93x the scale, still PASS) must not: it is beyond the
    envelope at the tensor level (1.58 bf16, 1.62 fp16). Measurements: docs/ci.md;
  * a row new in this report fails.
Fixed rows (failing before, passing now) are listed; they do not fail the gate.

The noise band. Re-running a deterministic kernel on the same inputs reproduces its error
exactly, so repeated runs say nothing about how much error movement is normal. What does:
the same kernel on re-drawn inputs (another seed) of the same case. An equally correct
kernel with another accumulation order, or the same kernel after torch changes its RNG
stream, moves error / scale by about as much as a re-draw does. So the band of a level is
the largest max/min ratio of error / scale across seeds over the (case, implementation,
tensor) that pass at every seed of a multi-seed noise run (reports/baselines/noise-suite.toml):
growth beyond what any re-draw produced for a correct result on this device is a regression.
A row whose own spread across seeds was larger (a buggy kernel's error is spikier: CPU
flash's dQ rows move up to ~5x between seeds) keeps its own, larger band. `measure_noise`
computes both; they live beside the baseline as <label>.noise.json with their provenance.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

from ..core.metrics import LEVELS
from .compare import Cell, RowKey, report_rows
from .envelope import Envelope, default_bands, default_envelope
from .explain import cell as escape
from .store import ReportError, load_json

JUDGED = ("FAIL", "KNOWN", "PASS")  # statuses that carry error / scale numbers
ACCEPTED = ("PASS", "KNOWN")  # do not fail a run: their error must not grow unnoticed
GATING = ("regressed", "grew", "disappeared", "unjudged", "new-failure")
GROWTH_GATES = ("tensor", "slice")  # row-level growth of an accepted row is drift: a correct switch moves rows 5x


@dataclass(frozen=True)
class NoiseBands:
    """Largest growth factor of error / scale per level that re-drawing inputs produced on results
    that pass at every seed; `own` holds (case-without-seed, impl, tensor) rows whose own spread
    across seeds was larger (a buggy kernel's error moves more): they get their own band."""

    bands: dict[str, float]
    own: dict[str, dict[str, float]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    spreads: dict[str, dict[str, float]] = field(default_factory=dict)

    def band(self, key: RowKey, level: str) -> float:
        return max(self.bands[level], self.own.get(family_key(*key), {}).get(level, 0.0))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_noise(path: str | Path) -> NoiseBands:
    data = load_json(path, "noise")
    bands = {lv: float(data["bands"][lv]) for lv in LEVELS}
    return NoiseBands(bands, data.get("own", {}), {**data.get("provenance", {}), "file": str(path)},
                      data.get("spreads", {}))


def family_key(case_id: str, impl: str, tensor: str) -> str:
    """The row without its seed: case ids end in -s<seed>."""
    return f"{re.sub(r'-s[0-9]+$', '', case_id)}|{impl}|{tensor}"


def seed_groups(report: dict[str, Any]) -> dict[str, tuple[set[str], dict[str, list[float]]]]:
    """family_key -> (statuses seen, per level the error / scale at each seed)."""
    groups: dict[str, tuple[set[str], dict[str, list[float]]]] = {}
    for key, cell in report_rows(report).items():
        statuses, ratios = groups.setdefault(family_key(*key), (set(), defaultdict(list)))
        statuses.add(cell.status)
        if cell.status in JUDGED:
            for level, ratio in cell.ratios.items():
                ratios[level].append(ratio)
    return groups


def _spread(ratios: list[float]) -> float | None:
    return max(ratios) / min(ratios) if len(ratios) >= 2 and min(ratios) > 0 else None


def measure_noise(report: dict[str, Any], source: str = "") -> NoiseBands:
    groups = seed_groups(report)
    spreads = {key: {lv: sp for lv, r in ratios.items() if (sp := _spread(r)) is not None}
               for key, (_, ratios) in groups.items()}
    correct = [key for key, (statuses, _) in groups.items() if statuses == {"PASS"}]
    bands, summary = {}, {}
    for level in LEVELS:
        values = [spreads[k][level] for k in correct if level in spreads[k]]
        if not values:
            raise ReportError(f"{source or 'report'}: no passing result has two or more seeds; run a multi-seed "
                              "suite (reports/baselines/noise-suite.toml)")
        bands[level] = max(values)
        summary[level] = {"passing_groups": len(values), "median": statistics.median(values), "max": max(values)}
    own = {key: {lv: sp for lv, sp in per.items() if sp > bands[lv]} for key, per in spreads.items()}
    judged = {key[0] for key in report_rows(report)}  # canary cases left out
    seeds = sorted({(c.get("case") or {}).get("seed") for cid, c in report["cases"].items() if cid in judged} - {None})
    fp, settings = report["fingerprint"], report.get("settings") or {}
    return NoiseBands(
        bands=bands, own={k: v for k, v in own.items() if v}, spreads=summary,
        provenance={"report": source, "device_label": fp.get("device_label"), "device_name": fp.get("device_name"),
                    "torch": fp.get("torch"), "seeds": seeds, "command": settings.get("command"),
                    "finished": settings.get("finished"),
                    "rule": "band = max over (case without seed, impl, tensor) passing at every seed of max/min "
                            "error/scale across seeds; rows whose own spread was larger keep their own (`own`)"},
    )


@dataclass(frozen=True)
class Change:
    key: RowKey
    kind: str  # regressed | grew | disappeared | unjudged | new-failure | fixed | drift | switched | new | same
    before: Cell | None
    after: Cell | None
    detail: str = ""

    @property
    def gates(self) -> bool:
        return self.kind in GATING


def growth(before: float, after: float) -> float:
    """How much error / scale grew, each floored at 1 (the scale: below it, what correct designs make)."""
    return max(after, 1.0) / max(before, 1.0)


@dataclass(frozen=True)
class Row:
    """What classify needs beyond the two cells: the case's dtype and whether the backend that ran changed."""

    dtype: str | None = None
    backend: tuple[str | None, str | None] = (None, None)

    @property
    def switched(self) -> bool:
        return None not in self.backend and self.backend[0] != self.backend[1]


def _growth(key: RowKey, before: Cell, after: Cell, bands: NoiseBands, envelope: Envelope,
            dtype: str | None) -> tuple[str, str]:
    """(gating, drift): growth beyond the band at tensor/slice level to beyond the envelope gates; the rest drifts."""
    gating, drift = [], []
    for level in LEVELS:
        b, a = before.ratios.get(level), after.ratios.get(level)
        band = bands.band(key, level)
        if b is None or a is None or growth(b, a) <= band:
            continue
        text = f"{level} {b:.3g}→{a:.3g}× (×{growth(b, a):.2f} > band ×{band:.2f})"
        limit = envelope.limit(dtype, level)
        if level in GROWTH_GATES and (limit is None or a > limit):
            gating.append(text + (f", beyond correct kernels' {limit:.3g}" if limit is not None else ""))
        else:
            drift.append(text + (f", within correct kernels' {limit:.3g}" if level in GROWTH_GATES else ""))
    return "; ".join(gating), "; ".join(drift)


def classify(key: RowKey, before: Cell | None, after: Cell | None, bands: NoiseBands,
             envelope: Envelope | None = None, row: Row = Row()) -> Change:
    if before is None:
        assert after is not None
        return Change(key, "new-failure" if after.outcome == "fails" else "new", None, after, after.reason[:200])
    if after is None:
        return Change(key, "disappeared", before, None, f"was {before.status}; the row is not in the new report")
    b, a = before.outcome, after.outcome
    if b == "passes" and a == "fails" or before.status == "KNOWN" and after.status in ("FAIL", "ERROR"):
        return Change(key, "regressed", before, after, after.reason[:300])
    if b != "n/a" and a == "n/a":
        return Change(key, "unjudged", before, after, f"{before.status} → {after.status}: {after.reason[:200]}")
    if b == "fails" and a == "passes":
        return Change(key, "fixed", before, after, f"{before.status} → {after.status}")
    if row.switched:
        return Change(key, "switched", before, after, f"backend {row.backend[0]} → {row.backend[1]}: another kernel "
                                                      "ran, compared on its status only")
    # a row already failing in the baseline fails the run itself; growth is gated where it was accepted
    if before.status in ACCEPTED and after.status in JUDGED:
        gating, drift = _growth(key, before, after, bands, envelope or Envelope(), row.dtype)
        if gating:
            return Change(key, "grew", before, after, gating)
        if drift:
            return Change(key, "drift", before, after, drift)
    return Change(key, "same", before, after)


@dataclass(frozen=True)
class Diff:
    changes: list[Change]
    bands: NoiseBands
    notes: list[str]

    @property
    def exit_status(self) -> int:
        return 1 if any(c.gates for c in self.changes) else 0

    def of(self, kind: str) -> list[Change]:
        return [c for c in self.changes if c.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {"exit_status": self.exit_status, "bands": self.bands.to_dict(), "notes": self.notes,
                "changes": [{"case_id": c.key[0], "impl": c.key[1], "tensor": c.key[2], "kind": c.kind,
                             "before": asdict(c.before) if c.before else None,
                             "after": asdict(c.after) if c.after else None, "detail": c.detail}
                            for c in self.changes if c.kind != "same"]}


def _notes(baseline: dict[str, Any], new: dict[str, Any]) -> list[str]:
    notes = []
    fb, fn = baseline["fingerprint"], new["fingerprint"]
    if fb.get("device_label") != fn.get("device_label"):
        notes.append(f"devices differ: baseline {fb.get('device_label')}, new {fn.get('device_label')}")
    if fb.get("torch") != fn.get("torch"):
        notes.append(f"torch {fb.get('torch')} → {fn.get('torch')}")
    differ = [cid for cid, c in new["cases"].items()
              if cid in baseline["cases"] and c.get("input_sha256") != baseline["cases"][cid].get("input_sha256")]
    if differ:
        notes.append(f"{len(differ)} case(s) got other inputs than in the baseline (torch RNG stream changed?), "
                     f"e.g. {differ[0]}: their errors are compared as a re-draw, which is what the noise band covers")
    if any(r.get("canary") for r in new["results"]) and not new["summary"].get("canary_failed_as_expected"):
        notes.append("the canary did not fail in the new report: its PASSes mean nothing (the run itself exits 1)")
    return notes


def parse_renames(pairs: list[str]) -> dict[str, str]:
    """`--rename OLD=NEW` values: baseline implementation name -> its name in the new report."""
    out = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            raise ReportError(f"--rename {pair!r} is not OLD=NEW (baseline implementation = its new name)")
        out[old] = new
    return out


def backends(report: dict[str, Any], renames: dict[str, str] | None = None) -> dict[tuple[str, str], str]:
    """(case, implementation) -> the backend that ran, where the result records it (sdpa-default's dispatch)."""
    renames = renames or {}
    return {(r["case_id"], renames.get(r["impl"], r["impl"])): str(r["notes"]["dispatch"])
            for r in report["results"] if (r.get("notes") or {}).get("dispatch")}


def diff_reports(baseline: dict[str, Any], new: dict[str, Any], bands: NoiseBands, *, partial: bool = False,
                 renames: dict[str, str] | None = None, envelope: Envelope | None = None) -> Diff:
    if baseline["schema_version"] != new["schema_version"]:
        raise ReportError(f"schema versions differ (baseline {baseline['schema_version']}, new "
                          f"{new['schema_version']}): refresh the baseline with this harness")
    renames = renames or {}
    before_rows = report_rows(baseline)
    unknown = sorted(set(renames) - {impl for _, impl, _ in before_rows})
    if unknown:
        raise ReportError(f"--rename {unknown[0]}=...: the baseline has no implementation {unknown[0]}")
    before = {(c, renames.get(i, i), t): cell for (c, i, t), cell in before_rows.items()}
    notes = _notes(baseline, new)
    if partial:
        kept = {k: v for k, v in before.items() if k[0] in new["cases"]}
        notes.append(f"--partial: compared the {len({k[0] for k in kept})} case(s) the new report ran; "
                     f"{len({k[0] for k in before} - {k[0] for k in kept})} baseline case(s) it did not run are left out")
        before = kept
    envelope = default_envelope() if envelope is None else envelope
    if not envelope.limits:
        notes.append("no committed calibration: growth beyond the band gates at every tensor/slice ratio")
    after = report_rows(new)
    dtypes = {cid: (c.get("case") or {}).get("dtype") for cid, c in (*baseline["cases"].items(), *new["cases"].items())}
    ran = (backends(baseline, renames), backends(new))
    keys = sorted(set(before) | set(after))
    changes = [classify(k, before.get(k), after.get(k), bands, envelope,
                        Row(dtypes.get(k[0]), (ran[0].get(k[:2]), ran[1].get(k[:2])))) for k in keys]
    order = {k: i for i, k in enumerate((*GATING, "fixed", "drift", "switched", "new", "same"))}
    changes.sort(key=lambda c: (order[c.kind], c.key))
    return Diff(changes, bands, notes)


def noise_for(baseline_path: Path, baseline: dict[str, Any], noise_path: str | None) -> NoiseBands:
    """--noise FILE, else <baseline>.noise.json beside it, else the baseline's own seed spread, else the
    default from the committed calibration (reports/envelope.py); the provenance says which."""
    if noise_path:
        return load_noise(noise_path)
    sibling = baseline_path.with_name(baseline_path.stem + ".noise.json")
    if sibling.exists():
        return load_noise(sibling)
    try:
        return measure_noise(baseline, str(baseline_path))
    except ReportError:
        pass
    default = default_bands()
    if default is None:
        raise ReportError(f"no noise band for {baseline_path}: give --noise FILE or put {sibling.name} beside it "
                          "(docs/compare-diff-repro.md: 'Refresh a baseline')")
    bands, provenance = default
    return NoiseBands(bands, provenance=provenance)


def band_source(bands: NoiseBands) -> str:
    """Where the noise bands came from, in words (the gate prints it)."""
    prov = bands.provenance
    if prov.get("source") == "calibration":
        return (f"the committed calibration {prov['calibration']}, the default: no --noise FILE and no "
                "<baseline>.noise.json beside the baseline")
    if prov.get("file"):
        return str(prov["file"])
    return f"the baseline's own seeds ({prov.get('report', 'baseline')})" if prov.get("report") is not None else "given"


def _cell_text(c: Cell | None) -> str:
    return "—" if c is None else c.text()


def render_diff(d: Diff, baseline: str, new: str) -> str:
    lines = [f"# gqa-harness diff: {new} against {baseline}", "",
             f"Gate: {'FAIL' if d.exit_status else 'pass'} · noise bands (max growth of error/scale across seeds): "
             + ", ".join(f"{lv} ×{b:.2f}" for lv, b in d.bands.bands.items()) + f", from {band_source(d.bands)}", ""]
    lines += [f"- {n}" for n in d.notes] + ([""] if d.notes else [])
    titles = {"regressed": "Passed in the baseline, fail now", "grew": "Error grew beyond the noise band and beyond "
              "what correct kernels reach", "disappeared": "Baseline rows that disappeared",
              "unjudged": "No longer judged", "new-failure": "New rows that fail", "fixed": "Fixed",
              "drift": "Error moved within what correct kernels reach (does not gate)",
              "switched": "Another backend ran (compared on status only)", "new": "New rows that pass"}
    for kind, title in titles.items():
        rows = d.of(kind)
        if not rows:
            continue
        lines += [f"## {title} ({len(rows)})", ""]
        lines.append(tabulate([[escape(x) for x in (*c.key, _cell_text(c.before), _cell_text(c.after), c.detail[:240])]
                               for c in rows],
                              headers=["case", "impl", "tensor", "baseline", "new", "detail"], tablefmt="github"))
        lines.append("")
    same = len(d.of("same"))
    lines.append(f"{same} row(s) unchanged within the noise band.")
    return "\n".join(lines) + "\n"

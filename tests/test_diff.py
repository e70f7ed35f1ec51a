"""diff, the CI gate: regressions fail it, noise does not, fixes are reported."""

from __future__ import annotations

import copy
import json

import pytest

from harness.cli import main
from harness.reports.compare import ReportError
from harness.reports.diff import NoiseBands, diff_reports, family_key, measure_noise, noise_for
from tests.synthetic_reports import CASES, make_report

KERNELS = {"sdpa-flash": "correct", "sdpa-math": "correct", "sdpa-bad": "tiled"}
BANDS = NoiseBands({"tensor": 1.15, "slice": 1.15, "row": 2.2})


@pytest.fixture(scope="module")
def baseline():
    return make_report("cpu", KERNELS)


def _kinds(d, kind):
    return {c.key for c in d.of(kind)}


def _scale_ratios(report, impl, factor):
    for r in report["results"]:
        if r["impl"] == impl:
            for t in r["tensors"].values():
                for level in t["metrics"]["levels"].values():
                    level["ratio"] *= factor


def test_a_rerun_of_deterministic_kernels_changes_nothing(baseline):
    d = diff_reports(baseline, make_report("cpu", KERNELS), BANDS)
    assert d.exit_status == 0 and {c.kind for c in d.changes} == {"same"}


def test_a_row_that_passed_and_fails_now_fails_the_gate(baseline):
    d = diff_reports(baseline, make_report("cpu", {**KERNELS, "sdpa-flash": "tiled"}), BANDS)
    assert d.exit_status == 1
    assert {k[1] for k in _kinds(d, "regressed")} == {"sdpa-flash"}
    assert d.changes[0].kind == "regressed"


def test_error_growth_within_the_band_passes_beyond_it_and_the_envelope_fails(baseline):
    inside = copy.deepcopy(baseline)
    _scale_ratios(inside, "sdpa-flash", 1.1)
    assert diff_reports(baseline, inside, BANDS).exit_status == 0
    drift = copy.deepcopy(baseline)
    _scale_ratios(drift, "sdpa-flash", 1.3)  # beyond the 1.15 band, but where correct kernels are (<= ~1.2)
    d = diff_reports(baseline, drift, BANDS)
    assert d.exit_status == 0 and d.of("drift") and not d.of("grew")
    beyond = copy.deepcopy(baseline)
    _scale_ratios(beyond, "sdpa-flash", 2.2)  # still PASS (the status is kept), up to ~1.96x: beyond every correct one
    d = diff_reports(baseline, beyond, BANDS)
    assert d.exit_status == 1 and {k[1] for k in _kinds(d, "grew")} == {"sdpa-flash"}
    assert "band ×1.15" in d.of("grew")[0].detail and "beyond correct kernels'" in d.of("grew")[0].detail


def test_a_row_with_its_own_larger_seed_spread_keeps_its_band(baseline):
    grown = copy.deepcopy(baseline)
    _scale_ratios(grown, "sdpa-flash", 2.2)
    own = {family_key(c.id, "sdpa-flash", t): {"tensor": 2.5, "slice": 2.5} for c in CASES for t in ("out", "dq", "dk", "dv")}
    assert diff_reports(baseline, grown, NoiseBands(BANDS.bands, own)).exit_status == 0


def _redrawn(seed: int) -> dict:
    """The same cases on inputs from another seed, labelled as the seed-0 cases: what a torch RNG change does."""
    report = make_report("cpu", KERNELS, tuple(c.replace(seed=seed) for c in CASES))
    text = json.dumps(report).replace(f"-s{seed}\"", "-s0\"")
    return json.loads(text)


def test_noise_from_redrawn_inputs_does_not_fail_the_gate_with_the_measured_band(baseline):
    """Band measured over seeds 0-3; the new report's inputs are seed 2's (other SHA-256): within the band."""
    noise = measure_noise(make_report("cpu", {"sdpa-flash": "correct", "sdpa-math": "correct"},
                                      tuple(c.replace(seed=s) for c in CASES for s in range(4))))
    assert all(b >= 1.0 for b in noise.bands.values())
    d = diff_reports(baseline, _redrawn(2), noise)
    assert d.exit_status == 0, [c.detail for c in d.changes if c.gates]
    assert any("other inputs than in the baseline" in n for n in d.notes)


def test_measure_noise_band_is_the_largest_seed_spread_of_passing_rows():
    report = make_report("cpu", {"sdpa-flash": "correct", "sdpa-bad": "tiled"},
                         tuple(CASES[0].replace(seed=s) for s in range(3)))
    noise = measure_noise(report)
    ratios = [r["tensors"]["out"]["metrics"]["levels"]["tensor"]["ratio"] for r in report["results"]
              if r["impl"] == "sdpa-flash"]
    assert noise.bands["tensor"] >= max(ratios) / min(ratios)
    assert noise.provenance["seeds"] == [0, 1, 2]
    assert not any("sdpa-flash" in k for k in noise.own)  # passing rows define the band, they have no own
    with pytest.raises(ReportError, match="two or more seeds"):
        measure_noise(make_report("cpu", {"sdpa-flash": "correct"}, CASES[:1]))


def test_a_baseline_row_that_disappeared_or_is_no_longer_judged_fails_the_gate(baseline):
    dropped = copy.deepcopy(baseline)
    dropped["results"] = [r for r in dropped["results"] if r["impl"] != "sdpa-math"]
    d = diff_reports(baseline, dropped, BANDS)
    assert d.exit_status == 1 and {k[1] for k in _kinds(d, "disappeared")} == {"sdpa-math"}
    refused = copy.deepcopy(baseline)
    for r in refused["results"]:
        if r["impl"] == "sdpa-math":
            r.update(status="UNSUPPORTED", tensors={}, error="flash refuses this", error_kind="unsupported")
    d = diff_reports(baseline, refused, BANDS)
    assert d.exit_status == 1 and {k[1] for k in _kinds(d, "unjudged")} == {"sdpa-math"}


def test_a_fix_is_reported_and_does_not_fail_the_gate(baseline):
    d = diff_reports(baseline, make_report("cpu", {**KERNELS, "sdpa-bad": "correct"}), BANDS)
    assert d.exit_status == 0
    fixed = _kinds(d, "fixed")
    assert fixed and {k[1] for k in fixed} == {"sdpa-bad"}


def test_known_beyond_its_ceiling_and_new_failing_rows_fail_the_gate(baseline):
    known = copy.deepcopy(baseline)
    for r in known["results"]:
        if r["impl"] == "sdpa-bad":
            for t in r["tensors"].values():
                t["status"] = "KNOWN" if t["status"] == "FAIL" else t["status"]
    assert diff_reports(known, known, BANDS).exit_status == 0
    d = diff_reports(known, baseline, BANDS)
    assert d.exit_status == 1 and {k[1] for k in _kinds(d, "regressed")} == {"sdpa-bad"}
    d = diff_reports(make_report("cpu", {"sdpa-math": "correct"}), make_report("cpu", {"sdpa-math": "correct",
                                                                                       "user:new": "tiled"}), BANDS)
    assert d.exit_status == 1 and _kinds(d, "new-failure")


def test_cli_gate_reads_the_noise_file_beside_the_baseline(baseline, tmp_path, capsys):
    base = tmp_path / "cpu-x86_64.json"
    base.write_text(json.dumps(baseline))
    new = tmp_path / "new.json"
    new.write_text(json.dumps(make_report("cpu", {**KERNELS, "sdpa-flash": "tiled"})))
    assert main(["diff", str(base), str(base)]) == 0  # a single-seed baseline, no noise file: the default band
    assert "from the committed calibration reports/calibration/cpu.json, the default" in capsys.readouterr().out
    (tmp_path / "cpu-x86_64.noise.json").write_text(json.dumps(BANDS.to_dict()))
    assert noise_for(base, baseline, None).bands == BANDS.bands
    assert main(["diff", str(base), str(base)]) == 0
    assert main(["diff", str(base), str(new), "--out", str(tmp_path / "d.md")]) == 1
    out = capsys.readouterr().out
    assert "Passed in the baseline, fail now" in out and (tmp_path / "d.json").exists()
    old = copy.deepcopy(baseline)
    old["schema_version"] = 0
    new.write_text(json.dumps(old))
    assert main(["diff", str(base), str(new)]) == 2

"""The gate's semantics for a new user (issue 19): a default noise band from the committed calibration,
growth that stays PASS gated only beyond what correct kernels reach, rows matched across a rename,
a partial report (one shard) gating its own cases, and a backend switch compared on status only.

The two pinned cases are real kernels on the smoke case where the difference shows (G=16, d=128):
an fp32 reference replaced by hand-expanded K/V on CPU flash (both correct) must pass the gate; a
kernel whose dK/dV group sum rounds to bf16 (every row still PASS) must fail it."""

from __future__ import annotations

import copy
import json

import pytest

from harness.cli import main
from harness.core.case import Case
from harness.reports.diff import NoiseBands, diff_reports, load_noise, noise_for, render_diff
from harness.reports.envelope import default_bands, default_envelope
from harness.reports.store import ReportError
from tests.synthetic_reports import CASES, make_report

G16 = tuple(Case(2, 16, 1, 64, 64, 128, dtype=d, causal="top-left") for d in ("bf16", "fp16"))
USER = "mykernels.attention:sdpa"


@pytest.fixture(scope="module")
def bands():
    return {"committed noise file": load_noise("reports/baselines/cpu-x86_64.noise.json"),
            "calibration default": NoiseBands(*default_bands()[:1], provenance=default_bands()[1])}


def _user(kernel: str, cases=G16, name: str = USER) -> dict:
    return make_report("cpu", {name: kernel}, cases)


def test_switching_between_two_correct_kernels_passes_the_gate_though_error_moved_beyond_the_band(bands):
    before, after = _user("fp32-reference"), _user("expanded-kv-flash")
    assert {r["status"] for r in (*before["results"], *after["results"])} == {"PASS"}
    for name, band in bands.items():
        d = diff_reports(before, after, band)
        assert d.exit_status == 0, (name, [c.detail for c in d.changes if c.gates])
        assert d.of("drift"), name  # it did move beyond the band, where correct kernels are: listed, not gating
        # the old rule (any growth of error/scale beyond the band, at any level) failed it: this is the case
        raw = [c for c in d.changes if c.before and c.after and any(
            c.after.ratios[lv] / c.before.ratios[lv] > band.bands[lv] for lv in band.bands if c.before.ratios.get(lv))]
        assert len(raw) >= 8, name


def test_a_bf16_group_sum_fails_the_gate_while_every_row_still_passes(bands):
    after = _user("bf16-group-sum")
    assert {r["status"] for r in after["results"]} == {"PASS"}
    for baseline in ("fp32-reference", "expanded-kv-flash"):
        for name, band in bands.items():
            d = diff_reports(_user(baseline), after, band)
            grew = {(k[0].split("-")[5], k[2]) for k in (c.key for c in d.of("grew"))}
            assert d.exit_status == 1 and grew == {("bf16", "dk"), ("bf16", "dv"), ("fp16", "dk"), ("fp16", "dv")}, \
                (baseline, name, grew)
            assert all("tensor " in c.detail and "beyond correct kernels'" in c.detail for c in d.of("grew"))


def test_the_envelope_comes_from_the_committed_calibration_and_audit():
    env = default_envelope()
    assert env.sources == ("reports/calibration/cpu.json", "reports/audit/audit-cpu-x86_64.json")
    assert 1.5 < env.limit("bf16", "tensor") < 1.645 and 1.5 < env.limit("fp16", "tensor") < 1.732
    assert env.limit("fp32", "tensor") is None  # not calibrated: growth beyond the band gates there


def test_without_a_noise_file_the_default_band_comes_from_the_calibration_and_the_gate_says_so(tmp_path, capsys):
    report = _user("fp32-reference")
    base = tmp_path / "cpu-x86_64.json"
    base.write_text(json.dumps(report))
    band = noise_for(base, report, None)
    assert band.provenance["source"] == "calibration" and band.bands == default_bands()[0]
    assert 1.0 < band.bands["tensor"] < 1.2
    assert main(["diff", str(base), str(base)]) == 0
    assert "from the committed calibration reports/calibration/cpu.json" in capsys.readouterr().out


def test_new_failures_and_pass_to_fail_always_fail_the_gate_even_on_another_backend(bands):
    band = bands["calibration default"]
    before = _user("fp32-reference", CASES)  # the tiled kernel fails these (two kv heads)
    d = diff_reports(before, make_report("cpu", {USER: "fp32-reference", "user:new": "tiled"}, CASES), band)
    assert d.exit_status == 1 and d.of("new-failure")
    broken = _user("tiled", CASES)
    for r in (*before["results"], *broken["results"]):
        r["notes"]["dispatch"] = "MATH" if r in before["results"] else "FLASH_ATTENTION"
    d = diff_reports(before, broken, band)
    assert d.exit_status == 1 and d.of("regressed")


def test_a_backend_switch_is_compared_on_status_only(bands):
    before, after = _user("fp32-reference", G16[:1]), _user("fp32-reference", G16[:1])
    for r in after["results"]:
        for t in r["tensors"].values():
            for level in t["metrics"]["levels"].values():
                level["ratio"] *= 2.5  # as if another backend ran: far beyond the envelope, still PASS
    band = bands["calibration default"]
    assert diff_reports(before, after, band).exit_status == 1  # same backend: that is growth
    for report, backend in ((before, "MATH"), (after, "FLASH_ATTENTION")):
        for r in report["results"]:
            r["notes"]["dispatch"] = backend
    d = diff_reports(before, after, band)
    assert d.exit_status == 0 and d.of("switched") and "MATH → FLASH_ATTENTION" in d.of("switched")[0].detail
    assert "Another backend ran" in render_diff(d, "a", "b")


def test_rename_matches_a_renamed_implementation(bands, tmp_path, capsys):
    band = bands["calibration default"]
    before, after = _user("fp32-reference", name="oldmod:attn"), _user("fp32-reference", name="newmod:attn")
    d = diff_reports(before, after, band)
    assert d.exit_status == 1 and d.of("disappeared") and d.of("new")
    d = diff_reports(before, after, band, renames={"oldmod:attn": "newmod:attn"})
    assert d.exit_status == 0 and {c.kind for c in d.changes} == {"same"}
    with pytest.raises(ReportError, match="no implementation nosuch"):
        diff_reports(before, after, band, renames={"nosuch": "x"})
    paths = []
    for name, report in (("base", before), ("new", after)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(report))
    assert main(["diff", *map(str, paths), "--rename", "oldmod:attn=newmod:attn"]) == 0
    assert main(["diff", *map(str, paths), "--rename", "oldmod:attn"]) == 2
    assert "is not OLD=NEW" in capsys.readouterr().err


def test_partial_compares_only_the_cases_the_new_report_ran(bands):
    band = bands["calibration default"]
    full = _user("fp32-reference", CASES)
    shard = copy.deepcopy(full)
    shard["results"] = [r for r in shard["results"] if r["case_id"] == CASES[0].id]
    shard["cases"] = {k: v for k, v in shard["cases"].items() if k == CASES[0].id}
    assert diff_reports(full, shard, band).exit_status == 1  # the other case disappeared
    d = diff_reports(full, shard, band, partial=True)
    assert d.exit_status == 0 and not d.of("disappeared")
    assert any("--partial: compared the 1 case(s)" in n for n in d.notes)
    broken = make_report("cpu", {USER: "tiled"}, CASES[:1])
    assert diff_reports(full, broken, band, partial=True).exit_status == 1  # what it ran still gates

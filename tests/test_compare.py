"""compare: one column per device, disagreements first, incomparable rows refused with a reason."""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.reports.compare import ReportError, build_matrix, render_matrix, report_rows, write_matrix
from tests.synthetic_reports import CASES, make_report


def _save(tmp_path, name, report):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(report))
    return path


@pytest.fixture
def three_devices(tmp_path):
    """sdpa-flash is wrong on the MI300X only (the public GQA report's shape); math right everywhere."""
    good = {"sdpa-flash": "correct", "sdpa-math": "correct"}
    return [_save(tmp_path, "mi300x", make_report("mi300x", {"sdpa-flash": "tiled", "sdpa-math": "correct"})),
            _save(tmp_path, "h100", make_report("h100", good)),
            _save(tmp_path, "cpu", make_report("cpu", good))]


def test_one_column_per_device_rows_where_devices_disagree_first(three_devices):
    m = build_matrix(three_devices)
    assert [d.column for d in m.devices] == ["rocm-gfx942", "cuda-sm_90", "cpu-x86_64"]
    first = m.rows[0]
    assert first.group == "disagree" and first.key[1] == "sdpa-flash"
    assert first.note == "fails on rocm-gfx942, passes on cuda-sm_90, cpu-x86_64"
    assert first.cells["rocm-gfx942"].status == "FAIL" and first.cells["cuda-sm_90"].status == "PASS"
    disagree = [r for r in m.rows if r.group == "disagree"]
    assert {r.key[1] for r in disagree} == {"sdpa-flash"} and m.rows[:len(disagree)] == disagree
    assert all(r.group == "passes" for r in m.rows if r.key[1] == "sdpa-math")
    assert len(m.rows) == len(CASES) * 2 * 4  # (case, impl, tensor)


def test_cell_is_error_over_scale_at_the_deciding_level_with_the_verdict(three_devices):
    m = build_matrix(three_devices)
    row = next(r for r in m.rows if r.key[1:] == ("sdpa-flash", "out"))
    bad, good = row.cells["rocm-gfx942"], row.cells["cuda-sm_90"]
    assert bad.level in ("tensor", "slice", "row") and bad.ratio > 100 and bad.text().startswith("FAIL ")
    assert good.level == "tensor" and good.ratio < 2 and good.text() == f"PASS {good.ratio:.3g}×"


def test_same_architecture_columns_are_told_apart_by_device_name(tmp_path):
    good = {"sdpa-math": "correct"}
    m = build_matrix([_save(tmp_path, "a", make_report("h100", good)), _save(tmp_path, "b", make_report("h200", good))])
    assert [d.column for d in m.devices] == ["cuda-sm_90 NVIDIA H100 80GB HBM3", "cuda-sm_90 NVIDIA H200"]


def test_rows_whose_input_hashes_differ_are_refused_with_the_reason(tmp_path):
    other = make_report("h100", {"sdpa-flash": "correct"})
    changed = CASES[0].id
    other["cases"][changed]["input_sha256"]["q"] = "0" * 64
    m = build_matrix([_save(tmp_path, "cpu", make_report("cpu", {"sdpa-flash": "correct"})),
                      _save(tmp_path, "h100", other)])
    assert not any(r.key[0] == changed for r in m.rows)
    assert any(r.key[0] == CASES[1].id for r in m.rows)
    assert len(m.refused) == 1 and changed in m.refused[0] and "input SHA-256 differ (q)" in m.refused[0]
    assert "torch 2.11.0+cu128" in m.refused[0] and "## Refused" in render_matrix(m)


def test_a_report_of_another_schema_version_is_refused(tmp_path):
    old = make_report("h100", {"sdpa-flash": "correct"})
    old["schema_version"] = 99
    m = build_matrix([_save(tmp_path, "cpu", make_report("cpu", {"sdpa-flash": "correct"})), _save(tmp_path, "old", old)])
    assert [d.column for d in m.devices] == ["cpu-x86_64"]
    assert "schema_version 99" in m.refused[0]
    with pytest.raises(ReportError, match="no report could be compared"):
        build_matrix([_save(tmp_path, "old", old)])


def test_a_result_without_tensors_gives_a_row_per_tensor():
    report = make_report("cpu", {"sdpa-flash": "correct"})
    report["results"][0].update(status="ERROR", tensors={}, error="RuntimeError: boom")
    rows = report_rows(report)
    cid = report["results"][0]["case_id"]
    assert {k[2] for k in rows if k[0] == cid} == {"out", "dq", "dk", "dv"}
    assert rows[(cid, "sdpa-flash", "dk")].status == "ERROR" and rows[(cid, "sdpa-flash", "dk")].outcome == "fails"


def test_markdown_and_json_files_and_the_cli(three_devices, tmp_path, capsys):
    md, js = write_matrix(build_matrix(three_devices), tmp_path / "m" / "matrix.md")
    text = md.read_text()
    assert text.index("## Devices disagree") < text.index("## Pass on every device")
    assert "| case " in text and "rocm-gfx942" in text
    data = json.loads(js.read_text())
    assert data["rows"][0]["group"] == "disagree" and data["rows"][0]["cells"]["rocm-gfx942"]["status"] == "FAIL"
    assert main(["compare", *map(str, three_devices), "--out", str(tmp_path / "cli.md")]) == 0
    assert (tmp_path / "cli.json").exists()
    assert main(["compare", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such report" in capsys.readouterr().err


def test_reports_of_one_device_share_a_column(tmp_path):
    a = make_report("cpu", {"sdpa-flash": "correct"}, CASES[:1])
    b = make_report("cpu", {"sdpa-flash": "correct"}, CASES[1:])
    m = build_matrix([_save(tmp_path, "a", a), _save(tmp_path, "b", b), _save(tmp_path, "c", b)])
    assert [d.column for d in m.devices] == ["cpu-x86_64"]
    assert {r.key[0] for r in m.rows} == {c.id for c in CASES}
    assert any("already given for cpu-x86_64" in line for line in m.refused)


def test_rows_that_pass_everywhere_but_far_apart_are_shown(tmp_path):
    a, b = make_report("cpu", {"sdpa-flash": "correct"}), make_report("h100", {"sdpa-flash": "correct"})
    for r in a["results"]:
        r["tensors"]["dk"]["metrics"]["levels"]["tensor"]["ratio"] *= 1.8  # status stays PASS: the cell only reads the ratio
    m = build_matrix([_save(tmp_path, "a", a), _save(tmp_path, "b", b)])
    apart = [r for r in m.rows if r.group == "apart"]
    assert apart and {r.key[2] for r in apart} == {"dk"} and "on cpu-x86_64 vs" in apart[0].note
    assert "differs 1.5× or more" in render_matrix(m)


def test_a_nonfinite_failure_reads_as_nan_not_as_a_clean_zero_ratio():
    from harness.reports.compare import _cell

    tensor = {"status": "FAIL", "rule": "nonfinite", "reason": "dq: 16384 NaN",
              "metrics": {"levels": {"tensor": {"ratio": 0.0}}}}
    assert _cell({"status": "FAIL"}, tensor).text() == "FAIL NaN/Inf"

"""The report store: reports are recognised one way, written and found in one place."""

from __future__ import annotations

import gzip
import json

import pytest

from harness.reports.store import ReportError, find_reports, load_report, write_report

REPORT = {"schema_version": 1, "fingerprint": {"device_label": "cpu-x86_64"}, "settings": {}, "cases": {},
          "results": []}


def test_a_written_report_is_found_and_loaded_and_named_by_its_device_label(tmp_path):
    md = write_report(tmp_path / "out", REPORT, "# report\n")
    assert md == tmp_path / "out" / "cpu-x86_64.md" and md.read_text() == "# report\n"
    (run,) = find_reports([tmp_path / "out"])
    assert run.label == "cpu-x86_64" and run.markdown == md and run.report == REPORT
    assert load_report(tmp_path / "out" / "cpu-x86_64.json") == REPORT


def test_other_json_files_are_passed_over_and_subfolders_searched_only_when_asked(tmp_path):
    write_report(tmp_path / "a" / "b", REPORT, "")
    (tmp_path / "a" / "bench.json").write_text(json.dumps({"schema": "gqa-harness-bench/1"}))
    (tmp_path / "a" / "list.json").write_text("[1, 2]")
    assert find_reports([tmp_path / "a"]) == []
    assert [r.label for r in find_reports([tmp_path / "a"], recursive=True)] == ["cpu-x86_64"]


@pytest.mark.parametrize("text, fragment", [
    (None, "no such report"), ("{", "not a JSON report"), ("[1]", "missing schema_version"),
    (json.dumps({k: v for k, v in REPORT.items() if k != "results"}), "missing results"),
])
def test_what_is_not_a_report_is_one_line_naming_the_file(tmp_path, text, fragment):
    path = tmp_path / "r.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ReportError) as info:
        load_report(path)
    assert fragment in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_gzipped_report_loads_as_the_plain_one_and_a_cut_gzip_is_one_line(tmp_path):
    plain = write_report(tmp_path, REPORT, "md").with_suffix(".json")
    packed = tmp_path / "packed.json.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert load_report(packed) == load_report(plain)
    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(packed.read_bytes()[:40])
    with pytest.raises(ReportError, match="cut.json.gz: not a JSON report") as info:
        load_report(cut)
    assert "\n" not in str(info.value)

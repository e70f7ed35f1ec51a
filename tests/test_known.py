"""Known failures: version ranges, per-tensor ceilings that never hide a worse failure, FIXED and stale entries."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from harness.core.case import Case
from harness.cli import main
from harness.core.known import KnownFailuresError, known_settings, load_known, version_matches, version_tuple
from harness.core.verdict import Where, apply_known
from harness.run.env import cudnn_version
from harness.reports.ledger import entry_states, fixed_in_run, load_reports
from harness.core.results import Status

from . import wrong_kernels
from .helpers import judge

CASE = Case(batch=1, q_heads=32, kv_heads=1, q_len=128, kv_len=128, head_dim=64)  # group size 32: dK/dV fail


def _toml(tmp_path, body: str):
    path = tmp_path / "known.toml"
    path.write_text(body)
    return path


ENTRY = '''
[[known]]
id = "bf16-group-sum"
case = "*"
impl = ["*"]
tensors = ["dk", "dv"]
device = "cpu-*"
torch = "{torch}"
max_ratio = {ceiling}
evidence = "test"
cite = "reports/findings/cpu-flash-gqa-dkdv-group-sum"
'''


def test_version_ranges_and_patterns():
    assert version_tuple("2.13.0+cpu") == (2, 13, 0) and version_tuple("9.19.0") == (9, 19, 0)
    assert version_matches(">=2.11,<2.14", "2.13.0+cpu")
    assert not version_matches(">=2.11,<2.13", "2.13.0+cpu")
    assert not version_matches(">=2.11,<2.14", "2.14.0a0")
    assert version_matches("2.13*", "2.13.0+cpu") and not version_matches("2.11*", "2.13.0+cpu")
    assert version_matches("*", None) and not version_matches(">=12.4", None)  # a CUDA range never matches a CPU build
    assert cudnn_version(91900) == "9.19.0" and cudnn_version(8907) == "8.9.7"


def _absorbed(path, torch_version="2.13.0+cpu", versions=None):
    known = load_known(path)
    result = judge(CASE, wrong_kernels.bf16_group_sum)
    out = {}
    for name, v in result.tensors.items():
        where = Where("k", "cpu", "cpu-x86_64", {"cuda": None, **(versions or {}), "torch": torch_version})
        out[name] = apply_known(v, known, CASE.id, CASE.group_size, where)
    return result, out


def test_a_failure_under_its_ceiling_is_known_only_inside_the_version_range(tmp_path):
    result, _ = _absorbed(_toml(tmp_path, ENTRY.format(torch="*", ceiling=1000.0)))
    assert any(v.status is Status.FAIL for v in result.tensors.values())  # the kernel really fails
    inside = _toml(tmp_path, ENTRY.format(torch=">=2.11,<2.14", ceiling=1000.0))
    _, verdicts = _absorbed(inside, "2.13.0+cpu")
    assert {verdicts[t].status for t in ("dk", "dv") if result.tensors[t].status is Status.FAIL} == {Status.KNOWN}
    _, verdicts = _absorbed(inside, "2.14.1")
    assert {verdicts[t].status for t in ("dk", "dv") if result.tensors[t].status is Status.FAIL} == {Status.FAIL}


def test_a_per_tensor_ceiling_never_hides_a_worse_failure(tmp_path):
    result, _ = _absorbed(_toml(tmp_path, ENTRY.format(torch="*", ceiling=1000.0)))
    failing = [t for t in ("dk", "dv") if result.tensors[t].status is Status.FAIL]
    ratio = {t: float(result.tensors[t].metrics.levels[result.tensors[t].rule].ratio.max()) for t in failing}
    t0 = failing[0]
    ceilings = {t: (ratio[t] * 0.5 if t == t0 else 1000.0) for t in ("dk", "dv")}  # t0's ceiling below its ratio
    body = ENTRY.format(torch="*", ceiling="{ " + ", ".join(f"{t} = {c}" for t, c in ceilings.items()) + " }")
    _, verdicts = _absorbed(_toml(tmp_path, body))
    assert verdicts[t0].status is Status.FAIL and "worse than its known-failure ceiling" in verdicts[t0].reason
    for t in failing[1:]:
        assert verdicts[t].status is Status.KNOWN


def test_a_failure_at_a_level_without_a_ceiling_stays_a_failure(tmp_path):
    result, _ = _absorbed(_toml(tmp_path, ENTRY.format(torch="*", ceiling=1000.0)))
    row_failure = replace(result.tensors["dk"], rule="row")  # the same failure, seen at the row level
    (entry,) = load_known(_toml(tmp_path, ENTRY.format(torch="*", ceiling=1000.0)))  # no max_row_ratio
    verdict = apply_known(row_failure, [entry], CASE.id, CASE.group_size,
                          Where("k", "cpu", "cpu-x86_64", {"torch": "2.13.0"}))
    assert verdict.status is Status.FAIL


def _gross_failure():
    result = judge(replace(CASE, mask="fully-masked-rows", q_heads=2, q_len=32, kv_len=32), wrong_kernels.nan_on_masked_rows)
    return next(v for v in result.tensors.values() if v.status is Status.FAIL and v.severity == "gross")


def test_a_gross_failure_is_absorbed_only_by_an_entry_that_says_gross(tmp_path):
    failure = _gross_failure()
    where = Where("k", "cpu", "cpu-x86_64", {"torch": "2.13.0"})
    plain = ENTRY.format(torch="*", ceiling=1e30).replace('case = "*"', 'case = ["b9-*", "b1-*"]').replace(
        '["dk", "dv"]', '["out", "dq", "dk", "dv"]')
    (entry,) = load_known(_toml(tmp_path, plain))
    assert apply_known(failure, [entry], CASE.id, 1, where).status is Status.FAIL  # no ceiling hides NaN
    (gross,) = load_known(_toml(tmp_path, plain + "gross = true\n"))
    assert apply_known(failure, [gross], CASE.id, 1, where).status is Status.KNOWN
    contract = replace(failure, rule="contract")  # a wrong shape or dtype is never a known numeric bug
    assert apply_known(contract, [gross], CASE.id, 1, where).status is Status.FAIL


@pytest.mark.parametrize("body, fragment", [
    (ENTRY.format(torch="*", ceiling=1.0) + "gross = true\n", "needs case patterns naming its cases"),
    (ENTRY.format(torch="*", ceiling=1.0).replace('case = "*"', 'case = "b1-*"').replace(
        'cite = "reports/findings/cpu-flash-gqa-dkdv-group-sum"', 'cite = "https://example.org/1"')
     + "gross = true\n", "citation holding the repro"),
    (ENTRY.format(torch="*", ceiling=1.0) + "gross = 'yes'\n", "true or false"),
    (ENTRY.format(torch="*", ceiling=1.0).replace('case = "*"', 'case = []'), "a list of patterns"),

    (ENTRY.format(torch="~2.13", ceiling=1.0).replace('torch = "~2.13"', 'torch = ">=2.x"'), "not a comparison"),
    (ENTRY.format(torch="*", ceiling="{ dk = 1.0 }"), "no ceiling for dv"),
    (ENTRY.format(torch="*", ceiling="{ dk = 1.0, dv = 1.0, dq = 1.0 }"), "dq"),
    (ENTRY.format(torch="*", ceiling=-1.0), "positive number"),
    (ENTRY.format(torch="*", ceiling=1.0) + "colour = 'red'\n", "unknown key(s) colour"),
    (ENTRY.format(torch="*", ceiling=1.0) * 2, "duplicate id"),
    ("[[known]\n", "malformed TOML"),
])
def test_bad_entries_are_one_line_errors(tmp_path, body, fragment):
    with pytest.raises(KnownFailuresError, match=None) as info:
        load_known(_toml(tmp_path, body))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def _report(entry_counts: dict[str, tuple[int, int]], finished: datetime, label="cpu-x86_64") -> dict:
    results = []
    for entry, (matched, known) in entry_counts.items():
        tensors = {f"t{i}": {"status": "KNOWN" if i < known else "PASS", "known_entry": entry} for i in range(matched)}
        results.append({"case_id": "c", "impl": entry, "status": "PASS", "tensors": tensors})
    return {"schema_version": 1, "settings": {"finished": finished.isoformat()}, "fingerprint": {"device_label": label},
            "cases": {}, "results": results}


def test_fixed_and_stale_entries_are_listed(tmp_path):
    known = load_known(_toml(tmp_path, ENTRY.format(torch="*", ceiling=1.0)
                             + ENTRY.format(torch="*", ceiling=1.0).replace("bf16-group-sum", "gone")
                             + ENTRY.format(torch="*", ceiling=1.0).replace("bf16-group-sum", "old")))
    now = datetime.now(timezone.utc)
    old = _report({"bf16-group-sum": (2, 2), "old": (2, 2)}, now - timedelta(days=90))
    recent = _report({"bf16-group-sum": (2, 0)}, now - timedelta(days=1))
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "a.json").write_text(json.dumps(old))
    (tmp_path / "r" / "b.json").write_text(json.dumps(recent))
    (tmp_path / "r" / "not-a-report.json").write_text("[1, 2]")
    states = {s.id: s.state for s in entry_states(known, load_reports([tmp_path / "r"]), now, days=30)}
    assert states == {"bf16-group-sum": "FIXED here", "gone": "stale",
                      "old": "stale"}
    assert fixed_in_run(recent) == [
        "known-failure entry bf16-group-sum matched 2 result tensors and every one passed: FIXED, remove it "
        "from cases/known-failures.toml"]
    assert fixed_in_run(old) == []


def test_a_pattern_entry_that_passed_is_fixed_only_here(tmp_path):
    """case = "*" passing on a small selection does not show the bug gone from the cases it skipped."""
    report = _report({"bf16-group-sum": (2, 0)}, datetime.now(timezone.utc))
    report["settings"]["known_by_pattern"] = ["bf16-group-sum"]
    [line] = fixed_in_run(report)
    assert "its case is a pattern: check that the run covered the suites it came from" in line
    assert "FIXED, remove it" not in line
    exact = ENTRY.format(torch="*", ceiling=1.0).replace('case = "*"', 'case = ["b1-h8x2-q64-k64-d64-bf16-s0"]')
    known = load_known(_toml(tmp_path, ENTRY.format(torch="*", ceiling=1.0) + exact.replace("bf16-group-sum", "exact")))
    assert known_settings(known) == {"known_entries": ["bf16-group-sum", "exact"], "known_by_pattern": ["bf16-group-sum"]}


def test_known_command(tmp_path, capsys):
    path = _toml(tmp_path, ENTRY.format(torch="*", ceiling=1.0))
    report = _report({"bf16-group-sum": (3, 1)}, datetime.now(timezone.utc))
    (tmp_path / "cpu.json").write_text(json.dumps(report))
    assert main(["known", str(tmp_path / "cpu.json"), "--file", str(path), "--check"]) == 0
    assert "active" in capsys.readouterr().out
    assert main(["known", str(tmp_path / "cpu.json"), "--file", str(path), "--days", "0", "--check"]) == 1
    assert main(["known", str(tmp_path / "nope")]) == 2


def test_the_repository_file_loads():
    assert load_known()  # cases/known-failures.toml parses under the grown schema


def test_a_report_saved_before_runs_recorded_pattern_entries_is_read_with_todays_file():
    """No settings.known_by_pattern: the known-failures file decides, so the run's line and `known` agree."""
    report = _report({"cpu-flash-gqa-dkdv-group-sum": (2, 0)}, datetime.now(timezone.utc))  # case = "*" today
    assert "known_by_pattern" not in report["settings"]
    [line] = fixed_in_run(report)
    assert "its case is a pattern" in line and "FIXED, remove it" not in line

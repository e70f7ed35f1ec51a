"""`gqa-harness merge`: shards of one device joined into one report that diff, compare, summary and known
read like any other; a missing, duplicated, overlapping, interrupted or corrupt shard, or shards of
other devices, fingerprints or selections, refused with one line (exit 2); `diff --partial` gates a shard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.cli import main
from harness.reports.merge import combine
from tests.test_plugin import statuses

RUN = ["run", "--suite", "smoke", "--dtype", "bf16", "--max-tokens", "8", "--impl", "sdpa-math", "--in-process",
       "--quiet", "--device", "cpu"]
LABEL = "cpu-x86_64"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merge")
    for i in (1, 2, 3):
        assert main([*RUN, "--shard", f"{i}/3", "--out", str(root / f"s{i}")]) == 0
    assert main([*RUN, "--out", str(root / "full")]) == 0
    return root


def _copy(runs: Path, name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(runs / name, target)
    return target


def _edit(directory: Path, edit_report=None, edit_lines=None) -> None:
    if edit_report:
        path = directory / f"{LABEL}.json"
        report = json.loads(path.read_text())
        edit_report(report)
        path.write_text(json.dumps(report))
    if edit_lines:
        path = directory / f"{LABEL}.jsonl"
        path.write_text("".join(line + "\n" for line in edit_lines(path.read_text().splitlines())))


def _merge(capsys, *args) -> tuple[int, str]:
    code = main(["merge", *map(str, args)])
    err = capsys.readouterr().err.strip()
    assert code == 0 or err.count("\n") == 0, err  # refusals are one line
    return code, err


def test_merged_shards_equal_the_unsharded_run_and_every_report_command_reads_them(runs, tmp_path, capsys):
    code, _ = _merge(capsys, runs / "s1", runs / "s2", runs / "s3", "--out", tmp_path / "m")
    assert code == 0
    merged = json.loads((tmp_path / "m" / f"{LABEL}.json").read_text())
    full = json.loads((runs / "full" / f"{LABEL}.json").read_text())
    assert statuses(merged) == statuses(full) and merged["summary"] == full["summary"]
    assert (tmp_path / "m" / f"{LABEL}.md").is_file() and (tmp_path / "m" / f"{LABEL}.jsonl").is_file()
    m = str(tmp_path / "m" / f"{LABEL}.json")
    assert main(["diff", str(runs / "full" / f"{LABEL}.json"), m]) == 0
    assert main(["compare", m, str(runs / "full" / f"{LABEL}.json")]) == 0
    assert main(["summary", str(tmp_path / "m")]) == 0
    assert main(["known", str(tmp_path / "m")]) == 0
    assert "artifact-name=gqa-report-cpu-x86_64" in capsys.readouterr().out


def test_a_missing_shard_is_refused_unless_partial_and_diff_partial_gates_one_shard(runs, tmp_path, capsys):
    code, err = _merge(capsys, runs / "s1", runs / "s3", "--out", tmp_path / "m")
    assert code == 2 and "missing shard(s) 2/3 of 3" in err
    code, _ = _merge(capsys, runs / "s1", runs / "s3", "--partial", "--out", tmp_path / "m")
    merged = json.loads((tmp_path / "m" / f"{LABEL}.json").read_text())
    assert code == 0 and merged["settings"]["merged"]["missing"] == [2] and merged["settings"]["merged"]["partial"]
    baseline = str(runs / "full" / f"{LABEL}.json")
    one = str(runs / "s2" / f"{LABEL}.json")
    assert main(["diff", baseline, one]) == 1  # the other shards' rows "disappeared"
    assert main(["diff", baseline, one, "--partial"]) == 0
    assert "--partial: compared the" in capsys.readouterr().out


def test_a_duplicated_or_overlapping_shard_is_refused(runs, tmp_path, capsys):
    code, err = _merge(capsys, runs / "s1", runs / "s2", runs / "s3", runs / "s2", "--out", tmp_path / "m")
    assert code == 2 and err.endswith(f"shard 2/3 given twice: {runs / 's2'} and {runs / 's2'}")
    other = _copy(runs, "s3", tmp_path)
    first = json.loads((runs / "s1" / f"{LABEL}.json").read_text())["settings"]["shard"]["assigned"][0]
    _edit(other, lambda r: r["settings"]["shard"]["assigned"].append(first))
    code, err = _merge(capsys, runs / "s1", runs / "s2", other, "--out", tmp_path / "m")
    assert code == 2 and f"both ran case {first}" in err and "overlapping shards" in err


@pytest.mark.parametrize("corrupt,expected", [
    (lambda lines: lines[:3] + ["{not json"] + lines[3:], ":4: corrupt stream (not JSON"),
    (lambda lines: lines[:-1] + [lines[-1][:40]], "corrupt stream (not JSON"),  # a torn last line
    (lambda lines: [line.replace('"status": "PASS"', '"status": "GOOD"', 1) for line in lines],
     "corrupt stream (status: \"GOOD\" is not one of"),
    (lambda lines: [line for line in lines if '"type": "result"' not in line][:-1] + lines[-1:],
     "corrupt stream:"),  # results missing from the stream that its report has
])
def test_a_corrupt_stream_is_refused_and_named(runs, tmp_path, capsys, corrupt, expected):
    bad = _copy(runs, "s2", tmp_path)
    _edit(bad, edit_lines=corrupt)
    code, err = _merge(capsys, runs / "s1", bad, runs / "s3", "--partial", "--out", tmp_path / "m")
    assert code == 2 and str(bad / f"{LABEL}.jsonl") in err and expected in err, err


@pytest.mark.parametrize("edit,expected", [
    (lambda r: r["fingerprint"].update(device_label="cuda-sm_90"), "shards of different devices"),
    (lambda r: r["fingerprint"].update(torch="2.12.0+cpu"), "shards of different fingerprints: torch is"),
    (lambda r: r["fingerprint"]["versions"].update(aotriton="0.11.1"), "shards of different fingerprints: versions"),
    (lambda r: r["settings"]["shard"].update(selection="0123456789abcdef"), "(shard selection differs)"),
    (lambda r: r["settings"].update(implementations=["sdpa-math", "sdpa-flash"]), "(settings implementations"),
    (lambda r: r["settings"].update(shard=None), "not a shard's report"),
])
def test_shards_of_other_devices_fingerprints_or_selections_are_refused(runs, tmp_path, capsys, edit, expected):
    other = _copy(runs, "s3", tmp_path)
    _edit(other, edit)
    code, err = _merge(capsys, runs / "s1", runs / "s2", other, "--out", tmp_path / "m")
    assert code == 2 and expected in err, err


def test_host_facts_may_differ_between_the_machines_of_a_pool(runs, tmp_path, capsys):
    other = _copy(runs, "s3", tmp_path)
    _edit(other, lambda r: r["fingerprint"].update(cpu="another CPU", cpu_threads=64, platform="Linux-other"))
    assert _merge(capsys, runs / "s1", runs / "s2", other, "--out", tmp_path / "m")[0] == 0
    merged = json.loads((tmp_path / "m" / f"{LABEL}.json").read_text())
    assert [p["host"]["cpu"] for p in merged["settings"]["merged"]["from"]][-1] == "another CPU"


def test_an_interrupted_shard_is_refused_unless_partial_and_the_merge_says_what_the_whole_run_missed(
        runs, tmp_path, capsys):
    cut = _copy(runs, "s2", tmp_path)
    victim = json.loads((cut / f"{LABEL}.json").read_text())["settings"]["shard"]["assigned"][0]

    def drop(r):
        r["results"] = [x for x in r["results"] if x["case_id"] != victim]
        r["settings"]["partial"] = {"reason": "stopped", "planned": len(r["results"]) + 1,
                                    "results": len(r["results"]), "canary_ran": False}
    _edit(cut, drop, lambda lines: [x for x in lines if not ('"type": "result"' in x and victim in x)])
    code, err = _merge(capsys, runs / "s1", cut, runs / "s3", "--out", tmp_path / "m")
    assert code == 2 and "shard 2/3" in err and "(interrupted?)" in err and victim in err
    assert _merge(capsys, runs / "s1", cut, runs / "s3", "--partial", "--out", tmp_path / "m")[0] == 0
    merged = json.loads((tmp_path / "m" / f"{LABEL}.json").read_text())
    note = merged["settings"]["partial"]  # the whole run's, not shard 2's own note
    assert note["results"] == len(merged["results"]) and note["planned"] == note["results"] + 1
    assert note["reason"] == "1 of 3 shard(s) stopped before the end"


def test_a_directory_must_hold_one_shard(runs, tmp_path, capsys):
    both = _copy(runs, "s1", tmp_path)
    shutil.copy(runs / "s2" / f"{LABEL}.json", both / "other.json")
    code, err = _merge(capsys, both, runs / "s2", "--out", tmp_path / "m")
    assert code == 2 and "holds one report" in err
    code, err = _merge(capsys, tmp_path / "nothing-here", "--out", tmp_path / "m")
    assert code == 2 and "not a directory" in err


def test_a_canary_that_did_not_fail_on_one_shard_shows_in_the_merged_report():
    fail = {"type": "result", "case_id": "canary", "impl": "canary-x", "status": "FAIL", "canary": True, "tensors": {}}
    records = [fail, {**fail, "status": "PASS"}, fail, {"type": "case", "case_id": "c", "case": {}, "spec": ""},
               {"type": "case", "case_id": "c", "case": {}, "spec": ""}]
    merged = combine(records)
    assert [r["status"] for r in merged if r.get("canary")] == ["PASS"]
    assert len([r for r in merged if r["type"] == "case"]) == 1

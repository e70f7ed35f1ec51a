"""Nothing lost: a run killed part-way leaves a valid partial report, and --resume finishes it
with a report equal to an uninterrupted run (timestamps and durations aside)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.reports.store import StreamError, open_stream, read_stream, repair_stream

ROOT = Path(__file__).resolve().parent.parent
CASES = [f"b=1,hq=4,hkv=2,lq={n},d=32" for n in (16, 32, 48, 64)]
ARGS = ["run", "--device", "cpu", "--quiet", *(x for c in CASES for x in ("--case", c)),
        "--impl", "sdpa-math", "--impl", "tests.faulty_kernels:gated"]
VOLATILE_SETTINGS = ("command", "started", "finished")


def _results(stream: Path) -> list[dict]:
    return [r for r in read_stream(stream) if r.get("type") == "result"]


def _stable(report: dict) -> dict:
    """The report without what legitimately differs between two runs: wall-clock times and the command."""
    report = json.loads(json.dumps(report))
    for key in VOLATILE_SETTINGS:
        report["settings"].pop(key, None)
    for r in report["results"]:
        r.pop("seconds")
    for c in report["cases"].values():
        c.pop("oracle_seconds")
    return report


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_report_of_an_uninterrupted_run(tmp_path, monkeypatch):
    gate = tmp_path / "gate"
    monkeypatch.setenv("GQA_TEST_GATE", str(gate))
    monkeypatch.chdir(ROOT)
    part = tmp_path / "part"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *ARGS, "--out", str(part)], cwd=ROOT,
                            env={**os.environ, "GQA_TEST_GATE": str(gate)}, stderr=subprocess.PIPE, text=True)
    stream = part / "cpu-x86_64.jsonl"
    deadline = time.monotonic() + 600  # a guard against a wedged test, not a measurement
    while not (stream.exists() and len(_results(stream)) >= 5):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # the gated kernel is blocked on the third case: kill it there
    assert proc.wait(120) == 130
    partial = json.loads((part / "cpu-x86_64.json").read_text())
    assert partial["summary"]["results"] == 5  # a valid partial report: the five results that finished

    gate.touch()
    assert main([*ARGS, "--out", str(part), "--resume"]) == 0
    done = [(r["case_id"], r["impl"]) for r in _results(stream)]
    assert len(done) == len(set(done)) == 9  # nothing ran twice: 4 cases x 2 implementations + the canary

    full = tmp_path / "full"
    assert main([*ARGS, "--out", str(full), "--in-process"]) == 0
    resumed = json.loads((part / "cpu-x86_64.json").read_text())
    uninterrupted = json.loads((full / "cpu-x86_64.json").read_text())
    assert _stable(resumed) == _stable(uninterrupted)


def _line(case_id: str, status: str = "PASS") -> str:
    return json.dumps({"type": "result", "case_id": case_id, "impl": "x", "status": status, "tensors": {}})


def test_a_torn_last_line_is_cut_before_appending(tmp_path):
    stream = tmp_path / "s.jsonl"
    stream.write_text(_line("a") + '\n{"type": "result", "case_')
    repair_stream(stream)
    assert stream.read_text() == _line("a") + "\n"
    sink, resumed = open_stream(stream, {"device_label": "cpu-x86_64"}, resume=True)
    sink(json.loads(_line("b")))
    sink.close()
    assert [r["case_id"] for r in read_stream(stream)] == ["a", "b"]
    assert [r["case_id"] for r in resumed.records] == ["a"] and resumed.skipped == []


def test_resume_validates_every_line_and_names_those_it_passes_over(tmp_path):
    stream = tmp_path / "s.jsonl"
    stream.write_bytes(b"\n".join([_line("a").encode(), _line("b", "BOGUS").encode(), b'{"type": "result"}', b"[1, 2]",
                                    b"null", b"\xff\xfe not utf-8", _line("c").encode()]) + b"\n")
    sink, resumed = open_stream(stream, {"device_label": "cpu-x86_64"}, resume=True)
    sink.close()
    assert [r["case_id"] for r in resumed.records] == ["a", "c"]
    assert [s.split(":")[0] for s in resumed.skipped] == ["line 2", "line 3", "line 4", "line 5", "line 6"]
    assert "BOGUS" in resumed.skipped[0]


def test_resume_refuses_another_plan_in_one_line_unless_forced(tmp_path):
    stream = tmp_path / "s.jsonl"
    first = {"cases": ["c1", "c2"], "implementations": ["sdpa-math"], "repeat": 1}
    sink, _ = open_stream(stream, {"device_label": "cpu-x86_64"}, resume=False, plan=first)
    sink.close()
    other = {**first, "cases": ["c1", "c3"]}
    with pytest.raises(StreamError) as info:
        open_stream(stream, {"device_label": "cpu-x86_64"}, resume=True, plan=other)
    assert "another plan (cases: 1 dropped (e.g. c2), 1 added (e.g. c3))" in str(info.value)
    assert "\n" not in str(info.value)
    sink, resumed = open_stream(stream, {"device_label": "cpu-x86_64"}, resume=True, plan=other, force=True)
    sink.close()
    assert resumed.forced and read_stream(stream)[-1]["resumed_over"] == resumed.forced


def test_a_fresh_run_replaces_the_stream_and_resume_keeps_it(tmp_path):
    stream = tmp_path / "s.jsonl"
    stream.write_text('{"type": "result", "case_id": "a", "impl": "x"}\n')
    sink, resumed = open_stream(stream, {"device_label": "cpu-x86_64"}, resume=False)
    sink.close()
    assert resumed.records == [] and [r["type"] for r in read_stream(stream)] == ["run"]
    sink, resumed = open_stream(stream, {"device_label": "cpu-x86_64"}, resume=True)
    sink.close()
    assert [r["type"] for r in resumed.records] == ["run"] and len(read_stream(stream)) == 1


def _disk_fills_at(size: int):
    """For the child: files stop growing at `size` bytes, as on a full disk (EFBIG where ENOSPC would be)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


def test_a_full_disk_is_one_line_leaves_no_cut_report_and_resume_finishes_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = [*ARGS[:-2], "--out"]  # sdpa-math only: no gate
    part, full = tmp_path / "part", tmp_path / "full"
    proc = subprocess.run([sys.executable, "-m", "harness.cli", *args, str(part)], cwd=ROOT, capture_output=True,
                          text=True, preexec_fn=_disk_fills_at(12_000))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "cannot write" in proc.stderr and "--resume" in proc.stderr
    assert not (part / "cpu-x86_64.json").exists()  # no cut-off report: the whole file or none
    assert 0 < len(_results(part / "cpu-x86_64.jsonl")) < 5  # what was written is kept
    assert main([*args, str(part), "--resume"]) == 0
    assert main([*args, str(full), "--in-process"]) == 0  # the reference: isolation changes no report field
    resumed, uninterrupted = (json.loads((d / "cpu-x86_64.json").read_text()) for d in (part, full))
    assert _stable(resumed) == _stable(uninterrupted)

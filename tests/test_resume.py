"""Nothing lost: a run killed part-way leaves a valid partial report, and --resume finishes it
with a report equal to an uninterrupted run (timestamps and durations aside)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.reports.store import open_stream, read_stream, repair_stream

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


def test_a_torn_last_line_is_cut_before_appending(tmp_path):
    stream = tmp_path / "s.jsonl"
    stream.write_text('{"type": "result", "case_id": "a", "impl": "x"}\n{"type": "result", "case_')
    repair_stream(stream)
    assert stream.read_text() == '{"type": "result", "case_id": "a", "impl": "x"}\n'
    sink, done = open_stream(stream, {"device_label": "cpu-x86_64"}, resume=True)
    sink({"type": "result", "case_id": "b", "impl": "x"})
    sink.close()
    assert [r["case_id"] for r in read_stream(stream)] == ["a", "b"] and done == {("a", "x")}


def test_a_fresh_run_replaces_the_stream_and_resume_keeps_it(tmp_path):
    stream = tmp_path / "s.jsonl"
    stream.write_text('{"type": "result", "case_id": "a", "impl": "x"}\n')
    sink, done = open_stream(stream, {"device_label": "cpu-x86_64"}, resume=False)
    sink.close()
    assert done == set() and [r["type"] for r in read_stream(stream)] == ["run"]
    sink, done = open_stream(stream, {"device_label": "cpu-x86_64"}, resume=True)
    sink.close()
    assert done == set() and len(read_stream(stream)) == 1

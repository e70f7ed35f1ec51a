"""Resume equivalence as a property: a run SIGKILLed at any point (between results, inside a case, while
FAILs are being re-run alone for the order check) and resumed gives the report an uninterrupted run
gives, statuses and order diagnoses included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from harness.cli import main
from harness.reports.store import read_stream
from tests.test_resume import _stable

ROOT = Path(__file__).resolve().parent.parent
# two GQA cases and a layout sibling: tiled_kv_heads fails every GQA case, so the run ends with order checks
CASES = ["b=1,hq=4,hkv=2,lq=16,d=32", "b=1,hq=4,hkv=2,lq=16,d=32,layout=blhd", "b=1,hq=4,hkv=2,lq=24,d=32"]
ARGS = ["run", "--device", "cpu", "--quiet", *(x for c in CASES for x in ("--case", c)),
        "--impl", "sdpa-math", "--impl", "tests.wrong_kernels:tiled_kv_heads"]
LABEL = "cpu-x86_64"


def _records(stream: Path) -> list[dict]:
    try:
        return read_stream(stream)
    except Exception:  # a torn line while the run writes: read again later
        return []


def _order_checked(records: list[dict]) -> int:
    return sum(1 for r in records if r.get("type") == "result" and "order" in (r.get("notes") or {}))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("full")
    main([*ARGS, "--out", str(out)])
    report = json.loads((out / f"{LABEL}.json").read_text())
    records = read_stream(out / f"{LABEL}.jsonl")
    assert _order_checked(records) > 0, "the plan must reach the order checks for this property to mean anything"
    return {"report": _stable(report), "records": len(records),
            "lines": (out / f"{LABEL}.jsonl").read_text().splitlines(keepends=True),
            "before_order": next(i for i, r in enumerate(records)
                                 if r.get("type") == "result" and "order" in (r.get("notes") or {}))}


def _kill_after(out: Path, lines: int) -> None:
    """Start the run and SIGKILL it once its stream holds `lines` records (or it ends first)."""
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *ARGS, "--out", str(out)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    stream = out / f"{LABEL}.jsonl"
    deadline = time.monotonic() + 600  # a guard against a wedged test, not a measurement
    while proc.poll() is None and time.monotonic() < deadline:
        if stream.exists() and len(_records(stream)) >= lines:
            break
        time.sleep(0.02)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, as a runner's OOM killer or timeout would
    proc.wait(60)


def _resume(out: Path) -> dict:
    assert main([*ARGS, "--out", str(out), "--resume"]) in (0, 1)
    return _stable(json.loads((out / f"{LABEL}.json").read_text()))


@pytest.mark.slow
@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(where=st.floats(min_value=0.0, max_value=1.0), torn=st.booleans())
@example(where=-1.0, torn=False)  # right after the first FAIL's order note, before its layout sibling's
@example(where=-2.0, torn=True)  # inside the next order note's line
def test_a_stream_cut_after_any_record_resumes_to_the_uninterrupted_report(uninterrupted, tmp_path_factory,
                                                                         where, torn):
    """A kill leaves a prefix of the stream, maybe with half a line: each prefix resumes to the same report.
    Cutting the uninterrupted stream reaches every point exactly, those a timed kill rarely hits included: the
    kill after the first order note gave a FAIL "the same failure as" itself (fixed with recorded notes)."""
    lines = uninterrupted["lines"]
    k = {-1.0: uninterrupted["before_order"] + 1, -2.0: uninterrupted["before_order"] + 1}.get(
        where, int(where * len(lines)))
    out = tmp_path_factory.mktemp("cut")
    cut = "".join(lines[:k]) + (lines[k][: len(lines[k]) // 2] if torn and k < len(lines) else "")
    (out / f"{LABEL}.jsonl").write_text(cut)
    assert _resume(out) == uninterrupted["report"]


@pytest.mark.slow
def test_a_run_sigkilled_while_a_fail_is_re_run_alone_resumes_to_the_uninterrupted_report(uninterrupted,
                                                                                        tmp_path_factory):
    """A real SIGKILL of the run and its workers (as an OOM killer or a runner's timeout sends) in the order check."""
    out = tmp_path_factory.mktemp("killed")
    _kill_after(out, uninterrupted["before_order"])
    assert _resume(out) == uninterrupted["report"]

"""Reliability, round two: a kernel cannot poison later results or pass by detaching its output, a
user module cannot end the run at import, an interrupted run says it is partial, a cut order check is
redone on --resume, a worker dies with its parent, and a repro counts only when its BUG line says so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from harness.cli import main
from harness.core.case import Case
from harness.core.results import Status
from harness.implementations import RegistryError, builtin_implementations
from harness.implementations.user import load_user_implementation
from harness.reports.report import build_report, render_markdown
from harness.repro.issue import script_reproduces
from harness.run.plan import RunPlan, resume_done
from harness.run.session import CaseRunner

from .helpers import session

CASE = Case(batch=1, q_heads=4, kv_heads=2, q_len=16, kv_len=16, head_dim=32)


def _run(name: str, isolate: bool = False):
    with CaseRunner(session(), isolate=isolate) as runner:
        return runner.run(CASE, load_user_implementation(f"tests.faulty_kernels:{name}")), runner


@pytest.mark.parametrize("isolate", [False, True])
def test_a_kernel_that_changes_process_state_fails_by_rule_global_state_and_the_state_is_put_back(isolate):
    result, _ = _run("flips_math_reduction", isolate)
    assert result.status is Status.FAIL and result.error_kind == "global-state"
    assert "fp16_bf16_reduction_math_sdp False → True" in result.error
    assert not torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    with CaseRunner(session()) as runner:  # the next result in the process is judged as before
        assert runner.run(CASE, builtin_implementations()["sdpa-math"]).status is Status.PASS


def test_a_detached_output_is_a_contract_failure_of_every_gradient():
    result, _ = _run("detached")
    assert result.status is Status.FAIL
    assert {n: (v.rule, v.status) for n, v in result.tensors.items() if n != "out"} == {
        n: ("contract", Status.FAIL) for n in ("dq", "dk", "dv")}
    assert "no autograd graph" in result.tensors["dq"].reason


def test_a_wrong_output_shape_fails_the_contract_with_its_reason_not_an_empty_error():
    result, _ = _run("wrong_shape")
    assert result.status is Status.FAIL and result.tensors["out"].rule == "contract"
    assert "has shape" in result.tensors["out"].reason and "not run" in result.tensors["dq"].reason


def test_a_user_module_that_exits_at_import_is_a_one_line_error_not_the_end_of_the_run():
    with pytest.raises(RegistryError, match="SystemExit"):
        load_user_implementation("tests.exits_at_import:f")
    with pytest.raises(RegistryError, match="Python identifiers"):
        load_user_implementation("tests.faulty_kernels:bad|<script>")


def test_an_interrupted_run_says_it_is_partial_and_whether_the_canary_ran():
    records = [{"type": "case", "case_id": "c", "case": {"dtype": "bf16"}, "spec": "b=1"}]
    partial = {"reason": "stopped before the end (Ctrl-C, SIGTERM or a time limit)", "planned": 10, "results": 0,
               "canary_ran": False}
    text = render_markdown(build_report(records, {"device": "cpu"}, {"partial": partial, "unavailable": {}}))
    assert "**PARTIAL REPORT**" in text and "0 of 10 results; the canary did not run" in text


def test_a_fail_whose_order_check_was_cut_off_runs_again_with_its_layout_siblings():
    siblings = (CASE, CASE.replace(layout="grad-out-noncontig"))
    other = CASE.replace(seed=3)
    plan = RunPlan(cases=(*siblings, other), impls=(builtin_implementations()["sdpa-math"],), isolate=True)

    def result(case, status, checked=False):
        return {"type": "result", "case_id": case.id, "impl": "sdpa-math", "status": status,
                "notes": {"order": {"checked": True}} if checked else {}}

    cut = [result(siblings[0], "PASS"), result(siblings[1], "FAIL"), result(other, "PASS")]
    assert resume_done(plan, cut) == {(other.id, "sdpa-math")}
    checked = [*cut[:1], result(siblings[1], "FAIL", checked=True), cut[2]]
    assert len(resume_done(plan, checked)) == 3


def test_a_worker_dies_with_its_parent_even_while_a_kernel_hangs(tmp_path):
    parent = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from harness.core.case import Case
        from harness.run.worker import Worker
        w = Worker("cpu", timeout=600.0, log_dir={str(tmp_path)!r})
        w.start()
        print(w.pid, flush=True)
        w.call(Case(1, 2, 1, 8, 8, 8), "tests.faulty_kernels:hang")
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    worker_pid = int(proc.stdout.readline())
    time.sleep(1.0)  # the kernel is hanging now
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(worker_pid):
        time.sleep(0.2)
    assert not _alive(worker_pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_repro_counts_only_with_its_bug_line():
    assert script_reproduces(1, "tensor 3.2\nBUG: dq is beyond what a correct kernel reaches")
    assert not script_reproduces(1, 'File "repro.py", line 3\nSyntaxError: invalid syntax')
    assert not script_reproduces(0, "OK: dq is within what a correct kernel reaches")


def test_an_errored_canary_is_said_and_fails_the_run():
    results = [{"type": "result", "case_id": "c", "impl": "canary-tiled-kv", "status": "ERROR", "error": "boom",
                "error_kind": "exception", "canary": True, "tensors": {}, "notes": {}}]
    report = build_report(results, {"device": "cpu"}, {"unavailable": {}})
    assert "## CANARY ERRORED" in render_markdown(report)


@pytest.mark.parametrize("argv, fragment", [
    (["run", "--case", "b=1,hq=2,hkv=1,lq=8,d=8,scale=inf"], "positive finite"),
    (["run", "--case", "b=1,hq=2,hkv=1,lq=8,d=8,scale=1e400"], "positive finite"),
    (["run", "--case", "b=1,hq=2,hkv=1,lq=8,d=8,d=16"], "head_dim twice"),
    (["run", "--case", "b=1,batch=2,hq=2,hkv=1,lq=8,d=8"], "batch twice"),
    (["run", "--case", "b=1,hq=2,hkv=1,lq=1000000000000,d=8"], "beyond any machine"),
    (["run", "--case", "b=1,hq=2,hkv=1,lq=8,d=8", "--timeout", "inf"], "--timeout inf"),
    (["run", "--case", "b=1,hq=2,hkv=1,lq=8,d=8", "--timeout", "1e300"], "--timeout"),
    (["known", "--days", "-1"], "--days -1"),
    (["known", "--file", "/nonexistent/known.toml"], "no such known-failures file"),
])
def test_bad_input_is_one_line_and_exit_2(argv, fragment, capsys, tmp_path):
    assert main([*argv, *(["--out", str(tmp_path / "o")] if argv[0] == "run" else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and "Traceback" not in err


def test_bad_files_are_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "suite.toml").write_bytes(b"\xff\xfe[[case]]")
    (tmp_path / "float.toml").write_text("[[case]]\nb = 1.5\nhq = 2\nhkv = 1\nlq = 8\nd = 8\n")
    (tmp_path / "file").write_text("")
    for argv, fragment in ((["known", str(tmp_path / "bad.json")], "not a JSON report"),
                           (["run", "--suite", str(tmp_path / "suite.toml")], "not UTF-8"),
                           (["run", "--suite", str(tmp_path / "float.toml")], "batch=1.5 must be an integer"),
                           (["run", "--case", "b=1,hq=2,hkv=1,lq=8,d=8", "--out", str(tmp_path / "file")], "cannot write")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert fragment in err and "\n" not in err, err


def test_text_from_kernels_cannot_break_a_table_or_inject_html():
    from harness.reports.explain import cell

    hostile = "ValueError: a|b <script>alert(1)</script> <img onerror=x>\nsecond line"
    safe = cell(hostile)
    assert "|" not in safe.replace("\\|", "") and "<script>" not in safe and "<img" not in safe and "\n" not in safe

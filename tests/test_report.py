"""Report: gross failures first, exit status rules (KNOWN, --strict, a canary that passes)."""

from __future__ import annotations

import warnings

from harness.core.case import Case
from harness.run.execute import refusal_reason, run_implementation
from harness.implementations import builtin_implementations
from harness.core.inputs import make_inputs
from harness.reports.report import build_report, exit_status, failure_rows, render_markdown


def _tensor(status, severity="", excess=None, rule="tensor"):
    return {"status": status, "rule": rule, "reason": f"{status} reason", "severity": severity, "excess": excess,
            "known_entry": "", "failing_heads": [[0, 1]], "metrics": None}


def _result(case_id, impl, status, tensors=None, canary=False):
    return {"type": "result", "case_id": case_id, "impl": impl, "status": status, "error": "", "error_kind": "",
            "notes": {}, "seconds": 0.1, "canary": canary, "tensors": tensors or {}}


def _report(results):
    records = [{"type": "case", "case_id": "c1", "case": {"dtype": "bf16"}, "spec": "b=1", "input_sha256": {}}]
    return build_report(records + results, {"device": "cpu", "device_label": "cpu-x86_64"}, {"unavailable": {}})


def test_gross_failures_are_listed_before_subtle_ones_whatever_their_ratio():
    report = _report([
        _result("c1", "subtle", "FAIL", {"dk": _tensor("FAIL", "beyond", 40.0)}),
        _result("c1", "gross", "FAIL", {"out": _tensor("FAIL", "gross", 3.0)}),
        _result("c1", "canary-tiled-kv", "FAIL", {"out": _tensor("FAIL", "gross", 9.0)}, canary=True),
    ])
    rows = failure_rows(report)
    assert [r["impl"] for r in rows] == ["gross", "subtle"]  # the canary is reported apart
    markdown = render_markdown(report)
    assert markdown.index("## Failures") < markdown.index("## Canary")


def test_exit_status_counts_known_only_under_strict_and_a_passing_canary_fails_the_run():
    canary_fail = _result("c1", "canary-tiled-kv", "FAIL", canary=True)
    known = _report([_result("c1", "x", "KNOWN", {"dk": _tensor("KNOWN", "beyond", 1.5)}), canary_fail])
    assert exit_status(known) == 0 and exit_status(known, strict=True) == 1
    canary_pass = _report([_result("c1", "x", "PASS"), _result("c1", "canary-tiled-kv", "PASS", canary=True)])
    assert exit_status(canary_pass) == 1
    assert "CANARY PASSED" in render_markdown(canary_pass)
    errors = _report([_result("c1", "x", "ERROR"), canary_fail])
    assert exit_status(errors) == 1


def test_refusal_is_recognised_with_torchs_warning_as_the_reason():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("Flash attention requires q, k, v to have the same last dimension")
        reason = refusal_reason(RuntimeError("No available kernel. Aborting execution."), caught)
    assert reason == "Flash attention requires q, k, v to have the same last dimension"
    assert refusal_reason(ValueError("boom"), []) is None


def test_sdpa_default_records_the_backend_dispatch_chose():
    outputs = run_implementation(builtin_implementations()["sdpa-default"], make_inputs(Case(1, 4, 2, 8, 8, 16)), "cpu")
    assert outputs.notes["dispatch"] in ("FLASH_ATTENTION", "MATH")


def test_a_result_returned_on_the_wrong_device_is_a_contract_failure():
    import torch

    from harness.core.verdict import contract_problem

    t = torch.zeros(2, 3)
    assert contract_problem("out", t, (2, 3), torch.float32, "cuda:0", produced_on="cuda:0") is None
    assert contract_problem("out", t, (2, 3), torch.float32, "cuda:0", produced_on="cpu") == "out is on cpu, expected cuda:0"
    assert contract_problem("out", t, (2, 3), torch.float32, "cpu") is None

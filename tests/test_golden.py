"""Golden Markdown: what a kernel engineer reads for a NaN failure, an order-dependent failure, a bug
reached through aliases, each known-failure state, and a compare summary. The reports are built by
hand (fixed numbers), so the files change only when the wording does.
Regenerate after an intended change: GQA_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py"""

from __future__ import annotations

import os
from pathlib import Path

from harness.reports.compare import build_matrix, render_matrix
from harness.reports.report import build_report, render_markdown
from harness.reports.store import write_report

GOLDEN = Path(__file__).parent / "golden"
CASE = {"batch": 2, "q_heads": 8, "kv_heads": 2, "q_len": 128, "kv_len": 128, "head_dim": 64, "dtype": "bf16"}
CASE_ID, SPEC = "b2-h8x2-q128-k128-d64-bf16-s0", "b=2,hq=8,hkv=2,lq=128,lk=128,d=64"
TOL = {"levels": {"bf16": {"tensor": {"factor": 2.0}, "slice": {"factor": 2.5}, "row": {"factor": 5.0}}}}
FP = {"device": "cuda:0", "device_label": "cuda-sm_90", "device_name": "NVIDIA H200", "torch": "2.11.0+cu130",
      "cuda": "13.0", "hip": None, "cudnn": 91900, "harness": "0.1.0"}


def _level(ratio, truth=10.0, err=None):
    err = ratio * 0.05 if err is None else err
    return {"ratio": ratio, "err": err, "truth": truth, "floor": 0.04, "lowprec": 0.05, "rel_err": err / truth,
            "index": [0, 1], "count": 8192}


def _tensor(status, rule, ratio, *, severity="beyond", known="", nonfinite=None, heads=((0, 1),), reason=""):
    metrics = {"levels": {lv: _level(ratio) for lv in ("tensor", "slice", "row")},
               "slice_ratio": [[ratio] * 8, [1.0] * 8], "nan": 0, "inf": 0,
               "worst": {"index": [0, 1, 5, 3], "actual": 1.25, "oracle": 0.5}, "nonfinite_where": {}}
    if nonfinite:
        metrics.update(nan=nonfinite, worst=None, nonfinite_where={
            "count": nonfinite, "fraction": nonfinite / 16384, "first_index": [0, 0, 0, 0], "rows": "0-127",
            "heads": [[b, h] for b in range(2) for h in range(8)]})
        heads = tuple((b, h) for b in range(2) for h in range(8))
    return {"status": status, "rule": rule, "reason": reason or f"{rule} failure", "severity": severity,
            "excess": None if severity == "gross" else ratio / 2.0, "known_entry": known,
            "failing_heads": [list(h) for h in heads], "metrics": metrics}


def _result(impl, status, tensors, notes=None):
    return {"type": "result", "case_id": CASE_ID, "impl": impl, "status": status, "error": "", "error_kind": "",
            "notes": notes or {}, "seconds": 0.1, "canary": False, "tensors": tensors}


def _report(results, known_entries=(), fp=FP):
    case = {"type": "case", "case_id": CASE_ID, "case": CASE, "spec": SPEC, "input_sha256": {"q": "ab" * 32}}
    return build_report([case, *results], fp, {"tolerances": TOL, "unavailable": {}, "known_entries": list(known_entries)})


def _failures(markdown: str) -> str:
    """From the Failures heading to the next top-level section."""
    start = markdown.index("## Failures")
    end = markdown.index("\n## ", start + 1)
    return markdown[start:end].rstrip() + "\n"


def _section(markdown: str, heading: str) -> str:
    start = markdown.index(heading)
    end = markdown.find("\n## ", start + 1)
    return markdown[start:end if end > 0 else None].rstrip() + "\n"


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("GQA_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; rerun with GQA_UPDATE_GOLDEN=1 if the change is intended"


def test_a_nan_failure_says_how_many_where_and_the_first_index():
    nan = _tensor("FAIL", "nonfinite", 0.0, severity="gross", nonfinite=16384,
                  reason="dq: 16384 NaN and 0 Inf where the oracle is finite")
    report = _report([_result("sdpa-cudnn", "FAIL", {"dq": nan})])
    assert_golden("nan_failure.md", _failures(render_markdown(report)))


def test_aliases_of_one_backend_are_one_bug():
    dq = _tensor("FAIL", "tensor", 40.0)
    report = _report([_result("sdpa-cudnn", "FAIL", {"dq": dq, "dk": _tensor("FAIL", "slice", 12.0, heads=((0, 0),))}),
                      _result("sdpa-default", "FAIL", {"dq": dq}, {"dispatch": "CUDNN_ATTENTION"}),
                      _result("expanded-kv-cudnn", "FAIL", {"dq": dq}),
                      _result("sdpa-flash", "FAIL", {"out": _tensor("FAIL", "row", 7.0)})])
    assert_golden("aliased_backend.md", _failures(render_markdown(report)))


def test_an_order_dependent_failure_reproduces_by_its_replay():
    replay = (f"gqa-harness replay --device cuda:0 --call '{SPEC},layout=v-noncontig@sdpa-cudnn' "
              f"--call '{SPEC}@sdpa-cudnn'")
    order = {"checked": True, "alone": "PASS", "order_dependent": True, "replay": replay,
             "summary": f"order-dependent: passes alone, fails after {CASE_ID} sdpa-cudnn"}
    report = _report([_result("sdpa-cudnn", "FAIL", {"dq": _tensor("FAIL", "tensor", 9.0)}, {"order": order})])
    markdown = render_markdown(report)
    assert_golden("order_dependent.md", _failures(markdown) + "\n" + _section(markdown, "## Order dependence"))


def test_each_known_failure_state_is_true():
    long = "cuDNN 9.19 dQ is wrong on bottom-right causal rows; " * 6
    known = _tensor("KNOWN", "tensor", 3.0, known="absorbed-entry", reason=f"known (absorbed-entry): {long}")
    beyond = _tensor("FAIL", "tensor", 30.0, known="beyond-entry", reason="30x (worse than its known-failure ceiling)")
    fixed = _tensor("PASS", "", 0.9, known="fixed-entry", severity="")
    report = _report([_result("sdpa-cudnn", "FAIL", {"dq": known, "dk": beyond, "dv": fixed})],
                     known_entries=("absorbed-entry", "beyond-entry", "fixed-entry", "idle-entry"))
    markdown = render_markdown(report)
    assert_golden("known_states.md", _section(markdown, "## Known failures") + "\n"
                  + _section(markdown, "## Known-failure entries"))


def test_compare_leads_with_a_device_by_implementation_summary(tmp_path):
    cpu_fp = {**FP, "device": "cpu", "device_label": "cpu-x86_64", "device_name": "x86_64", "torch": "2.13.0+cpu",
              "cuda": None, "cudnn": None}
    ok = _tensor("PASS", "", 1.1, severity="")
    cpu = _report([_result("sdpa-math", "PASS", {"dq": ok}), _result("sdpa-default", "PASS", {"dq": ok},
                                                                      {"dispatch": "FLASH_ATTENTION"})], fp=cpu_fp)
    gpu = _report([_result("sdpa-math", "PASS", {"dq": ok}),
                   _result("sdpa-default", "FAIL", {"dq": _tensor("FAIL", "tensor", 40.0)},
                           {"dispatch": "CUDNN_ATTENTION"})])
    paths = [write_report(tmp_path / name, r, "").with_suffix(".json") for name, r in (("cpu", cpu), ("gpu", gpu))]
    text = render_matrix(build_matrix(paths)).replace(str(tmp_path), "TMP")
    assert_golden("compare_summary.md", _section(text, "## Summary"))

"""Calibration: the JSON shape the tolerance file cites, and the summaries that read it."""

from __future__ import annotations

import json
from dataclasses import replace as dc_replace
import pytest
import torch

from harness.lab.audit import AUDIT_SEED_BASE
from harness.lab.calibrate import (AXES, CALIBRATION_SEED_BASE, SCHEMA, GridCase, axis_grid, axis_value,
                               build_calibration, calibration_plan, level_ratios, margins, run_calibration,
                               trends)
from harness.core.case import Case
from harness.cli import main
from harness.core.known import KnownFailure
from harness.implementations.user import implementation_from_callable
from harness.lab.calibrate import kernel_samples
from tests import wrong_kernels
from tests.helpers import cached_references, session
from harness.run.env import device_facts, fingerprint
from harness.run.session import Session
from harness.core.metrics import LEVELS
from harness.core.verdict import load_tolerances

TINY = Case(1, 4, 1, 32, 32, 16, "bf16")


def _row(source: str, kind: str, g: int, ratio: float, tensor: str = "dk") -> dict:
    return {"case_id": f"g{g}", "source": source, "kind": kind, "dtype": "bf16", "tensor": tensor, "group_size": g,
            "length": 128, "kv_len": 128, "head_dim": 64, "batch_heads": 16, "causal": "none",
            "axes": ["group_size"], "ratio": {"tensor": ratio, "slice": ratio, "row": ratio}, "vs_floor": ratio}


def test_calibration_seeds_are_distinct_from_the_audits_and_the_suites():
    plan = calibration_plan([GridCase(TINY, ("group_size",))], [TINY.replace(seed=0)], seeds=5)
    seeds = {case.seed for case, _, _ in plan}
    assert seeds == set(range(CALIBRATION_SEED_BASE, CALIBRATION_SEED_BASE + 5))
    assert max(seeds) < AUDIT_SEED_BASE and 0 not in seeds


def test_each_grid_line_varies_only_its_own_axis():
    grid = axis_grid()
    for axis in AXES:
        line = [g.case for g in grid if axis in g.axes]
        assert len({axis_value(c, axis) for c in line}) >= 4, axis
        for other in AXES:
            if other != axis and not (axis == "batch_heads" and other == "group_size"):
                assert len({axis_value(c, other) for c in line}) == 1, (axis, other)


def test_a_ratio_growing_like_sqrt_group_has_slope_one_half_and_a_flat_one_slope_zero():
    rows = [_row("bad", "counter-example", g, 0.83 * g**0.5) for g in (1, 2, 4, 8, 16)]
    rows += [_row("good", "kernel", g, 1.2) for g in (1, 2, 4, 8, 16)]
    slopes = {t["source"]: t["slope"] for t in trends(rows) if t["axis"] == "group_size" and t["tensors"] == "dk+dv"}
    assert slopes["bad"] == pytest.approx(0.5)
    assert slopes["good"] == pytest.approx(0.0)


def test_margins_never_count_a_counter_example_as_a_correct_kernel():
    tol = load_tolerances()
    rows = [_row("good", "kernel", 4, 1.3), _row("design:x", "design", 4, 0.9), _row("bad", "counter-example", 16, 9.0)]
    tensor = next(m for m in margins(rows, tol) if m["level"] == "tensor")
    assert tensor["kernel_max"] == 1.3 and tensor["design_max"] == 0.9
    assert tensor["margin"] == pytest.approx(tol.rule("bf16", "tensor").factor / 1.3)


def test_levels_the_verdict_would_not_judge_have_no_ratio():
    from harness.core.references import references

    refs = references(TINY.replace(seed=CALIBRATION_SEED_BASE))
    from harness.core.metrics import tensor_metrics

    m = tensor_metrics("out", refs.lowprec["out"][0], refs.oracle["out"], refs.lowprec["out"][1:], refs.inputs)
    ratios = level_ratios(m, "bf16", load_tolerances())
    assert ratios["row"] is None  # head dim 16 < the row level's min_count
    assert ratios["tensor"] is not None and ratios["tensor"] > 0


def test_calibration_json_has_the_shape_the_tolerance_file_and_summary_read():
    tol = load_tolerances()
    grid = [GridCase(TINY.replace(kv_heads=4), ("group_size",)), GridCase(TINY, ("group_size",))]
    plan = calibration_plan(grid, [TINY.replace(causal="top-left", q_heads=2)], seeds=1)
    rows, errors = run_calibration(plan, Session.open("cpu"))
    report = build_calibration(rows, errors, fingerprint(device_facts("cpu")), tol, {"seeds": 1})
    json.dumps(report, allow_nan=False)
    assert report["schema"] == SCHEMA and report["device_label"] == "cpu-x86_64"
    assert {"fingerprint", "settings", "tolerances", "margins", "distribution", "trends", "errors", "samples"} <= set(report)
    sources = {r["source"] for r in report["samples"]}
    assert {"design:flash-fp32acc", "expanded-kv-flash", "sdpa-math"} <= sources
    assert "sdpa-flash" in sources  # at group size 1 only
    assert any(s.startswith("sdpa-flash [") for s in sources)  # the counter-example, at G = 4 on the grid
    assert not [r for r in report["samples"] if r["source"] == "sdpa-flash" and r["group_size"] != 1]
    sample = report["samples"][0]
    assert set(sample["ratio"]) == set(LEVELS) and {"dtype", "tensor", "kind", "axes", "group_size"} <= set(sample)
    dist = report["distribution"][0]
    assert {"dtype", "tensor", "level", "source", "device", "n", "max", "max_case", "p99", "p95", "median"} <= set(dist)
    assert {(m["dtype"], m["level"]) for m in report["margins"]} == {("bf16", lv) for lv in LEVELS}
    trend = report["trends"][0]
    assert {"axis", "source", "kind", "tensors", "bins", "slope"} <= set(trend)


def test_calibrate_command_writes_json_and_markdown(tmp_path, capsys):
    suite = tmp_path / "tiny.toml"
    suite.write_text("[[case]]\nb = 1\nhq = 2\nhkv = 1\nlq = 16\nd = 16\ndtype = 'bf16'\n")
    threads = torch.get_num_threads()
    try:
        code = main(["calibrate", "--device", "cpu", "--no-grid", "--suite", str(suite), "--seeds", "1",
                     "--out", str(tmp_path / "cal"), "--quiet"])
    finally:
        torch.set_num_threads(threads)  # calibrate pins torch's threads for the process
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "cal" / "cpu.json").read_text())
    assert report["settings"]["suites"] == [str(suite)] and report["settings"]["first_seed"] == CALIBRATION_SEED_BASE
    assert "## Factors and margins" in (tmp_path / "cal" / "cpu.md").read_text()


def test_calibrate_rejects_a_bad_seed_count_in_one_line(capsys):
    assert main(["calibrate", "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--seeds" in err


def test_a_kernel_tensor_a_known_entry_absorbs_is_a_counter_example_not_a_correct_kernel():
    case = Case(batch=1, q_heads=32, kv_heads=1, q_len=128, kv_len=128, head_dim=64)  # group size 32: dK/dV fail
    impl = implementation_from_callable(wrong_kernels.bf16_group_sum, "group-sum-kernel")
    entry = KnownFailure(id="recorded-bug", case=("*",), impl=("group-sum-kernel",), tensors=("dk", "dv"), device="*",
                         torch="*", max_ratio=1e9, max_slice_ratio=1e9, max_row_ratio=1e9, evidence="test",
                         cite=("reports/findings/x",))
    plain, _ = kernel_samples(cached_references(case), impl, session())
    known, _ = kernel_samples(cached_references(case), impl, dc_replace(session(), known=(entry,)))
    assert {t: k for t, _, k in plain} == {"out": None, "dq": None, "dk": None, "dv": None}
    assert {t: k for t, _, k in known} == {"out": None, "dq": None, "dk": "recorded-bug", "dv": "recorded-bug"}

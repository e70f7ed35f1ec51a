"""False-alarm audit: known-good kernels and leave-one-out designs, margin = factor / largest ratio."""

from __future__ import annotations

import json

import torch

from harness.lab.audit import (AUDIT_SEED_BASE, audit_cases, audit_report, known_good, render_audit, run_audit,
                           summary)
from harness.core.case import Case
from harness.cli import main
from harness.implementations import DeviceFacts
from harness.core.lowprec import designs

from .helpers import CPU, session, tolerances

SMALL = Case(batch=1, q_heads=4, kv_heads=2, q_len=32, kv_len=32, head_dim=64)
MHA = SMALL.replace(kv_heads=4)


def test_audit_seeds_are_distinct_from_the_suites_and_calibration():
    cases = audit_cases([SMALL, MHA], seeds=3)
    assert [c.seed for c in cases] == [AUDIT_SEED_BASE + i for i in range(3)] * 2
    assert {c.replace(seed=0) for c in cases} == {SMALL, MHA}


def test_native_cpu_flash_is_known_good_only_without_gqa():
    assert known_good(CPU, MHA) == ["expanded-kv-flash", "sdpa-flash"]
    assert known_good(CPU, SMALL) == ["expanded-kv-flash"]  # its dK/dV group sum is a known CPU finding
    gpu = DeviceFacts(device="cuda:0", kind="cuda", name="H100", arch="sm_90")
    assert "sdpa-math" not in known_good(gpu, SMALL)  # math scores the floor and proves nothing


def test_the_audit_reports_the_margin_per_dtype_tensor_level_and_sources():
    tally = run_audit(audit_cases([MHA], seeds=1), session())
    sources = {s for s, _ in tally.by_source}
    assert {"expanded-kv-flash", "sdpa-flash"} <= sources
    assert {f"lowprec:{d.name}" for d in designs(torch.bfloat16)} <= sources
    rows = summary(tally, tolerances())
    assert {(r["tensor"], r["level"]) for r in rows} == {(t, lv) for t in ("out", "dq", "dk", "dv")
                                                       for lv in ("tensor", "slice", "row")}
    for r in rows:
        assert r["margin"] == r["factor"] / r["max_ratio"]
    report = audit_report(tally, tolerances(), {"device_label": "cpu-test", "torch": "x", "suite": "t", "seeds": 1,
                                                "first_seed": AUDIT_SEED_BASE, "seconds": 0.0})
    assert report["runs"] == 1 and report["min_margin"] == min(r["margin"] for r in rows)
    assert "| dtype" in render_audit(report)


def test_the_audit_can_raise_an_alarm_on_a_wrong_kernel():
    tally = run_audit(audit_cases([SMALL.replace(q_heads=8)], seeds=1), session(),
                      impl_names=["canary-tiled-kv"])
    assert any(a["source"] == "canary-tiled-kv" and a["status"] == "FAIL" for a in tally.alarms)
    assert max(p.ratio for p in tally.peaks.values()) > 10


def test_audit_command_writes_its_report(tmp_path, capsys):
    suite = tmp_path / "tiny.toml"
    suite.write_text("[[case]]\nb = 1\nhq = 2\nhkv = 2\nlq = 32\nd = 64\n")
    code = main(["audit", "--suite", str(suite), "--seeds", "2", "--out", str(tmp_path), "--quiet"])
    report = json.loads((tmp_path / "audit-cpu-x86_64.json").read_text())
    assert report["runs"] == 2 and report["settings"]["first_seed"] == AUDIT_SEED_BASE
    assert code == (1 if report["alarms"] else 0)
    assert "smallest margin" in capsys.readouterr().out
    assert main(["audit", "--seeds", "0"]) == 2


def test_kernels_and_designs_have_their_own_margins():
    tally = run_audit(audit_cases([MHA], seeds=1), session())
    both, kernels, designs_only = (summary(tally, tolerances(), k) for k in (None, "kernel", "design"))
    for row in both:
        parts = [r["max_ratio"] for r in kernels + designs_only
                 if (r["dtype"], r["tensor"], r["level"]) == (row["dtype"], row["tensor"], row["level"])]
        assert row["max_ratio"] == max(parts)
    assert {r["source"] for r in kernels} <= {"expanded-kv-flash", "sdpa-flash"}
    assert all(r["source"].startswith("lowprec:") for r in designs_only)

"""The pytest plugin: items per (case, implementation), xdist pinning, the merged report, same verdicts as run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from harness import plugin
from harness.cli import main
from harness.run import pinning
from harness.run.pinning import pinned_env, threads_per_worker, worker_index

REPO = Path(__file__).resolve().parent.parent
TINY = "b=2,hq=4,hkv=2,lq=24,lk=24,d=32"
KNOWN_CPU = "b=2,hq=8,hkv=1,lq=100,lk=100,d=64"  # smoke's G8 case: CPU flash dK/dV is a known failure


def pytest_run(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """pytest in an empty directory (no tests of ours collected), the repo importable for user kernels."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("PYTEST_XDIST_WORKER", None)
    full_env.pop("PYTEST_XDIST_WORKER_COUNT", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:randomly", *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=900)


def statuses(report: dict) -> dict[tuple[str, str], tuple[str, tuple[tuple[str, str], ...]]]:
    return {(r["case_id"], r["impl"]): (r["status"], tuple(sorted((t, v["status"]) for t, v in r["tensors"].items())))
            for r in report["results"]}


# --- pinning: pure, with injected environments ----------------------------------------------------


@pytest.mark.parametrize("n", range(8))
def test_worker_gwN_is_pinned_to_gpu_N_on_an_eight_gpu_cuda_runner(n):
    assert pinned_env({}, f"gw{n}", hip=False) == {"CUDA_VISIBLE_DEVICES": str(n)}
    assert pinned_env({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, f"gw{n}", hip=False) == {"CUDA_VISIBLE_DEVICES": str(n)}


def test_pinning_picks_from_the_gpus_the_run_was_given_and_wraps_when_workers_outnumber_them():
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert [pinned_env(env, f"gw{n}", hip=False)["CUDA_VISIBLE_DEVICES"] for n in range(6)] == ["4", "5", "6", "7", "4", "5"]


def test_rocm_pins_hip_visible_devices_and_drops_cuda_visible_devices_which_would_reindex_it():
    assert pinned_env({}, "gw3", hip=True) == {"HIP_VISIBLE_DEVICES": "3"}
    assert pinned_env({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "gw2", hip=True) == {"HIP_VISIBLE_DEVICES": "2",
                                                                               "CUDA_VISIBLE_DEVICES": None}
    assert pinned_env({"HIP_VISIBLE_DEVICES": "6,7"}, "gw1", hip=True) == {"HIP_VISIBLE_DEVICES": "7"}


def test_threads_are_cores_divided_by_workers_at_least_one():
    assert [threads_per_worker(16, w) for w in (1, 2, 8, 32)] == [16, 8, 2, 1]


def test_worker_names_that_are_not_gwN_are_a_usage_error():
    assert worker_index("gw12") == 12
    with pytest.raises(pytest.UsageError, match="not of the form gwN"):
        worker_index("master")


class _Config:
    def __init__(self, device):
        self.device = device

    def getoption(self, name, default=None):
        return {"gqa_device": self.device}.get(name, default)


def test_pin_worker_in_a_fake_8_gpu_environment_sets_the_device_and_threads(monkeypatch):
    threads = []
    monkeypatch.setattr("torch.set_num_threads", threads.append)
    monkeypatch.setattr("torch.cuda.is_initialized", lambda: False)
    monkeypatch.setattr(pinning, "_available_cores", lambda: 64)
    for n in range(8):
        env = {"PYTEST_XDIST_WORKER": f"gw{n}", "PYTEST_XDIST_WORKER_COUNT": "8", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
        done = pinning.pin_worker(_Config(None), env)
        assert env["CUDA_VISIBLE_DEVICES"] == str(n) and done["CUDA_VISIBLE_DEVICES"] == str(n)
        assert env["OMP_NUM_THREADS"] == "8"  # what the spawn-started kernel worker inherits
    assert threads == [8] * 8
    cpu_env = {"PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": "2"}
    assert "CUDA_VISIBLE_DEVICES" not in pinning.pin_worker(_Config("cpu"), cpu_env) and "CUDA_VISIBLE_DEVICES" not in cpu_env
    assert pinning.pin_worker(_Config(None), {}) == {}  # not an xdist worker: nothing to pin


def test_pinning_after_cuda_was_initialised_is_refused(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_initialized", lambda: True)
    with pytest.raises(pytest.UsageError, match="initialised before"):
        pinning.pin_worker(_Config("cuda"), {"PYTEST_XDIST_WORKER": "gw0"})


# --- items, outcomes, JUnit, -k, --lf (subprocess pytest runs) -------------------------------------


def test_items_carry_case_ids_fail_with_the_report_evidence_xfail_known_and_write_junit_properties(tmp_path):
    args = ["--gqa-case", TINY, "--gqa-case", KNOWN_CPU, "--gqa-device", "cpu", "--gqa-out", str(tmp_path / "out"),
            "--gqa-impl", "sdpa-flash", "--gqa-impl", "tests.wrong_kernels:tiled_kv_heads",
            "--gqa-in-process", "-o", "junit_family=xunit1", "--junitxml", str(tmp_path / "junit.xml"), "-rA"]
    proc = pytest_run(tmp_path, *args)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    wrong = "tests.wrong_kernels:tiled_kv_heads"
    assert f"gqa::b2-h4x2-q24-k24-d32-bf16-s0[{wrong}]" in out
    # the assertion message is the report's evidence: tensor, level, ratio, heads and the repro command
    assert "out FAIL gross at" in out and "x the correct-kernel scale" in out and "failing q-heads 1" in out
    assert f"reproduce: gqa-harness run --device cpu --case 'b=2,hq=4,hkv=2,lq=24,lk=24,d=32' --impl {wrong}" in out
    assert "XFAIL gqa::b2-h8x1-q100-k100-d64-bf16-s0[sdpa-flash]" in out and "cpu-flash-gqa-dkdv-group-sum" in out
    assert "PASSED gqa::b2-h8x2-q64-k64-d64-bf16-s7[canary-tiled-kv]" in out
    cases = {tc.get("name"): {p.get("name"): p.get("value") for p in tc.iter("property")}
             for tc in ET.parse(tmp_path / "junit.xml").getroot().iter("testcase")}
    props = cases["b2-h4x2-q24-k24-d32-bf16-s0[sdpa-flash]"]
    assert props["gqa.status"] == "PASS" and float(props["gqa.dq.tensor.ratio"]) < 2
    assert {"gqa.out.rel_err", "gqa.dk.floor", "gqa.dv.lowprec", "gqa.out.row.ratio"} <= set(props)
    report = json.loads((tmp_path / "out" / "cpu-x86_64.json").read_text())
    # tiled kv heads is right with one kv head (h % 1 == h // 8): it fails the GQA case only
    assert report["summary"]["counts"] == {"PASS": 2, "KNOWN": 1, "FAIL": 1}
    assert report["summary"]["canary_failed_as_expected"]

    # -k selects by case id and implementation; --lf reruns exactly the failure
    selected = pytest_run(tmp_path, *args[:-3], "-k", "h8x1 and flash", "-q")
    assert "1 xfailed" in selected.stdout and "passed" not in selected.stdout.splitlines()[-1], selected.stdout
    rerun = pytest_run(tmp_path, *args[:-3], "--lf", "-q")
    assert "1 failed" in rerun.stdout and "passed" not in rerun.stdout.splitlines()[-1], rerun.stdout


def test_gqa_strict_turns_known_into_failures_and_bad_input_is_a_one_line_usage_error(tmp_path):
    strict = pytest_run(tmp_path, "--gqa-case", KNOWN_CPU, "--gqa-device", "cpu", "--gqa-impl", "sdpa-flash",
                        "--gqa-strict", "--gqa-in-process", "--gqa-out", str(tmp_path / "out"), "-q", "-k", "not canary")
    assert strict.returncode == 1 and "KNOWN" in strict.stdout and "1 failed" in strict.stdout, strict.stdout
    bad = pytest_run(tmp_path, "--gqa-suite", "nosuch", "--gqa-device", "cpu", "-q")
    assert bad.returncode == 4 and "gqa-harness: unknown suite 'nosuch' (available:" in bad.stderr, bad.stderr


# --- xdist: one merged report, the same verdicts as gqa-harness run --------------------------------


def test_items_are_marked_gpu_and_vendor_on_gpus_and_slow_when_tagged_or_large():
    from harness.core.case import Case
    from harness.core.suites import SuiteCase

    small, large = Case(2, 8, 2, 64, 64, 64), Case(2, 64, 8, 4096, 4096, 128)
    assert plugin.item_markers(SuiteCase(small), "cpu") == []
    assert plugin.item_markers(SuiteCase(small), "rocm") == ["gpu", "rocm"]
    assert plugin.item_markers(SuiteCase(small, tags=("slow",)), "cuda") == ["gpu", "cuda", "slow"]
    assert plugin.item_markers(SuiteCase(large), "cpu") == ["slow"]


def test_pytest_n2_gives_the_same_verdicts_as_gqa_harness_run_and_one_merged_report(tmp_path):
    suite = tmp_path / "small.toml"
    suite.write_text('[[case]]\nb = 2\nhq = 8\nhkv = [2, 1]\nlq = 40\nlk = 56\nd = 32\ncausal = "bottom-right"\n'
                     '[[case]]\nb = 2\nhq = 4\nhkv = 2\nlq = 24\nd = 32\nmask = "fully-masked-rows"\ndtype = "fp16"\n'
                     '[[case]]\n' + "\n".join(f"{k} = {v}" for k, v in
                                              (x.split("=") for x in KNOWN_CPU.split(","))) + "\n")
    # gqa-harness run's main() in this process, kernels in-process (verdicts do not depend on isolation; the plugin's
    # side below keeps its kernel worker processes)
    assert main(["run", "--device", "cpu", "--suite", str(suite), "--quiet", "--in-process",
                 "--out", str(tmp_path / "cli")]) == 0
    # Without a GPU the default device is the CPU and the workers still pin: give them a fake 2-GPU list.
    gpu = torch.cuda.is_available()
    device = ["--gqa-device", "cpu"] if gpu else []
    xdist = pytest_run(tmp_path, "--gqa-suite", str(suite), *device, "--gqa-out", str(tmp_path / "xdist"), "-n", "2", "-q",
                       env={} if gpu else {"CUDA_VISIBLE_DEVICES": "3,5"})
    assert xdist.returncode == 0, xdist.stdout + xdist.stderr
    a = json.loads((tmp_path / "cli" / "cpu-x86_64.json").read_text())
    b = json.loads((tmp_path / "xdist" / "cpu-x86_64.json").read_text())
    assert statuses(a) == statuses(b) and len(statuses(a)) == 4 * 5 + 2
    assert "KNOWN" in {s for s, _ in statuses(b).values()}
    assert set(a) == set(b) and a["cases"].keys() == b["cases"].keys()
    assert all(a["cases"][c]["input_sha256"] == b["cases"][c]["input_sha256"] for c in a["cases"])
    assert sorted(b["settings"]["pytest_workers"]) == ["gw0", "gw1"]
    if not gpu:  # the real xdist workers pinned themselves in pytest_configure: gwN to the N-th listed GPU
        assert {w: p["pinned"]["CUDA_VISIBLE_DEVICES"] for w, p in b["settings"]["pytest_workers"].items()} == \
            {"gw0": "3", "gw1": "5"}
    assert {w["pinned"]["threads"] for w in b["settings"]["pytest_workers"].values()} == {max(1, len(os.sched_getaffinity(0)) // 2)}
    md = (tmp_path / "xdist" / "cpu-x86_64.md").read_text()
    assert md.startswith("# gqa-harness report") and "## Canary: failed as expected" in md
    # every implementation of a case ran on one worker: its oracle was computed once
    parts = list((tmp_path / "xdist" / ".parts").glob("*.jsonl"))
    case_records = [json.loads(line)["case_id"] for p in parts for line in p.read_text().splitlines()
                    if json.loads(line)["type"] == "case"]
    assert len(case_records) == len(set(case_records)) == 4 + 2


@pytest.mark.slow
def test_ci_runs_the_smoke_suite_through_the_plugin_with_two_workers(tmp_path):
    # --gqa-in-process: the verdicts of smoke are what is pinned here; the plugin's kernel worker processes under
    # xdist are pinned by test_pytest_n2_gives_the_same_verdicts_as_gqa_harness_run_and_one_merged_report
    proc = pytest_run(tmp_path, "--gqa-suite", "smoke", "--gqa-device", "cpu", "--gqa-out", str(tmp_path / "smoke"),
                      "-n", "2", "-q", "-p", "no:cacheprovider", "--gqa-in-process")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "smoke" / "cpu-x86_64.json").read_text())
    assert report["summary"]["canary_failed_as_expected"]
    assert not {"FAIL", "ERROR"} & set(report["summary"]["counts"]), report["summary"]["counts"]
    assert len(report["cases"]) >= 50 and "gqa-harness:" in proc.stdout

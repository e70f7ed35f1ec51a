"""The front door: `gqa-harness run` writes JSON + Markdown, exits 0/1/2, takes user kernels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMALL = "b=2,hq=4,hkv=2,lq=24,lk=24,d=32"


def gqa(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_run_writes_json_and_markdown_and_exits_zero_with_the_canary_failing(tmp_path):
    proc = gqa("run", "--device", "cpu", "--case", SMALL, "--case", SMALL + ",causal=top-left", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "cpu-x86_64.json").read_text())
    assert report["schema_version"] == 1 and report["summary"]["canary_failed_as_expected"]
    assert {r["impl"] for r in report["results"]} >= {"sdpa-math", "sdpa-flash", "sdpa-default", "canary-tiled-kv"}
    assert all(len(c["input_sha256"]["q"]) == 64 for c in report["cases"].values())
    markdown = (tmp_path / "cpu-x86_64.md").read_text()
    assert "## Canary: failed as expected" in markdown


def test_a_user_kernel_runs_by_module_and_function_and_a_wrong_one_fails_the_run(tmp_path):
    # --in-process, no canary: what is pinned is the module:function front door and the exit codes; the
    # isolated worker running a user kernel is the action's run (tests/test_workflows.py)
    lean = ("--in-process", "--no-canary")
    ok = gqa("run", "--device", "cpu", "--case", SMALL, "--impl", "tests.wrong_kernels:fp32_reference", *lean,
             "--out", str(tmp_path / "ok"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = gqa("run", "--device", "cpu", "--case", SMALL, "--impl", "tests.wrong_kernels:tiled_kv_heads", *lean,
              "--out", str(tmp_path / "bad"))
    assert bad.returncode == 1
    markdown = (tmp_path / "bad" / "cpu-x86_64.md").read_text()
    assert "tests.wrong_kernels:tiled_kv_heads" in markdown and "(gross)" in markdown
    assert "gqa-harness run --device cpu --case" in markdown  # the command that reproduces it


def test_bad_input_is_one_line_and_exit_two(tmp_path):
    proc = gqa("run", "--device", "cpu", "--case", "b=2,hq=32,hkv=3,lq=8,d=8", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gqa-harness: error: kv_heads=3 does not divide q_heads=32"


def test_env_prints_the_fingerprint():
    proc = gqa("env", "--device", "cpu")
    assert proc.returncode == 0 and json.loads(proc.stdout)["device_kind"] == "cpu"

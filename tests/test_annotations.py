"""GitHub annotations: `::error` lines for the worst failures point at the suite TOML line that defines
the case (checked against the TOML itself), `::warning` at FIXED known-failure entries; the pytest
items' location is the same line, which pytest-github-actions-annotate-failures and JUnit read."""

from __future__ import annotations

import copy
import json
import re
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.cli import main
from harness.core.known import KNOWN_FILE
from harness.reports.annotate import annotations, command, escape_property
from tests.test_plugin import pytest_run

SUITE = """[suite]
description = "annotations: two entries fail (the tiled kernel maps heads wrong when Hkv > 1), one passes"

[[case]]
name = "one-kv-head"   # tiled is right here: h % 1 == h // 4
b = 1
hq = 4
hkv = 1
lq = 16
d = 64

[[case]]
name = "two-kv-heads"
b = 1
hq = 4
hkv = 2
lq = 16
d = 64
dtype = ["bf16", "fp16"]

[[case]]
name = "four-kv-heads"
b = 1
hq = 8
hkv = 4
lq = 16
d = 64
"""
ERROR = re.compile(r"^::error file=([^,]+),line=(\d+),title=([^:]+)::(.*)$")
WRONG = "tests.wrong_kernels:tiled_kv_heads"


def _entry_at(path: Path, line: int) -> dict:
    """The [[case]] table that starts at `line` of the TOML, parsed on its own."""
    lines = path.read_text().splitlines()
    assert lines[line - 1].strip() == "[[case]]", (line, lines[line - 1])
    body = []
    for text in lines[line:]:
        if text.strip().startswith("[["):
            break
        body.append(text)
    return tomllib.loads("\n".join(body))


def _makes(entry: dict, case_id: str) -> bool:
    grid = [v if isinstance(v, list) else [v] for v in (entry["hq"], entry["hkv"], entry.get("dtype", "bf16"))]
    return any(f"-h{hq}x{hkv}-" in case_id and case_id.endswith(f"-{dt}-s0")
               for hq in grid[0] for hkv in grid[1] for dt in grid[2])


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("annotate")
    (tmp / "suite.toml").write_text(SUITE)
    return tmp


def test_run_in_github_actions_annotates_each_failure_at_the_suite_line_that_defines_its_case(failing_run, capsys,
                                                                                              monkeypatch):
    toml = failing_run / "suite.toml"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    code = main(["run", "--device", "cpu", "--suite", str(toml), "--impl", WRONG, "--in-process", "--quiet",
                 "--out", str(failing_run / "out")])
    assert code == 1
    errors = [ERROR.match(line) for line in capsys.readouterr().out.splitlines() if line.startswith("::error")]
    assert len(errors) == 3 and all(errors)  # h4x2 bf16 and fp16, h8x4; the G=4 one-kv-head case passes
    for m in errors:
        file, line, title, message = m[1], int(m[2]), m[3], m[4]
        case_id = message.split(" ", 1)[0]
        assert Path(file) == toml and title.startswith("FAIL tests.wrong_kernels%3Atiled_kv_heads out")
        assert _makes(_entry_at(toml, line), case_id), (line, case_id)
        assert "%0AReproduce: gqa-harness run --device cpu --case" in message
    monkeypatch.delenv("GITHUB_ACTIONS")
    main(["run", "--device", "cpu", "--suite", str(toml), "--impl", "sdpa-math", "--in-process", "--quiet",
          "--dtype", "bf16", "--out", str(failing_run / "quiet")])
    assert "::" not in capsys.readouterr().out


def test_a_bundled_suite_is_annotated_by_its_path_in_the_repository(failing_run):
    report = json.loads((failing_run / "out" / "cpu-x86_64.json").read_text())
    smoke = copy.deepcopy(report)
    for c in smoke["cases"].values():
        c["source"] = {"file": "cases/smoke.toml", "line": 42}
    assert all(a.startswith("::error file=cases/smoke.toml,line=42,title=") for a in annotations([smoke]))


def test_summary_keeps_github_s_limit_of_ten_and_warns_at_a_fixed_known_failure_entry(failing_run, capsys):
    report = json.loads((failing_run / "out" / "cpu-x86_64.json").read_text())
    failing = [r for r in report["results"] if r["status"] == "FAIL" and not r.get("canary")]
    report["results"] += [dict(copy.deepcopy(failing[0]), impl=f"user:k{i}") for i in range(12)]
    passing = next(r for r in report["results"] if r["status"] == "PASS" and not r.get("canary"))
    passing["tensors"]["dk"]["known_entry"] = "cpu-flash-gqa-dkdv-group-sum"  # matched, every tensor passed
    out = failing_run / "many"
    out.mkdir()
    (out / "cpu-x86_64.json").write_text(json.dumps(report))
    (out / "cpu-x86_64.md").write_text("# report\n")
    assert main(["summary", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len([a for a in printed if a.startswith("::error ")]) == 10
    (warning,) = [a for a in printed if a.startswith("::warning ")]
    line = KNOWN_FILE.read_text().splitlines().index("[[known]]") + 1
    assert warning.startswith(f"::warning file=cases/known-failures.toml,line={line},title=FIXED known failure "
                              "cpu-flash-gqa-dkdv-group-sum::")
    assert "its case is a pattern: check that the run covered the suites it came from" in warning  # case = "*"
    assert main(["summary", str(out), "--annotations", "0"]) == 0
    assert "::" not in capsys.readouterr().out


def test_workflow_command_values_are_escaped():
    assert escape_property("a:b,c%") == "a%3Ab%2Cc%25"
    assert command("error", "50%\nnext", "cases/x.toml", 3, "t: 1") == \
        "::error file=cases/x.toml,line=3,title=t%3A 1::50%25%0Anext"
    assert command("warning", "no file") == "::warning::no file"


def test_pytest_items_are_located_at_their_suite_line(failing_run):
    toml = failing_run / "suite.toml"
    proc = pytest_run(failing_run, "--gqa-suite", str(toml), "--gqa-impl", WRONG, "--gqa-device", "cpu",
                      "--gqa-in-process", "--gqa-out", str(failing_run / "pytest-out"), "-q", "-o",
                      "junit_family=xunit1", f"--junitxml={failing_run / 'junit.xml'}")
    assert proc.returncode == 1, proc.stdout[-2000:]
    cases = ET.parse(failing_run / "junit.xml").getroot().iter("testcase")
    located = [(c.get("name"), c.get("file"), c.get("line")) for c in cases if "canary" not in c.get("name")]
    assert len(located) == 4
    for name, file, line in located:
        assert Path(failing_run / file).resolve() == toml.resolve() or Path(file).resolve() == toml.resolve(), file
        assert _makes(_entry_at(toml, int(line) + 1), name.split("[")[0])  # pytest counts lines from 0

"""`run --shard I/N` and the plugin's `--gqa-shard`: each case in exactly one shard by a stable hash of
its id (or balanced by a report's seconds), the shard in the fingerprint and settings; and the
acceptance check: smoke (fp16, lengths capped at 16, two implementations) run as 4 separate
processes then merged has exactly the statuses of the unsharded run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.core.suites import select_cases
from harness.run.shards import ShardError, assign, balanced, case_seconds, hash_shard, parse_shard, shard_selection
from tests.test_plugin import pytest_run, statuses

REPO = Path(__file__).resolve().parent.parent
SUBSET = ["--suite", "smoke", "--dtype", "fp16", "--max-tokens", "16", "--impl", "sdpa-math", "--impl", "sdpa-flash",
          "--in-process", "--quiet", "--device", "cpu"]


def _cli(*args: str, cwd: Path = REPO) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-2000:]


def test_shard_syntax():
    assert (parse_shard("2/4").index, parse_shard(" 2 / 4 ").count, str(parse_shard("4/4"))) == (2, 4, "4/4")
    for bad in ("0/4", "5/4", "1/0", "a/b", "2", "-1/4", "1/4/2"):
        with pytest.raises(ShardError, match="is not I/N"):
            parse_shard(bad)


def test_a_case_goes_to_one_shard_by_a_stable_hash_of_its_id_whatever_else_is_selected():
    # pinned values: the same in every process, Python and machine (SHA-256, not the salted hash())
    assert hash_shard("b2-h8x2-q100-k100-d64-bf16-s0", 4) == 2 and hash_shard("b1-h1x1-q1-k1-d8-fp32-s0", 4) == 4
    assert [hash_shard(f"c{i}", 4) for i in range(8)] == [4, 4, 2, 3, 3, 3, 3, 3]
    chosen = select_cases(["smoke"])
    cuts = [shard_selection(chosen, f"{i}/4", None) for i in range(1, 5)]
    ids = [sc.case.id for part, _ in cuts for sc in part]
    assert sorted(ids) == sorted(sc.case.id for sc in chosen)  # each case once
    assert all(part for part, _ in cuts)
    fewer = [sc for sc in chosen if sc.case.dtype == "bf16"]
    for i in range(1, 5):  # a case's shard depends on its id alone
        mine = {sc.case.id for sc in cuts[i - 1][0]}
        assert {sc.case.id for sc in shard_selection(fewer, f"{i}/4", None)[0]} == {c for c in mine if "-bf16-" in c}
    block = cuts[1][1]
    assert block["shard"] == "2/4" and block["selected"] == len(chosen) and block["by"] == "hash"
    assert len({b["selection"] for _, b in cuts}) == 1


def test_balancing_by_recorded_seconds_is_longest_first_into_the_least_loaded_shard():
    cases = [sc.case for sc in select_cases(["smoke"])]
    seconds = {c.id: 1.0 + (i % 7) * 3.0 for i, c in enumerate(cases[:-5])}  # five cases unrecorded
    where = balanced(cases, 4, seconds)
    assert sorted(where) == sorted(c.id for c in cases) and set(where.values()) == {1, 2, 3, 4}
    per_flop = sorted(seconds[c.id] / c.flops() for c in cases[:-5])[len(cases[:-5]) // 2]
    cost = {c.id: seconds.get(c.id, per_flop * c.flops()) for c in cases}
    loads = [sum(cost[k] for k, v in where.items() if v == i) for i in range(1, 5)]
    assert max(loads) - min(loads) <= max(cost.values())  # LPT's bound
    assert balanced(cases, 4, seconds) == where  # deterministic
    with pytest.raises(ShardError, match="none of the selected cases"):
        assign(cases, 4, {"not-a-case": 1.0})


def test_shard_by_time_reads_a_report_and_needs_shard(tmp_path, capsys):
    report = json.loads((REPO / "reports" / "baselines" / "cpu-x86_64.json").read_text())
    seconds = case_seconds(report)
    smoke = {sc.case.id for sc in select_cases(["smoke"])}
    assert smoke <= set(seconds) and all(v > 0 for v in seconds.values())  # oracle + every implementation
    assert main(["run", "--suite", "smoke", "--shard-by-time", "reports/baselines/cpu-x86_64.json"]) == 2
    assert "--shard-by-time needs --shard I/N" in capsys.readouterr().err
    assert main(["run", "--suite", "smoke", "--shard", "5/4"]) == 2
    assert "is not I/N" in capsys.readouterr().err
    chosen = select_cases(["smoke"])
    part, block = shard_selection(chosen, "1/3", str(REPO / "reports" / "baselines" / "cpu-x86_64.json"))
    assert block["by"].startswith("time (") and block["assigned"] == [sc.case.id for sc in part]


def test_a_shard_writes_its_report_with_the_shard_in_the_fingerprint_and_an_empty_shard_still_reports(tmp_path,
                                                                                                      capsys):
    spec = "b=1,hq=4,hkv=2,lq=16,lk=16,d=64"
    case_id = select_cases([], [spec])[0].case.id
    mine = hash_shard(case_id, 2)
    for i in (1, 2):
        assert main(["run", "--case", spec, "--impl", "sdpa-math", "--shard", f"{i}/2", "--in-process", "--quiet",
                     "--out", str(tmp_path / f"s{i}")]) == 0
        report = json.loads((tmp_path / f"s{i}" / "cpu-x86_64.json").read_text())
        assert report["fingerprint"]["shard"] == f"{i}/2" and report["settings"]["shard"]["index"] == i
        judged = [r for r in report["results"] if not r.get("canary")]
        assert len(judged) == (1 if i == mine else 0)  # the other shard is empty, and says so
        assert report["summary"]["canary_failed_as_expected"]
    # --resume onto another shard's stream is refused: the shard is in the stream's header
    assert main(["run", "--case", spec, "--impl", "sdpa-math", "--shard", "2/2", "--in-process", "--quiet",
                 "--resume", "--out", str(tmp_path / "s1")]) == 2
    assert "shard='1/2'" in capsys.readouterr().err


def test_smoke_as_four_separate_shard_processes_merges_to_exactly_the_unsharded_statuses(tmp_path):
    """The acceptance check on a fast subset of smoke (the full smoke: docs/ci.md, run by hand)."""
    shards = [_cli("run", *SUBSET, "--shard", f"{i}/4", "--out", str(tmp_path / f"shard{i}")) for i in range(1, 5)]
    assert main(["run", *SUBSET, "--out", str(tmp_path / "full")]) == 0  # unsharded, here, while the shards run
    _wait(shards)
    assert main(["merge", *(str(tmp_path / f"shard{i}") for i in range(1, 5)), "--out", str(tmp_path / "merged")]) == 0
    full = json.loads((tmp_path / "full" / "cpu-x86_64.json").read_text())
    merged = json.loads((tmp_path / "merged" / "cpu-x86_64.json").read_text())
    assert len(full["cases"]) >= 20 and statuses(merged) == statuses(full)
    assert merged["summary"] == full["summary"]
    assert merged["settings"]["merged"]["present"] == [1, 2, 3, 4] and not merged["settings"]["merged"]["partial"]
    assert "shard" not in merged["fingerprint"]
    sources = {c["source"]["file"] for c in merged["cases"].values() if "source" in c}
    assert sources == {"cases/smoke.toml"}


def test_the_plugin_shards_the_same_way_and_its_shard_merges_with_the_cli_s(tmp_path):
    spec = ("--gqa-suite", "smoke", "--gqa-dtype", "bf16", "--gqa-max-tokens", "8", "--gqa-impl", "sdpa-math",
            "--gqa-in-process", "--gqa-device", "cpu")
    proc = pytest_run(tmp_path, *spec, "--gqa-shard", "1/2", "--gqa-out", str(tmp_path / "p1"), "-q")
    assert proc.returncode == 0, proc.stdout[-2000:]
    cli = ["run", "--suite", "smoke", "--dtype", "bf16", "--max-tokens", "8", "--impl", "sdpa-math", "--in-process",
           "--quiet", "--device", "cpu"]
    assert main([*cli, "--shard", "2/2", "--out", str(tmp_path / "c2")]) == 0
    assert main([*cli, "--out", str(tmp_path / "full")]) == 0
    part = json.loads((tmp_path / "p1" / "cpu-x86_64.json").read_text())
    assert part["fingerprint"]["shard"] == "1/2" and part["settings"]["shard"]["shard"] == "1/2"
    assert main(["merge", str(tmp_path / "p1"), str(tmp_path / "c2"), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "cpu-x86_64.json").read_text())
    assert statuses(merged) == statuses(json.loads((tmp_path / "full" / "cpu-x86_64.json").read_text()))

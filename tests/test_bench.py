"""Bench: the JSON shape (not the timings), what the figures count, and bad input."""

from __future__ import annotations

import json

from harness.core.case import Case
from harness.core.sampling import sample_rows
from harness.lab.bench import MODEL_SHAPES, SCHEMA, memory_case, model_case, oracle_peak
from harness.cli import main


def test_model_shapes_cover_head_dims_64_128_256_and_count_causal_flops_halved():
    assert sorted(MODEL_SHAPES) == [64, 128, 256]
    case = model_case(128, 256)
    assert case.causal == "top-left" and case.head_dim == 128
    assert case.flops() == 12 * case.batch * case.q_heads * 256 * 256 * 128 / 2


def test_memory_cases_keep_the_query_rows_and_grow_the_keys():
    small, large = memory_case(1024, 256), memory_case(16384, 256)
    assert small.q_len == large.q_len == 256 and large.kv_len == 16384 and large.q_heads == 32


def test_bench_json_has_the_figures_and_one_ratio_per_head_dim(tmp_path, capsys):
    suite = tmp_path / "tiny.toml"
    suite.write_text("[[case]]\nb = 1\nhq = 2\nhkv = 1\nlq = 16\nd = 16\ndtype = 'bf16'\n")
    code = main(["bench", "--json", "--length", "32", "--repeats", "1", "--memory-lengths", "64",
                 "--gemm-sizes", "64,128", "--suite", str(suite), "--quiet", "--out", str(tmp_path / "b"),
                 "--threads", "2", "--long-max-tokens", "0"])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads(out.out)  # stdout is exactly one JSON object
    assert report["schema"] == SCHEMA
    for key in ("oracle_gflops", "gemm_gflops", "ratio", "peak_bytes"):
        assert isinstance(report[key], (int, float)) and report[key] > 0, key
    assert set(report["ratios"]) == {"64", "128", "256"} and report["ratio"] == report["ratios"]["128"]
    assert report["gemm_gflops"] == max([*report["gemm"]["sizes"].values(), *report["gemm"]["sizes_after"].values()])
    row = report["throughput"][0]
    assert {"case_id", "spec", "head_dim", "model", "flops", "seconds", "gflops", "ratio"} <= set(row)
    assert [m["kv_len"] for m in report["memory"]] == [64]
    assert {"peak_bytes", "array_bytes", "workspace_bytes", "seconds"} <= set(report["memory"][0])
    s = report["suite"]
    assert {"wall_s", "references_s", "oracle_s", "implementations_s", "overhead_s", "cases", "results"} <= set(s)
    assert s["cases"] == 1 and s["results"] > 1  # every implementation, plus the canary
    assert "Oracle throughput" in (tmp_path / "b" / "bench.md").read_text()
    assert report["threads"] == 2
    assert report["long_memory"] == {"max_tokens": 0, "cases": []}  # 0 skips it; measured below
    split = report["work_split"]
    assert split["threads"] == [2, 16] and {"units", "parts", "efficiency_2", "efficiency_16"} <= set(split["cases"][0])


def test_long_case_peak_memory_is_the_row_sampled_oracles():
    case = Case(1, 4, 2, 2048, 2048, 32, causal="top-left", long=True)
    got = oracle_peak(case)
    assert got["rows"] == len(sample_rows(case).checked) < case.q_len and got["peak_bytes"] >= 0, got


def test_bench_rejects_bad_lengths_in_one_line(capsys):
    assert main(["bench", "--memory-lengths", "1k"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--memory-lengths" in err
    assert main(["bench", "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--threads" in err


def test_suite_only_splits_a_run_by_stage_and_its_json_is_a_valid_bench_file(tmp_path, capsys):
    from harness.reports.schema import first_error

    suite = tmp_path / "tiny.toml"
    suite.write_text("[[case]]\nb = 1\nhq = 2\nhkv = 1\nlq = 16\nd = 16\ndtype = 'bf16'\n")
    assert main(["bench", "--suite-only", "--suite", str(suite), "--device", "cpu", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "throughput" not in report and first_error(report, "bench") is None
    s = report["suite"]
    assert {"inputs", "oracle", "lowprec", "dterm", "yardsticks", "kernel", "transfer", "judge", "stream"} <= set(s["stages"])
    assert s["statuses"]["PASS"] >= 1 and sum(s["statuses"].values()) == s["results"]
    assert main(["bench", "--suite-only", "--suite", "none"]) == 2
    assert "--suite-only" in capsys.readouterr().err


def test_run_with_stages_writes_its_own_split_beside_the_report(tmp_path):
    suite = tmp_path / "tiny.toml"
    suite.write_text("[[case]]\nb = 1\nhq = 2\nhkv = 1\nlq = 16\nd = 16\ndtype = 'bf16'\n")
    out = tmp_path / "run"
    assert main(["run", "--device", "cpu", "--suite", str(suite), "--impl", "sdpa-math", "--stages", "--quiet",
                 "--out", str(out)]) == 0
    split = json.loads((out / "stages.json").read_text())
    assert split["finished"] and split["wall_s"] > 0
    assert {"oracle", "kernel", "transfer", "judge"} <= set(split["stages"])
    assert main(["run", "--device", "cpu", "--suite", str(suite), "--impl", "sdpa-math", "--quiet",
                 "--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "stages.json").exists()

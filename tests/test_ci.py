"""harness/reports/summary.py and `gqa-harness summary`: the job summary never exceeds GitHub's 1 MiB
step limit (cut at a line, with a note naming the artifact), artifact names are unique
and safe, and a missing report is said, not passed over."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.reports.summary import (SUMMARY_LIMIT, SummaryError, artifact_name, compose, summary_pages, slug, step_outputs,
                        summarize, trim, trim_note)

REPO = Path(__file__).resolve().parent.parent


def fake_report(directory: Path, label: str = "cuda-sm_90", markdown: str = "# gqa-harness report\n") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    report = {"schema_version": 1, "fingerprint": {"device_label": label}, "settings": {}, "cases": {}, "results": []}
    (directory / f"{label}.json").write_text(json.dumps(report))
    (directory / f"{label}.md").write_text(markdown)
    return directory / f"{label}.md"


def summary_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", "summary", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_short_markdown_passes_through_unchanged():
    assert trim("| a |\n| b |\n", 100, "NOTE") == "| a |\n| b |\n"


def test_long_markdown_is_cut_at_a_line_and_ends_with_the_note_within_the_byte_limit():
    text = "".join(f"| row {i} | ✓ × é |\n" for i in range(1000))  # multi-byte characters
    out = trim(text, 4096, "\n> trimmed\n")
    assert len(out.encode()) <= 4096 and out.endswith("\n> trimmed\n")
    body = out[: -len("\n> trimmed\n")]
    assert text.startswith(body) and body.endswith("|\n")  # whole lines only, nothing split


def test_a_note_longer_than_the_limit_is_itself_cut_to_the_limit():
    assert len(trim("x\n" * 100, 10, "a note of more than ten bytes").encode()) <= 10


def test_over_the_real_limit_the_summary_names_the_artifact_with_the_full_report(tmp_path):
    md = fake_report(tmp_path, markdown="| case | ok |\n" * 120_000)  # ~1.6 MB
    reports = summary_pages([tmp_path])
    text = compose(reports, [tmp_path], "gqa-report-cuda-sm_90-h100", SUMMARY_LIMIT)
    assert len(text.encode()) <= SUMMARY_LIMIT < md.stat().st_size
    assert text.rstrip().endswith("The full report is in the artifact `gqa-report-cuda-sm_90-h100`.")
    assert trim_note(md.stat().st_size, SUMMARY_LIMIT, "x").count(f"{md.stat().st_size:,} bytes") == 1


def test_artifact_names_are_unique_per_suffix_and_free_of_characters_upload_artifact_refuses():
    a = artifact_name(["cuda-sm_90"], "nvidia-h100")
    b = artifact_name(["cuda-sm_90"], "nvidia-h100-2")
    assert a == "gqa-report-cuda-sm_90-nvidia-h100" and a != b
    weird = artifact_name(["rocm-gfx942"], 'self-hosted/"linux": rocm*gpu?')
    assert not set('":<>|*?\\/ ') & set(weird) and weird == "gqa-report-rocm-gfx942-self-hosted-linux-rocm-gpu"
    assert artifact_name([], "x") == "gqa-report-no-report-x"
    assert slug("--a b--") == "a-b"


def test_reports_are_found_in_folders_or_by_file_and_labelled_from_their_fingerprint(tmp_path):
    fake_report(tmp_path / "models", "rocm-gfx942")
    fake_report(tmp_path / "edge", "rocm-gfx942")
    found = summary_pages([tmp_path / "models", tmp_path / "edge" / "rocm-gfx942.json"])
    assert [r.label for r in found] == ["rocm-gfx942", "rocm-gfx942"]
    outputs = step_outputs(found, "n")
    assert outputs["device-label"] == "rocm-gfx942" and outputs["report-json"] == ""  # two JSONs: no single one
    with pytest.raises(SummaryError, match="not a report"):
        summary_pages([Path(__file__)])


def test_summary_appends_to_what_the_step_already_wrote_and_counts_it_against_the_limit(tmp_path):
    fake_report(tmp_path / "out", markdown="line\n" * 400)
    summary, output = tmp_path / "summary.md", tmp_path / "output"
    summary.write_text("x" * 1000)
    code, printed = summarize([tmp_path / "out"], "h100", "gqa-report", 1500,
                              {"GITHUB_STEP_SUMMARY": str(summary), "GITHUB_OUTPUT": str(output)})
    assert code == 0 and summary.read_text().startswith("x" * 1000) and summary.stat().st_size <= 1500
    assert "artifact-name=gqa-report-cuda-sm_90-h100" in output.read_text().splitlines()
    assert printed.startswith("artifact-name=")  # the log shows the outputs, not the Markdown again


def test_cli_without_github_env_prints_the_markdown_and_with_it_writes_the_files(tmp_path):
    fake_report(tmp_path / "out", markdown="# hello report\n")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("GITHUB_")}
    plain = summary_cli("out", env=env, cwd=tmp_path)
    assert plain.returncode == 0 and plain.stdout.startswith("# hello report\n")
    env.update(GITHUB_STEP_SUMMARY=str(tmp_path / "s.md"), GITHUB_OUTPUT=str(tmp_path / "o"))
    ci = summary_cli("out", "--suffix", "a100", env=env, cwd=tmp_path)
    assert ci.returncode == 0 and (tmp_path / "s.md").read_text() == "# hello report\n"
    assert "report-json=out/cuda-sm_90.json" in (tmp_path / "o").read_text()


def test_no_report_exits_1_but_still_writes_a_note_and_the_artifact_name(tmp_path):
    env = {**__import__("os").environ, "GITHUB_STEP_SUMMARY": str(tmp_path / "s.md"), "GITHUB_OUTPUT": str(tmp_path / "o")}
    proc = summary_cli("gqa-out", "--suffix", "h100", env=env, cwd=tmp_path)
    assert proc.returncode == 1
    assert "No report was found in gqa-out" in (tmp_path / "s.md").read_text()
    assert "artifact-name=gqa-report-no-report-h100" in (tmp_path / "o").read_text()


def test_a_path_that_is_not_a_report_is_bad_input_with_a_one_line_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    proc = summary_cli("notes.txt", env=dict(__import__("os").environ), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "notes.txt" in proc.stderr

"""What CI needs around a finished run: the job summary (trimmed to GitHub's limit) and
a unique artifact name. `gqa-harness summary` is its front door; the workflows and
action.yml call it so that their shell steps stay one line and are tested here.

GitHub refuses a step summary over 1 MiB (the whole step's upload fails, not just the
tail), so the Markdown is cut at a line boundary with a note naming the artifact that
holds the full report. Artifact names must be unique within a workflow run; two runners
with the same GPU type would clash on the device label alone, so the caller adds a
suffix (the runner label or suite).
"""

from __future__ import annotations

import re
from pathlib import Path

from .store import SavedRun, find_reports

# GitHub's documented per-step limit for $GITHUB_STEP_SUMMARY.
SUMMARY_LIMIT = 1024 * 1024
ARTIFACT_PREFIX = "gqa-report"
# upload-artifact rejects " : < > | * ? \r \n \ /; keep a conservative set.
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_NAME_MAX = 200


class SummaryError(ValueError):
    pass


def slug(part: str) -> str:
    """A piece of an artifact name: unsafe runs become '-', no leading/trailing '-'."""
    return _UNSAFE.sub("-", part).strip("-.")


def artifact_name(labels: list[str], suffix: str = "", prefix: str = ARTIFACT_PREFIX) -> str:
    parts = [slug(p) for p in (prefix, "+".join(sorted(set(labels))) if labels else "no-report", suffix)]
    name = "-".join(p for p in parts if p)
    return name[:_NAME_MAX].rstrip("-.")


def reports_in(paths: list[Path]) -> list[SavedRun]:
    """The saved reports among `paths` (report files or directories of them) that have their Markdown."""
    for path in paths:
        if path.exists() and not path.is_dir() and path.suffix not in (".md", ".json"):
            raise SummaryError(f"{path} is not a report (.md or .json) nor a directory of reports")
    return [run for run in find_reports(paths) if run.markdown is not None]


def trim(markdown: str, limit: int, note: str) -> str:
    """`markdown` cut at a line boundary so that it plus `note` fits in `limit` UTF-8 bytes."""
    data = markdown.encode()
    if len(data) <= limit:
        return markdown
    note_bytes = note.encode()
    if len(note_bytes) > limit:
        return note_bytes[:limit].decode(errors="ignore")
    head = data[: limit - len(note_bytes)].decode(errors="ignore")
    cut = head.rfind("\n")
    return (head[: cut + 1] if cut >= 0 else "") + note


def trim_note(total_bytes: int, limit: int, artifact: str) -> str:
    return (f"\n> **Summary trimmed**: the report is {total_bytes:,} bytes, over the {limit:,}-byte job-summary "
            f"limit. The full report is in the artifact `{artifact}`.\n")


def missing_note(paths: list[Path]) -> str:
    where = ", ".join(str(p) for p in paths)
    return (f"## gqa-harness: no report\n\nNo report was found in {where}: the run step stopped before writing "
            "one (see its log).\n")


def compose(reports: list[SavedRun], paths: list[Path], artifact: str, limit: int) -> str:
    """The summary text for `reports`, within `limit` bytes."""
    if not reports:
        return trim(missing_note(paths), limit, "")
    text = "\n\n".join(r.markdown.read_text() for r in reports)
    if not text.endswith("\n"):
        text += "\n"
    return trim(text, limit, trim_note(len(text.encode()), limit, artifact))


def step_outputs(reports: list[SavedRun], artifact: str) -> dict[str, str]:
    """Values for $GITHUB_OUTPUT, read by later steps (upload name, baseline path)."""
    labels = sorted({r.label for r in reports})
    jsons = [str(r.json) for r in reports]
    return {
        "artifact-name": artifact,
        "device-label": "+".join(labels),
        "report-json": jsons[0] if len(jsons) == 1 else "",
    }


def append_summary(summary_file: Path, text: str) -> None:
    """Append, as GitHub expects; the limit counts what this step already wrote."""
    with summary_file.open("a", encoding="utf-8") as fh:
        fh.write(text)


def remaining(summary_file: Path, limit: int) -> int:
    used = summary_file.stat().st_size if summary_file.exists() else 0
    return max(limit - used, 0)


def write_outputs(output_file: Path, values: dict[str, str]) -> None:
    with output_file.open("a", encoding="utf-8") as fh:
        for key, value in values.items():
            if "\n" in value:
                raise SummaryError(f"output {key} has a newline: {value!r}")
            fh.write(f"{key}={value}\n")


def summarize(paths: list[Path], suffix: str, prefix: str, limit: int, environ: dict[str, str]) -> tuple[int, str]:
    """Write the summary to $GITHUB_STEP_SUMMARY (or return it for stdout when unset) and the
    step outputs to $GITHUB_OUTPUT. Exit status 1 when no report was found: the note and the
    outputs are still written, so an `if: always()` upload keeps whatever the run left."""
    reports = reports_in(paths)
    name = artifact_name([r.label for r in reports], suffix, prefix)
    printed = ""
    if environ.get("GITHUB_STEP_SUMMARY"):
        target = Path(environ["GITHUB_STEP_SUMMARY"])
        append_summary(target, compose(reports, paths, name, remaining(target, limit)))
    else:
        printed = compose(reports, paths, name, limit)
    outputs = step_outputs(reports, name)
    if environ.get("GITHUB_OUTPUT"):
        write_outputs(Path(environ["GITHUB_OUTPUT"]), outputs)
    return (0 if reports else 1), printed + "".join(f"{k}={v}\n" for k, v in outputs.items())

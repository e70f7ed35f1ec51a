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
from dataclasses import dataclass
from pathlib import Path

from .annotate import MAX_ANNOTATIONS, annotations
from .store import ReportError, load_report

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


@dataclass(frozen=True)
class Page:
    """One Markdown file for the summary, labelled by the saved report beside it (else by its name)."""

    markdown: Path
    json: Path | None
    label: str


def _page(md: Path) -> Page:
    try:
        report = load_report(md.with_suffix(".json"))
    except ReportError:  # a Markdown without its report (e.g. compare's matrix.md): shown, named by its file
        return Page(md, None, md.stem)
    return Page(md, md.with_suffix(".json"), str(report["fingerprint"].get("device_label") or md.stem))


def summary_pages(paths: list[Path]) -> list[Page]:
    """Each path is a report's .md/.json or a directory holding Markdown (<label>.md beside <label>.json)."""
    pages: list[Page] = []
    for path in paths:
        if path.is_dir():
            pages += [_page(md) for md in sorted(path.glob("*.md"))]
        elif path.suffix in (".md", ".json") and path.with_suffix(".md").is_file():
            pages.append(_page(path.with_suffix(".md")))
        elif path.exists():
            raise SummaryError(f"{path} is not a report (.md or .json) nor a directory of reports")
    return pages


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


def compose(reports: list[Page], paths: list[Path], artifact: str, limit: int) -> str:
    """The summary text for `reports`, within `limit` bytes."""
    if not reports:
        return trim(missing_note(paths), limit, "")
    text = "\n\n".join(r.markdown.read_text() for r in reports)
    if not text.endswith("\n"):
        text += "\n"
    return trim(text, limit, trim_note(len(text.encode()), limit, artifact))


def step_outputs(reports: list[Page], artifact: str) -> dict[str, str]:
    """Values for $GITHUB_OUTPUT, read by later steps (upload name, baseline path)."""
    labels = sorted({r.label for r in reports})
    jsons = [str(r.json) for r in reports if r.json is not None]
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


def summarize(paths: list[Path], suffix: str, prefix: str, limit: int, environ: dict[str, str],
              max_annotations: int = MAX_ANNOTATIONS) -> tuple[int, str]:
    """Write the summary to $GITHUB_STEP_SUMMARY (or return it for stdout when unset) and the
    step outputs to $GITHUB_OUTPUT; return the GitHub annotations of the worst failures (and FIXED
    known failures) for stdout, at most `max_annotations` of each. Exit status 1 when no report was
    found: the note and the outputs are still written, so an `if: always()` upload keeps whatever the run left."""
    reports = summary_pages(paths)
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
    notes = annotations([load_report(r.json) for r in reports if r.json is not None], max_annotations)
    return (0 if reports else 1), printed + "".join(f"{k}={v}\n" for k, v in outputs.items()) + \
        "".join(f"{a}\n" for a in notes)

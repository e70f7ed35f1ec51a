"""The one store of saved runs: JSONL streams written as results complete, and report files.

A run directory holds `<label>.jsonl` (the stream: a header, then case and result records),
`<label>.json` (the report, schema 1, self-describing: fingerprint, settings, cases, results)
and `<label>.md`. Everything that writes, finds or loads them goes through here, and a report
is recognised one way: a JSON object with the schema's top-level keys.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import jsontext
from .schema import first_error

SCHEMA_VERSION = 1
REPORT_KEYS = ("schema_version", "fingerprint", "settings", "cases", "results")


class ReportError(ValueError):
    """A file that cannot be read as a gqa-harness report; one line naming the file."""


class StreamError(ValueError):
    """--resume on a stream written by another environment or device (bad input: exit 2)."""


def clean_json(obj: Any) -> Any:
    """Non-finite floats become null (JSON has no Inf/NaN). A list of finite floats is already clean and
    is returned as it is, not copied: a per-slice table's million rows cost a list each otherwise."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if type(obj) is list and all(type(v) is float for v in obj) and all(map(math.isfinite, obj)):
            return obj
        return [clean_json(v) for v in obj]
    return obj


# --- streams -------------------------------------------------------------------------------------


class JsonlSink:
    """Append-only stream of records; each line is flushed so a killed run keeps what it wrote."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a", encoding="utf-8")

    def __call__(self, record: dict[str, Any]) -> None:
        try:
            self._fh.write(json.dumps(clean_json(record), allow_nan=False, default=_json_default) + "\n")
            self._fh.flush()
        except OSError as exc:  # a full disk: name the file (a write error carries none); resume cuts the torn line
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def close(self) -> None:
        self._fh.close()


def _json_default(obj: Any) -> Any:
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)  # tensors and arrays in notes


def read_stream(path: Path) -> list[dict[str, Any]]:
    """Records of a stream; a torn last line (killed mid-write) is dropped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _validated(path: Path) -> list[tuple[int, dict[str, Any] | None, str]]:
    """(line number, record or None, why not) for every non-empty line: JSON, UTF-8, the stream schema."""
    rows: list[tuple[int, dict[str, Any] | None, str]] = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            rows.append((n, None, f"not UTF-8: {exc.reason}"))
            continue
        except json.JSONDecodeError as exc:
            rows.append((n, None, f"not JSON: {exc.msg}"))
            continue
        problem = first_error(record, "stream")
        rows.append((n, None, problem) if problem else (n, record, ""))
    return rows


def read_stream_strict(path: Path) -> list[dict[str, Any]]:
    """Records of a finished stream, every line checked: what a merge trusts. A bad line, a torn last one
    included, is a StreamError naming the file and line."""
    try:
        rows = _validated(path)
    except OSError as exc:
        raise StreamError(f"{path}: corrupt stream ({type(exc).__name__}: {exc})") from None
    for n, record, problem in rows:
        if record is None:
            raise StreamError(f"{path}:{n}: corrupt stream ({problem})")
    return [record for _, record, _ in rows if record is not None]


def read_stream_checked(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The valid records of a stream, and one line per line passed over (its number and why): what a
    resumed run continues from and reports."""
    rows = _validated(path)
    return ([record for _, record, _ in rows if record is not None],
            [f"line {n}: {problem}" for n, record, problem in rows if record is None])


def plan_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two run plans, in words ('' when nothing)."""
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            gone, added = sorted(set(a) - set(b)), sorted(set(b) - set(a))
            parts.append(f"{key}: " + ", ".join(x for x in (gone and f"{len(gone)} dropped (e.g. {gone[0]})",
                                                           added and f"{len(added)} added (e.g. {added[0]})") if x))
        else:
            parts.append(f"{key}: {a!r} then, {b!r} now")
    return "; ".join(parts)


def repair_stream(path: Path) -> None:
    """Cut a torn last line (a run killed mid-write) so appended records start on a line of their own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def done_results(records: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(case id, implementation) pairs a stream already has a result for: what --resume skips."""
    return {(r["case_id"], r["impl"]) for r in records if r.get("type") == "result"}


# Fingerprint fields a resumed run must share with the stream it continues.
RESUME_KEYS = ("device_label", "torch", "cuda", "hip", "cudnn", "harness", "shard")


@dataclass(frozen=True)
class Resumed:
    """What a stream already holds when a run continues it."""

    records: list[dict[str, Any]]
    skipped: list[str]  # lines passed over, each with its number and why
    forced: str = ""  # the plan difference --force accepted, if any


def open_stream(path: Path, fingerprint: dict[str, Any], resume: bool, plan: dict[str, Any] | None = None,
                force: bool = False) -> tuple[JsonlSink, Resumed]:
    """The sink for a run and what it continues. Fresh: the old stream goes, a header record starts the
    new one. Resume: a torn last line is cut, every line validated (the bad ones passed over and named),
    the header's environment and plan checked: another plan is refused unless `force`, which records
    the difference in a new header."""
    header = {"type": "run", "fingerprint": {k: fingerprint.get(k) for k in RESUME_KEYS},
              **({"plan": plan} if plan is not None else {})}
    if not resume or not path.exists():
        path.unlink(missing_ok=True)
        sink = JsonlSink(path)
        sink(header)
        return sink, Resumed([], [])
    repair_stream(path)
    records, skipped = read_stream_checked(path)
    old = next((r for r in records if r.get("type") == "run"), None)
    forced = ""
    if old is not None:
        diff = [k for k in RESUME_KEYS if old["fingerprint"].get(k) != header["fingerprint"][k]]
        if diff:
            k = diff[0]
            raise StreamError(f"--resume: {path} was written with {k}={old['fingerprint'].get(k)!r}, this run has "
                              f"{k}={header['fingerprint'][k]!r}; use another --out or drop --resume")
        forced = plan_difference(old.get("plan") or {}, plan or {}) if plan is not None and "plan" in old else ""
        if forced and not force:
            raise StreamError(f"--resume: {path} was started with another plan ({forced}); run the same selection, "
                              "use another --out, or add --force to continue it and record the difference")
    sink = JsonlSink(path)
    if forced:
        sink({**header, "resumed_over": forced})
    return sink, Resumed(records, skipped, forced)


# --- reports -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedRun:
    json: Path
    report: dict[str, Any]

    @property
    def markdown(self) -> Path | None:
        md = self.json.with_suffix(".md")
        return md if md.is_file() else None

    @property
    def stream(self) -> Path:
        return self.json.with_suffix(".jsonl")

    @property
    def label(self) -> str:
        return str(self.report["fingerprint"].get("device_label") or self.json.stem)


def write_report(out: Path, report: dict[str, Any], markdown: str) -> Path:
    """`<label>.json` and `<label>.md` in `out`; returns the Markdown's path."""
    label = report["fingerprint"].get("device_label", "unknown")
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / f"{label}.json", jsontext.dumps(report))  # json.dumps(indent=1)'s bytes, faster
    md = out / f"{label}.md"
    write_atomically(md, markdown)
    return md


def write_atomically(path: Path, text: str) -> None:
    """The whole file or, when the disk fills, the previous one untouched: never a cut-off JSON."""
    part = path.with_name(path.name + ".part")
    try:
        part.write_text(text, encoding="utf-8")
        os.replace(part, path)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def stream_path(out: Path, label: str) -> Path:
    return out / f"{label}.jsonl"


def write_stream(path: Path, records: list[dict[str, Any]]) -> None:
    """A whole stream at once (a merge of parts); JsonlSink appends while a run goes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def missing_keys(data: Any) -> list[str]:
    """The report keys `data` lacks (all of them when it is not a JSON object)."""
    return [k for k in REPORT_KEYS if not isinstance(data, dict) or k not in data]


def _read_json(path: Path, what: str) -> Any:
    """A JSON file, or a gzipped one (`.json.gz`, as large reports are committed)."""
    try:
        return json.loads(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: no such {what}") from None
    except (OSError, ValueError, EOFError) as exc:  # EOFError: a cut-off gzip
        raise ReportError(f"{path}: not a JSON {what} ({type(exc).__name__}: {exc})") from None


def load_report(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    report = _read_json(path, "report")
    missing = missing_keys(report)
    if missing:
        raise ReportError(f"{path}: not a gqa-harness report (missing {', '.join(missing)})")
    # The schema describes schema 1; a report of another version is refused by what reads it, by version.
    problem = first_error(report, "report") if report["schema_version"] == SCHEMA_VERSION else None
    if problem:
        raise ReportError(f"{path}: not a valid report ({problem})")
    return report


def load_json(path: str | Path, kind: str) -> dict[str, Any]:
    """A bench, calibration, audit or noise file, checked against its schema (harness/reports/schema/)."""
    path = Path(path)
    data = _read_json(path, f"{kind} file")
    problem = first_error(data, kind)
    if problem:
        raise ReportError(f"{path}: not a valid {kind} file ({problem})")
    return data


def find_reports(paths: list[Path], recursive: bool = False) -> list[SavedRun]:
    """Reports among `paths`: files, or the *.json in directories (their subdirectories too when
    `recursive`); JSON files that are not reports (bench, calibration, noise bands) are passed over."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.rglob("*.json") if recursive else path.glob("*.json"))
        elif path.suffix == ".md":
            files.append(path.with_suffix(".json"))
        else:
            files.append(path)
    found = []
    for f in files:
        try:
            found.append(SavedRun(f, load_report(f)))
        except ReportError:
            continue
    return found

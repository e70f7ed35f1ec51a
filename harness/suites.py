"""Suites: TOML files in cases/, one schema, each entry a case or a grid of cases.

    [[case]]
    name = "llama3-8b-prefill"      # optional label, shown in reports
    b = 2
    hq = 32
    hkv = 8
    lq = 128
    d = 128
    dtype = ["bf16", "fp16"]        # a list expands into a grid (cartesian product)
    causal = ["none", "top-left"]

Expanded cases keep stable ids because ids derive from fields, not positions.
Errors are one line naming file, line and field.
"""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .case import Case, CaseError, case_from_mapping

CASES_DIR = Path(__file__).resolve().parent.parent / "cases"
ENTRY_KEYS = {"name", "tags", "notes"}


class SuiteError(ValueError):
    pass


@dataclass(frozen=True)
class SuiteCase:
    case: Case
    name: str = ""
    tags: tuple[str, ...] = ()


def suite_path(name: str, cases_dir: Path | None = None) -> Path:
    base = cases_dir or CASES_DIR
    path = Path(name)
    if path.suffix == ".toml" and path.exists():
        return path
    candidate = base / f"{name}.toml"
    if not candidate.exists():
        available = sorted(p.stem for p in base.glob("*.toml") if p.stem != "known-failures")
        raise SuiteError(f"unknown suite {name!r} (available: {', '.join(available)})")
    return candidate


def _entry_lines(text: str) -> list[int]:
    """1-based line numbers of each [[case]] header, for error messages."""
    return [i + 1 for i, line in enumerate(text.splitlines()) if line.strip().startswith("[[case]]")]


def _expand(entry: dict) -> list[dict]:
    fields = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    grid_keys = [k for k, v in fields.items() if isinstance(v, list)]
    if not grid_keys:
        return [fields]
    combos = itertools.product(*(fields[k] for k in grid_keys))
    return [{**fields, **dict(zip(grid_keys, combo))} for combo in combos]


def load_suite_text(text: str, source: str) -> list[SuiteCase]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{source}: malformed TOML: {exc}") from None
    unknown = set(data) - {"case", "suite"}
    if unknown:
        raise SuiteError(f"{source}: unknown top-level key(s) {', '.join(sorted(unknown))} (expected [[case]] tables)")
    entries = data.get("case", [])
    if not isinstance(entries, list) or not entries:
        raise SuiteError(f"{source}: no [[case]] entries")
    lines = _entry_lines(text)
    out: list[SuiteCase] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{source}:{lines[i] if i < len(lines) else '?'}"
        name = str(entry.get("name", ""))
        tags = tuple(entry.get("tags", ()))
        for fields in _expand(entry):
            try:
                case = case_from_mapping(fields)
            except CaseError as exc:
                label = f" ({name})" if name else ""
                raise SuiteError(f"{where}{label}: {exc}") from None
            if case.id in seen:
                continue
            seen.add(case.id)
            out.append(SuiteCase(case, name, tags))
    return out


def load_suite(name: str, cases_dir: Path | None = None) -> list[SuiteCase]:
    path = suite_path(name, cases_dir)
    return load_suite_text(path.read_text(), str(path))

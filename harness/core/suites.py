"""Suites: TOML files in cases/, one schema, each entry a case or a grid of cases.

    [suite]                          # optional: what the file is about
    description = "..."
    upstream = ["https://github.com/pytorch/pytorch/issues/196678"]   # regressions cite their bug
    signature = "NaN dQ on rows whose log-sum-exp < -88.7"             # ... and what it looks like
    tags = ["cuda", "cudnn"]         # added to every entry's tags
    guard = "nan"                    # default guard bands for entries that do not set their own

    [[case]]
    name = "llama3-8b-prefill"       # optional label, shown in reports and as a pytest keyword
    tags = ["gqa"]                   # optional; "slow" also marks the pytest items slow
    notes = "why this case exists"   # optional
    b = 2
    hq = 32
    hkv = 8
    lq = 128
    d = 128
    dtype = ["bf16", "fp16"]         # a list expands into a grid (cartesian product)
    causal = ["none", "top-left"]

    [[family]]                       # cases that differ only in group size (or key length), judged
    name = "g-trend-h2"              # together by core/differential.py's trend rules
    b = 1
    hkv = 2
    group_sizes = [1, 2, 4, 8, 16]   # hq = hkv x G; or kv_lens = [64, 128, 256, 512] (lk varies)
    lq = 128
    d = 64
    dtype = ["bf16", "fp16"]         # other lists still expand: one family per combination

A suite name is a file (`smoke` is cases/smoke.toml), a directory (`regressions` is every
cases/regressions/*.toml) or one file in it (`regressions/n17-cudnn-dq-nan-negative-lse`).
Expanded cases keep stable ids because ids derive from fields, not positions.
Errors are one line naming file, line and field.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

from .case import ALIASES, DTYPES, GUARDS, Case, CaseError, case_from_mapping, parse_case_spec

CASES_DIR = Path(__file__).resolve().parents[2] / "cases"
ENTRY_KEYS = {"name", "tags", "notes"}
FAMILY_AXES = {"group_sizes": "hq", "kv_lens": "lk"}  # a [[family]]'s varied axis -> the case field it sets
SUITE_KEYS = {"description": str, "upstream": list, "signature": str, "tags": list, "notes": str, "guard": str}
NOT_SUITES = {"known-failures"}


class SuiteError(ValueError):
    pass


@dataclass(frozen=True)
class SuiteCase:
    case: Case
    name: str = ""
    tags: tuple[str, ...] = ()
    notes: str = ""
    source: str = ""  # "file:line" of the entry that made it
    file: str = ""  # the suite file, relative to the repository when under it (cases/smoke.toml); "" inline
    line: int = 0  # the line of its [[case]] table (1-based; 0 unknown)


# --- finding suites ----------------------------------------------------------------------


def available_suites(cases_dir: Path | None = None) -> list[str]:
    base = cases_dir or CASES_DIR
    names = [p.stem for p in base.glob("*.toml") if p.stem not in NOT_SUITES]
    names += [p.name for p in base.iterdir() if p.is_dir() and any(p.glob("*.toml"))] if base.exists() else []
    return sorted(names)


def suite_paths(name: str, cases_dir: Path | None = None) -> list[Path]:
    """The TOML file(s) a suite name stands for."""
    base = cases_dir or CASES_DIR
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        return [path]
    if (base / f"{name}.toml").is_file():
        return [base / f"{name}.toml"]
    if (base / name).is_dir():
        files = sorted((base / name).glob("*.toml"))
        if files:
            return files
    raise SuiteError(f"unknown suite {name!r} (available: {', '.join(available_suites(base))})")


def suite_path(name: str, cases_dir: Path | None = None) -> Path:
    """The single file of a one-file suite (kept for callers that read one file)."""
    return suite_paths(name, cases_dir)[0]


# --- line numbers for errors ---------------------------------------------------------------


def _entry_spans(text: str, table: str = "case") -> list[tuple[int, int]]:
    """(first, last) 1-based lines of each [[case]] (or [[family]]) table, for error messages."""
    lines = text.splitlines()
    tables = [(i + 1, m[1]) for i, line in enumerate(lines) if (m := re.match(r"\s*\[\[\s*(\w+)\s*\]\]", line))]
    ends = [s - 1 for s, _ in tables[1:]] + [len(lines)]
    return [(start, end) for (start, name), end in zip(tables, ends) if name == table]


def _key_line(text: str, span: tuple[int, int] | None, key: str) -> int | None:
    if span is None:
        return None
    lines = text.splitlines()
    for n in range(span[0], span[1] + 1):
        if re.match(rf"\s*{re.escape(key)}\s*=", lines[n - 1]):
            return n
    return None


def _field_in_message(message: str, entry: dict[str, Any]) -> str | None:
    """The entry key a CaseError message is about (messages start with `field=` or name it)."""
    short = {v: k for k, v in ALIASES.items()}
    names = re.findall(r"([a-z_]+)=", message) + re.findall(r"field '([a-z_]+)'", message)
    for name in names:
        field = ALIASES.get(name, name)
        for key in (name, field, short.get(field, "")):
            if key in entry:
                return key
    return None


def display_path(source: str) -> str:
    """A suite file as annotations and reports name it: relative to the repository holding cases/ when
    under it (cases/smoke.toml), else as given."""
    try:
        return Path(source).resolve().relative_to(CASES_DIR.parent).as_posix()
    except (ValueError, OSError):
        return source


# --- loading -------------------------------------------------------------------------------


def _check_entry_meta(entry: dict[str, Any], error) -> tuple[str, tuple[str, ...], str]:
    name, tags, notes = entry.get("name", ""), entry.get("tags", []), entry.get("notes", "")
    if not isinstance(name, str):
        error("name", f"name={name!r} must be a string")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        error("tags", f"tags={tags!r} must be a list of strings")
    if not isinstance(notes, str):
        error("notes", f"notes={notes!r} must be a string")
    return name, tuple(tags), notes


def _expand(entry: dict[str, Any], error) -> list[dict[str, Any]]:
    fields = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    for key, value in fields.items():
        if isinstance(value, dict):
            error(key, f"field {key!r} is a table; give a value or a list of values")
        if isinstance(value, list):
            if not value:
                error(key, f"field {key!r} is an empty list; a grid needs at least one value")
            if any(isinstance(v, (list, dict)) for v in value):
                error(key, f"field {key!r} nests lists or tables; a grid takes a flat list of values")
    grid_keys = [k for k, v in fields.items() if isinstance(v, list)]
    if not grid_keys:
        return [fields]
    combos = itertools.product(*(fields[k] for k in grid_keys))
    return [{**fields, **dict(zip(grid_keys, combo))} for combo in combos]


def family_entry(entry: dict[str, Any], error) -> dict[str, Any]:
    """A [[family]] as the [[case]] grid of its members: group_sizes -> hq = hkv x G, kv_lens -> lk."""
    axes = [k for k in FAMILY_AXES if k in entry]
    if len(axes) != 1:
        error(None, f"a [[family]] needs exactly one of {', '.join(FAMILY_AXES)}")
    axis, values = axes[0], entry[axes[0]]
    if not isinstance(values, list) or len(values) < 2 or not all(isinstance(v, int) and v > 0 for v in values):
        error(axis, f"{axis}={values!r} must list at least two positive integers")
    fields = {k: v for k, v in entry.items() if k != axis}
    if FAMILY_AXES[axis] in fields or (axis == "group_sizes" and "hkv" not in fields):
        error(axis, f"a {axis} family sets {FAMILY_AXES[axis]} itself" + (" from hkv" if axis == "group_sizes" else ""))
    if axis == "group_sizes" and not isinstance(fields["hkv"], int):
        error("hkv", "a group_sizes family needs one hkv (the group size is what varies)")
    member = [fields["hkv"] * g for g in values] if axis == "group_sizes" else list(values)
    return {**fields, FAMILY_AXES[axis]: member, "tags": [*entry.get("tags", []), "family"]}


def _suite_meta(data: dict[str, Any], source: str) -> dict[str, Any]:
    meta = data.get("suite", {})
    if not isinstance(meta, dict):
        raise SuiteError(f"{source}: [suite] must be a table")
    for key, value in meta.items():
        if key not in SUITE_KEYS:
            raise SuiteError(f"{source}: [suite] has unknown key {key!r} (known: {', '.join(sorted(SUITE_KEYS))})")
        want = SUITE_KEYS[key]
        if not isinstance(value, want) or (want is list and not all(isinstance(v, str) for v in value)):
            raise SuiteError(f"{source}: [suite] {key} must be {'a list of strings' if want is list else 'a string'}")
    return meta


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SuiteError(f"{path}: not UTF-8 text (byte {exc.start}): a suite is a TOML file") from None


def load_suite_text(text: str, source: str) -> list[SuiteCase]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{source}: malformed TOML: {exc}") from None
    unknown = set(data) - {"case", "suite", "family"}
    if unknown:
        raise SuiteError(f"{source}: unknown top-level key(s) {', '.join(sorted(unknown))} (expected [[case]] tables)")
    meta = _suite_meta(data, source)
    entries = [("case", e) for e in data.get("case", [])] + [("family", e) for e in data.get("family", [])]
    if not isinstance(data.get("case", []), list) or not isinstance(data.get("family", []), list) or not entries:
        raise SuiteError(f"{source}: no [[case]] entries")
    spans = _entry_spans(text) + _entry_spans(text, "family")
    out: list[SuiteCase] = []
    seen: dict[str, str] = {}
    for i, (table, entry) in enumerate(entries):
        span = spans[i] if i < len(spans) else None
        where = f"{source}:{span[0] if span else '?'}"
        if not isinstance(entry, dict):
            raise SuiteError(f"{where}: [[case]] entry {i + 1} is not a table")
        label = f" ({entry['name']})" if isinstance(entry.get("name"), str) and entry.get("name") else ""

        def error(key: str | None, message: str, _span=span, _label=label, _where=where) -> None:
            line = _key_line(text, _span, key) if key else None
            raise SuiteError(f"{source}:{line or _where.rsplit(':', 1)[1]}{_label}: {message}")

        if table == "family" and isinstance(entry, dict):
            entry = family_entry(entry, error)
        name, tags, notes = _check_entry_meta(entry, error)
        tags = tuple(dict.fromkeys((*meta.get("tags", ()), *tags)))
        if "guard" in meta and "guard" not in entry:
            entry = {**entry, "guard": meta["guard"]}
        for fields in _expand(entry, error):
            try:
                case = case_from_mapping(fields)
            except CaseError as exc:
                error(_field_in_message(str(exc), entry), str(exc))
            if case.id in seen:
                error(None, f"duplicate case id {case.id} (first made at {seen[case.id]})")
            seen[case.id] = where
            out.append(SuiteCase(case, name, tags, notes, where, display_path(source), span[0] if span else 0))
    return out


def load_suite(name: str, cases_dir: Path | None = None) -> list[SuiteCase]:
    """Every case of a suite; a directory suite may repeat a case across files (kept once)."""
    out: list[SuiteCase] = []
    seen: set[str] = set()
    for path in suite_paths(name, cases_dir):
        for sc in load_suite_text(_text(path), str(path)):
            if sc.case.id not in seen:
                seen.add(sc.case.id)
                out.append(sc)
    return out


def suite_metadata(path: Path) -> dict[str, Any]:
    return _suite_meta(tomllib.loads(_text(path)), str(path))


# --- selection: what `run --suite/--case/--dtype/--max-tokens` and the pytest plugin share ------


def cap_lengths(case: Case, max_tokens: int) -> Case:
    """Shorten q_len and kv_len so the longer is at most `max_tokens`, keeping their ratio and the
    head geometry (batch, heads, head dims) exactly; decode (Lq = 1) stays decode."""
    longest = max(case.q_len, case.kv_len)
    if longest <= max_tokens:
        return case
    shrink = max_tokens / longest
    return case.replace(q_len=max(1, round(case.q_len * shrink)), kv_len=max(1, round(case.kv_len * shrink)))


def parse_dtypes(text: str | None) -> set[str] | None:
    if not text:
        return None
    keep = {d.strip() for d in text.split(",") if d.strip()}
    bad = keep - set(DTYPES)
    if bad:
        raise SuiteError(f"--dtype {','.join(sorted(bad))} is not one of {', '.join(DTYPES)}")
    return keep


def select_cases(suites: Iterable[str], specs: Iterable[str] = (), dtypes: str | None = None,
                 max_tokens: int | None = None, cases_dir: Path | None = None,
                 guard: str | None = None) -> list[SuiteCase]:
    """Inline cases first, then each suite's; filtered by dtype, capped, de-duplicated by id.
    `guard` (--guard) sets every case's guard bands, over what the suite says."""
    if max_tokens is not None and max_tokens < 1:
        raise SuiteError(f"--max-tokens={max_tokens} must be a positive integer")
    if guard is not None and guard not in GUARDS:
        raise SuiteError(f"--guard {guard!r} is not one of {', '.join(GUARDS)}")
    chosen = [SuiteCase(parse_case_spec(spec), source="--case") for spec in specs]
    for name in suites:
        chosen += load_suite(name, cases_dir)
    keep = parse_dtypes(dtypes)
    out: list[SuiteCase] = []
    seen: set[str] = set()
    for sc in chosen:
        if keep is not None and sc.case.dtype not in keep:
            continue
        case = cap_lengths(sc.case, max_tokens) if max_tokens else sc.case
        case = case.replace(guard=guard) if guard is not None else case
        if case.id in seen:
            continue
        seen.add(case.id)
        out.append(replace(sc, case=case))
    return out


__all__ = ["CASES_DIR", "SuiteCase", "SuiteError", "available_suites", "cap_lengths", "load_suite",
           "load_suite_text", "select_cases", "suite_metadata", "suite_path", "suite_paths"]

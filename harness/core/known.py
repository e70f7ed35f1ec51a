"""Known failures: cases/known-failures.toml turns a matching FAIL under its ceiling into KNOWN.

    [[known]]
    id = "cpu-flash-gqa-dkdv"    # short name, shown in reports
    case = "*-h*x*-*"            # fnmatch pattern on the case id, or a list of them (any matches)
    impl = ["sdpa-flash"]        # fnmatch pattern(s) on the implementation name
    tensors = ["dk", "dv"]
    min_group_size = 8           # only cases with at least this group size
    device = "cpu*"              # fnmatch pattern on the device label (cpu-x86_64, cuda-sm_90, rocm-gfx942)
    torch = ">=2.11,<2.14"       # version range (comma = and), or an fnmatch pattern like "2.13*"
    cuda = ">=12.4"              # likewise any of VERSION_KEYS: cuda, hip, cudnn (9.19.0 as loaded),
                                 # rocm_fa_library ("aotriton"/"ck"), rocm, aotriton (0.11.1, from the
                                 # wheel's aotriton/config.h), aotriton_experimental (the env variable),
                                 # flash_attn, xformers, triton, hip_runtime, miopen, cuda_runtime, nvidia_driver
    max_ratio = 1.2              # ceiling on the tensor-level error/scale, or per tensor: {dk = 1.2, dv = 1.3}
    ratio_per_sqrt_group = true  # ... times sqrt(group_size), for a bug that grows like a low-precision group sum
    max_slice_ratio = 1.5        # optional ceilings at the other levels (same forms, same scaling)
    max_row_ratio = 3.0
    differential = {group-trend = 0.6}  # optional ceilings on differential rules (core/differential.py)
    evidence = "why this is a real backend bug, with the figures"
    cite = ["https://github.com/pytorch/pytorch/issues/NNN", "reports/findings/<dir>"]   # required: at least one
    gross = true                 # optional: also absorbs this entry's gross failures (see below)

A FAIL beyond any ceiling stays FAIL, and so does a failure at a level the entry has no
ceiling for (a known entry never hides a new or worse failure); a gross failure (NaN, O(1)
error) is absorbed only by an entry that says `gross = true`. Such an entry is for a bug already
reproduced and filed (a GPU runner's CI stays green on it until the vendor fixes it, and the ledger
then says FIXED): it must name its cases (not `case = "*"`) and cite a reports/findings/ directory
holding the repro. It absorbs a gross failure at the error levels and the non-finite rule only,
never a contract, crash or guard failure. An entry that matched results in a run but absorbed no failure is
FIXED: the run says so, and `gqa-harness known` lists entries no recent report has matched.
Every entry cites its evidence (`cite`): an upstream link (http/https) or a reports/findings/
directory of this repository, which must exist; the loader refuses an entry that cites neither.
The values entries range on come from run/env.environment_versions (the fingerprint's `versions`).
"""

from __future__ import annotations

import fnmatch
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .results import TENSORS
from .suites import CASES_DIR

KNOWN_FILE = CASES_DIR / "known-failures.toml"
VERSION_KEYS = ("torch", "cuda", "hip", "cudnn", "rocm_fa_library", "rocm", "aotriton", "aotriton_experimental",
                "flash_attn", "xformers", "triton", "hip_runtime", "miopen", "cuda_runtime", "nvidia_driver")
_KEYS = {"id", "case", "impl", "min_group_size", "tensors", "device", *VERSION_KEYS, "max_ratio",
         "ratio_per_sqrt_group", "max_slice_ratio", "max_row_ratio", "evidence", "cite",
         "differential", "gross"}
GROSS_RULES = ("tensor", "slice", "row", "nonfinite")  # what a `gross = true` entry may absorb
_LINK = re.compile(r"^https?://\S+$")
FINDINGS = "reports/findings/"
_RANGE = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*(\d+(?:\.\d+)*)\s*$")

Ceiling = float | dict[str, float] | None


class KnownFailuresError(ValueError):
    pass


def version_tuple(text: str) -> tuple[int, ...]:
    """Leading numeric components: '2.13.0+cpu' -> (2, 13, 0), '9.19.0' -> (9, 19, 0)."""
    parts = []
    for piece in re.split(r"[.+-]", str(text)):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def _cmp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (a > b) - (a < b)


def is_range(spec: str) -> bool:
    return any(op in spec for op in "<>=!")


def check_spec(spec: str) -> str | None:
    """None when `spec` is a valid range or pattern, else why not."""
    if not is_range(spec):
        return None
    for clause in spec.split(","):
        if not _RANGE.match(clause):
            return f"{clause.strip()!r} is not a comparison like >=2.11"
    return None


def version_matches(spec: str, version: str | None) -> bool:
    """`spec` is '*' (anything, present or not), an fnmatch pattern, or comparisons joined by commas."""
    if spec == "*":
        return True
    if version is None:
        return False
    if not is_range(spec):
        return fnmatch.fnmatchcase(str(version), spec)
    have = version_tuple(version)
    ops = {">=": lambda c: c >= 0, "<=": lambda c: c <= 0, "==": lambda c: c == 0, "!=": lambda c: c != 0,
           ">": lambda c: c > 0, "<": lambda c: c < 0}
    for clause in spec.split(","):
        op, want = _RANGE.match(clause).groups()
        if not ops[op](_cmp(have, version_tuple(want))):
            return False
    return True


@dataclass(frozen=True)
class KnownFailure:
    id: str
    case: tuple[str, ...]  # fnmatch patterns on the case id; any matches
    impl: tuple[str, ...]
    tensors: tuple[str, ...]
    device: str
    torch: str
    max_ratio: float | dict[str, float]
    evidence: str
    ratio_per_sqrt_group: bool = False
    max_slice_ratio: Ceiling = None
    max_row_ratio: Ceiling = None
    min_group_size: int = 1
    cuda: str = "*"
    hip: str = "*"
    cudnn: str = "*"
    rocm_fa_library: str = "*"
    rocm: str = "*"
    aotriton: str = "*"
    aotriton_experimental: str = "*"
    flash_attn: str = "*"
    xformers: str = "*"
    triton: str = "*"
    hip_runtime: str = "*"
    miopen: str = "*"
    cuda_runtime: str = "*"
    nvidia_driver: str = "*"
    cite: tuple[str, ...] = ()  # upstream links and reports/findings/ directories
    differential: dict[str, float] = field(default_factory=dict, hash=False)  # differential rule -> ceiling (differential.py)
    gross: bool = False  # also absorbs gross failures (NaN, O(1)) of what it matches: a filed, reproduced bug

    def matches(self, case_id: str, impl: str, tensor: str, device_label: str, versions: dict[str, str | None],
                group_size: int = 1) -> bool:
        """`versions`: the environment's values of VERSION_KEYS (run.env.environment_versions)."""
        return (group_size >= self.min_group_size and any(fnmatch.fnmatchcase(case_id, p) for p in self.case)
                and any(fnmatch.fnmatchcase(impl, p) for p in self.impl)
                and tensor in self.tensors and fnmatch.fnmatchcase(device_label, self.device)
                and all(version_matches(getattr(self, k), versions.get(k)) for k in VERSION_KEYS))

    def ceilings(self, group_size: int, tensor: str | None = None) -> dict[str, float]:
        k = math.sqrt(group_size) if self.ratio_per_sqrt_group else 1.0
        out = {}
        for level, ceiling in (("tensor", self.max_ratio), ("slice", self.max_slice_ratio), ("row", self.max_row_ratio)):
            value = _for_tensor(ceiling, tensor)
            if value is not None:
                out[level] = value * k
        return out

    def absorbs(self, rule: str, severity: str, level_ratios: dict[str, float], tensor: str, group_size: int) -> bool:
        """Whether a failure at `rule` with these worst ratios per level is under every ceiling this entry
        has; a gross failure only by a `gross = true` entry, and one at a level without a ceiling never is."""
        if severity == "gross":
            return self.gross and rule in GROSS_RULES
        if rule not in ("tensor", "slice", "row") or not level_ratios:
            return False
        ceilings = self.ceilings(group_size, tensor)
        if rule not in ceilings:
            return False
        return all(level_ratios[lv] <= c for lv, c in ceilings.items())


def _for_tensor(ceiling: Ceiling, tensor: str | None) -> float | None:
    if isinstance(ceiling, dict):
        if tensor is None:
            return max(ceiling.values())
        return ceiling.get(tensor)
    return ceiling


def _ceiling(entry: dict, key: str, tensors: tuple[str, ...], where: str) -> Ceiling:
    raw = entry.get(key)
    if raw is None:
        return None
    values = raw if isinstance(raw, dict) else {t: raw for t in tensors}
    extra = set(values) - set(tensors)
    if isinstance(raw, dict) and extra:
        raise KnownFailuresError(f"{where}: {key} names {', '.join(sorted(extra))}, not in tensors {list(tensors)}")
    if isinstance(raw, dict) and key == "max_ratio" and set(tensors) - set(values):
        missing = ", ".join(sorted(set(tensors) - set(values)))
        raise KnownFailuresError(f"{where}: max_ratio has no ceiling for {missing}")
    for tensor, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise KnownFailuresError(f"{where}: {key} for {tensor} must be a positive number, got {value!r}")
    return {t: float(v) for t, v in raw.items()} if isinstance(raw, dict) else float(raw)


def _citations(entry: dict[str, Any], where: str, roots: tuple[Path, ...]) -> tuple[str, ...]:
    """The entry's `cite`: each an upstream link or an existing reports/findings/ directory."""
    raw = entry.get("cite", [])
    cites = [raw] if isinstance(raw, str) else raw
    if not isinstance(cites, list) or not all(isinstance(c, str) for c in cites) or not cites:
        raise KnownFailuresError(f"{where}: cites neither an upstream link nor a {FINDINGS} directory: add "
                                 f"cite = [\"https://...\"] or cite = [\"{FINDINGS}<dir>\"]")
    for c in cites:
        if _LINK.match(c):
            continue
        if not c.startswith(FINDINGS) or c.rstrip("/") == FINDINGS.rstrip("/"):
            raise KnownFailuresError(f"{where}: cite {c!r} is neither an http(s) link nor a {FINDINGS}<dir> path")
        if roots and not any((root / c).is_dir() for root in roots):
            raise KnownFailuresError(f"{where}: cite {c!r}: no such directory")
    return tuple(cites)


def entry_lines(path: Path) -> dict[str, int]:
    """Entry id -> the line of its [[known]] table (1-based), for annotations that point at an entry."""
    lines, start = {}, 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if re.match(r"\s*\[\[\s*known\s*\]\]", line):
            start = n
        m = re.match(r"""\s*id\s*=\s*["']([^"']+)["']""", line)
        if m and start:
            lines.setdefault(m[1], start)
    return lines


def parse_entry(entry: dict[str, Any], where: str, roots: tuple[Path, ...] = ()) -> KnownFailure:
    """One [[known]] table; `roots`: where a reports/findings/ citation must exist (none: not checked)."""
    unknown = set(entry) - _KEYS
    if unknown:
        raise KnownFailuresError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    missing = {"id", "case", "impl", "tensors", "max_ratio", "evidence"} - set(entry)
    if missing:
        raise KnownFailuresError(f"{where}: missing {', '.join(sorted(missing))}")
    where = f"{where} ({entry['id']})"
    tensors = tuple(entry["tensors"]) if isinstance(entry["tensors"], list) else (entry["tensors"],)
    bad = [t for t in tensors if t not in TENSORS]
    if bad:
        raise KnownFailuresError(f"{where}: tensors {bad} are not among {', '.join(TENSORS)}")
    versions = {k: str(entry.get(k, "*")) for k in VERSION_KEYS}
    for key, spec in versions.items():
        problem = check_spec(spec)
        if problem:
            raise KnownFailuresError(f"{where}: {key} = {spec!r}: {problem}")
    return KnownFailure(
        id=str(entry["id"]), case=_patterns(entry["case"], "case", where),
        impl=tuple(entry["impl"]) if isinstance(entry["impl"], list) else (entry["impl"],), tensors=tensors,
        device=entry.get("device", "*"), max_ratio=_ceiling(entry, "max_ratio", tensors, where), evidence=entry["evidence"],
        ratio_per_sqrt_group=bool(entry.get("ratio_per_sqrt_group", False)),
        max_slice_ratio=_ceiling(entry, "max_slice_ratio", tensors, where),
        max_row_ratio=_ceiling(entry, "max_row_ratio", tensors, where),
        min_group_size=int(entry.get("min_group_size", 1)), cite=_citations(entry, where, roots), **versions,
        differential=_differential(entry.get("differential", {}), where), gross=_gross(entry, where),
    )


def _patterns(raw: Any, key: str, where: str) -> tuple[str, ...]:
    values = [raw] if isinstance(raw, str) else raw
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise KnownFailuresError(f"{where}: {key} must be a pattern or a list of patterns, got {raw!r}")
    return tuple(values)


def _gross(entry: dict[str, Any], where: str) -> bool:
    """`gross = true` hides NaN and O(1) errors, so it must be narrow and point at a reproduced finding."""
    gross = entry.get("gross", False)
    if not isinstance(gross, bool):
        raise KnownFailuresError(f"{where}: gross must be true or false, got {gross!r}")
    if gross and any(p.strip("*") == "" for p in _patterns(entry["case"], "case", where)):
        raise KnownFailuresError(f"{where}: gross = true needs case patterns naming its cases, not {entry['case']!r}")
    cites = entry.get("cite", [])
    if gross and not any(str(c).startswith(FINDINGS) for c in ([cites] if isinstance(cites, str) else cites)):
        raise KnownFailuresError(f"{where}: gross = true needs a {FINDINGS}<dir> citation holding the repro")
    return gross


def _differential(raw: Any, where: str) -> dict[str, float]:
    """`differential = {group-trend = 0.6}`: ceilings on differential rules' values (slope, floor units)."""
    if not isinstance(raw, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                            for v in raw.values()):
        raise KnownFailuresError(f"{where}: differential must map rule names to positive numbers, got {raw!r}")
    return {str(k): float(v) for k, v in raw.items()}


def load_known(path: Path | None = None) -> list[KnownFailure]:
    path = path or KNOWN_FILE
    if not path.exists():
        return []
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise KnownFailuresError(f"{path}: malformed TOML: {exc}") from None
    roots = (path.resolve().parent.parent, CASES_DIR.parent)  # the repository of the file, and the harness's
    entries = [parse_entry(entry, f"{path}: entry {i + 1}", roots) for i, entry in enumerate(data.get("known", []))]
    ids = [e.id for e in entries]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise KnownFailuresError(f"{path}: duplicate id(s) {', '.join(dupes)}")
    return entries


def names_cases_by_pattern(entry: KnownFailure) -> bool:
    """True when the entry's `case` has a wildcard: one run passing what it matched does not show the
    bug gone from the cases the pattern reaches that the run did not select."""
    return any(ch in pattern for pattern in entry.case for ch in "*?[")


def known_settings(known: list[KnownFailure]) -> dict[str, Any]:
    """What a saved run records of the entries it loaded: their ids, and which name cases by pattern."""
    return {"known_entries": [k.id for k in known],
            "known_by_pattern": [k.id for k in known if names_cases_by_pattern(k)]}

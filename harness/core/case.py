"""The Case: one attention problem, validated, with a stable id used everywhere.

A Case is pure data (no tensors): what to generate and how to call the kernel.
Its id is the key of every report row, pytest item and repro script, so the id
format below is part of the public contract and must stay stable.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

DTYPES = ("bf16", "fp16", "fp32")
CAUSAL = ("none", "top-left", "bottom-right")
# "bool": random keep-mask (every row keeps >= 1 key); "additive": random float
# bias with some positions at mask_fill; "padding": per-batch key padding;
# "fully-masked-rows": a bool mask with some rows all False (torch: zero row);
# "block-diagonal", "sliding-window": structured bool masks.
MASKS = ("none", "bool", "additive", "padding", "fully-masked-rows", "block-diagonal", "sliding-window")
MASK_FILLS = ("-inf", "-65504", "finfo.min")
# Layouts are applied on the device, after the copy (a .to() would undo them).
LAYOUTS = ("bhld", "blhd", "v-noncontig", "kv-expanded", "grad-out-noncontig")
VALUES = ("normal", "uniform", "large-logits", "negative-lse", "outlier-channels")
# Guard bands around q, k, v, grad_out and the mask on the device (run/guards.py): "nan" fills them with
# NaN, "sentinel" with a large finite value for kernels that would turn a NaN read into a crash.
GUARDS = ("none", "nan", "sentinel")
# The sentinel: large, finite and exact in every dtype; a result moved by SENTINEL/64 or more read it.
SENTINEL = 16384.0

_CAUSAL_TAG = {"none": "", "top-left": "causal", "bottom-right": "causal-br"}


class CaseError(ValueError):
    """Bad case description; the message is one line naming the field."""


@dataclass(frozen=True)
class Case:
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str = "bf16"
    v_head_dim: int | None = None
    causal: str = "none"
    mask: str = "none"
    mask_fill: str = "-inf"
    mask_per_head: bool = False
    scale: float | None = None
    layout: str = "bhld"
    values: str = "normal"
    seed: int = 0
    grads: bool = True
    guard: str = "none"
    # long context: grad_out is zero off a sample of query rows and the oracle computes only those
    # rows (core/sampling.py), so its cost is O(rows x Lk), not O(Lq x Lk)
    long: bool = False

    def __post_init__(self) -> None:
        validate(self)

    @property
    def group_size(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def value_dim(self) -> int:
        return self.v_head_dim if self.v_head_dim is not None else self.head_dim

    @property
    def has_mask(self) -> bool:
        return self.mask != "none"

    @property
    def id(self) -> str:
        return case_id(self)

    def replace(self, **changes: Any) -> "Case":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flops(self) -> float:
        """Forward+backward FLOPs of the GEMMs: 12·B·Hq·Lq·Lk·D (4 forward, 8 backward), halved for causal."""
        d = (self.head_dim + self.value_dim) / 2
        f = 12.0 * self.batch * self.q_heads * self.q_len * self.kv_len * d
        if not self.grads:
            f /= 3
        return f / 2 if self.causal != "none" else f


def _positive(case: Case, name: str) -> None:
    value = getattr(case, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CaseError(f"{name}={value!r} must be a positive integer")


def _choice(case: Case, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(case, name)
    if value not in allowed:
        raise CaseError(f"{name}={value!r} is not one of {', '.join(allowed)}")


def validate(case: Case) -> None:
    for name in ("batch", "q_heads", "kv_heads", "q_len", "kv_len", "head_dim"):
        _positive(case, name)
    if case.v_head_dim is not None:
        _positive(case, "v_head_dim")
    if case.q_heads % case.kv_heads:
        raise CaseError(f"kv_heads={case.kv_heads} does not divide q_heads={case.q_heads}")
    _choice(case, "dtype", DTYPES)
    _choice(case, "causal", CAUSAL)
    _choice(case, "mask", MASKS)
    _choice(case, "mask_fill", MASK_FILLS)
    _choice(case, "layout", LAYOUTS)
    _choice(case, "values", VALUES)
    _choice(case, "guard", GUARDS)
    if not isinstance(case.seed, int) or isinstance(case.seed, bool) or case.seed < 0:
        raise CaseError(f"seed={case.seed!r} must be a non-negative integer")
    if case.scale is not None and (isinstance(case.scale, bool) or not isinstance(case.scale, (int, float))
                                   or not 0 < case.scale < math.inf):
        raise CaseError(f"scale={case.scale!r} must be a positive finite number or None")
    elements = case.batch * max(case.q_heads * case.q_len, case.kv_heads * case.kv_len) * max(case.head_dim, case.value_dim)
    if max(case.q_len, case.kv_len) > MAX_LENGTH or elements > MAX_ELEMENTS:
        raise CaseError(f"{case.batch}x{case.q_heads}x{case.q_len}x{case.head_dim} (kv {case.kv_len}) is beyond any "
                        f"machine: lengths up to {MAX_LENGTH:,} and {MAX_ELEMENTS:.0e} elements per tensor")
    if case.layout == "kv-expanded" and case.kv_heads != 1:
        raise CaseError(f"layout='kv-expanded' needs kv_heads=1 (a stride-0 expand of one kv head), got kv_heads={case.kv_heads}")
    if case.mask_per_head and not case.has_mask:
        raise CaseError("mask_per_head=True needs a mask other than 'none'")
    if case.mask == "padding" and case.batch < 2:
        raise CaseError("mask='padding' needs batch >= 2 (each batch pads a different number of keys)")


# Parse-time sanity bounds: beyond them no machine holds the case (2^40 elements of fp64 is 8 TiB); cases
# that merely exceed this machine are UNSUPPORTED at run time with the memory estimate (run/memory.py).
MAX_LENGTH = 1 << 31
MAX_ELEMENTS = 1 << 40


def _fmt_scale(scale: float) -> str:
    return f"{scale:.6g}".replace("-", "m")


def case_id(case: Case) -> str:
    """Readable, stable id: only non-default fields appear, in a fixed order."""
    parts = [
        f"b{case.batch}",
        f"h{case.q_heads}x{case.kv_heads}",
        f"q{case.q_len}",
        f"k{case.kv_len}",
        f"d{case.head_dim}" + (f"v{case.v_head_dim}" if case.v_head_dim is not None else ""),
        case.dtype,
        _CAUSAL_TAG[case.causal],
    ]
    if case.has_mask:
        mask = f"mask-{case.mask}"
        if case.mask_fill != "-inf":
            mask += f"-{case.mask_fill.replace('-', 'm')}"
        if case.mask_per_head:
            mask += "-perhead"
        parts.append(mask)
    if case.scale is not None:
        parts.append(f"sc{_fmt_scale(case.scale)}")
    if case.layout != "bhld":
        parts.append(case.layout)
    if case.values != "normal":
        parts.append(case.values)
    if not case.grads:
        parts.append("fwd")
    if case.guard != "none":
        parts.append(f"guard-{case.guard}")
    if case.long:
        parts.append("long")
    parts.append(f"s{case.seed}")
    return "-".join(p for p in parts if p)


# Short keys accepted by --case and in TOML, mapped to field names.
ALIASES = {
    "b": "batch", "hq": "q_heads", "hkv": "kv_heads", "lq": "q_len", "lk": "kv_len",
    "d": "head_dim", "dv": "v_head_dim", "s": "seed",
}
FIELDS = {f.name: f for f in dataclasses.fields(Case)}
_INT_FIELDS = {"batch", "q_heads", "kv_heads", "q_len", "kv_len", "head_dim", "v_head_dim", "seed"}
_BOOL_FIELDS = {"mask_per_head", "grads", "long"}


def coerce_field(name: str, raw: Any) -> Any:
    """Turn a raw value (string from --case, or TOML scalar) into the field's type."""
    if name in _INT_FIELDS:
        if raw is None or (name == "v_head_dim" and raw in ("", "none", "None")):
            return None
        if isinstance(raw, (bool, float)):  # TOML's 1.5 (or 2.0) is not an integer: no silent truncation
            raise CaseError(f"{name}={raw!r} must be an integer")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise CaseError(f"{name}={raw!r} must be an integer") from None
    if name in _BOOL_FIELDS:
        if isinstance(raw, bool):
            return raw
        text = str(raw).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise CaseError(f"{name}={raw!r} must be true or false")
    if name == "scale":
        if raw is None or raw in ("none", "None", ""):
            return None
        try:
            return float(raw)
        except (TypeError, ValueError, OverflowError):
            raise CaseError(f"scale={raw!r} must be a number or none") from None
    if name == "causal" and isinstance(raw, bool):
        return "top-left" if raw else "none"
    return str(raw)


def case_from_mapping(data: dict[str, Any]) -> Case:
    fields: dict[str, Any] = {}
    for key, raw in data.items():
        name = ALIASES.get(key, key)
        if name not in FIELDS:
            known = ", ".join(sorted(set(FIELDS) | set(ALIASES)))
            raise CaseError(f"unknown case field {key!r} (known: {known})")
        fields[name] = coerce_field(name, raw)
    missing = [n for n in ("batch", "q_heads", "kv_heads", "q_len", "head_dim") if n not in fields]
    if missing:
        raise CaseError(f"case is missing {', '.join(missing)}")
    fields.setdefault("kv_len", fields["q_len"])
    try:
        return Case(**fields)
    except TypeError as exc:  # pragma: no cover - guarded by the FIELDS check
        raise CaseError(str(exc)) from None


def parse_case_spec(spec: str) -> Case:
    """Parse `b=2,hq=32,hkv=8,lq=128,lk=128,d=128,dtype=bf16,causal=top-left`."""
    data: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise CaseError(f"--case item {item!r} is not key=value")
        key, value = (x.strip() for x in item.split("=", 1))
        name = ALIASES.get(key, key)
        twice = next((k for k in data if ALIASES.get(k, k) == name), None)
        if twice is not None:
            raise CaseError(f"--case gives {name} twice ({twice}={data[twice]}, {key}={value})")
        data[key] = value
    return case_from_mapping(data)


def case_spec(case: Case) -> str:
    """The inverse of parse_case_spec: a --case string that rebuilds this case."""
    defaults = Case(1, 1, 1, 1, 1, 1)
    short = {v: k for k, v in ALIASES.items()}
    items = []
    for name in FIELDS:
        value = getattr(case, name)
        if name in ("batch", "q_heads", "kv_heads", "q_len", "kv_len", "head_dim") or value != getattr(defaults, name):
            items.append(f"{short.get(name, name)}={'none' if value is None else value}")
    return ",".join(items)

"""JSON Schemas of the files the harness writes, shipped with the package, and the validator the store uses.

`report` (schema 1: `<label>.json`), `stream` (one record of `<label>.jsonl`), `bench`, `calibration`,
`audit` and `noise` are Draft 2020-12 schemas in this directory; `.ci/run` checks every committed
file against them with check-jsonschema, and the store checks every file it loads with `first_error`.

The validator is the small subset of JSON Schema these files use (type, enum, const, properties,
required, additionalProperties, items, minItems, minimum, maximum, pattern, minLength, anyOf, local
$ref); a schema using any other keyword is refused when loaded, so a schema and this code cannot
drift apart silently. tests/test_schema.py checks it agrees with the `jsonschema` reference
implementation on every committed file and on broken ones. A dependency was not worth it for this.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).resolve().parent
KINDS = ("report", "stream", "bench", "calibration", "audit", "noise")
_ANNOTATIONS = {"$schema", "$id", "$comment", "title", "description", "$defs", "examples", "default"}
_CHECKED = {"type", "enum", "const", "properties", "required", "additionalProperties", "items", "minItems",
            "minimum", "maximum", "pattern", "minLength", "anyOf", "$ref"}
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


_UNTAGGED = object()


class SchemaError(ValueError):
    """A schema file this validator cannot apply (a keyword outside its subset)."""


def schema_path(kind: str) -> Path:
    return SCHEMA_DIR / f"{kind}.schema.json"


@lru_cache(maxsize=None)
def load_schema(kind: str) -> dict[str, Any]:
    if kind not in KINDS:
        raise SchemaError(f"no schema {kind!r} (known: {', '.join(KINDS)})")
    schema = json.loads(schema_path(kind).read_text())
    _check_keywords(schema, kind)
    return schema


def _check_keywords(node: Any, where: str) -> None:
    if not isinstance(node, dict):
        return
    unknown = set(node) - _ANNOTATIONS - _CHECKED
    if unknown:
        raise SchemaError(f"{where}: keyword(s) {', '.join(sorted(unknown))} are outside the validator's subset")
    for key in ("properties", "$defs"):
        for name, sub in (node.get(key) or {}).items():
            _check_keywords(sub, f"{where}/{key}/{name}")
    for key in ("items", "additionalProperties"):
        _check_keywords(node.get(key), f"{where}/{key}")
    for i, sub in enumerate(node.get("anyOf") or ()):
        _check_keywords(sub, f"{where}/anyOf/{i}")


def _resolve(ref: str, root: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(schema, root of that schema) a `$ref` names: `#/$defs/NAME` here, or `KIND.schema.json#/$defs/NAME`."""
    file, _, pointer = ref.partition("#")
    if not pointer.startswith("/$defs/") or (file and not file.endswith(".schema.json")):
        raise SchemaError(f"only #/$defs/ references (here or in KIND.schema.json) are supported, not {ref}")
    target = load_schema(file.removesuffix(".schema.json")) if file else root
    return target["$defs"][pointer.removeprefix("/$defs/")], target


def _path(parts: tuple) -> str:
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
    return text or "(top level)"


def _short(value: Any) -> str:
    text = json.dumps(value, allow_nan=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _check(value: Any, node: dict[str, Any], root: dict[str, Any], at: tuple) -> tuple[tuple, str] | None:
    """The first violation of `node` by `value`, depth first, or None (stops at the first: loads stay fast)."""
    if "$ref" in node:
        found = _check(value, *_resolve(node["$ref"], root), at)
        if found:
            return found
    if "type" in node:
        types = node["type"] if isinstance(node["type"], list) else [node["type"]]
        if not any(_TYPES[t](value) for t in types):
            return at, f"{_short(value)} is not of type {' or '.join(types)}"
    if "const" in node and value != node["const"]:
        return at, f"{_short(value)} is not {_short(node['const'])}"
    if "enum" in node and value not in node["enum"]:
        return at, f"{_short(value)} is not one of {', '.join(map(str, node['enum']))}"
    if isinstance(value, str):
        if "minLength" in node and len(value) < node["minLength"]:
            return at, f"{_short(value)} is shorter than {node['minLength']}"
        if "pattern" in node and not re.search(node["pattern"], value):
            return at, f"{_short(value)} does not match {node['pattern']}"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in node and value < node["minimum"]:
            return at, f"{value} is less than {node['minimum']}"
        if "maximum" in node and value > node["maximum"]:
            return at, f"{value} is more than {node['maximum']}"
    elif isinstance(value, dict):
        found = _check_object(value, node, root, at)
        if found:
            return found
    elif isinstance(value, list):
        if "minItems" in node and len(value) < node["minItems"]:
            return at, f"has {len(value)} item(s), fewer than {node['minItems']}"
        items = node.get("items")
        if isinstance(items, dict):
            for i, item in enumerate(value):
                found = _check(item, items, root, (*at, i))
                if found:
                    return found
    return _check_any(value, node["anyOf"], root, at) if "anyOf" in node else None


def _check_object(value: dict, node: dict[str, Any], root: dict[str, Any], at: tuple) -> tuple[tuple, str] | None:
    for key in node.get("required", ()):
        if key not in value:
            return at, f"missing required {key!r}"
    props = node.get("properties", {})
    extra = node.get("additionalProperties", True)
    for key, item in value.items():
        sub = props.get(key, extra)
        if sub is False:
            return (*at, key), "is not allowed here"
        if isinstance(sub, dict) and sub:
            found = _check(item, sub, root, (*at, key))
            if found:
                return found
    return None


def _check_any(value: Any, alternatives: list[dict[str, Any]], root: dict[str, Any], at: tuple):
    tags = [((alt.get("properties") or {}).get("type") or {}).get("const", _UNTAGGED) for alt in alternatives]
    if isinstance(value, dict) and _UNTAGGED not in tags and value.get("type") in tags:
        # every form is tagged by its `type`: only the one this record names can match, so its errors are the ones
        return _check(value, alternatives[tags.index(value["type"])], root, at)
    firsts = []
    for alt in alternatives:
        found = _check(value, alt, root, at)
        if found is None:
            return None
        firsts.append(found)
    where, why = firsts[0]
    return where, f"matches none of the {len(firsts)} allowed forms (the first: {why})"


def first_error(value: Any, kind: str) -> str | None:
    """None when `value` is valid against the `kind` schema, else one line naming the first violation."""
    schema = load_schema(kind)
    found = _check(value, schema, schema, ())
    return None if found is None else f"{_path(found[0])}: {found[1]}"

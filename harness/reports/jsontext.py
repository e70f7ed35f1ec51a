"""A report's JSON text: exactly json.dumps(obj, indent=1, allow_nan=False), byte for byte, fast where
a report is big.

With an indent, the standard library encodes in pure Python, one generator step per value: a case with
a million (batch, head) slices (issue 17's n15) has four million-entry per-slice tables and took
seconds. Here every table (a list of rows of finite floats: `slice_ratio`) is cut out and replaced by a
placeholder string, the rest is encoded by json.dumps as before, and each table is rendered with one
join per row at the indentation the encoder would have used, then put in the placeholder's place.
"""

from __future__ import annotations

import json
import math
from typing import Any

INDENT = 1
_TOKEN = "\x00gqa-table-{}\x00"  # no report string holds a NUL; json.dumps writes it as \u0000
_isfinite = math.isfinite


def _row(x: Any) -> bool:
    return type(x) is list and all(type(v) is float for v in x) and all(map(_isfinite, x))


def _is_table(obj: list) -> bool:
    """A non-empty list of lists of finite floats (a row may be empty)."""
    return bool(obj) and type(obj[0]) is list and all(map(_row, obj))


def _cut(obj: Any, tables: list[list[list[float]]]) -> Any:
    """`obj` with every table replaced by its placeholder (appended to `tables`)."""
    if isinstance(obj, dict):
        return {k: _cut(v, tables) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if type(obj) is list and _is_table(obj):
            tables.append(obj)
            return _TOKEN.format(len(tables) - 1)
        return [_cut(v, tables) for v in obj]
    return obj


def _render(rows: list[list[float]], level: int) -> str:
    """json.dumps's indented text of a table whose opening bracket sits at indent level `level`."""
    pad1, pad2 = "\n" + " " * (INDENT * (level + 1)), "\n" + " " * (INDENT * (level + 2))
    sep2 = "," + pad2
    rendered = ["[]" if not row else "[" + pad2 + sep2.join(map(float.__repr__, row)) + pad1 + "]" for row in rows]
    return "[" + pad1 + ("," + pad1).join(rendered) + "\n" + " " * (INDENT * level) + "]"


def dumps(obj: Any) -> str:
    """json.dumps(obj, indent=1, allow_nan=False) (non-finite floats raise ValueError, as there)."""
    tables: list[list[list[float]]] = []
    text = json.dumps(_cut(obj, tables), indent=INDENT, allow_nan=False)
    if not tables:
        return text
    parts, pos = [], 0
    for i, rows in enumerate(tables):
        token = json.dumps(_TOKEN.format(i))
        at = text.index(token, pos)
        line_start = text.rfind("\n", 0, at) + 1
        level = (len(text[line_start:at]) - len(text[line_start:at].lstrip(" "))) // INDENT
        parts += [text[pos:at], _render(rows, level)]
        pos = at + len(token)
    parts.append(text[pos:])
    return "".join(parts)

"""The one failure-text renderer: what the Markdown report, the pytest failure message, strategies.check
and repro say about a result, and the command that reproduces it. It reads results in their
saved (dict) form, so a live result and a report loaded from disk read alike."""

from __future__ import annotations

import html
import shlex
from typing import Any

from ..core.metrics import ranges

FAILING = ("FAIL", "ERROR")
KV_TENSORS = ("dk", "dv")  # their (batch, head) slices are kv heads; out and dq have query heads
MAX_BATCHES = 4  # batches named in a heads list; the JSON has every (batch, head)


def cell(text: Any) -> str:
    """Text safe inside a Markdown table cell: no pipe to split it, no HTML to run, one line."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def head_kind(tensor: str) -> str:
    return "kv-head" if tensor in KV_TENSORS else "q-head"


def heads_text(heads: list[list[int]] | tuple[tuple[int, int], ...], tensor: str,
               shape: tuple[int, int] | None = None, total: int | None = None) -> str:
    """Failing (batch, head) slices named by kind: 'all 16 q-heads', or 'kv-heads 0-1, 3 (b0); 2 (b1)'.
    `shape` = (batches, heads) of the tensor, when known, tells 'all' from 'some'; `total`: how many fail where
    `heads` lists only the first of them (a report's failing_heads_total)."""
    if not heads:
        return "—"
    kind = head_kind(tensor)
    count = total if total is not None else len({tuple(h) for h in heads})
    if shape is not None and count == shape[0] * shape[1]:
        return f"all {shape[1]} {kind}s" + (f" of all {shape[0]} batches" if shape[0] > 1 else "")
    by_batch: dict[int, list[int]] = {}
    for b, h in heads:
        by_batch.setdefault(b, []).append(h)
    parts = [ranges(hs) + (f" (b{b})" if len(by_batch) > 1 or b else "") for b, hs in sorted(by_batch.items())]
    more = f"; … in {len(parts)} batches" if len(parts) > MAX_BATCHES else ""
    listed = f"; {total:,} slices in all" if total is not None and total > len(heads) else ""
    return f"{kind}s " + "; ".join(parts[:MAX_BATCHES]) + more + listed


def slice_shape(tensor: dict[str, Any]) -> tuple[int, int] | None:
    metrics = tensor.get("metrics") or {}
    if metrics.get("slice_shape"):  # a table too large to keep whole (metrics.SLICE_TABLE_MAX)
        return tuple(metrics["slice_shape"])
    rows = metrics.get("slice_ratio") or None
    return (len(rows), len(rows[0])) if rows and rows[0] else None


def failing_heads_text(tensor: dict[str, Any], name: str) -> str:
    """heads_text of a report's verdict (its failing slices, the tensor's shape, the count past the listed ones)."""
    return heads_text(tensor.get("failing_heads") or [], name, slice_shape(tensor), tensor.get("failing_heads_total"))


def nonfinite_text(name: str, tensor: dict[str, Any]) -> str:
    """'dq: 4096 NaN, 0 Inf (100.0% of dq), first at [0, 0, 0, 0], rows 0-127, all 8 q-heads'."""
    m = tensor.get("metrics") or {}
    where = m.get("nonfinite_where") or {}
    if not where:
        return ""
    heads = heads_text(where.get("heads", []), name, slice_shape(tensor))
    return (f"{name}: {m.get('nan', 0)} NaN, {m.get('inf', 0)} Inf ({where['fraction']:.1%} of {name}), first at "
            f"{where['first_index']}, rows {where['rows']}, {heads}")


def reproduce_command(spec: str, impl: str, device: str, notes: dict[str, Any] | None = None) -> str:
    """The command that brings this result back: the replay for an order-dependent FAIL (the case alone
    passes), else one run of the case on the implementation."""
    order = (notes or {}).get("order") or {}
    if order.get("order_dependent") and order.get("replay"):
        return order["replay"]
    return f"gqa-harness run --device {shlex.quote(device)} --case {quoted(spec)} --impl {shlex.quote(impl)}"


def quoted(text: str) -> str:
    """Always in single quotes, as a case spec is shown everywhere (shlex.quote leaves safe text bare)."""
    return f"'{text}'" if "'" not in text else shlex.quote(text)


GUARD_RULES = {"oob-read": "an out-of-bounds read", "oob-write": "an out-of-bounds write",
               "input-modified": "an input modified"}  # caught by guard bands (run/guards.py)


def tensor_line(name: str, tensor: dict[str, Any]) -> str:
    severity = f" {tensor['severity']}" if tensor.get("severity") else ""
    heads = failing_heads_text(tensor, name)
    rule = tensor.get("rule") or "-"
    where = (f"by rule {rule} ({GUARD_RULES[rule]}, caught by guard bands)" if rule in GUARD_RULES
             else f"at {rule} level")
    return (f"{name} {tensor['status']}{severity} {where}: {tensor.get('reason', '')}"
            + (f"; failing {heads}" if heads != "—" else ""))


def result_text(result: dict[str, Any], spec: str, device: str, statuses: tuple[str, ...] = (*FAILING, "KNOWN")) -> str:
    """Several lines: the verdict, each failing tensor with its evidence, and the reproduce command."""
    lines = [f"{result['case_id']} [{result['impl']}]: {result['status']}"]
    if result.get("error"):
        lines.append(f"  {result.get('error_kind') or 'error'}: {result['error']}")
    lines += [f"  {tensor_line(name, t)}" for name, t in result.get("tensors", {}).items() if t["status"] in statuses]
    order = (result.get("notes") or {}).get("order")
    if order:
        lines.append(f"  order check: {order.get('summary', '')}")
    lines.append(f"  reproduce: {reproduce_command(spec, result['impl'], device, result.get('notes'))}")
    return "\n".join(lines)

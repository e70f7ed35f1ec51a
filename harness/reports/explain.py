"""The one failure-text renderer: what the Markdown report, the pytest failure message, strategies.check
and repro say about a result, and the command that reproduces it. It reads results in their
saved (dict) form, so a live result and a report loaded from disk read alike."""

from __future__ import annotations

import shlex
from typing import Any

FAILING = ("FAIL", "ERROR")


def heads_text(heads: list[list[int]] | tuple[tuple[int, int], ...], limit: int = 8) -> str:
    if not heads:
        return "—"
    shown = ", ".join(f"b{b}h{h}" for b, h in heads[:limit])
    return shown + (f" (+{len(heads) - limit})" if len(heads) > limit else "")


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


def tensor_line(name: str, tensor: dict[str, Any]) -> str:
    severity = f" {tensor['severity']}" if tensor.get("severity") else ""
    heads = heads_text(tensor.get("failing_heads") or [])
    return (f"{name} {tensor['status']}{severity} at {tensor.get('rule') or '-'} level: {tensor.get('reason', '')}"
            + (f"; failing heads {heads}" if heads != "—" else ""))


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

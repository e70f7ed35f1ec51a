"""Run one implementation on one case on one device: the only place that touches the device.

Inputs arrive as CPU tensors; they are copied to the device, the case's layout is
applied there (and checked by its strides), the kernel runs forward and, through
autograd, backward, and the results come back to the CPU in their own dtype.
A kernel that refuses, raises or runs out of memory is a `Failure`, never an exception
out of an executor: the same kinds in this process and in a worker (worker.py).
"""

from __future__ import annotations

import gc
import re
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.nn.attention.bias import causal_lower_right

from ..core.inputs import Inputs, apply_layout, check_strides
from ..core.oracle import causal_keep
from ..core.results import Outputs
from ..implementations import Implementation, SdpaCall
from .determinism import run_repeated
_REFUSAL = re.compile(r"No available kernel|No viable backend|not supported|Unsupported|requires", re.I)


class Unsupported(Exception):
    """The kernel refused the case; the message is torch's reason."""


class HarnessDefect(Exception):
    """The harness failed to build what the case asks for (e.g. a layout did not survive)."""


@dataclass(frozen=True)
class Failure:
    """Why a call produced no outputs to judge. kind: unsupported (torch refused the case, `message` is
    its reason) | oom | harness (the harness could not build the case) | exception | crash | timeout."""

    kind: str
    message: str
    notes: dict[str, Any] = field(default_factory=dict)


# executor(impl, inputs, device) -> Outputs | Failure: in this process, or in a worker (worker.py)
Executor = Callable[[Implementation, Inputs, str], "Outputs | Failure"]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def failure_of(exc: Exception) -> Failure:
    """The Failure a kernel's exception stands for."""
    if isinstance(exc, Unsupported):
        return Failure("unsupported", str(exc))
    if isinstance(exc, torch.OutOfMemoryError):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return Failure("oom", first_line(exc))
    if isinstance(exc, HarnessDefect):
        return Failure("harness", f"harness defect: {exc}")
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return Failure("exception", first_line(exc), {"exception": tb.strip()[-2000:]})


def execute(impl: Implementation, inputs: Inputs, device: str, repeat: int = 1) -> Outputs | Failure:
    """One call in this process: the outputs, or why there are none."""
    try:
        return run_repeated(lambda: run_implementation(impl, inputs, device), repeat)
    except Exception as exc:  # noqa: BLE001 - a raising kernel is a result, the run goes on
        return failure_of(exc)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mask_and_causal(inputs: Inputs, device: torch.device, materialise: bool) -> tuple[object, bool]:
    """attn_mask and is_causal as a user would pass them for this case."""
    case = inputs.case
    mask = inputs.mask.to(device) if inputs.mask is not None else None
    if case.causal == "none":
        return mask, False
    if mask is None and case.causal == "top-left":
        return None, True
    if mask is None and not materialise:
        return causal_lower_right(case.q_len, case.kv_len), False
    keep = causal_keep(case, 0, case.q_len).to(device)
    if mask is None:
        return keep[None, None], False
    if mask.dtype == torch.bool:
        return mask & keep, False
    return mask.masked_fill(~keep, float("-inf")), False


def refusal_reason(exc: BaseException, caught: list[warnings.WarningMessage]) -> str | None:
    """torch's own reason when `exc` is a backend refusing the case, else None."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not isinstance(exc, RuntimeError) or not _REFUSAL.search(text):
        return None
    reasons = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
    return "; ".join(dict.fromkeys(reasons)) or text


def run_implementation(impl: Implementation, inputs: Inputs, device: str | torch.device) -> Outputs:
    case = inputs.case
    device = torch.device(device)
    leaves = {role: getattr(inputs, role).to(device) for role in ("q", "k", "v")}
    for leaf in leaves.values():
        leaf.requires_grad_(case.grads)
    kernel = {role: apply_layout(case, role, leaf) for role, leaf in leaves.items()}
    grad_out = apply_layout(case, "grad_out", inputs.grad_out.to(device))
    strides = {role: list(t.stride()) for role, t in {**kernel, "grad_out": grad_out}.items()}
    for role, t in {**kernel, "grad_out": grad_out}.items():
        problem = check_strides(case, role, t)
        if problem:
            raise HarnessDefect(f"layout not applied: {problem}")

    attn_mask, is_causal = _mask_and_causal(inputs, device, impl.materialise_causal_bias)
    call = SdpaCall(case=case, query=kernel["q"], key=kernel["k"], value=kernel["v"], attn_mask=attn_mask,
                    is_causal=is_causal, scale=case.scale, enable_gqa=kernel["q"].shape[1] != kernel["k"].shape[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = impl.forward(call)
            synchronize(device)
        except Exception as exc:
            reason = refusal_reason(exc, caught)
            if reason is not None:
                raise Unsupported(reason) from exc
            raise

    result = Outputs(tensors={"out": out.detach().cpu() if isinstance(out, torch.Tensor) else out},
                     notes=dict(call.notes), strides=strides)
    if isinstance(out, torch.Tensor):
        result.devices["out"] = str(out.device)
    if not case.grads:
        return result
    if not isinstance(out, torch.Tensor) or out.grad_fn is None:
        result.forward_only = "the output has no autograd graph (forward-only kernel)"
        return result
    try:
        grads = torch.autograd.grad(out, [leaves["q"], leaves["k"], leaves["v"]], grad_out, allow_unused=True)
        synchronize(device)
    except Exception as exc:  # noqa: BLE001 - a broken backward is a result, not a harness crash
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        result.backward_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return result
    for name, g in zip(("dq", "dk", "dv"), grads):
        result.tensors[name] = g.detach().cpu() if g is not None else None
        if g is not None:
            result.devices[name] = str(g.device)
    return result

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
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from ..core.inputs import Inputs, apply_layout, check_strides
from ..core.oracle import causal_keep
from ..core.results import Outputs
from ..implementations import Implementation, SdpaCall
from .determinism import compare_runs, run_repeated
from .guards import Placement, place_guarded
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


def execute(impl: Implementation, inputs: Inputs, device: str, repeat: int = 1,
            sync: Callable[[torch.device], None] | None = None) -> Outputs | Failure:
    """One call in this process: the outputs, or why there are none. Process-global settings a kernel
    changed are put back and named on its outputs, so no later result depends on them. A guarded case
    runs a second time without guards: the baseline oob-read is judged against, and a bitwise check."""
    where, sync = f"{impl.name} on {inputs.case.id}", sync or synchronize
    try:  # an error still pending from an earlier call is not this one's: say so rather than run
        settle(torch.device(device), sync, "an earlier call", f"surfaced before {where} started, not its own")
    except DeferredDeviceError as exc:
        return Failure("exception", str(exc), {"deferred": True})  # sticky: the worker restarts
    before = process_state()
    try:
        outcome: Outputs | Failure = run_repeated(lambda: run_implementation(impl, inputs, device, sync), repeat)
        if isinstance(outcome, Outputs) and inputs.case.guard != "none":
            unguarded = replace(inputs, case=inputs.case.replace(guard="none"))
            with_baseline(outcome, run_implementation(impl, unguarded, device, sync))
    except Exception as exc:  # noqa: BLE001 - a raising kernel is a result, the run goes on
        outcome = failure_of(exc)
    changed = restore_process_state(before)
    if changed:
        outcome.notes["global_state"] = changed
    return outcome


def with_baseline(guarded: Outputs, plain: Outputs) -> None:
    """The unguarded call's tensors on `guarded` (core/verdict.py's oob-read compares against them), and
    notes["guard_difference"] for tensors that differ bitwise: on a deterministic backend, a kernel whose
    result depends on the strides (or on what lies beyond the tensor)."""
    guarded.guard["baseline"] = dict(plain.tensors)
    runs = compare_runs(guarded.tensors, [plain.tensors])
    differing = {name: f"{r['max_abs_diff']:.3g}" for name, r in runs.items() if not r["deterministic"]}
    if differing:
        guarded.notes["guard_difference"] = ("differs bitwise from the same inputs without guards (max |diff|): "
                                             + ", ".join(f"{k} {v}" for k, v in differing.items()))


def capturing(executor: Executor, keep: dict[str, Outputs]) -> Executor:
    """`executor`, keeping each non-canary implementation's outputs in `keep` by name (the current case's,
    for the differential rule that compares native GQA with hand-expanded K/V: run/pairs.py)."""
    def run(impl: Implementation, inputs, device: str, *args, **kwargs):
        outcome = executor(impl, inputs, device, *args, **kwargs)
        if not isinstance(outcome, Failure) and not impl.canary:
            keep[impl.name] = outcome
        return outcome
    return run


_STATE_FLAGS: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {
    "flash_sdp": (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.enable_flash_sdp),
    "mem_efficient_sdp": (torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.enable_mem_efficient_sdp),
    "math_sdp": (torch.backends.cuda.math_sdp_enabled, torch.backends.cuda.enable_math_sdp),
    "cudnn_sdp": (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.enable_cudnn_sdp),
    "fp16_bf16_reduction_math_sdp": (torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed,
                                     torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp),
    "float32_matmul_precision": (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    "cuda_matmul_allow_tf32": (lambda: torch.backends.cuda.matmul.allow_tf32,
                               lambda v: setattr(torch.backends.cuda.matmul, "allow_tf32", v)),
    "cudnn_allow_tf32": (lambda: torch.backends.cudnn.allow_tf32, lambda v: setattr(torch.backends.cudnn, "allow_tf32", v)),
    "deterministic_algorithms": (torch.are_deterministic_algorithms_enabled, torch.use_deterministic_algorithms),
    "default_dtype": (torch.get_default_dtype, torch.set_default_dtype),
}


def process_state() -> dict[str, Any]:
    """The process-global settings that change numerics, as they are now."""
    state = {name: get() for name, (get, _) in _STATE_FLAGS.items()}
    library = getattr(torch.backends.cuda, "preferred_rocm_fa_library", None)
    if torch.version.hip and library is not None:
        state["rocm_fa_library"] = str(library())
    return state


def restore_process_state(before: dict[str, Any]) -> dict[str, str]:
    """Put back what differs from `before`; returns each change as "old → new"."""
    after = process_state()
    changed = {k: f"{before[k]} → {after[k]}" for k in before if after.get(k) != before[k]}
    for name in changed:
        if name in _STATE_FLAGS:
            _STATE_FLAGS[name][1](before[name])
        else:  # the ROCm flash library: set by name
            torch.backends.cuda.preferred_rocm_fa_library(before[name].split(".")[-1].lower())
    return changed


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DeferredDeviceError(Exception):
    """An asynchronous device error, named after the call that caused it (not a RuntimeError: never a refusal)."""


def settle(device: torch.device, sync: Callable[[torch.device], None], where: str, phase: str) -> None:
    """Wait for the device and check it, so an error a kernel left pending surfaces here, on its own call
    ("deferred error after <impl> on <case>"), not at the next call's first operation."""
    try:
        sync(device)
    except Exception as exc:  # noqa: BLE001 - whatever the device reports is this call's
        raise DeferredDeviceError(f"deferred error after {where} ({phase}): {first_line(exc)}") from exc


def _mask_and_causal(case, mask: torch.Tensor | None, device: torch.device, materialise: bool) -> tuple[object, bool]:
    """attn_mask and is_causal as a user would pass them for this case (`mask`: the case's, on the device)."""
    if case.causal == "none":
        return mask, False
    if mask is None and case.causal == "top-left":
        return None, True
    if mask is None and not materialise:
        from torch.nn.attention.bias import causal_lower_right  # here: it imports torch._dynamo (~1-2 s)

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


def _placement(case, inputs: Inputs, device: torch.device) -> Placement:
    """The inputs on the device: in guard buffers when the case asks for guards, else copied and laid out
    (a copy even on the CPU, so a kernel writing to its input cannot reach the shared CPU inputs)."""
    if case.guard != "none":
        return place_guarded(case, inputs, device)
    leaves = {role: getattr(inputs, role).to(device, copy=True) for role in ("q", "k", "v")}
    for leaf in leaves.values():
        leaf.requires_grad_(case.grads)
    kernel = {role: apply_layout(case, role, leaf) for role, leaf in leaves.items()}
    kernel["grad_out"] = apply_layout(case, "grad_out", inputs.grad_out.to(device))
    for role, t in kernel.items():
        problem = check_strides(case, role, t)
        if problem:
            raise HarnessDefect(f"layout not applied: {problem}")
    return Placement(leaves, kernel, inputs.mask.to(device) if inputs.mask is not None else None, [])


def run_implementation(impl: Implementation, inputs: Inputs, device: str | torch.device,
                       sync: Callable[[torch.device], None] = synchronize) -> Outputs:
    """One call, the device synchronised and checked after forward and after backward, so an asynchronous
    error is this call's (`sync` is injected by tests to stand for a device that reports one late)."""
    case = inputs.case
    device = torch.device(device)
    placed = _placement(case, inputs, device)
    leaves, kernel, grad_out = placed.leaves, placed.kernel, placed.kernel["grad_out"]
    strides = {role: list(t.stride()) for role, t in kernel.items()}
    attn_mask, is_causal = _mask_and_causal(case, placed.mask, device, impl.materialise_causal_bias)
    call = SdpaCall(case=case, query=kernel["q"], key=kernel["k"], value=kernel["v"], attn_mask=attn_mask,
                    is_causal=is_causal, scale=case.scale, enable_gqa=kernel["q"].shape[1] != kernel["k"].shape[1])
    where = f"{impl.name} on {case.id}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = impl.forward(call)
        except Exception as exc:
            reason = refusal_reason(exc, caught)
            if reason is not None:
                raise Unsupported(reason) from exc
            raise
        settle(device, sync, where, "forward")
    findings = placed.findings("forward", [])

    result = Outputs(tensors={"out": out.detach().cpu() if isinstance(out, torch.Tensor) else out},
                     notes=dict(call.notes), strides=strides)
    if case.guard != "none":
        result.guard = {"mode": case.guard, "findings": findings}
    if isinstance(out, torch.Tensor):
        result.devices["out"] = str(out.device)
    if not case.grads:
        return result
    if not isinstance(out, torch.Tensor) or out.grad_fn is None:
        # Forward-only only when the implementation says so, with its reason (flex on the CPU); a kernel
        # that detaches its output breaks the contract: no gradient reaches q, k or v (contract FAILs).
        if call.notes.get("forward_only"):
            result.forward_only = str(call.notes["forward_only"])
        else:
            result.tensors.update(dq=None, dk=None, dv=None)
            result.notes["backward"] = "the output has no autograd graph: no gradient reaches q, k or v"
        return result
    if tuple(out.shape) != tuple(grad_out.shape):  # the out contract FAIL says why; backward cannot run
        result.tensors.update(dq=None, dk=None, dv=None)
        result.notes["backward"] = f"not run: the output has shape {tuple(out.shape)}, grad_out {tuple(grad_out.shape)}"
        return result
    try:
        grads = torch.autograd.grad(out, [leaves["q"], leaves["k"], leaves["v"]], grad_out, allow_unused=True)
        settle(device, sync, where, "backward")
    except Exception as exc:  # noqa: BLE001 - a broken backward is a result, not a harness crash
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        result.backward_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return result
    if case.guard != "none":
        result.guard["findings"] += placed.findings("backward", findings)
    for name, g in zip(("dq", "dk", "dv"), grads):
        result.tensors[name] = g.detach().cpu() if g is not None else None
        if g is not None:
            result.devices[name] = str(g.device)
    return result

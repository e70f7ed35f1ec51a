"""The issue body for one failure, in the shape PyTorch's bug template asks for, short enough to read:
title with every field that changes the case, what is observed against what a correct kernel reaches,
what passes on the same inputs (the triage), how to reproduce, versions; the script, its output, the
per-head table and the reasoning behind the yardsticks fold away under <details>."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tabulate import tabulate

from ..core.case import Case, case_spec
from ..core.results import ImplResult
from ..core.verdict import Tolerances
from ..implementations import DeviceFacts, Implementation
from .script import backend_of
from .shrink import ShrinkResult, Signature

TENSOR_LABEL = {"out": "output", "dq": "dQ", "dk": "dK", "dv": "dV"}
LEVELS = ("tensor", "slice", "row")


def tag(facts: DeviceFacts, impl: str) -> str:
    if facts.kind == "rocm":
        return "ROCm"
    if facts.kind == "cuda":
        return "cuDNN" if impl.endswith("cudnn") else "CUDA"
    return "CPU"


def what_ran(impl: str, result: ImplResult, gqa: bool = True) -> str:
    found = backend_of(impl)
    if found is None:
        return f"user kernel `{impl}`"
    backend, expanded = found
    if not backend:
        return f"unpinned SDPA (dispatch chose {result.notes.get('dispatch', 'unknown')})"
    kv = "K/V expanded by hand (`repeat_interleave`, HF's repeat_kv), then " if expanded else ""
    return f"{kv}{backend} pinned with `torch.nn.attention.sdpa_kernel`" + (", `enable_gqa=True`" if gqa and not expanded else "")


def shape(case: Case) -> str:
    """Every field that changes what the kernel computes."""
    lens = f"L={case.q_len}" if case.q_len == case.kv_len else f"Lq={case.q_len}, Lk={case.kv_len}"
    mask = case.has_mask and f"mask {case.mask}" + (" per head" if case.mask_per_head else "") + (
        f" filled {case.mask_fill}" if case.mask_fill != "-inf" else "")
    extra = [x for x in (case.v_head_dim is not None and f"Dv={case.v_head_dim}",
                         case.causal != "none" and f"causal {case.causal}", mask,
                         case.layout != "bhld" and case.layout, case.values != "normal" and f"values {case.values}",
                         case.scale is not None and f"scale {case.scale:g}") if x]
    return ", ".join([f"B={case.batch}", f"Hq={case.q_heads}", f"Hkv={case.kv_heads}", lens, f"D={case.head_dim}",
                      case.dtype, *extra])


def ratio_at(result: ImplResult, tensor: str, level: str | None = None) -> tuple[float | None, str]:
    v = result.tensors.get(tensor)
    if v is None or v.metrics is None:
        return None, result.error or (v.reason if v else "")
    if v.rule == "nonfinite":  # NaN/Inf: no error-to-scale ratio means anything (the summary would say 0)
        return None, "nonfinite"
    level = level or (v.rule if v.rule in LEVELS else "tensor")
    return v.metrics.summary(level)["ratio"], level


def failing_level(result: ImplResult, tensor: str) -> str:
    level = ratio_at(result, tensor)[1]
    return level if level in LEVELS else "tensor"


def title(facts: DeviceFacts, impl: str, case: Case, sig: Signature, result: ImplResult) -> str:
    ratio, _ = ratio_at(result, sig.tensor)
    found = backend_of(impl)
    what = impl if found is None else (found[0] or "default SDPA") + (" (K/V expanded)" if found and found[1] else "")
    v = result.tensors.get(sig.tensor)
    how = (f"{ratio:.2g}× beyond a correct {case.dtype} kernel" if ratio is not None
           else "NaN/Inf where the fp64 reference is finite" if v is not None and v.rule == "nonfinite" else sig.kind)
    return (f"[{tag(facts, impl)}][SDPA] {what}: {TENSOR_LABEL.get(sig.tensor, sig.tensor)} {how} "
            f"({'GQA ' if case.q_heads != case.kv_heads else ''}{shape(case)})")


def observed(result: ImplResult, tol: Tolerances, dtype: str) -> list[list[str]]:
    """Per failing tensor: observed relative error against what a correct kernel reaches there."""
    rows = []
    for name, v in result.tensors.items():
        if str(v.status) not in ("FAIL", "KNOWN"):
            continue
        if v.metrics is None or v.rule not in LEVELS:
            rows.append([TENSOR_LABEL[name], v.rule, v.reason[:120], "—", "—", "—"])
            continue
        s = v.metrics.summary(v.rule)
        truth = s["truth"] or math.inf
        rows.append([TENSOR_LABEL[name], v.rule, f"{s['rel_err']:.2e}",
                     f"{s['floor'] / truth:.2e} / {s['lowprec'] / truth:.2e}", f"**{s['ratio']:.3g}×**",
                     f"{tol.rule(dtype, v.rule).factor:g}×"])
    return rows


def per_head(result: ImplResult, tensor: str, limit: int = 24) -> str:
    v = result.tensors[tensor]
    if v.metrics is None:
        return v.reason
    lv = v.metrics.levels["slice"]
    rows = []
    for b in range(lv.err.shape[0]):
        for h in range(lv.err.shape[1]):
            truth = float(lv.truth[b, h]) or math.inf
            rows.append((float(lv.ratio[b, h]), [b, h, f"{float(lv.err[b, h]) / truth:.2e}",
                                                 f"{float(lv.floor[b, h]) / truth:.2e}",
                                                 f"{float(lv.lowprec[b, h]) / truth:.2e}", f"{float(lv.ratio[b, h]):.3g}"]))
    shown = rows if len(rows) <= limit else sorted(rows, key=lambda r: -r[0])[:limit]
    heads = "kv head" if tensor in ("dk", "dv") else "query head"
    table = tabulate([r for _, r in shown], headers=["batch", heads, "rel-L2 error (observed)", "dtype floor (perfect)",
                                                      "low-prec ref (correct kernel)", "error / scale"], tablefmt="github")
    more = "" if len(rows) <= limit else f"\n\n({limit} worst of {len(rows)} (batch, head) slices shown)"
    return table + more


def versions(fp: dict[str, Any], ran: str) -> str:
    keys = ["torch", "torch_git", "cuda", "hip", "cudnn", "rocm_fa_library", "device", "device_name", "device_arch",
            "driver", "cpu", "cpu_threads", "python", "platform", "math_fp16_bf16_reduction_allowed", "harness"]
    return "```\n" + "\n".join([f"{k}: {fp[k]}" for k in keys if k in fp] + [f"backend that ran: {ran}"]) + "\n```"


def details(summary: str, *body: str) -> list[str]:
    return ["<details><summary>" + summary + "</summary>", "", *body, "", "</details>", ""]


@dataclass(frozen=True)
class Evidence:
    """What write_repro measured and ran, for the body."""

    case: Case
    impl: Implementation
    facts: DeviceFacts
    result: ImplResult
    sig: Signature
    tol: Tolerances
    fp: dict[str, Any]
    script: str
    script_exit: int
    output: str
    triage: list[list[str]]
    shrunk: ShrinkResult | None = None
    after: tuple[tuple[Case, Implementation], ...] = ()
    collect_env: str = ""


def _describe(e: Evidence, note: str) -> list[str]:
    ratio, level = ratio_at(e.result, e.sig.tensor)
    label = TENSOR_LABEL.get(e.sig.tensor, e.sig.tensor)
    ran = what_ran(e.impl.name, e.result, e.case.q_heads != e.case.kv_heads)
    subject = ran if e.impl.family == "user" else f"`torch.nn.functional.scaled_dot_product_attention` ({ran})"
    v = e.result.tensors.get(e.sig.tensor)
    how = (f"**{ratio:.3g}×** what a correct {e.case.dtype} kernel reaches on the same inputs ({level} level)"
           if ratio is not None else f"this kind: {v.reason if v else e.result.error}")
    lines = [f"{subject[0].upper() + subject[1:]} on {e.facts.device} ({e.facts.name or e.facts.arch}), torch "
             f"{e.fp.get('torch')}, returns **{label}** with an error against an fp64 reference of {how}.", "",
             f"Shape: {shape(e.case)}" + (" (`enable_gqa=True`)" if e.case.q_heads != e.case.kv_heads else "") + "."]
    if note:
        lines += ["", note]
    if e.after:
        lines += ["", "Order-dependent: it fails only after these calls in the same process (the script replays them "
                  "first): " + ", ".join(f"`{c.id}` on {i.name}" for c, i in e.after) + "."]
    if e.shrunk is not None:
        minimal = ("locally minimal: every single smaller batch, head count, length or head dim, and dropping the "
                   "mask or causal, passes or fails differently" if e.shrunk.locally_minimal
                   else "time budget reached: smaller, not proven minimal")
        lines += ["", f"Shrunk by gqa-harness from `{case_spec(e.shrunk.start)}` ({e.shrunk.evaluations} evaluations; "
                  f"{minimal})."]
    return lines


def issue_body(e: Evidence, title_text: str, note: str = "") -> str:
    label = TENSOR_LABEL.get(e.sig.tensor, e.sig.tensor)
    v = e.result.tensors.get(e.sig.tensor)
    worst = ""
    if v is not None and v.metrics is not None and v.metrics.worst_index is not None:
        worst = (f"Largest absolute error: {e.sig.tensor}{list(v.metrics.worst_index)} = {v.metrics.worst_actual:.6g}, "
                 f"fp64 reference {v.metrics.worst_oracle:.6g}.")
    factors = {lv: e.tol.rule(e.case.dtype, lv).factor for lv in LEVELS}
    lines = [f"Title: {title_text}", "", "### 🐛 Describe the bug", "", *_describe(e, note), "",
             "### Observed vs expected", "",
             tabulate(observed(e.result, e.tol, e.case.dtype),
                      headers=["tensor", "level", "observed rel. error", "correct kernel: rel. floor / low-prec ref",
                               "error / scale", "a correct kernel stays under"], tablefmt="github"), "", worst, ""]
    if e.triage:
        lines += ["What passes on the same inputs and device (the same tensor, error / scale at the same level):", "",
                  tabulate(e.triage, headers=["variant", "implementation", "verdict", "error / scale"],
                           tablefmt="github"), ""]
    lines += ["### To reproduce", "",
              f"`python repro.py {e.facts.device}` (below; only torch needed) rebuilds the inputs from the seed, checks "
              "their SHA-256, runs forward and backward, computes the fp64 and low-precision references inline and "
              f"exits 1 while the bug is present (here: exit {e.script_exit}).", "",
              "### Versions", "", versions(e.fp, what_ran(e.impl.name, e.result)), ""]
    lines += details("repro.py", "```python", e.script.rstrip(), "```")
    lines += details(f"Output (exit status {e.script_exit})", "```", e.output.strip()[-6000:], "```")
    lines += details(f"{label} per (batch, head)", per_head(e.result, e.sig.tensor) if v is not None else e.result.error)
    lines += details("Why this is beyond normal bf16/fp16 error", "### Why this is beyond normal bf16/fp16 error", "",
                     "Two yardsticks come from the same quantized inputs: the **dtype floor** (the fp64 result rounded "
                     f"to {e.case.dtype}: a perfect kernel) and the **low-precision reference**, the envelope of "
                     "fp32-accumulating designs with the roundings a correct fused kernel must make (P rounded before "
                     "P·V and Pᵀ·dO, dS rounded before its GEMMs, D = rowsum(dO∘O) from O as stored or in fp32, per-head "
                     "dK/dV rounded before an fp32 group sum). Scale = the larger (and fp32 eps × magnitude where the "
                     "truth is 0). Known-good kernels score about 1× this scale; a tensor fails beyond "
                     f"{factors['tensor']:g}× (whole tensor), {factors['slice']:g}× (one (batch, head)) or "
                     f"{factors['row']:g}× (one row): factors calibrated with provenance in harness/core/tolerances.toml.")
    if e.collect_env:
        lines += details("python -m torch.utils.collect_env", "```", e.collect_env.strip(), "```")
    return "\n".join(lines)

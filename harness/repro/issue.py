"""`gqa-harness repro`: a standalone script and an issue body for one failing (case, implementation).

The case is judged as a run judges it (without known-failure entries), the script is
written (script.py holds its text) and run in a fresh interpreter to confirm that it
reproduces, and the issue body is written in the shape PyTorch's bug template asks for:
title, describe the bug, the script and its output, observed vs expected per head, why it
is beyond normal bf16/fp16 error, and the versions block with what collect_env misses
(which backend ran, the ROCm attention library, cuDNN).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from ..core.case import Case, case_spec
from ..core.references import References, references
from ..core.results import ImplResult
from ..core.verdict import Tolerances
from ..implementations import DeviceFacts, Implementation, builtin_implementations
from ..run.session import Session, run_one
from .plots import available, draw_failure
from .script import ReproError, backend_of, inline_inputs, render_script
from .shrink import ShrinkResult, Signature, signature_of

TENSOR_LABEL = {"out": "output", "dq": "dQ", "dk": "dK", "dv": "dV"}
SCRIPT_TIMEOUT_S = 900


@dataclass(frozen=True)
class Repro:
    out_dir: Path
    script: Path
    issue: Path
    signature: Signature
    script_exit: int
    script_output: str

    @property
    def reproduces(self) -> bool:
        return self.script_exit != 0


def _tag(facts: DeviceFacts, impl: str) -> str:
    if facts.kind == "rocm":
        return "ROCm"
    if facts.kind == "cuda":
        return "cuDNN" if impl.endswith("cudnn") else "CUDA"
    return "CPU"


def _what_ran(impl: str, result: ImplResult, gqa: bool = True) -> str:
    found = backend_of(impl)
    if found is None:
        return f"user kernel `{impl}`"
    backend, expanded = found
    if not backend:
        return f"unpinned SDPA (dispatch chose {result.notes.get('dispatch', 'unknown')})"
    kv = "K/V expanded by hand (`repeat_interleave`, HF's repeat_kv), then " if expanded else ""
    return f"{kv}{backend} pinned with `torch.nn.attention.sdpa_kernel`" + (", `enable_gqa=True`" if gqa and not expanded else "")


def _shape(case: Case) -> str:
    lens = f"L={case.q_len}" if case.q_len == case.kv_len else f"Lq={case.q_len}, Lk={case.kv_len}"
    extra = [x for x in (case.causal != "none" and f"causal {case.causal}", case.has_mask and f"mask {case.mask}",
                         case.layout != "bhld" and case.layout, case.scale is not None and f"scale {case.scale:g}") if x]
    return ", ".join([f"B={case.batch}", f"Hq={case.q_heads}", f"Hkv={case.kv_heads}", lens, f"D={case.head_dim}",
                      case.dtype, *extra])


def _ratio(result: ImplResult, tensor: str, level: str | None = None) -> tuple[float | None, str]:
    v = result.tensors.get(tensor)
    if v is None or v.metrics is None:
        return None, result.error or (v.reason if v else "")
    level = level or (v.rule if v.rule in ("tensor", "slice", "row") else "tensor")
    return v.metrics.summary(level)["ratio"], level


def _level(result: ImplResult, tensor: str) -> str:
    level = _ratio(result, tensor)[1]
    return level if level in ("tensor", "slice", "row") else "tensor"


def _per_head(result: ImplResult, tensor: str, limit: int = 24) -> str:
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


def _controls(refs: References, impl: Implementation, session: Session, tensor: str, level: str) -> list[list[str]]:
    """Correct paths on the same inputs: math, and the same backend behind hand-expanded kv."""
    builtins = builtin_implementations()
    names = ["sdpa-math"]
    found = backend_of(impl.name)
    if found and found[0] and not found[1]:
        names.append("expanded-kv-" + impl.name.removeprefix("sdpa-"))
    rows = []
    for name in dict.fromkeys(names):
        other = builtins.get(name)
        if other is None or name == impl.name or other.available(session.facts) is not None:
            continue
        res = run_one(session, refs, other)
        ratio, _ = _ratio(res, tensor, level)
        v = res.tensors.get(tensor)
        rows.append([name, "—" if ratio is None else f"{ratio:.3g}", str(v.status) if v else str(res.status)])
    return rows


def _versions(fp: dict[str, Any], what_ran: str, collect_env: str) -> str:
    keys = ["torch", "torch_git", "cuda", "hip", "cudnn", "rocm_fa_library", "device", "device_name", "device_arch",
            "driver", "cpu", "cpu_threads", "python", "platform", "math_fp16_bf16_reduction_allowed", "harness"]
    lines = [f"{k}: {fp[k]}" for k in keys if k in fp] + [f"backend that ran: {what_ran}"]
    body = "```\n" + "\n".join(lines) + "\n```"
    if collect_env:
        body += "\n\n<details><summary>python -m torch.utils.collect_env</summary>\n\n```\n" + collect_env.strip() + "\n```\n</details>"
    return body


def run_script(script: Path, device: str) -> tuple[int, str]:
    """The script in a fresh interpreter, from the current directory (where a user module imports)."""
    proc = subprocess.run([sys.executable, str(script), device], capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _collect_env() -> str:
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.utils.collect_env"], capture_output=True, text=True,
                              timeout=120)
        return proc.stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"collect_env failed: {exc}"


def issue_body(*, title: str, case: Case, impl: Implementation, facts: DeviceFacts, result: ImplResult, sig: Signature,
               script: str, script_exit: int, output: str, controls: list[list[str]], tol: Tolerances, note: str,
               shrunk: ShrinkResult | None, fp: dict[str, Any], collect_env: str,
               after: list[tuple[Case, Implementation]] = ()) -> str:
    v = result.tensors.get(sig.tensor)
    ratio, level = _ratio(result, sig.tensor)
    label = TENSOR_LABEL.get(sig.tensor, sig.tensor)
    what = _what_ran(impl.name, result, case.q_heads != case.kv_heads)
    factor = tol.rule(case.dtype, level).factor if level in ("tensor", "slice", "row") else None
    subject = what if impl.family == "user" else f"`torch.nn.functional.scaled_dot_product_attention` ({what})"
    describe = [
        f"{subject[0].upper() + subject[1:]} on {facts.device} ({facts.name or facts.arch}), "
        f"torch {fp.get('torch')}, returns **{label}** with an error against an fp64 reference of "
        + (f"**{ratio:.3g}×** what a correct {case.dtype} kernel reaches on the same inputs ({level} level; "
           f"a correct kernel stays under {factor:g}×)." if ratio is not None else f"this kind: {v.reason if v else result.error}."),
        "", f"Shape: {_shape(case)}" + (" (`enable_gqa=True`)" if case.q_heads != case.kv_heads else "") + ".",
    ]
    if note:
        describe += ["", note]
    if after:
        describe += ["", "Order-dependent: it fails only after these calls in the same process (the script replays "
                     "them first): " + ", ".join(f"`{c.id}` on {i.name}" for c, i in after) + "."]
    if shrunk is not None:
        describe += ["", f"Found by gqa-harness and shrunk from `{case_spec(shrunk.start)}` by `gqa-harness shrink` "
                     f"({shrunk.evaluations} evaluations; "
                     + ("locally minimal: every single smaller batch, head count, length or head dim, and dropping the mask "
                        "or causal, passes or fails differently"
                        + (f" or less than {shrunk.min_excess:g}x beyond its factor" if shrunk.min_excess > 1 else "")
                        + (f", at seeds 0-{shrunk.seeds - 1} too" if shrunk.seeds > 1 else "") + ")."
                        if shrunk.locally_minimal else
                        "time budget reached: smaller, not proven minimal).")]
    describe += ["", "The script rebuilds the inputs from the seed (checking their SHA-256), runs forward and backward, "
                 "computes the fp64 reference and the low-precision reference inline, and exits 1 while the bug is present."]
    worst = ""
    if v is not None and v.metrics is not None and v.metrics.worst_index is not None:
        worst = (f"Largest absolute error: {sig.tensor}{list(v.metrics.worst_index)} = {v.metrics.worst_actual:.6g}, "
                 f"fp64 reference {v.metrics.worst_oracle:.6g}.")
    why = [
        "Two yardsticks are computed from the same quantized inputs: the **dtype floor** (the fp64 result rounded to "
        f"{case.dtype}: a perfect kernel) and the **low-precision reference**, the envelope of fp32-accumulating designs "
        "with the roundings a correct fused kernel must make (P rounded before P·V and Pᵀ·dO, dS rounded before its GEMMs, "
        "D = rowsum(dO∘O) from O as stored or in fp32, per-head dK/dV rounded before an fp32 group sum). "
        "Scale = the larger of the two (and fp32 eps × magnitude where the truth is 0). "
        f"Known-good kernels score about 1× this scale; the harness fails a tensor beyond "
        f"{tol.rule(case.dtype, 'tensor').factor:g}× (whole tensor), {tol.rule(case.dtype, 'slice').factor:g}× (one (batch, head)) "
        f"or {tol.rule(case.dtype, 'row').factor:g}× (one row), factors calibrated with provenance in harness/core/tolerances.toml. "
        + (f"This kernel is {ratio:.3g}× at the {level} level." if ratio is not None else ""),
    ]
    if controls:
        why += ["", f"Other paths on the same inputs and device ({label}, worst error / scale at the {level} level):", "",
                tabulate(controls, headers=["implementation", "error / scale", "verdict"], tablefmt="github")]
    parts = [
        f"Title: {title}", "", "### 🐛 Describe the bug", "", *describe, "", "```python", script.rstrip(), "```", "",
        f"Output (exit status {script_exit}):", "", "```", output.strip()[-6000:], "```", "",
        "### Observed vs expected", "",
        f"{label} per (batch, head), relative L2 error against the fp64 reference:", "",
        _per_head(result, sig.tensor) if v is not None else result.error, "", worst, "",
        "### Why this is beyond normal bf16/fp16 error", "", *why, "",
        "### Versions", "", _versions(fp, what, collect_env), "",
    ]
    return "\n".join(parts)


def default_title(facts: DeviceFacts, impl: str, case: Case, sig: Signature, result: ImplResult) -> str:
    ratio, level = _ratio(result, sig.tensor)
    found = backend_of(impl)
    what = impl if found is None else (found[0] or "default SDPA") + (" (K/V expanded)" if found and found[1] else "")
    how = f"{ratio:.2g}× beyond a correct {case.dtype} kernel" if ratio is not None else sig.kind
    return (f"[{_tag(facts, impl)}][SDPA] {what}: {TENSOR_LABEL.get(sig.tensor, sig.tensor)} {how} "
            f"({'GQA ' if case.q_heads != case.kv_heads else ''}{_shape(case)})")


def write_repro(case: Case, impl: Implementation, session: Session, out_dir: Path, *, tensor: str | None = None,
                title: str | None = None, note: str = "", shrunk: ShrinkResult | None = None,
                collect_env: bool = False, plots: bool = False,
                after: list[tuple[Case, Implementation]] | None = None) -> Repro:
    """`after`: the calls that preceded an order-dependent failure (notes["order"]["after"] of its
    result); they are replayed in this process before judging, and in the script before the call."""
    session = session.without_known()  # a KNOWN finding is reproduced as the failure it is
    facts, tol = session.facts, session.tolerances
    after = after or []
    for prev_case, prev_impl in after:
        run_one(session, references(prev_case), prev_impl)
    refs = references(case)
    result = run_one(session, refs, impl)
    sig = signature_of(result, tensor)
    if sig is None:
        raise ReproError(f"{(tensor + ' of ') if tensor else ''}{case.id} does not fail on {impl.name} "
                         f"(status {result.status}): nothing to reproduce")
    out_dir.mkdir(parents=True, exist_ok=True)
    user = impl.name if impl.family == "user" else None
    header = (f"Repro: {impl.name} {TENSOR_LABEL.get(sig.tensor, sig.tensor)} on {case.id} ({facts.device}).\n"
              f"Generated by gqa-harness (`gqa-harness repro --device {facts.device} --case '{case_spec(case)}' "
              f"--impl {impl.name}`).")
    script_text = render_script(refs.inputs, impl.name, sig.tensor or "out", tol, header,
                                device=facts.device.split(":")[0] if facts.kind == "cpu" else facts.device, user=user,
                                after=[(c, i.name) for c, i in after])
    script = out_dir / "repro.py"
    script.write_text(script_text)
    pt = out_dir / "inputs.pt"
    if not inline_inputs(case):
        inp = refs.inputs
        torch.save({"q": inp.q, "k": inp.k, "v": inp.v, "grad_out": inp.grad_out,
                    **({"mask": inp.mask} if inp.mask is not None else {})}, pt)
    else:
        pt.unlink(missing_ok=True)
    code, output = run_script(script, facts.device)
    fp = session.fingerprint()
    body = issue_body(title=title or default_title(facts, impl.name, case, sig, result), case=case, impl=impl,
                      facts=facts, result=result, sig=sig, script=script_text, script_exit=code, output=output,
                      controls=_controls(refs, impl, session, sig.tensor, _level(result, sig.tensor))
                      if sig.tensor else [], tol=tol, note=note,
                      shrunk=shrunk, fp=fp, collect_env=_collect_env() if collect_env else "", after=after)
    pictures: list[Path] = []
    if plots and sig.tensor:
        why_not = available()
        if why_not:
            print(f"gqa-harness repro: no plots: {why_not}", file=sys.stderr)
        factors = {lv: tol.rule(case.dtype, lv).factor for lv in ("tensor", "slice", "row")}
        pictures = draw_failure(result.tensors[sig.tensor], out_dir, f"{impl.name} on {case.id}", factors)
    if pictures:
        body = body.replace("### Why this is beyond", "".join(f"![{p.stem}]({p.name})\n\n" for p in pictures)
                            + "### Why this is beyond", 1)
    if code == 0:
        body = ("> **The script did not reproduce the failure on this machine (exit 0)**: do not file this as is.\n\n"
                + body)
    issue = out_dir / "issue.md"
    issue.write_text(body)
    summary = {"case": case_spec(case), "case_id": case.id, "impl": impl.name, "signature": str(sig),
               "script_exit": code, "reproduces": code != 0, "device": facts.device, "torch": fp.get("torch"),
               "shrink": shrunk.to_dict() if shrunk else None, "plots": [p.name for p in pictures]}
    (out_dir / "repro.json").write_text(json.dumps(summary, indent=1))
    return Repro(out_dir, script, issue, sig, code, output)

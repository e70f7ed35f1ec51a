"""`gqa-harness repro`: a standalone script and an issue body for one failing (case, implementation).

The case is judged as a run judges it (without known-failure entries), the script is
written (script.py holds its text) and run in a fresh interpreter to confirm that it
reproduces, the triage runs (what passes on the same inputs: the other dtype, G = 1, K/V
expanded by hand, other backends, another device's report) and the issue body (body.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.case import Case, CaseError, case_spec
from ..core.results import ImplResult
from ..implementations import Implementation, builtin_implementations
from ..run.session import CaseRunner, Session
from .body import TENSOR_LABEL, Evidence, failing_level, issue_body, ratio_at, title as default_title
from .plots import available, draw_failure
from .script import ReproError, backend_of, check_scriptable, inline_inputs, render_script
from .shrink import ShrinkResult, Signature, signature_of

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
        return script_reproduces(self.script_exit, self.script_output)


def script_reproduces(code: int, output: str) -> bool:
    """Exit 1 with its BUG line: a script that crashed (a SyntaxError, a missing module) also exits 1."""
    return code == 1 and "\nBUG: " in "\n" + output


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


def _cell(result: ImplResult, tensor: str, level: str) -> tuple[str, str]:
    ratio, _ = ratio_at(result, tensor, level)
    v = result.tensors.get(tensor)
    shown = "NaN/Inf" if ratio is None and v is not None and v.rule == "nonfinite" else "—"
    return (str(v.status) if v else str(result.status)), (shown if ratio is None else f"{ratio:.3g}×")


def triage(case: Case, impl: Implementation, runner: CaseRunner, tensor: str, level: str,
           compare: dict[str, Any] | None = None) -> list[list[str]]:
    """What else runs on the same inputs, and how it does: other backends (math, the fused ones), the same
    backend on K/V expanded by hand, the same call in the other dtype and at group size 1, and the same
    case on another device when its report is given."""
    builtins = builtin_implementations()
    found = backend_of(impl.name)
    names = ["sdpa-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn"]
    if found and found[0] and not found[1]:
        names.append("expanded-kv-" + impl.name.removeprefix("sdpa-"))
    rows = []
    for name in dict.fromkeys(names):
        other = builtins.get(name)
        if other is None or name == impl.name or other.available(runner.session.facts) is not None:
            continue
        rows.append(["same inputs", name, *_cell(runner.run(case, other), tensor, level)])
    variants = [(f"dtype {d}", {"dtype": d}) for d in ("bf16", "fp16") if d != case.dtype]
    if case.group_size > 1:
        variants.append(("group size 1 (MHA)", {"kv_heads": case.q_heads,
                                                "layout": "bhld" if case.layout == "kv-expanded" else case.layout}))
    for what, changes in variants:
        try:
            variant = case.replace(**changes)
        except CaseError:  # not expressible (e.g. a layout that needs one kv head)
            continue
        rows.append([what, impl.name, *_cell(runner.run(variant, impl), tensor, level)])
    if compare is not None:
        fp = compare.get("fingerprint") or {}
        theirs = next((r for r in compare["results"] if r["case_id"] == case.id and r["impl"] == impl.name), None)
        t = (theirs or {}).get("tensors", {}).get(tensor) or {}
        ratio = (((t.get("metrics") or {}).get("levels") or {}).get(level) or {}).get("ratio")
        rows.append([f"{fp.get('device_name') or fp.get('device_label')} (torch {fp.get('torch')})", impl.name,
                     t.get("status") or (theirs or {}).get("status", "not run there"),
                     "—" if ratio is None else f"{ratio:.3g}×"])
    return rows


def write_repro(case: Case, impl: Implementation, session: Session, out_dir: Path, *, tensor: str | None = None,
                title: str | None = None, note: str = "", shrunk: ShrinkResult | None = None,
                collect_env: bool = False, plots: bool = False,
                after: list[tuple[Case, Implementation]] | None = None, compare: dict[str, Any] | None = None,
                isolate: bool = True) -> Repro:
    """`after`: the calls that preceded an order-dependent failure (notes["order"]["after"] of its
    result); they are replayed in the same worker process before judging, and in the script before the
    call. `compare`: another device's report, for the triage table. Every kernel call runs in a worker
    process, as `run` makes it: a crashing kernel is an ERROR here too, not the end of `repro`."""
    check_scriptable(case)
    session = session.without_known()  # a KNOWN finding is reproduced as the failure it is
    with CaseRunner(session, isolate=isolate) as runner:
        return _write(case, impl, runner, out_dir, tensor=tensor, title=title, note=note, shrunk=shrunk,
                      collect_env=collect_env, plots=plots, after=after or [], compare=compare)


def _write(case: Case, impl: Implementation, runner: CaseRunner, out_dir: Path, *, tensor: str | None, title: str | None,
           note: str, shrunk: ShrinkResult | None, collect_env: bool, plots: bool,
           after: list[tuple[Case, Implementation]], compare: dict[str, Any] | None) -> Repro:
    session = runner.session
    facts, tol = session.facts, session.tolerances
    for prev_case, prev_impl in after:
        runner.run(prev_case, prev_impl)
    result = runner.run(case, impl)
    refs = runner.refs
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
    level = failing_level(result, sig.tensor) if sig.tensor else "tensor"
    evidence = Evidence(case, impl, facts, result, sig, tol, fp, script_text, code, output,
                        triage(case, impl, runner, sig.tensor, level, compare) if sig.tensor else [],
                        shrunk, tuple(after), _collect_env() if collect_env else "")
    body = issue_body(evidence, title or default_title(facts, impl.name, case, sig, result), note)
    pictures: list[Path] = []
    if plots and sig.tensor:
        why_not = available()
        if why_not:
            print(f"gqa-harness repro: no plots: {why_not}", file=sys.stderr)
        factors = {lv: tol.rule(case.dtype, lv).factor for lv in ("tensor", "slice", "row")}
        pictures = draw_failure(result.tensors[sig.tensor], out_dir, f"{impl.name} on {case.id}", factors)
    if pictures:
        body = body.replace("### To reproduce", "".join(f"![{p.stem}]({p.name}) (attach {p.name} to the issue)\n\n"
                                                        for p in pictures) + "### To reproduce", 1)
    if not script_reproduces(code, output):
        body = (f"> **The script did not reproduce the failure on this machine (exit {code}"
                + ("" if code == 0 else ", without its BUG line: it crashed") + ")**: do not file this as is.\n\n" + body)
    issue = out_dir / "issue.md"
    issue.write_text(body)
    summary = {"case": case_spec(case), "case_id": case.id, "impl": impl.name, "signature": str(sig),
               "script_exit": code, "reproduces": script_reproduces(code, output), "device": facts.device, "torch": fp.get("torch"),
               "shrink": shrunk.to_dict() if shrunk else None, "plots": [p.name for p in pictures]}
    (out_dir / "repro.json").write_text(json.dumps(summary, indent=1))
    return Repro(out_dir, script, issue, sig, code, output)

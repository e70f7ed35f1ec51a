"""`gqa-harness calibrate`: the measured distribution of error / scale that the factors derive from.

Sources, each scored per (case, tensor, level) as metrics.py scores a kernel:
  * design:<name> — each low-precision reference design (lowprec.py) scored against the
    envelope of the OTHER designs (leave-one-out). Their spread is what a correct kernel's
    design choices alone can cost: the factors derive from it;
  * known-good kernels on the device (CPU: flash behind hand-expanded kv, math, native flash
    at group size 1; GPU: the fused backends) validate the factors. A factor chosen to let a
    real kernel pass would be circular, so kernels never set a factor;
  * counter-examples: a backend with a known, recorded bug (cases/known-failures.toml), run
    where the bug shows, only to show in the trend tables what a trending ratio looks like.
Cases: an axis grid (group size, length, head dim, batch x heads, each varied alone around one
base so a trend cannot hide behind another axis) plus corpus suites, each over many seeds
distinct from the suites' (0..) and the audit's (10000..).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from tabulate import tabulate

from ..core.case import Case
from ..core.differential import loglog_slope
from ..core.inputs import torch_dtype
from ..core.lowprec import designs
from ..core.metrics import LEVELS, TensorMetrics, tensor_metrics
from ..core.references import References, references
from ..core.results import Status
from ..core.suites import load_suite
from ..core.verdict import Tolerances
from ..implementations import DeviceFacts, Implementation, builtin_implementations
from ..run.session import Session, run_one

SCHEMA = "gqa-harness-calibration/1"
CALIBRATION_SEED_BASE = 1_000  # suites use 0.., the audit 10000..
AXES = ("group_size", "length", "head_dim", "batch_heads")
CPU_KERNELS = ("expanded-kv-flash", "sdpa-math")
CPU_KERNELS_G1 = ("sdpa-flash",)  # native CPU flash is known-good only without GQA
GPU_KERNELS = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "expanded-kv-flash", "expanded-kv-efficient",
               "expanded-kv-cudnn")
# (implementation, known-failures id): run at G > 1 on the grid only, for the trend table
CPU_COUNTER_EXAMPLES = (("sdpa-flash", "cpu-flash-gqa-dkdv-group-sum"),)


@dataclass(frozen=True)
class GridCase:
    case: Case
    axes: tuple[str, ...]  # the axes whose line through the base this case lies on


def axis_value(case: Case, axis: str) -> int:
    return {"group_size": case.group_size, "length": case.q_len, "head_dim": case.head_dim,
            "batch_heads": case.batch * case.q_heads}[axis]


def axis_grid(dtypes: tuple[str, ...] = ("bf16", "fp16")) -> list[GridCase]:
    """One axis varied at a time around b1-h16x4-q128-d64 (B·Hq = 16 held while G varies)."""
    base = dict(batch=1, q_heads=16, kv_heads=4, q_len=128, kv_len=128, head_dim=64)
    lines: dict[str, list[dict[str, int]]] = {
        "group_size": [dict(kv_heads=16 // g) for g in (1, 2, 4, 8, 16)],
        "length": [dict(q_len=n, kv_len=n) for n in (64, 128, 256, 512)],
        "head_dim": [dict(head_dim=d) for d in (64, 80, 128, 256)],
        "batch_heads": [dict(batch=b, q_heads=h, kv_heads=h // 4) for b, h in ((1, 4), (1, 8), (1, 16), (2, 16), (4, 16))],
    }
    found: dict[Case, set[str]] = {}
    for axis, changes in lines.items():
        for change in changes:
            for dtype in dtypes:
                found.setdefault(Case(**{**base, **change}, dtype=dtype), set()).add(axis)
    return [GridCase(c, tuple(a for a in AXES if a in axes)) for c, axes in found.items()]


def kernels_for(facts: DeviceFacts, case: Case) -> list[str]:
    if facts.kind == "cpu":
        return [*CPU_KERNELS, *(CPU_KERNELS_G1 if case.group_size == 1 else ())]
    return list(GPU_KERNELS)


def counter_examples_for(facts: DeviceFacts, case: Case, on_grid: bool) -> list[tuple[str, str]]:
    if facts.kind != "cpu" or not on_grid or case.group_size == 1:
        return []
    return list(CPU_COUNTER_EXAMPLES)


def level_ratios(m: TensorMetrics, dtype: str, tol: Tolerances) -> dict[str, float | None]:
    """Largest error/scale per level; None where the verdict would not judge that level."""
    out: dict[str, float | None] = {}
    for level in LEVELS:
        if m.levels[level].count < tol.rule(dtype, level).min_count:
            out[level] = None
            continue
        r = m.summary(level)["ratio"]
        out[level] = r if math.isfinite(r) else None
    return out


def _vs_floor(m: TensorMetrics) -> float | None:
    lv = m.levels["tensor"]
    floor = float(lv.floor)
    return float(lv.err) / floor if floor > 0 else None


def design_samples(refs: References) -> list[tuple[str, str, TensorMetrics]]:
    """(source, tensor, metrics) for each design scored against the envelope of the others."""
    names = [d.name for d in designs(torch_dtype(refs.inputs.case))]
    out = []
    for tensor, truth in refs.oracle.items():
        lowprec = refs.lowprec[tensor]
        for i, name in enumerate(names):
            others = lowprec[:i] + lowprec[i + 1:]
            out.append((f"design:{name}", tensor, tensor_metrics(tensor, lowprec[i], truth, others, refs.inputs, refs.row_noise.get(tensor))))
    return out


def kernel_samples(refs: References, impl: Implementation, session: Session
                   ) -> tuple[list[tuple[str, TensorMetrics, str | None]], str]:
    """(tensor, metrics, the known-failure entry that absorbs it or None) of one implementation; or the error.
    A tensor a known entry absorbs is a recorded bug (on a GPU, cuDNN's NaN dQ, say): it is shown as a
    counter-example, never counted as what a correct kernel reaches."""
    result = run_one(session, refs, impl)
    if result.status is Status.UNSUPPORTED:
        return [], ""
    samples = [(name, v.metrics, v.known_entry if v.status is Status.KNOWN else None)
               for name, v in result.tensors.items() if v.metrics is not None]
    problems = [f"{name}: {v.reason}" for name, v in result.tensors.items() if v.metrics is None and v.reason]
    return samples, result.error or "; ".join(problems)


def sample_row(case: Case, source: str, kind: str, tensor: str, m: TensorMetrics, tol: Tolerances,
               axes: tuple[str, ...]) -> dict[str, Any]:
    return {"case_id": case.id, "source": source, "kind": kind, "dtype": case.dtype, "tensor": tensor,
            "group_size": case.group_size, "length": case.q_len, "kv_len": case.kv_len, "head_dim": case.head_dim,
            "batch_heads": case.batch * case.q_heads, "causal": case.causal, "axes": list(axes),
            "ratio": {lv: _r4(x) for lv, x in level_ratios(m, case.dtype, tol).items()}, "vs_floor": _r4(_vs_floor(m))}


def _r4(x: float | None) -> float | None:
    """Samples keep 4 decimals: a ratio's noise is far larger, and the file stays small."""
    return None if x is None else round(x, 4)


def calibrate_case(case: Case, axes: tuple[str, ...], on_grid: bool, session: Session,
                   builtins: dict[str, Implementation]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    refs = references(case)
    facts, tol = session.facts, session.tolerances
    rows = [sample_row(case, source, "design", tensor, m, tol, axes) for source, tensor, m in design_samples(refs)]
    errors = []
    runs = [(name, "kernel", name) for name in kernels_for(facts, case)]
    runs += [(name, "counter-example", f"{name} [{entry}]") for name, entry in counter_examples_for(facts, case, on_grid)]
    for name, kind, source in runs:
        impl = builtins.get(name)
        if impl is None or impl.available(facts) is not None:
            continue
        samples, error = kernel_samples(refs, impl, session)
        if error:
            errors.append({"case_id": case.id, "source": source, "error": error})
        rows += [sample_row(case, source if known is None else f"{name} [{known}]",
                            kind if known is None else "counter-example", tensor, m, tol, axes)
                 for tensor, m, known in samples]
    return rows, errors


def calibration_plan(grid: list[GridCase], suite_cases: list[Case], seeds: int,
                     first_seed: int = CALIBRATION_SEED_BASE) -> list[tuple[Case, tuple[str, ...], bool]]:
    """(case with a calibration seed, its grid axes, on the grid) for every case and seed."""
    plan = []
    for i in range(seeds):
        plan += [(g.case.replace(seed=first_seed + i), g.axes, True) for g in grid]
        plan += [(c.replace(seed=first_seed + i), (), False) for c in suite_cases]
    return plan


def run_calibration(plan: list[tuple[Case, tuple[str, ...], bool]], session: Session,
                    progress: Callable[[int, int], None] = lambda done, total: None) -> tuple[list[dict], list[dict]]:
    builtins = builtin_implementations()
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    for i, (case, axes, on_grid) in enumerate(plan):
        r, e = calibrate_case(case, axes, on_grid, session, builtins)
        rows += r
        errors += e
        progress(i + 1, len(plan))
    return rows, errors


# --- summaries ---------------------------------------------------------------------------------


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def distribution(rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """Per (dtype, tensor, level, source, device): count, max (with its case), p99, p95, median."""
    groups: dict[tuple[str, str, str, str, str], list[tuple[float, str]]] = defaultdict(list)
    for r in rows:
        for level in LEVELS:
            if r["ratio"][level] is not None:
                groups[(r["dtype"], r["tensor"], level, r["source"], r["kind"])].append((r["ratio"][level], r["case_id"]))
    out = []
    for (dtype, tensor, level, source, kind), vals in sorted(groups.items()):
        ratios = [v for v, _ in vals]
        worst = max(vals)
        out.append({"dtype": dtype, "tensor": tensor, "level": level, "source": source, "kind": kind, "device": device,
                    "n": len(ratios), "max": worst[0], "max_case": worst[1], "p99": _quantile(ratios, 0.99),
                    "p95": _quantile(ratios, 0.95), "median": statistics.median(ratios)})
    return out


def margins(rows: list[dict[str, Any]], tol: Tolerances) -> list[dict[str, Any]]:
    """Per (dtype, level): the factor, the largest design (leave-one-out) and correct-kernel ratios."""
    out = []
    for dtype in sorted({r["dtype"] for r in rows}):
        for level in LEVELS:
            picked = [r for r in rows if r["dtype"] == dtype and r["ratio"][level] is not None]
            design = max((r for r in picked if r["kind"] == "design"), key=lambda r: r["ratio"][level], default=None)
            kernel = max((r for r in picked if r["kind"] == "kernel"), key=lambda r: r["ratio"][level], default=None)
            factor = tol.rule(dtype, level).factor
            worst = max([x["ratio"][level] for x in (design, kernel) if x is not None], default=None)
            out.append({
                "dtype": dtype, "level": level, "factor": factor,
                "design_max": design["ratio"][level] if design else None,
                "design_max_at": f"{design['source']} {design['tensor']} {design['case_id']}" if design else "",
                "kernel_max": kernel["ratio"][level] if kernel else None,
                "kernel_max_at": f"{kernel['source']} {kernel['tensor']} {kernel['case_id']}" if kernel else "",
                "margin": factor / worst if worst else None,
            })
    return out


TENSOR_SETS = {"out+dq": ("out", "dq"), "dk+dv": ("dk", "dv")}


def trends(rows: list[dict[str, Any]], level: str = "tensor") -> list[dict[str, Any]]:
    """Per axis, source and tensor set: median and max ratio per axis value over the grid line, and the
    log-log slope of the medians. A correct kernel is flat; a group sum in low precision is not."""
    out = []
    for axis in AXES:
        on_line = [r for r in rows if axis in r["axes"] and r["ratio"][level] is not None]
        for source in sorted({r["source"] for r in on_line}):
            for set_name, tensors in TENSOR_SETS.items():
                picked = [r for r in on_line if r["source"] == source and r["tensor"] in tensors]
                by_x: dict[int, list[float]] = defaultdict(list)
                for r in picked:
                    by_x[r[axis]].append(r["ratio"][level])
                if not by_x:
                    continue
                bins = {str(x): {"n": len(v), "median": statistics.median(v), "max": max(v)} for x, v in sorted(by_x.items())}
                kind = picked[0]["kind"]
                out.append({"axis": axis, "source": source, "kind": kind, "tensors": set_name, "level": level,
                            "bins": bins, "slope": loglog_slope([(float(x), b["median"]) for x, b in bins.items()])})
    return out


def build_calibration(rows: list[dict[str, Any]], errors: list[dict[str, str]], fingerprint: dict[str, Any],
                      tol: Tolerances, settings: dict[str, Any]) -> dict[str, Any]:
    device = str(fingerprint.get("device_label", ""))
    return {"schema": SCHEMA, "fingerprint": fingerprint, "device_label": device, "settings": settings,
            "tolerances": tol.as_dict(), "margins": margins(rows, tol), "distribution": distribution(rows, device),
            "trends": trends(rows), "errors": errors, "samples": rows}


# --- Markdown ----------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render_calibration(report: dict[str, Any]) -> str:
    fp, st = report["fingerprint"], report["settings"]
    lines = [
        f"# Calibration: {report['device_label']} (torch {fp.get('torch')}, {fp.get('cpu') or fp.get('device_name')})", "",
        f"Command: `{st.get('command', '')}`; {st.get('started', '')} to {st.get('finished', '')}; "
        f"{st.get('cases', 0)} (case, seed) runs, seeds {st.get('first_seed')}..{st.get('first_seed', 0) + st.get('seeds', 1) - 1}, "
        f"grid {'on' if st.get('grid') else 'off'}, suites {', '.join(st.get('suites', [])) or 'none'}.", "",
        "Ratio = error / scale (scale = max(dtype floor, low-precision envelope, fp32-eps term)), the quantity the "
        "verdict compares with each factor. `design:*` = a low-precision design against the envelope of the other "
        "designs (leave-one-out): the spread the factors derive from. Kernels validate; they never set a factor.", "",
        "## Factors and margins", "",
    ]
    rows = [[m["dtype"], m["level"], m["factor"], _f(m["design_max"]), _f(m["kernel_max"]), m["kernel_max_at"],
             _f(m["margin"])] for m in report["margins"]]
    lines += [tabulate(rows, headers=["dtype", "level", "factor", "max design (LOO)", "max correct kernel", "where",
                                      "margin"], tablefmt="github"), ""]
    lines += ["## Trends (tensor level): median ratio per axis value (max in brackets), log-log slope", "",
              "Each axis is varied alone around b1-h16x4-q128-d64 (group size at B·Hq = 16). Flat (|slope| small) for "
              "correct kernels; the counter-example is a recorded bug (cases/known-failures.toml), shown, not calibrated to.", ""]
    for axis in AXES:
        trend = [t for t in report["trends"] if t["axis"] == axis]
        if not trend:
            continue
        xs = sorted({int(x) for t in trend for x in t["bins"]})
        rows = [[t["source"], t["tensors"],
                 *[(f"{t['bins'][str(x)]['median']:.2f} ({t['bins'][str(x)]['max']:.2f})" if str(x) in t["bins"] else "")
                   for x in xs], _f(t["slope"], 3)] for t in trend]
        lines += [f"### {axis}", "", tabulate(rows, headers=["source", "tensors", *[str(x) for x in xs], "slope"],
                                              tablefmt="github"), ""]
    lines += ["## Distribution per source, dtype and tensor (max / p95 / median per level)", ""]
    cells: dict[tuple[str, str, str, str], dict[str, dict]] = defaultdict(dict)
    for d in report["distribution"]:
        cells[(d["kind"], d["source"], d["dtype"], d["tensor"])][d["level"]] = d
    rows = []
    for (kind, source, dtype, tensor), by_level in sorted(cells.items()):
        rows.append([source, dtype, tensor, max(x["n"] for x in by_level.values()),
                     *[(f"{by_level[lv]['max']:.2f} / {by_level[lv]['p95']:.2f} / {by_level[lv]['median']:.2f}"
                        if lv in by_level else "") for lv in LEVELS]])
    lines += [tabulate(rows, headers=["source", "dtype", "tensor", "n", *LEVELS], tablefmt="github"), ""]
    if report["errors"]:
        lines += ["## Errors", ""] + [f"- {e['case_id']} {e['source']}: {e['error']}" for e in report["errors"][:50]] + [""]
    return "\n".join(lines)


def dump_calibration(report: dict[str, Any]) -> str:
    """One sample per line: thousands of samples, readable and diffable without the indent's bulk."""
    head = {k: v for k, v in report.items() if k != "samples"}
    text = json.dumps(head, indent=1, allow_nan=False)[:-2]
    lines = ",\n".join(json.dumps(row, separators=(",", ":"), allow_nan=False) for row in report["samples"])
    return text + ',\n "samples": [\n' + lines + "\n ]\n}\n"


def report_stem(facts: DeviceFacts, label: str) -> str:
    """File name: `cpu` for any CPU (the fingerprint inside names the model), the device label on a GPU."""
    return "cpu" if facts.kind == "cpu" else label


def calibrate_command(device: str | None, suites: list[str], seeds: int, first_seed: int, grid: bool, out,
                      quiet: bool) -> int:
    session = Session.open(device)
    facts, label, tol = session.facts, session.label, session.tolerances
    suite_cases = [sc.case for name in suites for sc in load_suite(name)]
    plan = calibration_plan(axis_grid() if grid else [], suite_cases, seeds, first_seed)
    started, t0, last = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.monotonic(), [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if quiet or (now - last[0] < 10 and done != total):
            return
        last[0] = now
        print(f"[{done}/{total}] {now - t0:.0f}s, ETA {(now - t0) / done * (total - done):.0f}s", file=sys.stderr, flush=True)

    rows, errors = run_calibration(plan, session, progress)
    settings = {"command": " ".join(["gqa-harness", *sys.argv[1:]]), "started": started,
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "suites": suites,
                "grid": grid, "seeds": seeds, "first_seed": first_seed, "cases": len(plan)}
    report = build_calibration(rows, errors, session.fingerprint(), tol, settings)
    stem = report_stem(facts, label)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(dump_calibration(report))
    (out / f"{stem}.md").write_text(render_calibration(report))
    for m in report["margins"]:
        print(f"{m['dtype']} {m['level']}: factor {m['factor']:g}, design max {_f(m['design_max'])}, "
              f"kernel max {_f(m['kernel_max'])}, margin {_f(m['margin'])}")
    print(f"calibration written to {out / (stem + '.json')} and .md")
    return 0

"""The one place that decides the status of every tensor of a result: `judge` is the pipeline.

Rules, in order (the first that applies decides):
  0. the call  — a forward-only kernel: its gradients UNSUPPORTED; a backward that raised: ERROR.
  1. contract  — missing gradient, wrong shape, dtype or device: FAIL.
  1b. guards   — guarded cases only (run/guards.py): an input changed by the call (input-modified) or a
                 guard band written (oob-write) is a FAIL named after the input; an output that took up
                 the guard's NaN or sentinel where the same call without guards did not, with the oracle
                 finite, read out of bounds (oob-read, with the first index).
  1c. unsampled-dq — long cases only (sampling.py): dQ non-zero on a row whose grad_out is zero: FAIL.
  2. range     — the oracle itself exceeds finfo.max / 2: OUT_OF_RANGE (no kernel can be judged).
  3. nonfinite — NaN/Inf where the oracle is finite, or finite where the oracle is not: FAIL (gross).
  4. levels    — error / scale beyond the level's factor at the tensor, slice or row level
                 (each level judged only with at least its minimum element count): FAIL.
  5. known     — a FAIL under the ceilings of a matching cases/known-failures.toml entry: KNOWN;
                 beyond them it stays FAIL and says so (known.py holds the entries, not the decision).
Factors live in tolerances.toml with their provenance. The message is one line a
kernel engineer can act on: tensor, level, how far beyond a correct kernel, which heads.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import torch

from .case import SENTINEL
from .inputs import TORCH_DTYPES, torch_dtype
from .known import KnownFailure
from .metrics import LEVELS, TensorMetrics, tensor_metrics
from .references import References
from .results import TENSORS, Outputs, Status, TensorVerdict
from .sampling import RowSample


@dataclass(frozen=True)
class LevelRule:
    factor: float
    min_count: int


@dataclass(frozen=True)
class Tolerances:
    levels: dict[str, dict[str, LevelRule]]  # dtype -> level -> rule
    gross_rel_err: float
    provenance: dict[str, Any] = field(default_factory=dict)

    def rule(self, dtype: str, level: str) -> LevelRule:
        return self.levels[dtype][level]

    def as_dict(self) -> dict[str, Any]:
        return {"levels": {d: {lv: {"factor": r.factor, "min_count": r.min_count} for lv, r in rules.items()}
                           for d, rules in self.levels.items()},
                "gross_rel_err": self.gross_rel_err, "provenance": self.provenance}


def load_tolerances(text: str | None = None) -> Tolerances:
    if text is None:
        text = resources.files("harness.core").joinpath("tolerances.toml").read_text()
    data = tomllib.loads(text)
    levels = {
        dtype: {lv: LevelRule(float(r["factor"]), int(r["min_count"])) for lv, r in data["dtype"][dtype].items()}
        for dtype in data["dtype"]
    }
    return Tolerances(levels=levels, gross_rel_err=float(data["severity"]["gross_rel_err"]),
                      provenance=data.get("provenance", {}))


def contract_problem(name: str, actual: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                     device: str, produced_on: str | None = None) -> str | None:
    """`produced_on`: the device the kernel returned the tensor on (results are copied to the CPU)."""
    if actual is None:
        return f"{name} is missing: no gradient reached the input"
    if not isinstance(actual, torch.Tensor):
        return f"{name} is a {type(actual).__name__}, not a tensor"
    if tuple(actual.shape) != tuple(shape):
        return f"{name} has shape {tuple(actual.shape)}, expected {tuple(shape)}"
    if actual.dtype != dtype:
        return f"{name} has dtype {actual.dtype}, expected {dtype}"
    where = torch.device(produced_on) if produced_on else actual.device
    if device and where.type != torch.device(device).type:
        return f"{name} is on {where}, expected {device}"
    return None


def _heads(mask: torch.Tensor) -> tuple[tuple[int, int], ...]:
    return tuple((int(b), int(h)) for b, h in mask.nonzero().tolist())


def judge_metrics(m: TensorMetrics, dtype: str, tol: Tolerances) -> TensorVerdict:
    """Rules 2-4 on computed metrics."""
    finfo_max = torch.finfo(TORCH_DTYPES[dtype]).max
    name = m.tensor
    if m.oracle_absmax > finfo_max / 2:
        return TensorVerdict(name, Status.OUT_OF_RANGE, "range",
                             f"{name}: the oracle reaches |{m.oracle_absmax:.3g}| > {dtype} max/2; no kernel can be judged",
                             metrics=m)
    if m.nonfinite_where_oracle_finite:
        w = m.nonfinite_where
        return TensorVerdict(name, Status.FAIL, "nonfinite",
                             f"{name}: {m.nan_count} NaN and {m.inf_count} Inf where the oracle is finite "
                             f"({w['fraction']:.1%} of {name}), first at {w['first_index']}, rows {w['rows']}",
                             severity="gross", excess=math.inf, failing_heads=tuple(map(tuple, w["heads"])), metrics=m)
    if not m.nonfinite_pattern_matches:
        return TensorVerdict(name, Status.FAIL, "nonfinite",
                             f"{name}: finite where the oracle is non-finite ({m.oracle_nonfinite} elements): "
                             "a NaN/Inf in the inputs was swallowed",
                             severity="gross", excess=math.inf, metrics=m)
    for level in LEVELS:
        rule = tol.rule(dtype, level)
        lv = m.levels[level]
        if lv.count < rule.min_count:
            continue
        ratio = torch.nan_to_num(lv.ratio, nan=math.inf)
        over = ratio > rule.factor
        if not bool(over.any()):
            continue
        worst = m.summary(level)
        if level == "tensor":
            heads = _heads(m.levels["slice"].ratio > tol.rule(dtype, "slice").factor)
        else:
            heads = _heads(over if level == "slice" else over.any(-1))
        slice_rel = m.levels["slice"].err / m.levels["slice"].truth.clamp_min(1e-300)
        gross = bool(((slice_rel > tol.gross_rel_err) & (m.levels["slice"].truth > 0)).any()) or m.nan_count > 0
        units = {"tensor": "", "slice": f" in {int(over.sum())}/{over.numel()} (batch, head) slices",
                 "row": f" in {int(over.sum())}/{over.numel()} rows"}[level]
        where = f"; worst at {level} {worst['index']}" if level != "tensor" else ""
        reason = (f"{name}: {level} error {worst['ratio']:.3g}x the correct-kernel scale (factor {rule.factor:g}){units}"
                  f"{where}; rel-L2 {worst['rel_err']:.2e}, floor {worst['floor']:.2e}, "
                  f"low-precision ref {worst['lowprec']:.2e}, err {worst['err']:.2e}")
        if m.worst_index is not None:
            reason += f"; worst element {name}{list(m.worst_index)} = {m.worst_actual:.5g} vs oracle {m.worst_oracle:.5g}"
        return TensorVerdict(name, Status.FAIL, level, reason, "gross" if gross else "beyond",
                             worst["ratio"] / rule.factor, heads, m)
    tensor_ratio = float(m.levels["tensor"].ratio)
    return TensorVerdict(name, Status.PASS, "", "", excess=tensor_ratio / tol.rule(dtype, "tensor").factor, metrics=m)


@dataclass(frozen=True)
class Where:
    """What known-failure entries match on besides the case: the implementation and the environment."""

    impl: str
    device: str  # the device the kernel ran on ("cpu", "cuda:0")
    device_label: str  # cpu-x86_64, cuda-sm_90, rocm-gfx942
    versions: dict[str, str | None]  # torch, cuda, hip, cudnn, rocm_fa_library


def judge(refs: References, outputs: Outputs, tol: Tolerances, known: tuple[KnownFailure, ...] | list[KnownFailure],
          where: Where) -> dict[str, TensorVerdict]:
    """Every tensor of one call, through rules 0-5."""
    case = refs.case
    dtype = torch_dtype(case)
    verdicts: dict[str, TensorVerdict] = {}
    for name in TENSORS:
        if name not in refs.oracle:
            continue
        if name != "out" and outputs.forward_only:
            verdicts[name] = TensorVerdict(name, Status.UNSUPPORTED, "forward-only", outputs.forward_only)
            continue
        if name != "out" and outputs.backward_error:
            verdicts[name] = TensorVerdict(name, Status.ERROR, "backward-error", f"backward raised {outputs.backward_error}")
            continue
        truth = refs.oracle[name]
        shape = tuple(truth.shape)
        if refs.rows is not None and name in ("out", "dq"):  # a long case's oracle holds its checked rows only
            shape = (*shape[:2], case.q_len, shape[3])
        problem = contract_problem(name, outputs.tensors.get(name), shape, dtype, where.device,
                                   outputs.devices.get(name))
        if problem and outputs.tensors.get(name) is None and outputs.notes.get("backward"):
            problem = f"{name} is missing: {outputs.notes['backward']}"
        if problem:
            verdicts[name] = TensorVerdict(name, Status.FAIL, "contract", problem, severity="gross", excess=math.inf)
            continue
        oob = oob_read(name, outputs.tensors[name], truth, outputs.guard)
        if oob is not None:
            verdicts[name] = oob
            continue
        actual = outputs.tensors[name]
        if refs.rows is not None and name in ("out", "dq"):  # a long case: the oracle holds only its checked rows
            zero = unsampled_dq(actual, refs.inputs.sample) if name == "dq" else None
            if zero is not None:
                verdicts[name] = apply_known(zero, known, case.id, case.group_size, where)
                continue
            actual = actual.index_select(2, refs.rows.to(actual.device))
        m = tensor_metrics(name, actual, truth, refs.lowprec[name], refs.inputs, refs.row_noise.get(name),
                           refs.yardsticks.get(name))
        verdicts[name] = apply_known(judge_metrics(m, case.dtype, tol), known, case.id, case.group_size, where)
    return {**verdicts, **guard_verdicts(outputs.guard)}


def guard_verdicts(guard: dict[str, Any]) -> dict[str, TensorVerdict]:
    """Rule 1b's oob-write and input-modified, one verdict per finding, keyed by the input it concerns."""
    verdicts: dict[str, TensorVerdict] = {}
    for f in guard.get("findings", []):
        name = f["tensor"]
        if f["rule"] == "oob-write":
            lo, hi = f["bytes"]
            reason = (f"{name}: out-of-bounds write during {f['phase']}: {f['elements']} guard elements changed, "
                      f"bytes {lo:+d} to {hi:+d} from {name}'s first element, the first {f['where']}")
        else:
            reason = (f"{name}: the call modified its input during {f['phase']}: {f['elements']} elements changed, "
                      f"first at {name}{f['first_index']}")
        key = name if name not in verdicts else f"{name} ({f['rule']})"
        verdicts[key] = TensorVerdict(name, Status.FAIL, f["rule"], reason, severity="gross", excess=math.inf)
    return verdicts


def oob_read(name: str, actual: torch.Tensor, truth: torch.Tensor, guard: dict[str, Any]) -> TensorVerdict | None:
    """Rule 1b's oob-read: elements that took up the guard (NaN, or a sentinel-sized change) where the oracle
    is finite and the same call without guards (the baseline, when it ran) did not."""
    if not guard:
        return None
    base = guard.get("baseline", {}).get(name)
    base = base if isinstance(base, torch.Tensor) and base.shape == actual.shape else None
    ref = base if base is not None else truth
    if guard["mode"] == "nan":  # NaN-ness needs no fp64 copies (checked on every guarded result)
        bad = torch.isnan(actual) & ~torch.isnan(ref)
    else:
        a, ref = actual.double(), ref.double()
        bad = (~torch.isfinite(a) & torch.isfinite(ref)) | ((a - ref).abs() >= SENTINEL / 64)
    if truth.shape == actual.shape:  # a long case's oracle holds only its sampled rows: no finiteness per element
        bad &= torch.isfinite(truth)
    if not bool(bad.any()):
        return None
    first = bad.nonzero()[0].tolist()
    rows = bad.any(-1)
    took = "NaN" if guard["mode"] == "nan" else f"sentinel ({SENTINEL:g})"
    against = "the same call without guards" if base is not None else "the oracle"
    reason = (f"{name}: out-of-bounds read: {int(bad.sum())} elements took up the guard's {took} where {against} "
              f"did not (oracle finite), first at {name}{first}, in {int(rows.sum())}/{rows.numel()} rows")
    return TensorVerdict(name, Status.FAIL, "oob-read", reason, severity="gross", excess=math.inf,
                         failing_heads=_heads(rows.any(-1)))


def unsampled_dq(actual: torch.Tensor, sample: RowSample) -> TensorVerdict | None:
    """Rule 1c (long cases): grad_out is zero on every row outside the sample, so dQ is exactly zero there."""
    off = torch.ones(actual.shape[2], dtype=torch.bool)
    off[sample.rows] = False
    written = (actual != 0).any(-1)[:, :, off.to(actual.device)]  # NaN != 0 too
    if not bool(written.any()):
        return None
    rows = off.nonzero().reshape(-1)
    b, h, i = (int(x) for x in written.nonzero()[0])
    row = int(rows[i])
    value = actual[b, h, row][actual[b, h, row] != 0][0].item()
    reason = (f"dq: non-zero on {int(written.any(0).any(0).sum())} of the {len(rows)} unsampled rows, where grad_out "
              f"is zero so dQ must be exactly 0; first at dq[{b}, {h}, {row}] (a value {value:.5g})")
    return TensorVerdict("dq", Status.FAIL, "unsampled-dq", reason, severity="gross", excess=math.inf,
                         failing_heads=_heads(written.any(-1)))


def apply_known(verdict: TensorVerdict, known, case_id: str, group_size: int, where: Where) -> TensorVerdict:
    """Rule 5. The matching entry's id is kept on the verdict even when it absorbs nothing, so a report
    can tell an entry that matched passing tensors (FIXED: the entry can go)."""
    entries = [k for k in known
               if k.matches(case_id, where.impl, verdict.tensor, where.device_label, where.versions, group_size)]
    if not entries:
        return verdict
    verdict = replace(verdict, known_entry=entries[0].id)
    if verdict.status is not Status.FAIL:
        return verdict
    ratios = ({lv: float(verdict.metrics.levels[lv].ratio.max()) for lv in LEVELS}
              if verdict.metrics is not None else {})
    for entry in entries:
        if ratios and entry.absorbs(verdict.rule, verdict.severity, ratios, verdict.tensor, group_size):
            return replace(verdict, status=Status.KNOWN, known_entry=entry.id, reason=f"known ({entry.id}): {verdict.reason}")
    return replace(verdict, reason=verdict.reason + " (worse than its known-failure ceiling)")

"""Orders the work: per case, inputs and oracle once, then every implementation, judged.

Results stream to a JSONL file as they complete, so an interrupted run keeps
everything already computed; the final JSON/Markdown report is built from them.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .case import Case, case_spec
from .execute import TENSORS, HarnessDefect, Outputs, Unsupported, run_implementation
from .implementations import DeviceFacts, Implementation
from .implementations.canary import CANARY_CASE
from .inputs import Inputs, make_inputs, torch_dtype
from .known import KnownFailure, apply_known
from .lowprec import lowprec_reference
from .metrics import tensor_metrics
from .oracle import oracle
from .report import clean_json
from .verdict import Status, TensorVerdict, Tolerances, contract_problem, judge_metrics, worst_status


@dataclass(frozen=True)
class ImplResult:
    case_id: str
    impl: str
    status: Status
    tensors: dict[str, TensorVerdict] = field(default_factory=dict)
    error: str = ""  # ERROR/UNSUPPORTED: the one-line reason
    error_kind: str = ""  # exception | oom | harness | unsupported
    notes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    canary: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id, "impl": self.impl, "status": str(self.status), "error": self.error,
            "error_kind": self.error_kind, "notes": self.notes, "seconds": round(self.seconds, 4),
            "canary": self.canary, "tensors": {k: v.to_dict() for k, v in self.tensors.items()},
        }


@dataclass(frozen=True)
class References:
    """Computed once per case on the CPU and shared by every implementation."""

    inputs: Inputs
    oracle: dict[str, torch.Tensor]
    lowprec: dict[str, list[torch.Tensor]]
    seconds: float


def references(case: Case) -> References:
    start = time.perf_counter()
    inputs = make_inputs(case)
    truth = oracle(inputs).tensors()
    lp = lowprec_reference(inputs).tensors()
    return References(inputs, truth, lp, time.perf_counter() - start)


def judge_outputs(refs: References, outputs: Outputs, device: str, tol: Tolerances) -> dict[str, TensorVerdict]:
    case = refs.inputs.case
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
        problem = contract_problem(name, outputs.tensors.get(name), tuple(truth.shape), dtype, device)
        if problem:
            verdicts[name] = TensorVerdict(name, Status.FAIL, "contract", problem, severity="gross", excess=math.inf)
            continue
        m = tensor_metrics(name, outputs.tensors[name], truth, refs.lowprec[name], refs.inputs)
        verdicts[name] = judge_metrics(m, case.dtype, tol)
    return verdicts


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def run_one(refs: References, impl: Implementation, facts: DeviceFacts, tol: Tolerances,
            known: list[KnownFailure], device_label: str) -> ImplResult:
    case = refs.inputs.case
    base = dict(case_id=case.id, impl=impl.name, canary=impl.canary)
    reason = impl.supports(case, facts)
    if reason:
        return ImplResult(**base, status=Status.UNSUPPORTED, error=reason, error_kind="unsupported")
    start = time.perf_counter()
    try:
        outputs = run_implementation(impl, refs.inputs, facts.device)
    except Unsupported as exc:
        return ImplResult(**base, status=Status.UNSUPPORTED, error=str(exc), error_kind="unsupported",
                          seconds=time.perf_counter() - start)
    except torch.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return ImplResult(**base, status=Status.ERROR, error=_first_line(exc), error_kind="oom",
                          seconds=time.perf_counter() - start)
    except HarnessDefect as exc:
        return ImplResult(**base, status=Status.ERROR, error=f"harness defect: {exc}", error_kind="harness",
                          seconds=time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - a raising kernel is a result (ERROR), the run goes on
        tb = traceback.format_exception_only(type(exc), exc)
        return ImplResult(**base, status=Status.ERROR, error=_first_line(exc), error_kind="exception",
                          notes={"exception": "".join(tb).strip()[-2000:]}, seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    verdicts = judge_outputs(refs, outputs, facts.device, tol)
    for name, v in list(verdicts.items()):
        verdicts[name], _ = apply_known(v, known, case_id=case.id, impl=impl.name, group_size=case.group_size,
                                        device_label=device_label, torch_version=facts.torch_version)
    notes: dict[str, Any] = {**outputs.notes, "strides": outputs.strides}
    return ImplResult(**base, status=worst_status([v.status for v in verdicts.values()]), tensors=verdicts,
                      notes=notes, seconds=seconds)


@dataclass
class RunPlan:
    cases: list[Case]
    impls: list[Implementation]
    canaries: list[Implementation]
    facts: DeviceFacts
    tol: Tolerances
    known: list[KnownFailure]
    device_label: str


def canary_cases(cases: Iterable[Case]) -> list[Case]:
    """The canary case in every dtype the run uses, so the canary exercises each dtype's tolerances."""
    dtypes = sorted({c.dtype for c in cases}) or ["bf16"]
    return [CANARY_CASE.replace(dtype=d) for d in dtypes]


def execute_plan(plan: RunPlan, sink: Callable[[dict[str, Any]], None],
                 progress: Callable[[int, int, ImplResult], None] | None = None,
                 done: set[tuple[str, str]] | None = None) -> list[ImplResult]:
    """Run every (case, implementation), stream each result to `sink`, return them all."""
    done = done or set()
    work: list[tuple[Case, list[Implementation]]] = [(c, plan.impls) for c in plan.cases]
    work += [(c, plan.canaries) for c in canary_cases(plan.cases)] if plan.canaries else []
    total = sum(len(impls) for _, impls in work)
    results: list[ImplResult] = []
    count = 0
    for case, impls in work:
        todo = [i for i in impls if (case.id, i.name) not in done]
        count += len(impls) - len(todo)
        if not todo:
            continue
        refs = references(case)
        sink({"type": "case", "case_id": case.id, "case": case.to_dict(), "spec": case_spec(case), "input_sha256": refs.inputs.hashes(),
              "oracle_seconds": round(refs.seconds, 4)})
        for impl in todo:
            result = run_one(refs, impl, plan.facts, plan.tol, plan.known, plan.device_label)
            sink({"type": "result", **result.to_dict()})
            results.append(result)
            count += 1
            if progress:
                progress(count, total, result)
    return results


class JsonlSink:
    """Append-only stream of records; each line is flushed so a killed run keeps what it wrote."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a", encoding="utf-8")

    def __call__(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(clean_json(record), allow_nan=False, default=_json_default) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


def read_stream(path: Path) -> list[dict[str, Any]]:
    """Records of a stream; a torn last line (killed mid-write) is dropped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records

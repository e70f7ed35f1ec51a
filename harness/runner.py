"""Orders the work: per case, inputs and oracle once, then every implementation, judged.

Results stream to a JSONL file as they complete, so an interrupted run keeps
everything already computed; the final JSON/Markdown report is built from them.
"""

from __future__ import annotations

import json
import math
import random
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .cancellation import d_term_noise
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
from .determinism import run_repeated
from .worker import RemoteError, Worker, WorkerCrash, WorkerTimeout, last_words, rebuildable

# executor(impl, inputs, device) -> Outputs: run_implementation in this process, or a Worker's execute.
Executor = Callable[[Implementation, Inputs, str], Outputs]


@dataclass(frozen=True)
class ImplResult:
    case_id: str
    impl: str
    status: Status
    tensors: dict[str, TensorVerdict] = field(default_factory=dict)
    error: str = ""  # ERROR/UNSUPPORTED: the one-line reason
    error_kind: str = ""  # exception | oom | harness | unsupported | crash | timeout | memory
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
    row_noise: dict[str, torch.Tensor] = field(default_factory=dict)  # cancellation.d_term_noise


def references(case: Case) -> References:
    start = time.perf_counter()
    inputs = make_inputs(case)
    truth = oracle(inputs).tensors()
    lp = lowprec_reference(inputs).tensors()
    noise = d_term_noise(inputs, truth["out"]) if case.grads else {}
    return References(inputs, truth, lp, time.perf_counter() - start, noise)


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
        problem = contract_problem(name, outputs.tensors.get(name), tuple(truth.shape), dtype, device,
                                   outputs.devices.get(name))
        if problem:
            verdicts[name] = TensorVerdict(name, Status.FAIL, "contract", problem, severity="gross", excess=math.inf)
            continue
        m = tensor_metrics(name, outputs.tensors[name], truth, refs.lowprec[name], refs.inputs,
                           refs.row_noise.get(name))
        verdicts[name] = judge_metrics(m, case.dtype, tol)
    return verdicts


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def run_one(refs: References, impl: Implementation, facts: DeviceFacts, tol: Tolerances,
            known: list[KnownFailure], device_label: str, executor: Executor | None = None) -> ImplResult:
    """Run and judge one (case, implementation); `executor` defaults to this process."""
    case = refs.inputs.case
    base = dict(case_id=case.id, impl=impl.name, canary=impl.canary)
    reason = impl.supports(case, facts)
    if reason:
        return ImplResult(**base, status=Status.UNSUPPORTED, error=reason, error_kind="unsupported")
    start = time.perf_counter()
    try:
        outputs = (executor or run_implementation)(impl, refs.inputs, facts.device)
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
    except WorkerCrash as exc:  # the process died or hung: the kernel's doing, the run goes on
        kind = "timeout" if isinstance(exc, WorkerTimeout) else "crash"
        words = last_words(exc.stderr)
        tail = f"; stderr: {words}" if words else ""
        return ImplResult(**base, status=Status.ERROR, error=f"{exc}{tail}", error_kind=kind,
                          notes={"stderr": exc.stderr}, seconds=time.perf_counter() - start)
    except RemoteError as exc:
        return ImplResult(**base, status=Status.ERROR, error=exc.first_line(), error_kind="exception",
                          notes={"exception": exc.tb.strip()[-2000:]}, seconds=time.perf_counter() - start)
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
    status = worst_status([v.status for v in verdicts.values()])
    # an ERROR result says why in one line, like a raising kernel's does (e.g. backward raised)
    error = next((f"{v.tensor}: {v.reason}" for v in verdicts.values() if v.status is Status.ERROR), "")
    return ImplResult(**base, status=status, tensors=verdicts, error=error, notes=notes, seconds=seconds)


@dataclass
class RunPlan:
    cases: list[Case]
    impls: list[Implementation]
    canaries: list[Implementation]
    facts: DeviceFacts
    tol: Tolerances
    known: list[KnownFailure]
    device_label: str
    # Reliability (defaults keep the in-process behaviour that tests and library callers rely on):
    isolate: bool = False  # kernels in a spawn-started worker process (worker.py)
    timeout: float | None = None  # per-case budget override in seconds; None scales with FLOPs
    repeat: int = 1  # --repeat N: bitwise determinism check (determinism.py)
    shuffle: int | None = None  # --shuffle SEED: random work order (order-dependence hunting)
    order_check: bool = True  # re-run every FAIL alone in a fresh process (order.py); isolated runs only
    log_dir: Path | None = None  # worker stdout/stderr logs


def canary_cases(cases: Iterable[Case]) -> list[Case]:
    """The canary case in every dtype the run uses, so the canary exercises each dtype's tolerances."""
    dtypes = sorted({c.dtype for c in cases}) or ["bf16"]
    return [CANARY_CASE.replace(dtype=d) for d in dtypes]


def layout_sibling_key(case: Case) -> str:
    """Cases that differ only in layout (strides of q, k, v, grad_out) share this key."""
    return case.replace(layout="bhld").id


def plan_work(plan: RunPlan) -> list[tuple[Case, list[Implementation]]]:
    """(case, implementations) in run order: layout siblings back to back, in one process on purpose
    (a plan cached for one layout and reused for another only shows that way); shuffled with a seed."""
    work: list[tuple[Case, list[Implementation]]] = [(c, list(plan.impls)) for c in plan.cases]
    work += [(c, list(plan.canaries)) for c in canary_cases(plan.cases)] if plan.canaries else []
    groups: dict[str, list[tuple[Case, list[Implementation]]]] = {}
    for item in work:
        groups.setdefault(layout_sibling_key(item[0]), []).append(item)
    ordered = list(groups.values())
    if plan.shuffle is not None:
        rng = random.Random(plan.shuffle)
        rng.shuffle(ordered)
        for group in ordered:
            rng.shuffle(group)
            for _, impls in group:
                rng.shuffle(impls)
    return [item for group in ordered for item in group]


def _skipped(case: Case, impl: Implementation, reason: str, kind: str) -> ImplResult:
    status = Status.UNSUPPORTED if kind == "memory" else Status.ERROR
    return ImplResult(case_id=case.id, impl=impl.name, status=status, error=reason, error_kind=kind,
                      canary=impl.canary)


def execute_plan(plan: RunPlan, sink: Callable[[dict[str, Any]], None],
                 progress: Callable[[int, int, ImplResult], None] | None = None,
                 done: set[tuple[str, str]] | None = None) -> list[ImplResult]:
    """Run every (case, implementation), stream each result to `sink`, return them all."""
    from .memory import OomTracker, skip_reason
    from .order import OrderChecker

    done = done or set()
    work = plan_work(plan)
    total = sum(len(impls) for _, impls in work)
    results: list[ImplResult] = []
    count = 0
    ooms = OomTracker()
    worker = Worker(plan.facts.device, plan.facts.kind, timeout=plan.timeout, repeat=plan.repeat,
                    log_dir=plan.log_dir) if plan.isolate else None
    checker = OrderChecker(plan) if plan.isolate and plan.order_check else None
    try:
        for case, impls in work:
            todo = [i for i in impls if (case.id, i.name) not in done]
            count += len(impls) - len(todo)
            if not todo:
                continue
            too_big = skip_reason(case)
            refs = None if too_big else references(case)
            sink({"type": "case", "case_id": case.id, "case": case.to_dict(), "spec": case_spec(case),
                  "input_sha256": refs.inputs.hashes() if refs else {},
                  "oracle_seconds": round(refs.seconds, 4) if refs else 0.0})
            for impl in todo:
                oom_skip = ooms.skip_reason(impl.name, case)
                if too_big or oom_skip:
                    result = _skipped(case, impl, too_big or oom_skip, "memory" if too_big else "oom")
                else:
                    executor = _executor(impl, worker, plan.repeat)
                    result = run_one(refs, impl, plan.facts, plan.tol, plan.known, plan.device_label, executor)
                    if result.error_kind == "oom":
                        ooms.record(impl.name, case)
                    isolated = worker is not None and executor == worker.execute
                    if worker is not None and not isolated:
                        result = replace(result, notes={**result.notes, "isolation": "ran in the parent process: "
                                                        "a worker cannot rebuild this implementation by name"})
                    if checker and isolated and result.status is Status.FAIL and not impl.canary:
                        checker.note(result, refs, impl, worker.history[:-1])
                sink({"type": "result", **result.to_dict()})
                results.append(result)
                count += 1
                if progress:
                    progress(count, total, result)
    finally:
        if worker:
            worker.close()
    if checker:
        results = checker.finish(results, sink)
    return results


def _executor(impl: Implementation, worker: Worker | None, repeat: int) -> Executor | None:
    if worker is not None and rebuildable(impl):
        return worker.execute
    if repeat > 1:
        return lambda i, inputs, device: run_repeated(lambda: run_implementation(i, inputs, device), repeat)
    return None


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


def repair_stream(path: Path) -> None:
    """Cut a torn last line (a run killed mid-write) so appended records start on a line of their own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def done_results(records: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(case id, implementation) pairs a stream already has a result for: what --resume skips."""
    return {(r["case_id"], r["impl"]) for r in records if r.get("type") == "result"}


class StreamError(ValueError):
    """--resume on a stream written by another environment or device (bad input: exit 2)."""


# Fingerprint fields a resumed run must share with the stream it continues.
RESUME_KEYS = ("device_label", "torch", "cuda", "hip", "cudnn", "harness")


def open_stream(path: Path, fingerprint: dict[str, Any], resume: bool) -> tuple[JsonlSink, set[tuple[str, str]]]:
    """The sink for a run and what it may skip. Fresh: the old stream goes, a header record starts the
    new one. Resume: a torn last line is cut, the header checked, finished results are skipped."""
    header = {"type": "run", "fingerprint": {k: fingerprint.get(k) for k in RESUME_KEYS}}
    if not resume or not path.exists():
        path.unlink(missing_ok=True)
        sink = JsonlSink(path)
        sink(header)
        return sink, set()
    repair_stream(path)
    records = read_stream(path)
    old = next((r for r in records if r.get("type") == "run"), None)
    if old is not None:
        diff = [k for k in RESUME_KEYS if old["fingerprint"].get(k) != header["fingerprint"][k]]
        if diff:
            k = diff[0]
            raise StreamError(f"--resume: {path} was written with {k}={old['fingerprint'].get(k)!r}, this run has "
                              f"{k}={header['fingerprint'][k]!r}; use another --out or drop --resume")
    return JsonlSink(path), done_results(records)

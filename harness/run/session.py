"""One run, opened once: `Session` holds what every result of it shares, `CaseRunner` runs and judges.

Every entry point (run, the pytest plugin, strategies.check, shrink, repro, order replay,
audit, calibrate, bench) opens a Session and runs cases through a CaseRunner, so device
facts, tolerances, known failures and the pinned process state come from one place.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ..core.case import Case, case_spec
from ..core.known import KnownFailure, load_known
from ..core.references import References, references
from ..core.results import ImplResult, Outputs, Status, worst_status
from ..core.verdict import Tolerances, Where, judge, load_tolerances
from ..implementations import DeviceFacts, Implementation, canaries, resolve
from .env import device_facts, device_label, environment_versions, fingerprint, pin_process_state
from .execute import Executor, Failure, capturing, execute
from .memory import OomTracker, skip_reason
from .stages import StageClock
from .worker import Call, Worker, rebuildable


@dataclass(frozen=True)
class Session:
    facts: DeviceFacts
    label: str  # cpu-x86_64, cuda-sm_90, rocm-gfx942: file names and matrix columns
    tolerances: Tolerances
    known: tuple[KnownFailure, ...]
    versions: dict[str, str | None]  # what known-failure entries range on
    pinned: dict[str, Any]  # the process-global settings pinned for this run

    @classmethod
    def open(cls, device: str | None = None, *, known: list[KnownFailure] | None = None,
             known_file: Path | None = None, facts: DeviceFacts | None = None) -> Session:
        """`known`: entries to apply (default: cases/known-failures.toml, or `known_file`); `facts`
        injected by tests to stand for another device."""
        facts = facts or device_facts(device)
        entries = load_known(known_file) if known is None else known
        return cls(facts, device_label(facts), load_tolerances(), tuple(entries),
                   {**environment_versions(), "torch": facts.torch_version}, pin_process_state())

    @property
    def device(self) -> str:
        return self.facts.device

    def fingerprint(self) -> dict[str, Any]:
        return fingerprint(self.facts)

    def resolve(self, names: list[str]) -> tuple[list[Implementation], dict[str, str]]:
        return resolve(names, self.facts)

    def canaries(self) -> list[Implementation]:
        return canaries(self.facts)

    def without_known(self) -> Session:
        """Judged as a run would, but no failure absorbed: for shrinking, calibrating and repros."""
        return replace(self, known=())

    def where(self, impl: Implementation) -> Where:
        return Where(impl.name, self.facts.device, self.label, self.versions)


def run_one(session: Session, refs: References, impl: Implementation, executor: Executor | None = None) -> ImplResult:
    """Run and judge one (case, implementation); `executor` defaults to this process."""
    case = refs.case
    base = dict(case_id=case.id, impl=impl.name, canary=impl.canary)
    reason = impl.supports(case, session.facts)
    if reason:
        return ImplResult(**base, status=Status.UNSUPPORTED, error=reason, error_kind="unsupported")
    start = time.perf_counter()
    outcome = (executor or execute)(impl, refs.inputs, session.device)
    seconds = time.perf_counter() - start
    if isinstance(outcome, Failure):
        status = Status.UNSUPPORTED if outcome.kind == "unsupported" else Status.ERROR
        return ImplResult(**base, status=status, error=outcome.message, error_kind=outcome.kind,
                          notes=dict(outcome.notes), seconds=seconds)
    verdicts = judge(refs, outcome, session.tolerances, session.known, session.where(impl))
    status = worst_status([v.status for v in verdicts.values()])
    # an ERROR result says why in one line, like a raising kernel's does (e.g. backward raised)
    error = next((f"{v.tensor}: {v.reason}" for v in verdicts.values() if v.status is Status.ERROR), "")
    kind = "backward" if error else ""
    changed = outcome.notes.get("global_state")
    if changed:  # rule global-state: later results would depend on it (put back by execute)
        status = worst_status([status, Status.FAIL])
        error, kind = "global-state: the kernel changed " + ", ".join(f"{k} {v}" for k, v in changed.items()) + \
            " (restored before the next call)", "global-state"
    return ImplResult(**base, status=status, tensors=verdicts, error=error, error_kind=kind,
                      notes={**outcome.notes, "strides": outcome.strides}, seconds=seconds)


def case_record(case: Case, refs: References | None) -> dict[str, Any]:
    """The stream's record of a case: its fields, spec, input hashes and what its references cost."""
    return {"type": "case", "case_id": case.id, "case": case.to_dict(), "spec": case_spec(case),
            "input_sha256": refs.inputs.hashes() if refs else {},
            "oracle_seconds": round(refs.seconds, 4) if refs else 0.0,
            # a long case: which rows its row-sampled oracle checked, and which output rows it left unchecked
            **({"sampling": refs.inputs.sample.describe()} if refs and refs.inputs.sample is not None else {})}


class CaseRunner:
    """Runs (case, implementation) pairs of one session: the references of the current case computed
    once, cases too big for host memory and bigger siblings of an OOM skipped, kernels in a worker
    process when `isolate` (else, and for what a worker cannot rebuild, in this one)."""

    def __init__(self, session: Session, *, isolate: bool = False, timeout: float | None = None, repeat: int = 1,
                 log_dir: Path | None = None, sink: Callable[[dict[str, Any]], None] | None = None,
                 clock: StageClock | None = None):
        self.session = session
        self.clock = clock  # the stage split, when measured (stages.py)
        self.repeat = repeat
        self.sink = sink  # receives each new case's record
        self.worker = Worker(session.device, session.facts.kind, timeout=timeout, repeat=repeat,
                             log_dir=log_dir) if isolate else None
        self.refs: References | None = None
        self.outputs: dict[str, Outputs] = {}  # the current case's outputs, for gqa-vs-expanded (pairs.py)
        self._case: Case | None = None
        self._too_big: str | None = None
        self._ooms = OomTracker()
        self._isolated_last = False

    def __enter__(self) -> CaseRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()

    def references(self, case: Case) -> References | None:
        """The case's references (None when they cannot fit in host memory), computed once per case."""
        if case != self._case:
            self._case, self._too_big, self.outputs = case, skip_reason(case), {}
            self.refs = None if self._too_big else references(case)
            for stage, (wall, cpu) in (self.refs.stages.items() if self.refs and self.clock else ()):
                self.clock.add(stage, wall, cpu)
            if self.sink:
                self.sink(case_record(case, self.refs))
        return self.refs

    def _executor(self, impl: Implementation) -> tuple[Executor, bool]:
        if self.worker is not None and rebuildable(impl):
            return self.worker.execute, True
        return functools.partial(execute, repeat=self.repeat), False

    def run(self, case: Case, impl: Implementation) -> ImplResult:
        refs = self.references(case)
        skipped = self._too_big or self._ooms.skip_reason(impl.name, case)
        self._isolated_last = False
        if skipped:
            return ImplResult(case_id=case.id, impl=impl.name, canary=impl.canary, error=skipped,
                              status=Status.UNSUPPORTED if self._too_big else Status.ERROR,
                              error_kind="memory" if self._too_big else "oom")
        executor, self._isolated_last = self._executor(impl)
        if self.clock is None:
            result = run_one(self.session, refs, impl, capturing(executor, self.outputs))
        else:
            result = self._timed_run(refs, impl, executor)
        if result.error_kind == "oom":
            self._ooms.record(impl.name, case)
        if self.worker is not None and not self._isolated_last:
            result = replace(result, notes={**result.notes, "isolation": "ran in the parent process: a worker "
                                                                         "cannot rebuild this implementation by name"})
        return result

    def _timed_run(self, refs: References, impl: Implementation, executor: Executor) -> ImplResult:
        """run_one with its time split: kernel (as the worker timed it), transfer (the rest of the call) and
        judge (the rest of run_one: metrics and verdict)."""
        call = [0.0, 0.0]

        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return executor(*args, **kwargs)
            finally:
                call[0], call[1] = time.perf_counter() - wall, time.process_time() - cpu

        wall, cpu = time.perf_counter(), time.process_time()
        result = run_one(self.session, refs, impl, capturing(timed, self.outputs))
        total = (time.perf_counter() - wall, time.process_time() - cpu)
        kernel = self.worker.last_kernel if self._isolated_last and self.worker is not None else None
        kernel = kernel or (call[0], call[1])  # in this process the whole call is the kernel's
        self.clock.add("kernel", *kernel)
        self.clock.add("transfer", max(0.0, call[0] - kernel[0]), call[1] if self._isolated_last else 0.0)
        self.clock.add("judge", total[0] - call[0], total[1] - call[1])
        return result

    def preceding_calls(self) -> list[Call] | None:
        """The calls that ran before the last one in its worker process; None if it ran in this process."""
        return self.worker.history[:-1] if self._isolated_last and self.worker is not None else None

"""Orders the work of a run: per case, inputs and oracle once, then every implementation, judged.

Results stream to a JSONL file as they complete (reports/store.py), so an interrupted run
keeps everything already computed; the final JSON/Markdown report is built from them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..core.case import Case
from ..core.results import ImplResult, Status
from ..core.suites import SuiteCase
from ..implementations import Implementation
from ..implementations.canary import CANARY_CASE
from .order import OrderChecker
from .session import CaseRunner, Session


@dataclass(frozen=True)
class RunPlan:
    """What to run and how; the session says where and against what."""

    cases: tuple[Case, ...]
    impls: tuple[Implementation, ...]
    canaries: tuple[Implementation, ...] = ()
    # Reliability (defaults keep the in-process behaviour that tests and library callers rely on):
    isolate: bool = False  # kernels in a spawn-started worker process (worker.py)
    timeout: float | None = None  # per-case budget override in seconds; None scales with FLOPs
    repeat: int = 1  # --repeat N: bitwise determinism check (determinism.py)
    shuffle: int | None = None  # --shuffle SEED: random work order (order-dependence hunting)
    order_check: bool = True  # re-run every FAIL alone in a fresh process (order.py); isolated runs only
    log_dir: Path | None = None  # worker stdout/stderr logs
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)  # case id -> its suite file and line


def case_sources(chosen: Iterable[SuiteCase]) -> dict[str, dict[str, Any]]:
    """Case id -> {"file", "line"} of the suite entry that defined it (inline --case: none)."""
    return {sc.case.id: {"file": sc.file, "line": sc.line} for sc in chosen if sc.file}


def with_sources(sink: Callable[[dict[str, Any]], None],
                 sources: dict[str, dict[str, Any]]) -> Callable[[dict[str, Any]], None]:
    """`sink`, with each case record given the suite file and line of its case: what annotations point at."""
    if not sources:
        return sink

    def write(record: dict[str, Any]) -> None:
        if record.get("type") == "case" and record.get("case_id") in sources:
            record = {**record, "source": sources[record["case_id"]]}
        sink(record)
    return write


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


def execute_plan(session: Session, plan: RunPlan, sink: Callable[[dict[str, Any]], None],
                 progress: Callable[[int, int, ImplResult], None] | None = None,
                 done: set[tuple[str, str]] | None = None) -> list[ImplResult]:
    """Run every (case, implementation), stream each record to `sink`, return the results."""
    done = done or set()
    work = plan_work(plan)
    total = sum(len(impls) for _, impls in work)
    results: list[ImplResult] = []
    count = 0
    checker = OrderChecker(session, plan.timeout, plan.log_dir) if plan.isolate and plan.order_check else None
    with CaseRunner(session, isolate=plan.isolate, timeout=plan.timeout, repeat=plan.repeat, log_dir=plan.log_dir,
                    sink=with_sources(sink, plan.sources)) as runner:
        for case, impls in work:
            todo = [i for i in impls if (case.id, i.name) not in done]
            count += len(impls) - len(todo)
            for impl in todo:
                result = runner.run(case, impl)
                preceding = runner.preceding_calls()
                if checker and preceding is not None and result.status is Status.FAIL and not impl.canary:
                    checker.note(result, runner.refs, impl, preceding)
                sink({"type": "result", **result.to_dict()})
                results.append(result)
                count += 1
                if progress:
                    progress(count, total, result)
    if checker:
        results = checker.finish(results, sink)
    return results

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
from ..core.differential import load_rules
from ..core.results import ImplResult, Status
from ..core.suites import SuiteCase
from ..implementations import Implementation
from ..implementations.canary import CANARY_CASE
from .order import OrderChecker, recorded_verdicts, representatives
from .pairs import family_judgements, pair_judgements, record
from .session import CaseRunner, Session
from .stages import StageClock, maybe


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


def plan_digest(plan: RunPlan) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the work and how it is judged."""
    return {"cases": sorted(c.id for c in plan.cases), "implementations": sorted(i.name for i in plan.impls),
            "canaries": sorted(i.name for i in plan.canaries), "repeat": plan.repeat, "isolate": plan.isolate,
            "shuffle": plan.shuffle, "timeout": plan.timeout, "order_check": plan.order_check}


def plan_size(plan: RunPlan) -> int:
    return sum(len(impls) for _, impls in plan_work(plan))


def resume_done(plan: RunPlan, records: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(case, implementation) pairs a resumed run may skip: those with a result in the stream, except the
    layout-sibling groups of a FAIL whose order check was cut off. Those groups run again, in order, so the
    check sees the calls that an uninterrupted run's worker had made before the FAIL."""
    results = {(r["case_id"], r["impl"]): r for r in records if r.get("type") == "result"}
    planned = {(c.id, i.name): c for c, impls in plan_work(plan) for i in impls}
    done = {key for key in results if key in planned}
    if not (plan.isolate and plan.order_check):
        return done
    cut = {layout_sibling_key(planned[key]) for key, r in results.items()
           if key in planned and r["status"] == "FAIL" and not r.get("canary") and "order" not in (r.get("notes") or {})}
    return {key for key in done if layout_sibling_key(planned[key]) not in cut}


def partial_note(plan: RunPlan, records: list[dict[str, Any]]) -> dict[str, Any]:
    """What a report of a run that did not reach its end must say: how much ran, and whether the canary did."""
    results = {(r["case_id"], r["impl"]): r for r in records if r.get("type") == "result"}
    return {"reason": "stopped before the end (Ctrl-C, SIGTERM or a time limit)", "planned": plan_size(plan),
            "results": len(results), "canary_ran": any(r.get("canary") for r in results.values())}


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
                 done: set[tuple[str, str]] | None = None, clock: StageClock | None = None,
                 prior: list[dict[str, Any]] | None = None) -> list[ImplResult]:
    """Run every (case, implementation), stream each record to `sink`, return the results. `clock`: where
    the time went, stage by stage (stages.py), when the caller measures it."""
    done = done or set()
    sink = clock.wrap("stream", sink) if clock else sink
    work = plan_work(plan)
    total = sum(len(impls) for _, impls in work)
    results: list[ImplResult] = []
    count = 0
    rules = load_rules()
    checker = (OrderChecker(session, plan.timeout, plan.log_dir, prior=representatives(prior or []),
                            recorded=recorded_verdicts(prior or []))
               if plan.isolate and plan.order_check else None)
    with CaseRunner(session, isolate=plan.isolate, timeout=plan.timeout, repeat=plan.repeat, log_dir=plan.log_dir,
                    sink=with_sources(sink, plan.sources), clock=clock) as runner:
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
            if todo and runner.refs is not None:  # the case ended: native GQA vs expanded K/V on it
                with maybe(clock, "pairs"):
                    pairs = pair_judgements(session, rules, runner.refs, runner.outputs)
                for verdict in pairs:
                    sink(record(verdict))
    if checker:
        with maybe(clock, "order"):
            results = checker.finish(results, sink)
    with maybe(clock, "families"):
        families = family_judgements(session, rules, results, plan.cases)
    for verdict in families:  # plan level: the trend rules
        sink(record(verdict))
    return results

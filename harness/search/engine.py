"""The search: Hypothesis's engine over the case space, each example through the run pipeline, each new
failure shrunk by Hypothesis's own shrinker and confirmed alone in a fresh process.

A search is rounds of `hypothesis.find` over the space (seeded by --seed and the round number)
whose condition is a `Hunt`. An example runs on every implementation as `run` runs it: inputs and
one oracle per case for all of them, the verdict with known failures, kernels in an isolated worker,
every result streamed to the report. The condition holds for the first example that fails in a way
no finding explains (findings.py); the hunt is then locked on that failure (implementation, tensor,
rule, severity) and Hypothesis shrinks: each candidate runs on that implementation only and counts
when it fails the same way and no other finding explains it. The shrunk case then runs alone in a
fresh worker process, then on the other implementations: the finding is confirmed when it fails the
same way there.

Budgets: new examples stop at the wall-time budget, --max-examples or --max-findings; a shrink under way goes on for
at most --shrink-budget seconds. Past a budget the condition answers only from what it has run, so
Hypothesis ends at once with the smallest failing example it holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from random import Random
from typing import Any, Callable

from hypothesis import HealthCheck, Phase, Verbosity, find, settings
from hypothesis.control import current_build_context
from hypothesis.database import ExampleDatabase, choices_to_bytes
from hypothesis.errors import NoSuchExample, Unsatisfiable

from ..core.case import Case
from ..core.results import ImplResult
from ..implementations import Implementation
from ..implementations.canary import CANARY_CASE
from ..repro.shrink import Signature, same_failure, signature_of
from ..run.session import CaseRunner, Session
from .findings import Finding, finding_from_record
from .space import SearchSpace
from .store import Entry, ExampleStore

ROUND_EXAMPLES = 200  # examples per find() call; past a limit the rest of a round costs ~ms each
Sink = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Limits:
    budget: float  # seconds of exploring, counted over every run of a resumed search
    max_examples: int | None = None
    max_findings: int | None = None  # stop exploring once this many findings are made
    shrink_budget: float = 120.0
    timeout: float | None = None  # per (case, implementation), as `run --timeout`


@dataclass(frozen=True)
class Prior:
    """What an interrupted search left in its stream, for --resume."""

    findings: tuple[Finding, ...] = ()
    examples: int = 0
    elapsed: float = 0.0
    rounds: int = 0


@dataclass(frozen=True)
class Met:
    """An example with a failure no finding explained when it ran: its choices (pending in the store until
    every failure on it is explained) and when it was met."""

    choices: bytes | None
    examples: int
    elapsed: float


@dataclass
class Tally:
    examples: int = 0
    rounds: int = 0
    replayed: int = 0  # examples from the database replayed first
    replay_still_failing: int = 0
    replay_passing: int = 0  # ... and dropped from it
    findings: list[Finding] = field(default_factory=list)


def search_settings(phases: list[Phase], max_examples: int, database: ExampleDatabase | None) -> settings:
    return settings(settings.get_profile("default"), database=database, phases=phases, max_examples=max_examples,
                    deadline=None, derandomize=False, suppress_health_check=list(HealthCheck),
                    verbosity=Verbosity.quiet, print_blob=False, report_multiple_bugs=False)


def current_choices() -> bytes | None:
    """The choice sequence of the example Hypothesis is running, as its database stores it. `find`'s
    condition gets only the value, so this reads the build context (no public handle exists)."""
    try:
        return choices_to_bytes(current_build_context().data.choices)
    except Exception:  # noqa: BLE001 - outside a Hypothesis run there is nothing to store
        return None


class Hunt:
    """The condition of one find() call: the first unexplained failure, then that failure only."""

    def __init__(self, search: Search, replay: bool = False):
        self.search = search
        self.replay = replay  # a database example runs whatever the budget says
        self.target: tuple[Implementation, Signature] | None = None
        self.start: Case | None = None
        self.found_examples, self.found_s, self.locked_at = 0, 0.0, 0.0
        self.choices: bytes | None = None  # ... of the last example the condition held for: the shrunk one
        self.result: ImplResult | None = None  # the target's result on that example
        self.evaluations = 0
        self.out_of_time = False
        self.met_failure = False  # a failure met, even one a finding explains (a replay that still fails)
        self._shrunk: dict[Case, ImplResult] = {}

    def __call__(self, case: Case) -> bool:
        held = self._explore(case) if self.target is None else self._same(case)
        if held:
            self.choices = current_choices()
        return held

    def _explore(self, case: Case) -> bool:
        if case not in self.search.seen and not (self.replay or self.search.exploring()):
            return False
        failing = self.search.explore(case)
        self.met_failure = self.met_failure or bool(failing)
        new = self.search.unexplained(case)
        if not new:
            return False
        met = self.search.meet(case, current_choices())
        impl = next(i for i in self.search.impls if i.name == new[0].impl)
        self.target, self.start, self.result = (impl, signature_of(new[0])), case, new[0]
        self.found_examples, self.found_s = met.examples, met.elapsed
        self.locked_at = self.search.clock()
        return True

    def _same(self, case: Case) -> bool:
        impl, sig = self.target
        if case in self.search.seen:
            result = next((r for r in self.search.seen[case] if r.impl == impl.name), None)
        elif case in self._shrunk:
            result = self._shrunk[case]
        elif self.search.clock() - self.locked_at > self.search.limits.shrink_budget:
            self.out_of_time = True
            return False
        else:
            result = self._shrunk[case] = self.search.shrink_runner.run(case, impl)
            self.evaluations += 1
        held = result is not None and same_failure(result, sig) and not self.search.explained(result, case)
        if held:
            self.result = result
        return held


class Search:
    def __init__(self, session: Session, impls: list[Implementation], space: SearchSpace, limits: Limits, seed: int,
                 sink: Sink, store: ExampleStore, prior: Prior = Prior(), log_dir: Path | None = None,
                 progress: Callable[[Search], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.session, self.impls, self.space, self.limits, self.seed = session, impls, space, limits, seed
        self.sink, self.store, self.clock, self.progress, self.log_dir = sink, store, clock, progress, log_dir
        self.tally = Tally(examples=prior.examples, rounds=prior.rounds, findings=list(prior.findings))
        self.started = clock() - prior.elapsed
        self.seen: dict[Case, tuple[ImplResult, ...]] = {}  # failing results of every example run
        self.met: dict[Case, Met] = {}  # examples with failures not yet explained
        self._stuck: set[Case] = set()  # ... whose replay made no finding (not tried again)
        self.explore_runner = self._runner(sink)
        self.shrink_runner = self._runner(None)
        # One worker process for exploring and shrinking (each runner keeps its own references): a second
        # one cost a start-up (tens of seconds on a loaded machine) inside the first shrink's budget.
        # Confirmation still runs in a fresh process of its own.
        self.shrink_runner.worker = self.explore_runner.worker

    def _runner(self, sink: Sink | None) -> CaseRunner:
        return CaseRunner(self.session, isolate=True, timeout=self.limits.timeout, log_dir=self.log_dir, sink=sink)

    def close(self) -> None:
        self.explore_runner.close()  # the shared worker: stopping it twice is harmless
        self.shrink_runner.close()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        return max(0.0, self.limits.budget - self.elapsed())

    def exploring(self) -> bool:
        cap, enough = self.limits.max_examples, self.limits.max_findings
        return (self.left() > 0 and (cap is None or self.tally.examples < cap)
                and (enough is None or len(self.tally.findings) < enough))

    # --- running examples -----------------------------------------------------------------------

    def explore(self, case: Case) -> tuple[ImplResult, ...]:
        """Run `case` on every implementation (once; the failing results are remembered)."""
        if case in self.seen:
            return self.seen[case]
        failing = []
        for impl in self.impls:
            result = self.explore_runner.run(case, impl)
            self.sink({"type": "result", **result.to_dict()})
            if signature_of(result) is not None:
                failing.append(result)
        self.seen[case] = tuple(failing)
        self.tally.examples += 1
        self.sink({"type": "search", "event": "progress", "examples": self.tally.examples,
                   "elapsed": round(self.elapsed(), 2), "rounds": self.tally.rounds})
        if self.progress:
            self.progress(self)
        return self.seen[case]

    def explained(self, result: ImplResult, case: Case) -> bool:
        cls = self.space.case_class(case)
        return any(f.explains(result, cls) for f in self.tally.findings)

    def unexplained(self, case: Case) -> list[ImplResult]:
        return [r for r in self.seen.get(case, ()) if not self.explained(r, case)]

    def meet(self, case: Case, choices: bytes | None) -> Met:
        """The first time `case` shows an unexplained failure: its choices go to the store's pending corpus."""
        if case not in self.met:
            self.met[case] = Met(choices, self.tally.examples, round(self.elapsed(), 2))
            if choices is not None:
                self.store.save_pending(choices)
        return self.met[case]

    def canary(self) -> None:
        """The deliberately wrong kernel once per dtype: the report says whether this pipeline can fail here."""
        for impl in self.session.canaries():
            for dtype in self.space.dtypes:
                result = self.explore_runner.run(CANARY_CASE.replace(dtype=dtype), impl)
                self.sink({"type": "result", **result.to_dict()})

    # --- the phases -------------------------------------------------------------------------------

    def replay(self) -> None:
        """Every example of the database first: a still-failing one is a finding again at once."""
        for entry in self.store.entries():
            hunt = Hunt(self, replay=True)
            key = self.store.stage(entry)
            case = self._find(hunt, [Phase.reuse, Phase.shrink], 2, self.store.db, key=key)
            self.store.clear_replay()
            self.tally.replayed += 1
            if case is not None:
                self.tally.replay_still_failing += 1
                self._finish(hunt, case, replayed=True, old=entry.value)
            elif hunt.met_failure:
                self.tally.replay_still_failing += 1  # explained by a finding of this search: kept
            else:
                self.tally.replay_passing += 1
                self.store.drop(entry.value)

    def explore_rounds(self) -> None:
        while self.exploring():
            hunt = Hunt(self)
            case = self._find(hunt, [Phase.generate, Phase.shrink], ROUND_EXAMPLES, None,
                              random=Random(f"{self.seed}/{self.tally.rounds}"))
            self.tally.rounds += 1
            if case is not None:
                self._finish(hunt, case, replayed=False, old=None)
            self.leftovers()

    def leftovers(self) -> None:
        """Failures met on an example whose hunt locked on another one (another implementation, another
        tensor): the example is replayed from its choices and hunted again until each is explained."""
        while True:
            for case in [c for c in self.met if not self.unexplained(c)]:
                self.store.drop(self.met.pop(case).choices)
            case = next((c for c in self.met if c not in self._stuck and self.met[c].choices is not None), None)
            if case is None:
                return
            hunt = Hunt(self, replay=True)
            found = self._find(hunt, [Phase.reuse, Phase.shrink], 2, self.store.db,
                               key=self.store.stage(Entry(self.met[case].choices, shrunk=False)))
            self.store.clear_replay()
            if found is None:
                self._stuck.add(case)
            else:
                self._finish(hunt, found, replayed=False, old=None)

    def _find(self, hunt: Hunt, phases: list[Phase], max_examples: int, db: ExampleDatabase | None,
              key: bytes | None = None, random: Random | None = None) -> Case | None:
        try:
            return find(self.space.strategy(), hunt, settings=search_settings(phases, max_examples, db),
                        random=random, database_key=key)
        except (NoSuchExample, Unsatisfiable):
            return None

    def _finish(self, hunt: Hunt, case: Case, replayed: bool, old: bytes | None) -> Finding:
        impl, sig = hunt.target
        confirm = self.confirm(case, impl)
        tensor = hunt.result.tensors.get(sig.tensor) if hunt.result is not None else None
        finding = Finding(
            number=len(self.tally.findings) + 1, impl=impl.name, signature=sig, case=case, start=hunt.start,
            case_class=self.space.case_class(case), reason=tensor.reason if tensor else (hunt.result.error or ""),
            found_after_examples=hunt.found_examples, found_after_s=round(hunt.found_s, 2),
            shrink_evaluations=hunt.evaluations, shrink_s=round(self.clock() - hunt.locked_at, 2),
            shrink_complete=not hunt.out_of_time, confirmed=same_failure(confirm, sig),
            confirm_status=str(confirm.status), replayed=replayed)
        self.tally.findings.append(finding)
        self.sink(finding.to_record())
        self.store.settle(old, hunt.choices)
        return finding

    def confirm(self, case: Case, impl: Implementation) -> ImplResult:
        """The shrunk case alone in a fresh worker process, then on the other implementations."""
        with self._runner(self.sink) as fresh:
            first = fresh.run(case, impl)
            rest = [fresh.run(case, i) for i in self.impls if i.name != impl.name]
        first = replace(first, notes={**first.notes, "search": "a finding's shrunk case, run alone in a fresh process"})
        for result in (first, *rest):
            self.sink({"type": "result", **result.to_dict()})
        return first

    def run(self) -> Tally:
        self.canary()
        self.replay()
        self.leftovers()
        self.explore_rounds()
        self.leftovers()
        return self.tally


def prior_from_records(records: list[dict[str, Any]]) -> Prior:
    progress = [r for r in records if r.get("type") == "search" and r.get("event") == "progress"]
    last = progress[-1] if progress else {}
    return Prior(findings=tuple(finding_from_record(r) for r in records if r.get("type") == "finding"),
                 examples=int(last.get("examples", 0)), elapsed=float(last.get("elapsed", 0.0)),
                 rounds=int(last.get("rounds", 0)))

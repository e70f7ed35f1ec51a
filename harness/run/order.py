"""Order dependence: a FAIL that passes alone in a fresh process depends on what ran before it.

Kernels keep state between calls (execution-plan caches, autotuning choices, workspaces),
so a result can depend on earlier work in the same process, e.g. a plan built for one
grad_out layout reused for another. Every FAIL of an isolated run is re-run alone in a
fresh worker; if it passes there, the calls that preceded it in its worker are searched
for the shortest sequence that brings the failure back: each single preceding call (most
recent first, the same implementation first), then the whole history, shrunk greedily.
Every try is a fresh process. `gqa-harness replay --call SPEC@IMPL ...` replays one.
One FAIL that reproduces alone stands for every later FAIL of the same signature (implementation,
tensor, rule): a kernel with a layout bug fails most cases the same way, and re-running each of
them alone (a fresh process each, up to 20 FAILs) cost minutes and told nothing new.
A FAIL whose representative was order-dependent or unclear is still checked itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ..core.case import case_spec
from ..core.references import References, references
from ..core.results import ImplResult, Status
from ..implementations import Implementation, by_name
from .session import Session, run_one
from .worker import Call, Worker, WorkerCrash

MAX_CHECKS = 20  # FAILs of distinct signatures checked per run; each costs a few process starts
MAX_TRIES = 8  # fresh processes per FAIL


@dataclass(frozen=True)
class Pending:
    result: ImplResult
    refs: References
    impl: Implementation
    preceding: list[Call]


def _label(call: Call) -> str:
    return f"{call.case.id} {call.impl}"


def replay_command(sequence: list[Call], target: Call, device: str) -> str:
    steps = " ".join(f"--call '{case_spec(c.case)}@{c.impl}'" for c in [*sequence, target])
    return f"gqa-harness replay --device {device} {steps}"


def candidate_singles(preceding: list[Call], impl: str) -> list[Call]:
    """Single preceding calls to try, most recent first, those of the same implementation first."""
    recent = list(reversed(preceding))
    return [c for c in recent if c.impl == impl] + [c for c in recent if c.impl != impl]


def shrink(sequence: list[Call], fails: Callable[[list[Call]], bool], budget: int) -> tuple[list[Call] | None, int]:
    """Greedy delta debugging: the shortest sub-sequence found (order kept) that still fails; tries used."""
    tries = 1
    if not fails(sequence):
        return None, tries
    chunks = 2
    while len(sequence) > 1 and tries < budget:
        size = -(-len(sequence) // chunks)
        for start in range(0, len(sequence), size):
            if tries >= budget:
                break
            candidate = sequence[:start] + sequence[start + size:]
            tries += 1
            if candidate and fails(candidate):
                sequence, chunks = candidate, max(chunks - 1, 2)
                break
        else:
            if chunks >= len(sequence):
                break
            chunks = min(chunks * 2, len(sequence))
    return sequence, tries


class OrderChecker:
    """Collects the FAILs of a run and, at its end, tells reproducible from order-dependent ones."""

    def __init__(self, session: Session, timeout: float | None = None, log_dir: Path | None = None,
                 max_checks: int = MAX_CHECKS, max_tries: int = MAX_TRIES,
                 prior: dict[tuple[str, str, str], Any] | None = None,
                 recorded: dict[tuple[str, str], dict[str, Any]] | None = None):
        """`prior`: signature -> a FAIL of the resumed stream that already reproduced alone (representatives);
        `recorded`: (case id, implementation) -> the order note the resumed stream already holds for it."""
        self.prior = dict(prior or {})
        self.recorded = dict(recorded or {})
        self.session = session
        self.timeout = timeout
        self.log_dir = log_dir
        self.max_checks = max_checks
        self.max_tries = max_tries
        self.pending: list[Pending] = []

    def note(self, result, refs, impl, preceding: list[Call]) -> None:
        self.pending.append(Pending(result, refs, impl, list(preceding)))

    def finish(self, results: list, sink: Callable[[dict[str, Any]], None]) -> list:
        """Each FAIL is streamed again with notes["order"]; the report keeps the last record."""
        updated = {}
        # signature -> a FAIL that reproduced alone; a resumed run starts from those its stream holds, so its
        # notes are the ones the uninterrupted run wrote
        stands_for: dict[tuple[str, str, str], Any] = dict(self.prior)
        checks = 0
        for p in self.pending:
            signature = failure_signature(p.result)
            recorded = self.recorded.get((p.result.case_id, p.result.impl))
            if recorded is not None:
                # a FAIL checked before the kill and run again with its layout siblings: the note it already has,
                # not a new one (which would call it "the same failure as" itself)
                checks += bool(recorded.get("checked"))
                verdict = recorded
            elif all(s in stands_for for s in signature):
                verdict = same_failure(signature, stands_for)
            elif checks < self.max_checks:
                checks += 1
                verdict = self.check(p)
                if verdict.get("order_dependent") is False:
                    for s in signature:
                        stands_for.setdefault(s, p.result)
            else:
                verdict = {"checked": False,
                           "summary": f"not re-run alone: more than {self.max_checks} distinct FAILs in this run"}
            new = replace(p.result, notes={**p.result.notes, "order": verdict})
            sink({"type": "result", **new.to_dict()})
            updated[(new.case_id, new.impl)] = new
        return [updated.get((r.case_id, r.impl), r) for r in results]

    def run_after(self, p: Pending, sequence: list[Call]) -> Status | None:
        """Status of the failing (case, impl) in a fresh worker after `sequence`; None if a step crashed."""
        worker = Worker(self.session.device, self.session.facts.kind, timeout=self.timeout, log_dir=self.log_dir)
        try:
            for call in sequence:
                try:
                    worker.call(call.case, call.impl)
                except WorkerCrash:
                    return None
            return run_one(self.session, p.refs, p.impl, worker.execute).status
        finally:
            worker.close()

    def check(self, p: Pending) -> dict[str, Any]:
        target = Call(p.refs.case, p.impl.name)
        device = self.session.device
        alone = self.run_after(p, [])
        if alone is Status.FAIL:
            return {"checked": True, "order_dependent": False, "alone": "FAIL",
                    "summary": "reproduces alone in a fresh process"}
        base = {"checked": True, "alone": str(alone)}
        if alone not in (Status.PASS, Status.KNOWN):  # neither reproduced nor cleared: say what happened
            return {**base, "order_dependent": None,
                    "summary": f"re-run alone in a fresh process it ended {alone or 'in a crash'}, not FAIL"}
        tries = 1
        for call in candidate_singles(p.preceding, p.impl.name):
            if tries >= self.max_tries - 1:
                break
            tries += 1
            if self.run_after(p, [call]) is Status.FAIL:
                return {**base, "order_dependent": True, "after": [[call.case.id, call.impl]],
                        "summary": f"order-dependent: passes alone, fails after {_label(call)}",
                        "replay": replay_command([call], target, device)}
        if len(p.preceding) > 1 and tries < self.max_tries:
            seq, used = shrink(p.preceding, lambda s: self.run_after(p, s) is Status.FAIL, self.max_tries - tries)
            tries += used
            if seq:
                return {**base, "order_dependent": True, "after": [[c.case.id, c.impl] for c in seq],
                        "summary": f"order-dependent: passes alone, fails after {len(seq)} calls: "
                                   + "; ".join(_label(c) for c in seq[:5]) + (" ..." if len(seq) > 5 else ""),
                        "replay": replay_command(seq, target, device)}
        return {**base, "order_dependent": None,
                "summary": f"passes alone; no preceding sequence brought it back in {tries} fresh processes (flaky?)"}


def failure_signature(result: ImplResult) -> frozenset[tuple[str, str, str]]:
    """(implementation, tensor, rule) of each failing tensor; a FAIL without one (the global-state rule)
    is (implementation, its error kind, "")."""
    failing = {(result.impl, name, v.rule) for name, v in result.tensors.items() if v.status is Status.FAIL}
    return frozenset(failing or {(result.impl, result.error_kind or "", "")})


@dataclass(frozen=True)
class Representative:
    """A FAIL of a resumed stream that reproduced alone: what `same_failure` names."""
    case_id: str
    impl: str


def representatives(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], Representative]:
    """Signature -> the first FAIL in `records` (a resumed stream, in run order) that reproduced alone."""
    out: dict[tuple[str, str, str], Representative] = {}
    for r in records:
        order = (r.get("notes") or {}).get("order") or {}
        if r.get("type") != "result" or r.get("status") != "FAIL" or order.get("order_dependent") is not False:
            continue
        failing = {(r["impl"], name, v.get("rule") or "") for name, v in (r.get("tensors") or {}).items()
                   if v.get("status") == "FAIL"}
        for s in failing or {(r["impl"], r.get("error_kind") or "", "")}:
            out.setdefault(s, Representative(r["case_id"], r["impl"]))
    return out


def recorded_verdicts(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(case id, implementation) -> the order note of each FAIL in `records` (a resumed stream) that has one."""
    return {(r["case_id"], r["impl"]): r["notes"]["order"] for r in records
            if r.get("type") == "result" and "order" in (r.get("notes") or {})}


def same_failure(signature: frozenset[tuple[str, str, str]], stands_for: dict[tuple[str, str, str], Any]) -> dict[str, Any]:
    """The order note of a FAIL not re-run because FAILs of its signature reproduced alone."""
    firsts = sorted({(stands_for[s].case_id, stands_for[s].impl) for s in signature})
    what = ", ".join(f"{t} {r}".strip() for _, t, r in sorted(signature))
    return {"checked": False, "same_as": [list(f) for f in firsts],
            "summary": f"not re-run alone: the same failure ({what}) reproduces alone in "
                       + "; ".join(f"{c} {i}" for c, i in firsts)}


def replay(session: Session, calls: list[Call]) -> ImplResult:
    """Run `calls` in order in one fresh worker; the last one is judged."""
    *sequence, target = calls
    impl = by_name(target.impl)
    worker = Worker(session.device, session.facts.kind)
    try:
        for call in sequence:
            worker.call(call.case, call.impl)
        return run_one(session, references(target.case), impl, worker.execute)
    finally:
        worker.close()



"""Shrink a failing (case, implementation) to a small case with the same failure.

Greedy delta debugging over the case's fields, deterministic (fixed move order, no
randomness) and bounded in time:
  batch → kv heads (the group size kept) → group size (kv heads kept) → lengths (together
  while equal, then each) → head dim → value head dim → the mask, causal, layout, value
  distribution and scale set to their plain defaults.
Each field offers its biggest reduction first (to the minimum, to half, by one step); a
candidate is accepted when it still fails *the same way*: the same tensor, with the same
kind of failure (accuracy beyond the scale, or against fp32 roundoff where the truth is ~0,
non-finite values, a contract break, or the kernel raising) and the same severity (gross stays gross). Passes over all fields repeat
until a pass accepts nothing; the result is then locally minimal: every single further
reduction (`neighbours`) passes or fails differently. With `seeds` > 1 each smaller shape is
also tried at seeds 0..seeds-1 (in that order), for failures that hit a few rows of some
draws only; local minimality then covers those seeds too. Candidates are judged exactly as a
run judges them (references + run_one), without known-failure entries, so a KNOWN
finding shrinks like any failure. By default the seed stays: the inputs are re-drawn from it
at each shape, as the harness does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..core.case import Case, CaseError, case_spec
from ..core.metrics import LEVELS
from ..core.results import ImplResult, Status, TensorVerdict
from ..implementations import Implementation
from ..run.session import CaseRunner, Session


class ShrinkError(ValueError):
    """The starting point is not a failure to shrink; one line saying why."""


@dataclass(frozen=True)
class Signature:
    """What makes two failures 'the same': tensor, kind and severity."""

    tensor: str  # out | dq | dk | dv, or "" when the kernel raised
    kind: str  # accuracy | accuracy-at-zero (the truth there is below fp32 roundoff) | nonfinite | contract | error
    severity: str  # gross | beyond | "" (error)

    def __str__(self) -> str:
        return f"{self.tensor or 'call'} {self.kind}" + (f" ({self.severity})" if self.severity else "")


def _kind(v: TensorVerdict) -> str:
    if v.rule in LEVELS:
        if v.metrics is not None:
            unit = v.metrics.summary(v.rule)
            rel = unit["rel_err"]
            if not math.isfinite(rel) or (rel > 0 and unit["err"] / rel <= unit["eps"]):
                # the truth is ~0 there (e.g. dQ of a row that sees one key): judged against fp32 roundoff,
                # a different failure from one beyond the low-precision reference
                return "accuracy-at-zero"
        return "accuracy"
    return "error" if v.rule == "backward-error" else v.rule


def _failing(result: ImplResult) -> list[TensorVerdict]:
    fails = [v for v in result.tensors.values() if v.status is Status.FAIL]
    return sorted(fails, key=lambda v: (v.severity != "gross", -(v.excess if math.isfinite(v.excess) else 1e300)))


def signature_of(result: ImplResult, tensor: str | None = None) -> Signature | None:
    """The failure of `result` (on `tensor`, or its worst failing tensor); None if it does not fail."""
    if result.status is Status.ERROR and not result.tensors:
        return Signature("", "error", "") if tensor is None else None
    fails = [v for v in _failing(result) if tensor is None or v.tensor == tensor]
    if not fails:
        return None
    v = fails[0]
    return Signature(v.tensor, _kind(v), v.severity)


def same_failure(result: ImplResult, sig: Signature, min_excess: float = 1.0) -> bool:
    """`result` fails like `sig`, at least `min_excess` times beyond its level's factor."""
    if sig.kind == "error" and not sig.tensor:
        return result.status is Status.ERROR and not result.tensors
    v = result.tensors.get(sig.tensor)
    return (v is not None and v.status is Status.FAIL and _kind(v) == sig.kind and v.severity == sig.severity
            and v.excess >= min_excess)


# --- moves ----------------------------------------------------------------------------------

Move = Callable[[Case], Iterator[Case]]


def _smaller(x: int, low: int, step: int = 1) -> list[int]:
    """Reductions of x, biggest first: to the minimum, to half, by one step."""
    half = max(low, (x // 2) // step * step)
    return [c for c in dict.fromkeys((low, half, x - step)) if low <= c < x]


def _valid(case: Case, **changes) -> Iterator[Case]:
    try:
        yield case.replace(**changes)
    except CaseError:
        return


def _batch(c: Case) -> Iterator[Case]:
    for b in _smaller(c.batch, 1):
        yield from _valid(c, batch=b)


def _kv_heads(c: Case) -> Iterator[Case]:
    """Fewer kv heads, each with the same group of query heads."""
    for h in _smaller(c.kv_heads, 1):
        yield from _valid(c, kv_heads=h, q_heads=h * c.group_size)


def _group(c: Case) -> Iterator[Case]:
    for g in _smaller(c.group_size, 1):
        yield from _valid(c, q_heads=c.kv_heads * g)


def _lengths(c: Case) -> Iterator[Case]:
    if c.q_len == c.kv_len:
        for n in _smaller(c.q_len, 1):
            yield from _valid(c, q_len=n, kv_len=n)
    for n in _smaller(c.q_len, 1):
        yield from _valid(c, q_len=n)
    for n in _smaller(c.kv_len, 1):
        yield from _valid(c, kv_len=n)


def _head_dim(c: Case) -> Iterator[Case]:
    # multiples of 8, as fused kernels want; a failure that needs an odd head dim keeps it
    for d in _smaller(c.head_dim, 8, 8):
        yield from _valid(c, head_dim=d)
    if c.v_head_dim is not None:
        yield from _valid(c, v_head_dim=None)
        for d in _smaller(c.v_head_dim, 8, 8):
            yield from _valid(c, v_head_dim=d)


def _plain(c: Case) -> Iterator[Case]:
    """The simpler setting of each option, one at a time."""
    defaults = {"mask": "none", "mask_per_head": False, "mask_fill": "-inf", "causal": "none", "layout": "bhld",
                "values": "normal", "scale": None}
    for name, plain in defaults.items():
        if getattr(c, name) != plain:
            extra = {"mask_per_head": False, "mask_fill": "-inf"} if name == "mask" else {}
            yield from _valid(c, **{name: plain, **extra})


MOVES: tuple[tuple[str, Move], ...] = (
    ("batch", _batch), ("kv_heads", _kv_heads), ("group", _group), ("lengths", _lengths),
    ("head_dim", _head_dim), ("plain", _plain),
)


def with_seeds(case: Case, seeds: int) -> list[Case]:
    """`case`, then the same shape at seeds 0..seeds-1: inputs are re-drawn at every shape, so a
    failure that hits a few rows (a data-dependent bug) may need another draw to show at a smaller one."""
    return [case, *(case.replace(seed=s) for s in range(seeds) if s != case.seed)]


def neighbours(case: Case, seeds: int = 1) -> list[Case]:
    """Every single reduction of `case`: a locally minimal case fails on none of them the same way."""
    return [variant for _, move in MOVES for cand in move(case) for variant in with_seeds(cand, seeds)]


# --- the search -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ShrinkResult:
    start: Case
    case: Case
    impl: str
    signature: Signature
    result: ImplResult  # the shrunk case's result
    evaluations: int
    seconds: float
    locally_minimal: bool  # False when the time budget ran out first
    trail: list[str] = field(default_factory=list)
    min_excess: float = 1.0
    seeds: int = 1

    def to_dict(self) -> dict:
        v = self.result.tensors.get(self.signature.tensor)
        return {
            "impl": self.impl, "start": case_spec(self.start), "start_id": self.start.id,
            "case": case_spec(self.case), "case_id": self.case.id, "signature": str(self.signature),
            "tensor": self.signature.tensor, "kind": self.signature.kind, "severity": self.signature.severity,
            "reason": v.reason if v is not None else self.result.error, "evaluations": self.evaluations,
            "seconds": round(self.seconds, 2), "locally_minimal": self.locally_minimal, "trail": self.trail,
            "min_excess": self.min_excess, "seeds": self.seeds,
        }


Judge = Callable[[Case], ImplResult]


class IsolatedJudge:
    """Judges a case as a run does, with no known-failure entries (a KNOWN finding is a FAIL here), each
    call in a worker process as `run` makes it: a kernel that segfaults or hangs costs one candidate, not
    the shrink. Close it (or use it in a `with`) to stop the worker."""

    def __init__(self, impl: Implementation, session: Session, isolate: bool = True, timeout: float | None = None):
        self.impl = impl
        self.runner = CaseRunner(session.without_known(), isolate=isolate, timeout=timeout)

    def __call__(self, case: Case) -> ImplResult:
        return self.runner.run(case, self.impl)

    def __enter__(self) -> IsolatedJudge:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.runner.close()


def judge_with(impl: Implementation, session: Session, isolate: bool = True,
               timeout: float | None = None) -> IsolatedJudge:
    return IsolatedJudge(impl, session, isolate, timeout)


def shrink(start: Case, impl: Implementation, judge: Judge, tensor: str | None = None, budget_s: float = 300.0,
           clock: Callable[[], float] = time.monotonic, min_excess: float = 1.0, seeds: int = 1) -> ShrinkResult:
    """`min_excess` > 1 keeps only candidates that fail clearly (error/scale >= min_excess x the factor):
    a bug that grows with size (a low-precision group sum) otherwise shrinks to a case just over the line."""
    t0 = clock()
    first = judge(start)
    sig = signature_of(first, tensor)
    what = f"{tensor} of " if tensor else ""
    if sig is None:
        raise ShrinkError(f"{what}{start.id} does not fail on {impl.name} (status {first.status}): nothing to shrink")
    if not same_failure(first, sig, min_excess):
        raise ShrinkError(f"{what}{start.id} fails on {impl.name} only {first.tensors[sig.tensor].excess:.3g}x beyond "
                          f"its factor, under --min-excess {min_excess:g}")
    current, current_result, evaluations, trail = start, first, 1, []
    rejected: set[Case] = set()  # judging is deterministic: a rejected case stays rejected
    progress = True
    while progress:
        progress = False
        for name, move in MOVES:
            accepted = True
            while accepted:
                accepted = False
                for cand in (variant for c in move(current) for variant in with_seeds(c, seeds)):
                    if cand in rejected:
                        continue
                    if clock() - t0 > budget_s:
                        return ShrinkResult(start, current, impl.name, sig, current_result, evaluations,
                                            clock() - t0, False, trail, min_excess, seeds)
                    result = judge(cand)
                    evaluations += 1
                    if same_failure(result, sig, min_excess):
                        trail.append(f"{name}: {current.id} → {cand.id}")
                        current, current_result, accepted, progress = cand, result, True, True
                        break
                    rejected.add(cand)
    return ShrinkResult(start, current, impl.name, sig, current_result, evaluations, clock() - t0, True, trail,
                        min_excess, seeds)

"""Shared test helpers: judge a kernel on a case exactly as a run would."""

from __future__ import annotations

from functools import lru_cache

from harness.core.case import Case
from harness.core.references import References, references
from harness.core.results import ImplResult
from harness.core.verdict import Tolerances
from harness.implementations import DeviceFacts
from harness.implementations.user import implementation_from_callable
from harness.run.session import Session, run_one

CPU = DeviceFacts(device="cpu", kind="cpu", name="test", arch="x86_64")


@lru_cache(maxsize=1)
def session() -> Session:
    """A CPU session with no known-failure entries, labelled cpu-test."""
    return Session.open(facts=CPU, known=[])


@lru_cache(maxsize=64)
def cached_references(case: Case) -> References:
    return references(case)


def tolerances() -> Tolerances:
    return session().tolerances


def judge(case: Case, kernel, name: str | None = None) -> ImplResult:
    impl = implementation_from_callable(kernel, name or kernel.__name__)
    return run_one(session(), cached_references(case), impl)

"""Shared test helpers: judge a kernel on a case exactly as a run would."""

from __future__ import annotations

from functools import lru_cache

from harness.core.case import Case
from harness.implementations import DeviceFacts
from harness.implementations.user import implementation_from_callable
from harness.run.plan import ImplResult, References, references, run_one
from harness.core.verdict import Tolerances, load_tolerances

CPU = DeviceFacts(device="cpu", kind="cpu", name="test", arch="x86_64")


@lru_cache(maxsize=64)
def cached_references(case: Case) -> References:
    return references(case)


@lru_cache(maxsize=1)
def tolerances() -> Tolerances:
    return load_tolerances()


def judge(case: Case, kernel, name: str | None = None) -> ImplResult:
    impl = implementation_from_callable(kernel, name or kernel.__name__)
    return run_one(cached_references(case), impl, CPU, tolerances(), [], "cpu-test")

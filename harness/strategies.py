"""Hypothesis for your own tests: generated valid cases, judged as a run judges them.

    from hypothesis import given
    from harness.strategies import cases, check

    @given(cases())
    def test_my_kernel(case):
        check(case, "mypkg.attn:sdpa")          # FAIL/ERROR raise, with a ready-to-paste repro

The strategies live in harness/core/generate.py; this module is their public face.
"""

from __future__ import annotations

from hypothesis import note

from .core.case import Case, case_spec
from .core.generate import BUDGETS, budget, case_bytes, case_toml, cases, lengths
from .core.references import references
from .core.results import ImplResult
from .reports.explain import reproduce_command, result_text
from .run.session import Session, run_one

__all__ = ["BUDGETS", "budget", "case_bytes", "case_toml", "cases", "check", "judge", "lengths", "repro"]


def repro(case: Case, impl: str, device: str = "cpu") -> str:
    return (f"# case {case.id}: paste into a cases/*.toml file\n{case_toml(case)}\n"
            f"# reproduce:\n{reproduce_command(case_spec(case), impl, device)}")


def judge(case: Case, impl: str, device: str = "cpu") -> ImplResult:
    """One implementation (a built-in name or module:function) on one case, judged as a run would,
    known failures applied."""
    session = Session.open(device)
    (implementation,), _ = session.resolve([impl])
    return run_one(session, references(case), implementation)


def check(case: Case, impl: str, device: str = "cpu", strict: bool = False) -> ImplResult:
    """For @given tests: FAIL or ERROR raise AssertionError with the verdict; Hypothesis shrinks the
    case and prints the repro (TOML entry + command) noted here for the final, shrunk example."""
    note(repro(case, impl, device))
    result = judge(case, impl, device)
    bad = ("FAIL", "ERROR", *(("KNOWN",) if strict else ()))
    if str(result.status) in bad:
        raise AssertionError(result_text(result.to_dict(), case_spec(case), device, bad))
    return result

"""Session and CaseRunner: one run opened once; references computed once per case; a case that cannot
fit is skipped with its reason; known failures come from the session and can be switched off."""

from __future__ import annotations

import torch

from harness.core.case import Case
from harness.core.known import KnownFailure
from harness.core.results import Status
from harness.implementations import builtin_implementations
from harness.implementations.user import implementation_from_callable
from harness.run.session import CaseRunner, Session

from . import wrong_kernels
from .helpers import CPU

CASE = Case(batch=1, q_heads=32, kv_heads=1, q_len=128, kv_len=128, head_dim=64)  # G = 32: a bf16 group sum fails


def test_opening_a_session_pins_the_process_state_it_records():
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)  # what a stray kernel could have left behind
    session = Session.open(facts=CPU, known=[])
    assert session.pinned == {"math_fp16_bf16_reduction_allowed": False}
    assert not torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    assert session.label == "cpu-x86_64" and session.versions["torch"] == CPU.torch_version


def test_the_case_runner_computes_references_once_per_case_and_streams_its_record_once():
    records: list[dict] = []
    math, flash = (builtin_implementations()[n] for n in ("sdpa-math", "sdpa-flash"))
    small = Case(1, 4, 2, 16, 16, 32)
    with CaseRunner(Session.open(facts=CPU, known=[]), sink=records.append) as runner:
        first = runner.run(small, math)
        refs = runner.refs
        second = runner.run(small, flash)
        assert runner.refs is refs
        runner.run(small.replace(seed=1), math)
    assert [r["case_id"] for r in records] == [small.id, small.replace(seed=1).id]
    assert first.status is Status.PASS and second.status is Status.PASS


def test_a_case_too_big_for_host_memory_is_unsupported_with_the_estimate(monkeypatch):
    monkeypatch.setattr("harness.run.memory.available_host_bytes", lambda: 1_000)
    with CaseRunner(Session.open(facts=CPU, known=[])) as runner:
        result = runner.run(Case(1, 4, 2, 16, 16, 32), builtin_implementations()["sdpa-math"])
    assert result.status is Status.UNSUPPORTED and result.error_kind == "memory" and "host memory" in result.error


def test_known_failures_come_from_the_session_and_without_known_turns_them_off():
    entry = KnownFailure(id="group-sum", case=("*",), impl=("*",), tensors=("dk", "dv"), device="*", torch="*",
                         max_ratio=1000.0, evidence="test")
    session = Session.open(facts=CPU, known=[entry])
    impl = implementation_from_callable(wrong_kernels.bf16_group_sum, "bf16_group_sum")
    with CaseRunner(session) as runner:
        absorbed = runner.run(CASE, impl)
    with CaseRunner(session.without_known()) as runner:
        plain = runner.run(CASE, impl)
    assert plain.status is Status.FAIL and absorbed.status is Status.KNOWN
    assert {t.known_entry for t in absorbed.tensors.values() if t.status is Status.KNOWN} == {"group-sum"}

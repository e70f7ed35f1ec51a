"""Guard bands (run/guards.py) and their rules (core/verdict.py: oob-read, oob-write, input-modified), the
device checked after every call (run/execute.py), and guards as a case field, a suite default and --guard."""

from __future__ import annotations

import math

import pytest
import torch

from harness.core.case import Case, CaseError, parse_case_spec
from harness.core.inputs import make_inputs
from harness.core.references import references
from harness.core.suites import SuiteError, load_suite, load_suite_text, select_cases
from harness.core.verdict import oob_read
from harness.implementations import builtin_implementations
from harness.implementations.base import Implementation, SdpaCall
from harness.implementations.registry import by_name
from harness.implementations.sdpa import sdpa
from harness.reports.explain import result_text
from harness.run.execute import Failure, execute
from harness.run.guards import guard_layout, place
from harness.run.session import Session, run_one

CASE = "b=2,hq=8,hkv=2,lq=16,lk=33,d=32"
KERNELS = {  # kernel -> (the one rule, the tensors it fails, the location its message names)
    "reads_key_past_kv_len": ("oob-read", {"out", "dq", "dk", "dv"}, "first at out[0, 0, 0, 0]"),
    "reads_next_batch_key_for_last_head": ("oob-read", {"out", "dq"}, "first at out[1, 4, 0, 0]"),
    "writes_row_past_input_end": ("oob-write", {"k"}, "after k[1, 1, 32, 31]"),
    "modifies_value_in_place": ("input-modified", {"v"}, "first at v[1, 1, 32, 0]"),
}


@pytest.fixture(scope="module")
def session() -> Session:
    return Session.open("cpu", known=[])


def _failing(result) -> dict[str, str]:
    return {name: v.rule for name, v in result.tensors.items() if str(v.status) != "PASS"}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_each_stray_access_is_caught_by_exactly_its_rule_at_its_place_with_nan_guards(session, kernel):
    rule, tensors, where = KERNELS[kernel]
    case = parse_case_spec(CASE + ",guard=nan")
    result = run_one(session, references(case), by_name(f"tests.guard_kernels:{kernel}"))
    assert str(result.status) == "FAIL"
    assert _failing(result) == {t: rule for t in tensors}
    first = "out" if rule == "oob-read" else next(iter(tensors))
    assert where in result.tensors[first].reason
    text = result_text(result.to_dict(), CASE + ",guard=nan", "cpu")
    assert rule in text and where in text


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_no_stray_access_is_flagged_without_guards(session, kernel):
    case = parse_case_spec(CASE)
    result = run_one(session, references(case), by_name(f"tests.guard_kernels:{kernel}"))
    assert str(result.status) == "PASS", _failing(result)


def test_a_sentinel_does_not_catch_a_stray_read_masked_by_minus_inf_but_still_catches_writes(session):
    """Why NaN is the default: -inf masking and x 0 wipe out a finite sentinel; a NaN survives both."""
    case = parse_case_spec(CASE + ",guard=sentinel")
    refs = references(case)
    for kernel, rule in (("reads_key_past_kv_len", None), ("writes_row_past_input_end", "oob-write")):
        result = run_one(session, refs, by_name(f"tests.guard_kernels:{kernel}"))
        assert set(_failing(result).values()) == ({rule} if rule else set())


def test_sentinel_influence_is_a_change_of_sentinel_size_against_the_unguarded_call():
    truth = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    base = torch.zeros(1, 1, 2, 2)
    moved = base.clone()
    moved[0, 0, 1, 0] = 300.0  # >= 16384 / 64
    guard = {"mode": "sentinel", "baseline": {"out": base}}
    verdict = oob_read("out", moved, truth, guard)
    assert verdict.rule == "oob-read" and "first at out[0, 0, 1, 0]" in verdict.reason
    assert oob_read("out", base + 1.0, truth, guard) is None
    assert oob_read("out", moved, truth, {}) is None  # no guards: no such rule


@pytest.mark.parametrize("spec", [
    "b=2,hq=8,hkv=2,lq=17,lk=33,d=40,guard=nan",
    "b=2,hq=4,hkv=1,lq=9,lk=9,d=72,layout=kv-expanded,causal=bottom-right,guard=nan",
    "b=2,hq=4,hkv=2,lq=5,lk=16,d=104,layout=blhd,mask=padding,dtype=fp16,guard=nan",
    "b=1,hq=4,hkv=2,lq=12,lk=12,d=32,layout=v-noncontig,mask=additive,mask_per_head=true,guard=nan",
    "b=2,hq=4,hkv=2,lq=1,lk=32,d=64,layout=grad-out-noncontig,values=negative-lse,guard=nan",
    "b=2,hq=4,hkv=2,lq=5,lk=16,d=104,layout=blhd,mask=bool,guard=sentinel",
])
def test_every_default_cpu_backend_passes_inside_guards(session, spec):
    case = parse_case_spec(spec)
    refs = references(case)
    impls, _ = session.resolve([])
    for impl in impls:
        result = run_one(session, refs, impl)
        assert not any(v.rule in ("oob-read", "oob-write", "input-modified") for v in result.tensors.values()), \
            (impl.name, _failing(result))
        assert "guard_difference" not in result.notes or impl.name != "sdpa-math", result.notes


def test_the_layout_puts_guard_before_after_and_between_heads_and_rows():
    layout = guard_layout((2, 3, 5, 40), (0, 1, 2, 3))
    b, h, l, d = layout.strides
    assert d == 1 and l >= 40 + 16 and l % 16 == 0  # a row guard after every row, rows aligned
    assert h >= 5 * l + 2 * l and b == 3 * h  # two guard rows between heads
    assert layout.offset >= 256 and layout.offset % 128 == 0  # a margin before
    end = layout.offset + 2 * b
    assert layout.numel - end >= b  # a whole batch block after: "the next batch" is guard
    blhd = guard_layout((2, 3, 5, 40), (0, 2, 1, 3))
    assert blhd.strides[2] > blhd.strides[1] > blhd.strides[3] == 1


def test_a_placed_input_holds_its_values_and_the_fill_everywhere_else():
    cpu = torch.randn(2, 2, 3, 8).to(torch.bfloat16)
    g = place("k", cpu, torch.device("cpu"), "nan", (0, 1, 2, 3))
    assert torch.equal(g.view, cpu) and g.findings("forward") == []
    inside = g.inside()
    assert int(inside.sum()) == cpu.numel() and bool(torch.isnan(g.buffer[~inside]).all())
    g.buffer[g.layout.offset - 3] = 0  # three elements before the tensor
    (found,) = g.findings("backward")
    assert found["rule"] == "oob-write" and found["bytes"] == [-6, -4] and "3 elements before k" in found["where"]
    mask = place("mask", torch.ones(1, 1, 4, 4, dtype=torch.bool), torch.device("cpu"), "nan", (0, 1, 2, 3))
    assert not bool(mask.buffer[~mask.inside()].any())  # a bool guard is False: writes only


def test_guard_is_a_case_field_in_the_id_and_spec(session):
    case = parse_case_spec(CASE + ",guard=sentinel")
    assert case.id.endswith("-guard-sentinel-s0") and Case(1, 1, 1, 1, 1, 1).guard == "none"
    with pytest.raises(CaseError, match="guard='zeros' is not one of none, nan, sentinel"):
        parse_case_spec(CASE + ",guard=zeros")


def test_edge_is_guarded_by_default_and_guard_overrides_any_suite():
    assert {sc.case.guard for sc in load_suite("edge")} == {"nan"}
    assert {sc.case.guard for sc in load_suite("smoke")} == {"none"}
    assert {sc.case.guard for sc in select_cases(["smoke"], guard="sentinel")} == {"sentinel"}
    assert {sc.case.guard for sc in select_cases(["edge"], guard="none")} == {"none"}
    with pytest.raises(SuiteError, match="--guard 'zeros'"):
        select_cases(["smoke"], guard="zeros")
    text = '[suite]\nguard = "nan"\n[[case]]\nb = 1\nhq = 2\nhkv = 1\nlq = 4\nd = 8\n[[case]]\nb = 1\nhq = 2\nhkv = 1\nlq = 4\nd = 8\nguard = "none"\n'
    assert [sc.case.guard for sc in load_suite_text(text, "t.toml")] == ["nan", "none"]


def test_generated_cases_are_guarded_by_default():
    from hypothesis import HealthCheck, given, settings  # only this test draws cases

    from harness.core.generate import cases

    @settings(max_examples=5, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(cases())
    def check(case):
        assert case.guard == "nan"

    check()


def _strided_sensitive(call: SdpaCall) -> torch.Tensor:
    """Right values, but one ulp more when K is not contiguous (a stride-dependent code path)."""
    out = sdpa(call)
    return out if call.key.is_contiguous() else torch.nextafter(out, torch.full_like(out, math.inf))


def test_a_result_that_changes_with_the_guard_strides_is_noted(session):
    impl = Implementation("strided-sensitive", "user", _strided_sensitive)
    case = parse_case_spec(CASE + ",guard=nan")
    outcome = execute(impl, make_inputs(case), "cpu")
    assert "out" in outcome.notes["guard_difference"] and "baseline" in outcome.guard


class FakeDevice:
    """A device whose errors surface late: a kernel leaves one pending, the next synchronise reports it."""

    def __init__(self) -> None:
        self.pending: str | None = None
        self.syncs = 0

    def sync(self, device) -> None:
        self.syncs += 1
        if self.pending:
            message, self.pending = self.pending, None
            raise RuntimeError(message)


def _faulting(fake: FakeDevice, phase: str):
    def forward(call: SdpaCall) -> torch.Tensor:
        out = sdpa(call)
        if phase == "forward":
            fake.pending = "CUDA error: an illegal memory access was encountered"
            return out
        return _LateInBackward.apply(out, fake)
    return forward


class _LateInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fake):
        ctx.fake = fake
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.fake.pending = "hipErrorIllegalAddress: deferred"
        return grad, None


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_a_deferred_device_error_is_the_call_that_left_it_not_the_next(session, phase):
    fake = FakeDevice()
    inputs = make_inputs(parse_case_spec(CASE))
    bad = Implementation("leaves-error", "user", _faulting(fake, phase))
    good = builtin_implementations()["sdpa-math"]
    first = execute(bad, inputs, "cpu", sync=fake.sync)
    expected = f"deferred error after leaves-error on {inputs.case.id} ({phase})"
    if phase == "forward":
        assert isinstance(first, Failure) and expected in first.message and "illegal memory access" in first.message
    else:
        assert expected in first.backward_error
    second = execute(good, inputs, "cpu", sync=fake.sync)
    assert not isinstance(second, Failure) and second.backward_error is None


def test_an_error_pending_before_a_call_starts_is_not_blamed_on_it():
    fake = FakeDevice()
    fake.pending = "CUDA error: unspecified launch failure"
    inputs = make_inputs(parse_case_spec(CASE))
    outcome = execute(builtin_implementations()["sdpa-math"], inputs, "cpu", sync=fake.sync)
    assert isinstance(outcome, Failure) and outcome.notes["deferred"]
    assert f"deferred error after an earlier call (surfaced before sdpa-math on {inputs.case.id} started, " \
           "not its own)" in outcome.message

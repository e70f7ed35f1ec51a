"""shrink: smaller, the same failure, locally minimal, deterministic, time-bounded."""

from __future__ import annotations

import itertools

import pytest

from harness.core.case import Case, parse_case_spec
from harness.implementations.user import implementation_from_callable
from harness.core.results import ImplResult
from harness.implementations.user import load_user_implementation
from harness.repro.shrink import ShrinkError, Signature, judge_with, neighbours, same_failure, shrink, signature_of
from harness.core.results import Status, TensorVerdict
from tests.helpers import CPU, session
from tests import repro_kernels

FAKE = implementation_from_callable(repro_kernels.correct, "fake")


def fake_judge(fails_when, tensor="dk", severity="beyond", rule="tensor", calls=None):
    """A judge that fails `tensor` exactly when `fails_when(case)`: the search logic without kernels."""
    def judge(case: Case) -> ImplResult:
        if calls is not None:
            calls.append(case)
        verdict = (TensorVerdict(tensor, Status.FAIL, rule, "fake", severity, 3.0) if fails_when(case)
                   else TensorVerdict(tensor, Status.PASS))
        return ImplResult(case.id, "fake", verdict.status, {tensor: verdict})
    return judge


START = parse_case_spec("b=4,hq=32,hkv=8,lq=200,lk=200,d=128,causal=top-left,mask=bool,layout=blhd")


def test_shrink_keeps_the_group_size_that_triggers_and_drops_what_is_not_needed():
    needs = lambda c: c.group_size >= 4 and c.q_len >= 37 and c.causal != "none"  # noqa: E731
    result = shrink(START, FAKE, fake_judge(needs))
    c = result.case
    assert (c.batch, c.kv_heads, c.q_heads, c.q_len, c.kv_len, c.head_dim) == (1, 1, 4, 37, 1, 8)
    assert (c.causal, c.mask, c.layout) == ("top-left", "none", "bhld")
    assert result.locally_minimal and result.signature == Signature("dk", "accuracy", "beyond")


def test_result_is_locally_minimal_every_single_reduction_passes():
    needs = lambda c: c.group_size * c.kv_heads >= 6 and c.head_dim >= 24  # noqa: E731
    result = shrink(START, FAKE, fake_judge(needs))
    assert needs(result.case)
    assert neighbours(result.case) and not any(needs(n) for n in neighbours(result.case))


def test_a_different_failure_is_not_accepted():
    """Small cases fail dq, not dk: shrinking a dk failure must not walk into them."""
    def judge(case):
        tensor = "dq" if case.q_len < 50 else "dk"
        return fake_judge(lambda c: True, tensor)(case)
    assert shrink(START, FAKE, judge).case.q_len == 50
    gross = fake_judge(lambda c: c.q_len < 50, severity="gross")
    beyond = fake_judge(lambda c: c.q_len >= 50)
    assert shrink(START, FAKE, lambda c: (gross if c.q_len < 50 else beyond)(c)).case.q_len == 50


def test_deterministic():
    needs = lambda c: c.kv_heads >= 2 and c.kv_len % 5 == 0  # noqa: E731
    a, b = shrink(START, FAKE, fake_judge(needs)), shrink(START, FAKE, fake_judge(needs))
    assert a.case == b.case and a.trail == b.trail and a.evaluations == b.evaluations


def test_time_bound_returns_the_best_so_far_not_claimed_minimal():
    ticks = itertools.count()
    result = shrink(START, FAKE, fake_judge(lambda c: True), budget_s=5, clock=lambda: next(ticks))
    assert not result.locally_minimal
    assert result.case != START and result.evaluations <= 6


def test_a_case_that_does_not_fail_is_refused():
    with pytest.raises(ShrinkError, match="does not fail"):
        shrink(START, FAKE, fake_judge(lambda c: False))
    with pytest.raises(ShrinkError, match="dq of"):
        shrink(START, FAKE, fake_judge(lambda c: True, "dk"), tensor="dq")


def test_signature_picks_the_worst_failure_gross_first():
    verdicts = {"dq": TensorVerdict("dq", Status.FAIL, "row", "", "beyond", 9.0),
                "dk": TensorVerdict("dk", Status.FAIL, "slice", "", "gross", 2.0),
                "out": TensorVerdict("out", Status.FAIL, "nonfinite", "", "gross", float("inf"))}
    result = ImplResult("x", "y", Status.FAIL, verdicts)
    assert signature_of(result) == Signature("out", "nonfinite", "gross")
    assert signature_of(result, "dq") == Signature("dq", "accuracy", "beyond")
    assert not same_failure(result, Signature("dk", "accuracy", "beyond"))
    crashed = ImplResult("x", "y", Status.ERROR, error="RuntimeError: boom", error_kind="exception")
    assert signature_of(crashed) == Signature("", "error", "") and same_failure(crashed, signature_of(crashed))


def test_a_wrong_kernel_on_a_model_size_case_shrinks_to_a_small_case_with_the_same_failure():
    """Acceptance: Llama-8B-like heads (32 query, 8 kv), d 128, B 2, 96 tokens; a kv-head mapping bug."""
    impl = implementation_from_callable(repro_kernels.tiled_kv_heads, "tests.repro_kernels:tiled_kv_heads")
    start = parse_case_spec("b=2,hq=32,hkv=8,lq=96,lk=96,d=128")
    with judge_with(impl, session()) as judge:  # each candidate in a worker process, as run makes it
        result = shrink(start, impl, judge, budget_s=600)
    c = result.case
    assert result.locally_minimal
    assert (c.batch, c.q_heads, c.kv_heads) == (1, 4, 2)  # the smallest GQA where tiled != interleaved
    assert c.q_len * c.kv_len * c.head_dim <= 96 * 96 * 128 // 64
    assert result.signature == Signature("out", "accuracy", "gross")
    assert same_failure(judge(c), result.signature)
    for smaller in neighbours(c):
        assert not same_failure(judge(smaller), result.signature), smaller.id


def test_min_excess_keeps_a_growing_bug_clearly_beyond_its_factor():
    """A bug whose excess grows like sqrt(group size): by default it shrinks to just over the line."""
    def judge(case):
        excess = 0.4 * case.group_size ** 0.5
        verdict = TensorVerdict("dk", Status.FAIL if excess > 1 else Status.PASS, "tensor", "", "beyond", excess)
        return ImplResult(case.id, "fake", verdict.status, {"dk": verdict})
    start = parse_case_spec("b=1,hq=32,hkv=1,lq=64,d=64")
    assert shrink(start, FAKE, judge).case.group_size == 7
    assert shrink(start, FAKE, judge, min_excess=2).case.group_size == 25
    with pytest.raises(ShrinkError, match="under --min-excess 3"):
        shrink(start, FAKE, judge, min_excess=3)


def test_seeds_let_a_draw_dependent_failure_shrink_further_deterministically():
    """Fails at any length > 100, or from 10 on but only on seed 2's draw (a few unlucky rows)."""
    needs = lambda c: c.q_len > 100 or (c.q_len >= 10 and c.seed == 2)  # noqa: E731
    start = parse_case_spec("b=1,hq=4,hkv=4,lq=200,d=64")
    assert shrink(start, FAKE, fake_judge(needs)).case.q_len == 101
    found = shrink(start, FAKE, fake_judge(needs), seeds=4)
    assert (found.case.q_len, found.case.seed) == (10, 2) and found.locally_minimal
    assert not any(needs(n) for n in neighbours(found.case, seeds=4))
    assert shrink(start, FAKE, fake_judge(needs), seeds=4).trail == found.trail


def test_a_failure_where_the_truth_is_zero_is_another_kind():
    """dQ of top-left causal with Lq = 1 is exactly 0: error there is judged against fp32 roundoff,
    not the same failure as one beyond the low-precision reference."""
    from tests.helpers import judge
    from tests.wrong_kernels import fp32_reference

    def noisy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        out = fp32_reference(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        return out + (out.detach().float() * 0 + 1e-3 * query.float().sum(-1, keepdim=True)).to(out.dtype)

    at_zero = judge(parse_case_spec("b=1,hq=4,hkv=4,lq=1,lk=40,d=64,causal=top-left"), noisy)
    assert signature_of(at_zero, "dq").kind == "accuracy-at-zero"
    beyond = judge(parse_case_spec("b=1,hq=4,hkv=4,lq=40,lk=40,d=64,causal=top-left"), noisy)
    assert signature_of(beyond, "dq").kind == "accuracy"


def test_a_kernel_that_aborts_costs_shrink_a_candidate_not_the_process():
    impl = load_user_implementation("tests.faulty_kernels:abort")
    with judge_with(impl, session(), timeout=60.0) as judge:
        result = shrink(parse_case_spec("b=1,hq=2,hkv=1,lq=8,d=16"), impl, judge, budget_s=8)
    assert result.signature == Signature("", "error", "") and result.result.error_kind == "crash"

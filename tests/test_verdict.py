"""Every verdict rule fails on a deliberately wrong kernel and passes correct ones.

The wrong kernels live in tests/wrong_kernels.py; each test checks that the verdict names
the tensor, the level and the heads a kernel engineer should look at.
"""

from __future__ import annotations

import math

import pytest
import torch

from harness.core.case import Case
from harness.core.metrics import tensor_metrics
from harness.core.suites import load_suite
from harness.core.results import Status, worst_status
from harness.core.verdict import judge_metrics, load_tolerances

from . import wrong_kernels as wk
from .helpers import cached_references, judge

GQA = Case(batch=2, q_heads=8, kv_heads=2, q_len=64, kv_len=64, head_dim=64)


def failing(result, tensor):
    verdict = result.tensors[tensor]
    assert verdict.status is Status.FAIL, f"{tensor} should fail: {verdict.status} {verdict.reason}"
    return verdict


def passing(result):
    bad = {n: v.reason for n, v in result.tensors.items() if v.status is not Status.PASS}
    assert result.status is Status.PASS and not bad, bad


# --- correct kernels pass everywhere ---------------------------------------------------------

SMOKE = [sc.case for sc in load_suite("smoke")]


@pytest.mark.parametrize("case", SMOKE, ids=lambda c: c.id)
@pytest.mark.parametrize("kernel", [wk.math_sdpa, wk.fp32_reference], ids=lambda k: k.__name__)
def test_correct_kernels_pass_every_smoke_case(case, kernel):
    passing(judge(case, kernel))


# --- gross -------------------------------------------------------------------------------------


def test_tiled_kv_head_mapping_fails_gross_on_the_remapped_heads():
    result = judge(GQA, wk.tiled_kv_heads)
    out = failing(result, "out")
    assert out.severity == "gross"
    heads = {h for _, h in out.failing_heads}
    # right kv head h // 4 vs tiled h % 2: they agree on heads 0, 2 (kv 0) and 5, 7 (kv 1) only
    assert heads == {1, 3, 4, 6}
    assert "out" in out.reason and "x the correct-kernel scale" in out.reason


def test_missing_group_sum_fails_dk_and_dv_but_not_out_or_dq():
    result = judge(GQA, wk.no_group_sum)
    assert result.tensors["out"].status is Status.PASS
    assert result.tensors["dq"].status is Status.PASS
    for tensor in ("dk", "dv"):
        verdict = failing(result, tensor)
        assert verdict.severity == "gross"
        assert verdict.rule == "tensor"


def test_ignored_scale_fails_only_when_a_scale_is_given():
    passing(judge(GQA, wk.ignores_scale))
    verdict = failing(judge(GQA.replace(scale=0.05), wk.ignores_scale), "out")
    assert verdict.severity == "gross"


def test_nan_on_fully_masked_rows_fails_as_nonfinite():
    case = Case(batch=2, q_heads=4, kv_heads=2, q_len=16, kv_len=32, head_dim=64, mask="fully-masked-rows")
    verdict = failing(judge(case, wk.nan_on_masked_rows), "out")
    assert verdict.rule == "nonfinite" and verdict.severity == "gross"
    assert "NaN" in verdict.reason and "where the oracle is finite" in verdict.reason


def test_wrong_output_dtype_is_a_contract_failure():
    verdict = failing(judge(GQA, wk.wrong_output_dtype), "out")
    assert verdict.rule == "contract" and "dtype torch.float32, expected torch.bfloat16" in verdict.reason


def test_missing_gradient_is_a_contract_failure():
    result = judge(GQA, wk.missing_value_gradient)
    verdict = failing(result, "dv")
    assert verdict.rule == "contract" and "dv is missing" in verdict.reason
    assert result.tensors["out"].status is Status.PASS


# --- subtle ------------------------------------------------------------------------------------


def test_group_sum_accumulated_in_bf16_fails_dk_dv_for_large_groups():
    case = Case(batch=1, q_heads=32, kv_heads=1, q_len=128, kv_len=128, head_dim=64)
    result = judge(case, wk.bf16_group_sum)
    assert result.tensors["out"].status is Status.PASS
    assert result.tensors["dq"].status is Status.PASS
    for tensor in ("dk", "dv"):
        verdict = failing(result, tensor)
        assert verdict.severity == "beyond"  # subtle: a few x a correct kernel, not O(1)
        assert verdict.metrics.levels["tensor"].ratio > 2.0


def test_group_sum_in_bf16_passes_for_mha_where_there_is_no_group_to_sum():
    passing(judge(Case(batch=1, q_heads=4, kv_heads=4, q_len=128, kv_len=128, head_dim=64), wk.bf16_group_sum))


def test_causal_off_by_one_fails_only_when_lengths_differ():
    equal = Case(batch=2, q_heads=8, kv_heads=2, q_len=64, kv_len=64, head_dim=64, causal="bottom-right")
    passing(judge(equal, wk.causal_off_by_one_when_lengths_differ))
    longer = equal.replace(q_len=48, kv_len=100)
    result = judge(longer, wk.causal_off_by_one_when_lengths_differ)
    verdict = failing(result, "out")
    assert {h for _, h in verdict.failing_heads} == set(range(8))


def test_length_class_bug_fails_only_for_kv_len_1_mod_32():
    passing(judge(GQA.replace(kv_len=96), wk.drops_last_key_when_kv_len_1_mod_32))
    verdict = failing(judge(GQA.replace(kv_len=97), wk.drops_last_key_when_kv_len_1_mod_32), "out")
    assert verdict.rule in ("tensor", "slice", "row")


# --- rules on metrics directly -------------------------------------------------------------------


def _metrics_for(case, tensor, perturb):
    refs = cached_references(case)
    truth = refs.oracle[tensor]
    actual = perturb(truth.to(torch.bfloat16 if case.dtype == "bf16" else torch.float16))
    return tensor_metrics(tensor, actual, truth, refs.lowprec[tensor], refs.inputs)


def test_single_row_error_fails_at_row_level_naming_its_head():
    tol = load_tolerances()

    def bump_one_row(t):
        t = t.clone()
        t[1, 3, 10] *= 1.05  # 5% on one row of one head: invisible in the tensor norm
        return t

    verdict = judge_metrics(_metrics_for(GQA, "out", bump_one_row), "bf16", tol)
    assert verdict.status is Status.FAIL and verdict.rule in ("slice", "row")
    assert (1, 3) in verdict.failing_heads


def test_row_level_respects_its_minimum_element_count():
    tol = load_tolerances()
    small = Case(batch=2, q_heads=4, kv_heads=2, q_len=64, kv_len=64, head_dim=8)  # 8-element rows

    def bump_one_row(t):
        t = t.clone()
        t[0, 0, 5, 0] *= 1.02
        return t

    metrics = _metrics_for(small, "out", bump_one_row)
    assert metrics.levels["row"].count < tol.rule("bf16", "row").min_count
    verdict = judge_metrics(metrics, "bf16", tol)
    assert verdict.rule != "row"


def test_zero_valued_truth_is_judged_against_the_epsilon_term():
    # Top-left causal with Lq = 1: the one row sees only key 0, so dQ is exactly 0.
    case = Case(batch=2, q_heads=4, kv_heads=2, q_len=1, kv_len=64, head_dim=64, causal="top-left")
    refs = cached_references(case)
    assert float(refs.oracle["dq"].abs().max()) == 0.0
    passing(judge(case, wk.math_sdpa))
    noisy = _metrics_for(case, "dq", lambda t: t + 1e-2)
    verdict = judge_metrics(noisy, "bf16", load_tolerances())
    assert verdict.status is Status.FAIL and math.isfinite(float(noisy.levels["tensor"].ratio))


def test_out_of_range_oracle_cannot_be_judged():
    from dataclasses import replace

    from harness.core.inputs import make_inputs
    from harness.core.lowprec import lowprec_reference
    from harness.core.oracle import oracle

    case = Case(batch=1, q_heads=2, kv_heads=1, q_len=8, kv_len=8, head_dim=16, dtype="fp16", grads=False)
    inputs = make_inputs(case)
    inputs = replace(inputs, v=torch.full_like(inputs.v, 60000.0))
    truth = oracle(inputs).output
    assert float(truth.abs().max()) > torch.finfo(torch.float16).max / 2
    m = tensor_metrics("out", truth.half(), truth, lowprec_reference(inputs).tensors()["out"], inputs)
    assert judge_metrics(m, "fp16", load_tolerances()).status is Status.OUT_OF_RANGE


def test_nan_swallowed_where_the_oracle_is_nan_fails():
    case = Case(batch=1, q_heads=2, kv_heads=1, q_len=8, kv_len=8, head_dim=64, grads=False)
    refs = cached_references(case)
    truth = refs.oracle["out"].clone()
    truth[0, 0, 3] = float("nan")  # as if q had a NaN in that row
    m = tensor_metrics("out", torch.zeros_like(truth).bfloat16(), truth, refs.lowprec["out"], refs.inputs)
    verdict = judge_metrics(m, "bf16", load_tolerances())
    assert verdict.status is Status.FAIL and "swallowed" in verdict.reason


def test_worst_status_orders_error_before_fail_before_pass():
    assert worst_status([Status.PASS, Status.FAIL, Status.ERROR]) is Status.ERROR
    assert worst_status([Status.PASS, Status.UNSUPPORTED]) is Status.UNSUPPORTED
    assert worst_status([]) is Status.PASS


def test_the_worst_element_is_the_first_largest_absolute_error_in_row_major_order_as_a_flat_argmax_gives():
    from harness.core.metrics import _worst

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        diff = torch.randint(-3, 4, (2, 3, 5, 4), generator=gen).double()  # many ties, negative maxima
        flat = int(diff.abs().argmax())
        assert _worst(diff) == (flat, float(diff.abs().max()))
    assert _worst(torch.zeros(0, 1, 2, 3, dtype=torch.float64)) == (None, 0.0)

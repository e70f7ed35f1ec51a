"""The D-term yardstick: covers what D's rounding leaves in dQ/dK on cancellation rows, stays
negligible elsewhere, and does not blind the verdict to a wrong kernel on those rows."""

from __future__ import annotations

import torch

from harness.core.case import Case
from harness.core.metrics import tensor_metrics
from harness.core.oracle import Rounding, attention
from harness.core.results import Status
from harness.core.verdict import judge_metrics, load_tolerances

from .helpers import cached_references

EARLY_ROWS = Case(1, 3, 3, 2, 10, 64, dtype="fp16", causal="top-left", seed=6)  # rows see 1-2 keys


def _design(refs, **rounding):
    return attention(refs.inputs, torch.float32, Rounding(dtype=torch.float16, **rounding))


def test_a_correct_design_that_differs_only_in_ds_rounding_passes_on_cancellation_rows():
    refs = cached_references(EARLY_ROWS)
    # D from O as stored vs D from the fp32 O: on these rows that choice alone moves dQ far beyond
    # the other designs' envelope; the D-term accounts for it
    design = _design(refs, p_before_pv=True, p_before_dv=True, ds_before_gemm=True).dq
    without = tensor_metrics("dq", design, refs.oracle["dq"], refs.lowprec["dq"][:1], refs.inputs)
    with_term = tensor_metrics("dq", design, refs.oracle["dq"], refs.lowprec["dq"][:1], refs.inputs,
                               refs.row_noise["dq"])
    assert float(without.levels["row"].ratio.max()) > float(with_term.levels["row"].ratio.max())
    assert judge_metrics(with_term, "fp16", load_tolerances()).status is Status.PASS


def test_the_d_term_does_not_widen_the_scale_on_well_conditioned_inputs():
    refs = cached_references(Case(2, 8, 2, 96, 96, 64))
    m = tensor_metrics("dq", refs.oracle["dq"].bfloat16(), refs.oracle["dq"], refs.lowprec["dq"], refs.inputs,
                       refs.row_noise["dq"])
    tensor = m.levels["tensor"]
    assert float(tensor.dterm) < 0.5 * float(tensor.lowprec)  # the designs' envelope still decides


def test_a_wrong_kernel_still_fails_on_cancellation_rows():
    refs = cached_references(EARLY_ROWS)
    wrong = refs.oracle["dq"].clone()
    wrong[0, 1, 1] *= 1.05  # 5% on one row
    m = tensor_metrics("dq", wrong.half(), refs.oracle["dq"], refs.lowprec["dq"], refs.inputs, refs.row_noise["dq"])
    assert judge_metrics(m, "fp16", load_tolerances()).status is Status.FAIL


def test_dk_noise_has_one_row_per_key_of_each_kv_head():
    refs = cached_references(Case(2, 8, 2, 16, 24, 32, causal="bottom-right"))
    assert refs.row_noise["dk"].shape == (2, 2, 24)
    assert refs.row_noise["dq"].shape == (2, 8, 16)

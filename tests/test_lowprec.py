"""The low-precision reference: near the floor on well-conditioned inputs, far above it where a
correct bf16 kernel must be (ill-conditioned dQ), and never a group sum in the dtype."""

from __future__ import annotations

import torch

from harness.core.case import Case
from harness.core.inputs import make_inputs
from harness.core.lowprec import designs, lowprec_reference
from harness.core.oracle import Rounding, attention, oracle


def _err(a, b):
    return float((a.double() - b).norm())


def _floor(truth, dtype):
    return float((truth.to(dtype).double() - truth).norm())


def test_designs_are_within_a_few_floors_on_well_conditioned_inputs():
    inputs = make_inputs(Case(2, 8, 2, 96, 96, 64))
    truth = oracle(inputs).tensors()
    for name, result in lowprec_reference(inputs).results.items():
        for tensor, value in result.tensors().items():
            ratio = _err(value, truth[tensor]) / _floor(truth[tensor], torch.bfloat16)
            assert 0.9 <= ratio < 3.0, (name, tensor, ratio)


def test_rounding_ds_reproduces_the_large_dq_error_of_ill_conditioned_inputs():
    # One key channel of magnitude ~960 (all logits near -120), L = 640, bf16: the true dQ is the
    # result of cancellation. fp32 softmax scores ~1x the floor; dS rounded to bf16 ~1,000x.
    inputs = make_inputs(Case(1, 1, 1, 640, 640, 64, values="negative-lse"))
    truth = oracle(inputs).dq
    floor = _floor(truth, torch.bfloat16)
    fp32_pipeline = attention(inputs, torch.float32, Rounding(dtype=torch.bfloat16)).dq
    ds_rounded = attention(inputs, torch.float32, Rounding(dtype=torch.bfloat16, ds_before_gemm=True)).dq
    assert _err(fp32_pipeline, truth) / floor < 2.0
    assert _err(ds_rounded, truth) / floor > 300.0
    # so the envelope of the accepted designs, the yardstick, stands far above the floor here
    envelope = max(_err(r.dq, truth) for r in lowprec_reference(inputs).results.values())
    assert envelope / floor > 300.0


def test_every_design_accumulates_in_fp32_and_none_sums_the_group_in_the_dtype():
    for design in designs(torch.bfloat16):
        assert design.dtype == torch.bfloat16
    # per-head dK/dV rounded before an fp32 sum stays flat in the group size
    for g in (1, 8, 32):
        inputs = make_inputs(Case(1, g, 1, 64, 64, 64, seed=g))
        truth = oracle(inputs).dk
        per_head = lowprec_reference(inputs).results["flash-per-head-dkdv"].dk
        assert _err(per_head, truth) / _floor(truth, torch.bfloat16) < 3.0

"""Inputs: seeded, bit-identical across calls, layouts applied on the device and checked."""

from __future__ import annotations

import torch

from harness.core.case import Case
from harness.run.execute import HarnessDefect, run_implementation
from harness.implementations import builtin_implementations
from harness.core.inputs import apply_layout, check_strides, make_inputs


def test_inputs_are_bit_identical_for_the_same_case_and_differ_by_seed():
    case = Case(2, 8, 2, 16, 16, 32, mask="bool")
    assert make_inputs(case).hashes() == make_inputs(case).hashes()
    assert make_inputs(case).hashes()["q"] != make_inputs(case.replace(seed=1)).hashes()["q"]


def test_inputs_are_quantized_to_the_case_dtype():
    inputs = make_inputs(Case(1, 2, 1, 4, 4, 8, dtype="fp16"))
    assert {t.dtype for t in (inputs.q, inputs.k, inputs.v, inputs.grad_out)} == {torch.float16}


def test_blhd_layout_survives_and_is_checked_by_strides():
    case = Case(2, 8, 2, 16, 16, 32, layout="blhd")
    q = make_inputs(case).q
    view = apply_layout(case, "q", q.clone())
    assert torch.equal(view, q) and not view.is_contiguous()
    assert check_strides(case, "q", view) is None
    assert "layout 'blhd' needs" in check_strides(case, "q", q.contiguous())


def test_stride_zero_expanded_kv_reaches_the_kernel():
    case = Case(2, 4, 1, 8, 8, 16, layout="kv-expanded")
    k = apply_layout(case, "k", make_inputs(case).k)
    assert k.shape[1] == 4 and k.stride(1) == 0


def test_a_layout_lost_on_the_way_is_a_harness_defect(monkeypatch):
    import harness.run.execute as execute

    case = Case(2, 4, 2, 8, 8, 16, layout="v-noncontig")
    monkeypatch.setattr(execute, "apply_layout", lambda case, role, leaf: leaf.contiguous())
    try:
        run_implementation(builtin_implementations()["sdpa-math"], make_inputs(case), "cpu")
    except HarnessDefect as exc:
        assert "layout not applied" in str(exc)
    else:
        raise AssertionError("a lost layout must not pass silently")


def test_negative_lse_values_put_every_logit_near_minus_120():
    case = Case(1, 1, 1, 32, 32, 64, values="negative-lse")
    inputs = make_inputs(case)
    logits = inputs.q.double() @ inputs.k.double().transpose(-1, -2) / 8
    assert float(logits.max()) < -100

"""Cases: one-line validation errors naming the field, stable ids, --case round trips."""

from __future__ import annotations

import pytest

from harness.core.case import Case, CaseError, case_spec, parse_case_spec


def test_id_is_stable_and_readable():
    case = Case(2, 32, 8, 128, 128, 128, causal="top-left")
    assert case.id == "b2-h32x8-q128-k128-d128-bf16-causal-s0"
    full = Case(2, 8, 2, 1, 257, 192, v_head_dim=128, dtype="fp16", causal="bottom-right", mask="additive",
                mask_fill="-65504", mask_per_head=True, scale=0.125, layout="blhd", values="outlier-channels",
                seed=3, grads=False)
    assert full.id == ("b2-h8x2-q1-k257-d192v128-fp16-causal-br-mask-additive-m65504-perhead-sc0.125-blhd-"
                       "outlier-channels-fwd-s3")


@pytest.mark.parametrize("spec, message", [
    ("b=2,hq=32,hkv=3,lq=8,d=64", "kv_heads=3 does not divide q_heads=32"),
    ("b=0,hq=4,hkv=2,lq=8,d=64", "batch=0 must be a positive integer"),
    ("b=1,hq=4,hkv=2,lq=8,d=64,dtype=fp8", "dtype='fp8' is not one of bf16, fp16, fp32"),
    ("b=1,hq=4,hkv=2,lq=8,d=64,causal=yes", "causal='yes' is not one of"),
    ("b=1,hq=4,hkv=2,lq=8,d=64,layout=kv-expanded", "layout='kv-expanded' needs kv_heads=1"),
    ("b=1,hq=4,hkv=2,lq=8,d=64,heads=3", "unknown case field 'heads'"),
    ("b=1,hq=4,hkv=2,lq=8", "case is missing head_dim"),
    ("b=1,hq=4,hkv=2,lq=x,d=8", "q_len='x' must be an integer"),
    ("b=1,hq=4,hkv=2,lq=8,d=8,scale=-1", "scale=-1.0 must be a positive finite number"),
    ("b=1,hq=4,hkv=2,lq=8,d=8,mask=padding", "mask='padding' needs batch >= 2"),
    ("b=1,hq4", "--case item 'hq4' is not key=value"),
])
def test_bad_cases_get_one_line_naming_the_field(spec, message):
    with pytest.raises(CaseError) as info:
        parse_case_spec(spec)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_case_spec_round_trips():
    case = Case(2, 8, 2, 48, 100, 80, dtype="fp16", causal="bottom-right", scale=0.2, layout="blhd", seed=5)
    assert parse_case_spec(case_spec(case)) == case


def test_kv_len_defaults_to_q_len():
    assert parse_case_spec("b=1,hq=4,hkv=1,lq=9,d=8").kv_len == 9


def test_flops_count_is_halved_for_causal():
    case = Case(1, 2, 1, 8, 8, 4)
    assert case.flops() == 12 * 2 * 8 * 8 * 4
    assert case.replace(causal="top-left").flops() == case.flops() / 2

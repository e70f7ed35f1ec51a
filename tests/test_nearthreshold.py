"""The near-threshold families (-65504 rows, negative LSE): a textbook fp32 FlashAttention-2 design fails the
yardstick as committed the way CPU flash, cuDNN and memory-efficient do; the prototype allowances of
harness/lab/nearthreshold.py pass it and still fail a deliberately coarser kernel on the same inputs
(docs/benchmarks-calibration.md, "Near-threshold families: -65504 rows and negative LSE")."""

from __future__ import annotations

import pytest
import torch

from harness.core.case import parse_case_spec
from harness.core.metrics import tensor_metrics
from harness.core.results import Status
from harness.core.verdict import judge_metrics, load_tolerances
from harness.implementations.user import implementation_from_callable
from harness.lab import refkernels
from harness.lab.nearthreshold import proposed_noise
from harness.run.execute import run_implementation

from .helpers import cached_references

M65504_Q9 = "b=2,hq=2,hkv=2,lq=9,lk=9,d=64,dtype=fp16,mask=fully-masked-rows,mask_fill=-65504,values=large-logits"
M65504_Q63 = "b=3,hq=2,hkv=1,lq=63,lk=63,d=64,dtype=fp16,causal=top-left,mask=fully-masked-rows,mask_fill=-65504"
NEG_LSE = "b=2,hq=4,hkv=2,lq=192,lk=192,d=64,dtype=bf16,values=negative-lse"


def _statuses(spec: str, kernel, proposal: bool) -> dict[str, Status]:
    refs = cached_references(parse_case_spec(spec))
    outs = run_implementation(implementation_from_callable(kernel, kernel.__name__), refs.inputs, "cpu")
    noise = proposed_noise(refs.inputs, refs.oracle["out"], refs.row_noise) if proposal else refs.row_noise
    tol = load_tolerances()
    return {name: judge_metrics(tensor_metrics(name, outs.tensors[name], refs.oracle[name], refs.lowprec[name],
                                               refs.inputs, noise.get(name)), refs.case.dtype, tol).status
            for name in ("out", "dq", "dk", "dv")}


def _passes(statuses: dict[str, Status]) -> bool:
    return all(s is Status.PASS for s in statuses.values())


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_a_textbook_fp32_flash_fails_the_m65504_rows_through_its_fp32_lse_alone():
    assert _statuses(M65504_Q9, refkernels.flash_b64, proposal=False)["dv"] is Status.FAIL
    assert _passes(_statuses(M65504_Q9, refkernels.flash_b64_lse64, proposal=False))  # the same, LSE in fp64


@pytest.mark.parametrize("spec", [M65504_Q9, M65504_Q63])
def test_the_logit_term_passes_textbook_designs_and_fails_an_lse_four_times_coarser(spec):
    assert _passes(_statuses(spec, refkernels.flash_b64, proposal=True))
    assert _passes(_statuses(spec, refkernels.flash_b64_log2, proposal=True))
    assert not _passes(_statuses(spec, refkernels.lse_bits(22), proposal=True))


def test_negative_lse_dq_rows_textbook_fails_now_passes_with_the_coherent_terms_and_ds_one_bit_short_fails():
    assert _statuses(NEG_LSE, refkernels.flash_b64, proposal=False)["dq"] is Status.FAIL
    assert _passes(_statuses(NEG_LSE, refkernels.flash_b64, proposal=True))
    assert not _passes(_statuses(NEG_LSE, refkernels.ds_bits(7), proposal=True))


def test_the_logit_term_keeps_finfo_min_rows_zeroed_gross():
    spec = "b=1,hq=1,hkv=1,lq=2,lk=2,d=64,mask=fully-masked-rows,mask_fill=finfo.min"
    from harness.lab.nearthreshold import zero_huge_rows

    assert _statuses(spec, zero_huge_rows, proposal=True)["out"] is Status.FAIL


def test_the_per_head_term_still_fails_a_group_sum_in_the_dtype_where_the_heads_cancel():
    from .subtle_kernels import group_sum_in_dtype

    spec = "b=1,hq=16,hkv=2,lq=128,lk=128,d=64,dtype=bf16,values=negative-lse"
    assert _statuses(spec, group_sum_in_dtype, proposal=True)["dk"] is Status.FAIL

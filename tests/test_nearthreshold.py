"""The logit term (harness/core/cancellation.py): a textbook fp32 FlashAttention-2 design fails the -65504
rows through its fp32 logits and LSE alone without it and passes with it; a kernel whose LSE is four times
coarser, zeroed finfo.min rows, and the ordinary and outlier-channel inputs it must not touch still decide as
before. The coherent and per-head allowances still in proposal (harness/lab/nearthreshold.py) keep a
deliberately coarser kernel failing (docs/benchmarks-calibration.md, "Near-threshold families")."""

from __future__ import annotations

import pytest
import torch

from harness.core.cancellation import combined, row_terms
from harness.core.case import parse_case_spec
from harness.core.metrics import tensor_metrics
from harness.core.results import Status
from harness.core.verdict import judge_metrics, load_tolerances
from harness.implementations.user import implementation_from_callable
from harness.lab import refkernels
from harness.lab.nearthreshold import proposed_noise, zero_huge_rows
from harness.run.execute import run_implementation

from .helpers import cached_references

M65504_Q9 = "b=2,hq=2,hkv=2,lq=9,lk=9,d=64,dtype=fp16,mask=fully-masked-rows,mask_fill=-65504,values=large-logits"
M65504_Q63 = "b=3,hq=2,hkv=1,lq=63,lk=63,d=64,dtype=fp16,causal=top-left,mask=fully-masked-rows,mask_fill=-65504"
NEG_LSE = "b=2,hq=4,hkv=2,lq=192,lk=192,d=64,dtype=bf16,values=negative-lse"
OUTLIERS = "b=2,hq=8,hkv=2,lq=96,lk=96,d=64,dtype=fp16,values=outlier-channels"


def _d_term_alone(refs) -> dict[str, torch.Tensor]:
    terms = row_terms(refs.inputs, refs.oracle["out"])
    return {"dq": terms["d_dq"], "dk": terms["d_dk"]}


def _without_group_sum(refs) -> dict[str, torch.Tensor]:
    terms = row_terms(refs.inputs, refs.oracle["out"])
    return combined(terms | {"head_dk": torch.zeros_like(terms["head_dk"]), "head_dv": torch.zeros_like(terms["head_dv"])})


def _metrics(spec: str, kernel, noise: str):
    refs = cached_references(parse_case_spec(spec))
    outs = run_implementation(implementation_from_callable(kernel, kernel.__name__), refs.inputs, "cpu")
    rows = {"before": _d_term_alone, "core": lambda r: r.row_noise, "logit": _without_group_sum,
            "proposal": lambda r: proposed_noise(r.inputs, r.oracle["out"])}[noise](refs)
    return {name: tensor_metrics(name, outs.tensors[name], refs.oracle[name], refs.lowprec[name], refs.inputs,
                                 rows.get(name)) for name in ("out", "dq", "dk", "dv")}


def _statuses(spec: str, kernel, noise: str = "core") -> dict[str, Status]:
    tol = load_tolerances()
    dtype = parse_case_spec(spec).dtype
    return {name: judge_metrics(m, dtype, tol).status for name, m in _metrics(spec, kernel, noise).items()}


def _passes(statuses: dict[str, Status]) -> bool:
    return all(s is Status.PASS for s in statuses.values())


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_a_textbook_fp32_flash_fails_the_m65504_rows_without_the_logit_term_through_its_fp32_lse_alone():
    assert _statuses(M65504_Q9, refkernels.flash_b64, "before")["dv"] is Status.FAIL
    assert _passes(_statuses(M65504_Q9, refkernels.flash_b64_lse64, "before"))  # the same, LSE in fp64


@pytest.mark.parametrize("spec", [M65504_Q9, M65504_Q63])
def test_the_logit_term_passes_textbook_designs_and_fails_an_lse_four_times_coarser(spec):
    assert _passes(_statuses(spec, refkernels.flash_b64))
    assert _passes(_statuses(spec, refkernels.flash_b64_log2))
    assert not _passes(_statuses(spec, refkernels.lse_bits(22)))


def test_the_logit_term_keeps_finfo_min_rows_zeroed_gross():
    spec = "b=1,hq=1,hkv=1,lq=2,lk=2,d=64,mask=fully-masked-rows,mask_fill=finfo.min"
    assert _statuses(spec, zero_huge_rows)["out"] is Status.FAIL


@pytest.mark.parametrize("spec", [
    OUTLIERS,  # the case the coherent proposal widened 4.4x (a CPU flash dQ 7.5x beyond a textbook kernel passed)
    "b=2,hq=4,hkv=2,lq=97,lk=97,d=64,causal=top-left,dtype=fp16",
])
def test_the_logit_term_moves_no_ratio_on_ordinary_or_outlier_channel_logits(spec):
    before, core = _metrics(spec, refkernels.flash_b64_log2, "before"), _metrics(spec, refkernels.flash_b64_log2, "logit")
    for name in before:
        for level in ("tensor", "slice", "row"):
            a, b = before[name].levels[level].ratio, core[name].levels[level].ratio
            assert torch.allclose(a, b, rtol=1e-6, atol=0), (name, level)


def test_negative_lse_dq_rows_textbook_passes_with_the_coherent_proposal_and_ds_one_bit_short_fails():
    assert _passes(_statuses(NEG_LSE, refkernels.flash_b64, "proposal"))
    assert not _passes(_statuses(NEG_LSE, refkernels.ds_bits(7), "proposal"))


@pytest.mark.parametrize("noise", ["core", "proposal"])
def test_the_group_sum_term_still_fails_a_group_sum_in_the_dtype_where_the_heads_cancel(noise):
    from .subtle_kernels import group_sum_in_dtype

    spec = "b=1,hq=16,hkv=2,lq=128,lk=128,d=64,dtype=bf16,values=negative-lse"
    assert _statuses(spec, group_sum_in_dtype, noise)["dk"] is Status.FAIL

"""The D-term yardstick: covers what D's rounding leaves in dQ/dK on cancellation rows, stays
negligible elsewhere, and does not blind the verdict to a wrong kernel on those rows."""

from __future__ import annotations

import pytest
import torch

from harness.core import cancellation
from harness.core.cancellation import LOGIT_CAP, row_terms
from harness.core.case import Case, parse_case_spec
from harness.core.metrics import tensor_metrics
from harness.core.oracle import Rounding, attention, softmax_scale
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


def _dense_logit_term(inputs, oracle_out):
    """The logit term written out densely (K/V expanded, one softmax, |v_j - O_i| taken directly), independent of
    the blocked core loop."""
    case = inputs.case
    g, scale = case.group_size, softmax_scale(case)
    ulp = lambda x: torch.where(x > 0, 2.0 ** (torch.frexp(x)[1] - 24).double(), 0.0)  # noqa: E731
    q, do, o = inputs.q.double(), inputs.grad_out.double(), oracle_out.double()
    k, v = (t.double().repeat_interleave(g, 1) for t in (inputs.k, inputs.v))
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if inputs.mask is not None:
        s = s.masked_fill(~inputs.mask, float("-inf")) if inputs.mask.dtype == torch.bool else s + inputs.mask.double()
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.softmax(s, -1)
    abs_s = torch.where(p > 0, s.abs(), 0.0)
    sig_f = ((2 / 12) ** 0.5 * ulp(abs_s)).clamp_max(LOGIT_CAP)
    sig_b = ((2 / 12) ** 0.5 * (ulp(abs_s) ** 2 + ulp(lse.abs()) ** 2).sqrt()).clamp_max(LOGIT_CAP)
    gap = torch.matmul(do, v.transpose(-1, -2)) - (do * o).sum(-1, keepdim=True)
    w = (p * sig_b * gap) ** 2
    fold = lambda t: t.view(case.batch, case.kv_heads, g, case.kv_len).sum(2)  # noqa: E731
    return {"logit_out": ((p * sig_f) ** 2 * ((v[:, :, None] - o[:, :, :, None]) ** 2).sum(-1)).sum(-1).sqrt(),
            "logit_dv": fold(((p * sig_b) ** 2 * do.pow(2).sum(-1, keepdim=True)).sum(-2)).sqrt(),
            "logit_dq": (scale**2 * (w * k.pow(2).sum(-1)[..., None, :]).sum(-1)).sqrt(),
            "logit_dk": fold((scale**2 * w * q.pow(2).sum(-1, keepdim=True)).sum(-2)).sqrt()}


@pytest.mark.parametrize("spec", [
    "b=2,hq=2,hkv=2,lq=9,lk=9,d=64,dtype=fp16,mask=fully-masked-rows,mask_fill=-65504,values=large-logits",
    "b=1,hq=4,hkv=2,lq=33,lk=20,d=32,dtype=bf16,mask=fully-masked-rows,mask_fill=-65504",
])
def test_the_logit_term_equals_its_dense_formula(spec):
    refs = cached_references(parse_case_spec(spec))
    terms, dense = row_terms(refs.inputs, refs.oracle["out"]), _dense_logit_term(refs.inputs, refs.oracle["out"])
    for name, want in dense.items():
        assert float(want.max()) > 0, name  # the case exercises the term
        # out: the core's |v_j - O_i|² = |v|² - 2 O·v + |O|² cancels in fp64 (|v|² ~ 64: ~1e-14 absolute), which
        # reaches 1e-6 of the case's largest row term on rows where O sits on v_j, far under any row's floor;
        # the others agree to fp64 summation order
        atol = (1e-6 if name == "logit_out" else 1e-12) * float(want.max())
        torch.testing.assert_close(terms[name], want, rtol=1e-9, atol=atol, msg=name)


def test_the_logit_term_on_sampled_rows_is_the_full_terms_rows():
    refs = cached_references(parse_case_spec("b=1,hq=4,hkv=2,lq=40,lk=40,d=32,dtype=fp16,causal=top-left,"
                                             "mask=fully-masked-rows,mask_fill=-65504"))
    rows = torch.tensor([0, 7, 21, 39])
    full = row_terms(refs.inputs, refs.oracle["out"])
    sampled = row_terms(refs.inputs, refs.oracle["out"].index_select(2, rows), rows)
    for name in ("logit_out", "logit_dq", "d_dq"):
        torch.testing.assert_close(sampled[name], full[name].index_select(2, rows), rtol=1e-12, atol=0, msg=name)


def test_a_forward_only_case_gets_the_logit_term_for_out_alone():
    refs = cached_references(parse_case_spec("b=1,hq=2,hkv=1,lq=8,lk=8,d=16,grads=False"))
    assert set(refs.row_noise) == {"out"}


def _dense_group_sum_term(inputs) -> dict[str, torch.Tensor]:
    """The group-sum term from fp64 autograd on K/V expanded by hand (each query head's dK/dV is then the gradient
    of its own copy), independent of the blocked core loop."""
    case = inputs.case
    g = case.group_size
    k, v = (t.double().repeat_interleave(g, 1).requires_grad_() for t in (inputs.k, inputs.v))
    mask = torch.zeros(case.q_len, case.kv_len, dtype=torch.float64)
    if case.causal != "none":
        offset = 0 if case.causal == "top-left" else case.kv_len - case.q_len
        keep = torch.ones(case.q_len, case.kv_len, dtype=torch.bool).tril(offset)
        mask = mask.masked_fill(~keep, float("-inf"))
    if inputs.mask is not None:
        m = inputs.mask
        mask = mask.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else mask + m.double()
    out = torch.nn.functional.scaled_dot_product_attention(inputs.q.double(), k, v, attn_mask=mask)
    out.backward(inputs.grad_out.double())
    bits = {torch.bfloat16: 8, torch.float16: 11}[inputs.q.dtype]
    tiniest = 2.0**-24 if inputs.q.dtype == torch.float16 else 0.0  # fp16's subnormal spacing
    ulp = lambda x: torch.where(x > 0, (2.0 ** (torch.frexp(x)[1] - bits).double()).clamp_min(tiniest), 0.0)  # noqa: E731
    fold = lambda t: (ulp(t.abs()) ** 2 / 12).sum(-1).view(case.batch, case.kv_heads, g, -1).sum(2).sqrt()  # noqa: E731
    return {"head_dk": fold(k.grad), "head_dv": fold(v.grad)}


@pytest.mark.parametrize("spec", [
    "b=2,hq=4,hkv=2,lq=40,lk=40,d=64,dtype=fp16,values=negative-lse,s=10003",
    "b=1,hq=6,hkv=2,lq=17,lk=29,d=32,dv=16,dtype=bf16,causal=top-left,mask=additive,mask_per_head=True",
    "b=2,hq=8,hkv=2,lq=45,lk=30,d=32,dtype=bf16,causal=bottom-right,mask=bool",  # rows that see no key
    "b=2,hq=4,hkv=1,lq=19,lk=37,d=32,dtype=fp16,causal=top-left,mask=padding",  # keys no row sees: dK_h = 0 exactly
    "b=1,hq=4,hkv=2,lq=1536,d=32,dtype=fp16,causal=top-left,long=True",  # row-sampled: grad_out only on its rows
])
def test_the_group_sum_term_equals_fp64_autograd_on_hand_expanded_kv(spec, monkeypatch):
    refs = cached_references(parse_case_spec(spec))
    dense = _dense_group_sum_term(refs.inputs)
    terms = row_terms(refs.inputs, refs.oracle["out"], refs.rows)
    monkeypatch.setattr(cancellation, "CHUNK_BYTES", 2**14)  # many key blocks and row chunks: the same terms
    blocked = row_terms(refs.inputs, refs.oracle["out"], refs.rows)
    for name, want in dense.items():
        assert float(want.max()) > 0, name
        torch.testing.assert_close(terms[name], want, rtol=1e-9, atol=0, msg=name)
        torch.testing.assert_close(blocked[name], want, rtol=1e-9, atol=0, msg=name)


def test_the_group_sum_term_is_zero_without_a_group():
    refs = cached_references(parse_case_spec("b=2,hq=4,hkv=4,lq=40,lk=40,d=64,dtype=bf16,values=negative-lse"))
    terms = row_terms(refs.inputs, refs.oracle["out"])
    assert float(terms["head_dk"].abs().max()) == 0 and float(terms["head_dv"].abs().max()) == 0


def test_a_design_that_rounds_each_heads_dk_passes_where_the_heads_cancel_only_with_the_group_sum_term():
    # the false-alarm audit's worst such row (negative LSE, G = 2): the per-head design judged against the others
    refs = cached_references(parse_case_spec("b=2,hq=4,hkv=2,lq=40,lk=40,d=64,dtype=fp16,values=negative-lse,s=10003"))
    per_head = attention(refs.inputs, torch.float32, Rounding(
        dtype=torch.float16, p_before_pv=True, p_before_dv=True, ds_before_gemm=True, o_as_stored=True,
        per_head_dkdv=True)).dk
    others = [t for i, t in enumerate(refs.lowprec["dk"]) if i != 1]  # leave the per-head design out
    terms = row_terms(refs.inputs, refs.oracle["out"])
    without = torch.maximum(terms["d_dk"], terms["logit_dk"])

    def status(noise):
        m = tensor_metrics("dk", per_head, refs.oracle["dk"], others, refs.inputs, noise)
        return judge_metrics(m, "fp16", load_tolerances()).status

    assert status(without) is Status.FAIL
    assert status(refs.row_noise["dk"]) is Status.PASS


def test_ulp_is_zero_at_zero_and_fp16_spacing_below_its_normals():
    x = torch.tensor([0.0, 2.0**-30, 1.0], dtype=torch.float64)
    assert cancellation.ulp(x, torch.float16).tolist() == [0.0, 2.0**-24, 2.0**-10]
    assert cancellation.ulp(x, torch.bfloat16).tolist() == [0.0, 2.0**-37, 2.0**-7]
    assert cancellation.ulp(x).tolist() == [0.0, 2.0**-53, 2.0**-23]

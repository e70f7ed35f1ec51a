"""The oracle is the truth, so it is tested hardest: against fp64 autograd through a plain
implementation, against finite differences, and against an independent numpy loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.core.case import Case
from harness.core.inputs import make_inputs
from harness.core.oracle import oracle


def autograd_reference(inputs):
    """fp64 autograd through plain attention with the kv heads expanded."""
    case = inputs.case
    q, k, v = (t.double().requires_grad_() for t in (inputs.q, inputs.k, inputs.v))
    g = case.group_size
    s = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * (case.scale or case.head_dim**-0.5)
    if inputs.mask is not None:
        s = s.masked_fill(~inputs.mask, -math.inf) if inputs.mask.dtype == torch.bool else s + inputs.mask.double()
    if case.causal != "none":
        offset = 0 if case.causal == "top-left" else case.kv_len - case.q_len
        s = s.masked_fill(~torch.ones(case.q_len, case.kv_len, dtype=torch.bool).tril(offset), -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    out = p @ v.repeat_interleave(g, 1)
    out.backward(inputs.grad_out.double())
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def numpy_loop(inputs):
    """Independent: per (batch, head, row) loops in numpy, forward only, written from the definition."""
    case = inputs.case
    q, k, v = (t.double().numpy() for t in (inputs.q, inputs.k, inputs.v))
    full = (case.batch, case.q_heads, case.q_len, case.kv_len)
    keep = np.ones(full, dtype=bool)
    bias = np.zeros(full)
    if inputs.mask is not None and inputs.mask.dtype == torch.bool:
        keep = np.broadcast_to(inputs.mask.numpy(), full)
    elif inputs.mask is not None:
        bias = np.broadcast_to(inputs.mask.double().numpy(), full)
    scale = case.scale or 1 / math.sqrt(case.head_dim)
    offset = {"none": None, "top-left": 0, "bottom-right": case.kv_len - case.q_len}[case.causal]
    out = np.zeros((case.batch, case.q_heads, case.q_len, case.value_dim))
    for b in range(case.batch):
        for h in range(case.q_heads):
            kv = h // case.group_size
            for i in range(case.q_len):
                logits = np.full(case.kv_len, -math.inf)
                for j in range(case.kv_len):
                    if keep[b, h, i, j] and (offset is None or j <= i + offset):
                        logits[j] = float(np.dot(q[b, h, i], k[b, kv, j])) * scale + bias[b, h, i, j]
                if np.all(np.isneginf(logits)):
                    continue  # a row that sees no key is zero
                w = np.exp(logits - logits.max())
                out[b, h, i] = (w / w.sum()) @ v[b, kv]
    return torch.from_numpy(out)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


CASES = [
    Case(2, 8, 2, 33, 40, 16, causal="bottom-right", mask="bool"),
    Case(2, 4, 4, 17, 17, 8, dtype="fp16", mask="fully-masked-rows"),
    Case(1, 6, 1, 9, 31, 8, v_head_dim=12, causal="top-left", mask="additive", mask_per_head=True),
    Case(2, 4, 2, 20, 12, 16, causal="bottom-right"),  # Lq > Lk: the first rows see no key
    Case(2, 4, 1, 24, 24, 16, mask="padding", scale=0.3),
    Case(1, 4, 2, 16, 16, 16, mask="sliding-window", mask_fill="-65504", dtype="fp16"),
    Case(1, 4, 2, 16, 16, 16, mask="block-diagonal", mask_fill="finfo.min"),
    Case(2, 2, 2, 1, 50, 32, causal="bottom-right"),  # decode
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("chunk", [None, 1, 5, 7])
def test_oracle_matches_fp64_autograd_with_any_chunking(case, chunk):
    inputs = make_inputs(case)
    got = oracle(inputs, chunk=chunk).tensors()
    want = autograd_reference(inputs)
    for name in ("out", "dq", "dk", "dv"):
        assert rel(got[name], want[name]) < 1e-12, name


@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: c.id)
def test_oracle_forward_matches_an_independent_numpy_loop(case):
    inputs = make_inputs(case)
    assert rel(oracle(inputs).output, numpy_loop(inputs)) < 1e-12


@pytest.mark.parametrize("case", [
    Case(1, 2, 1, 3, 4, 3, causal="bottom-right"),
    Case(1, 4, 2, 2, 3, 2, mask="additive", scale=0.7),
    Case(1, 2, 2, 3, 3, 2, v_head_dim=3, causal="top-left"),
], ids=lambda c: c.id)
def test_oracle_gradients_match_central_finite_differences(case):
    """d/dx sum(out * grad_out) by central differences of the oracle's own forward (h = 1e-6)."""
    inputs = make_inputs(case)
    result = oracle(inputs)
    do = inputs.grad_out.double()
    for name, grad in (("q", result.dq), ("k", result.dk), ("v", result.dv)):
        base = getattr(inputs, name).double()
        numeric = torch.zeros_like(base)
        for idx in np.ndindex(*base.shape):
            values = []
            for sign in (1, -1):
                bumped = base.clone()
                bumped[idx] += sign * 1e-6
                forward = oracle(_with(inputs, **{name: bumped})).output
                values.append(float((forward * do).sum()))
            numeric[idx] = (values[0] - values[1]) / 2e-6
        assert rel(grad, numeric) < 1e-7, name


def _with(inputs, **tensors):
    from dataclasses import replace

    return replace(inputs, **tensors)


def test_fully_masked_rows_are_zero_with_zero_gradient():
    case = Case(2, 4, 2, 12, 10, 16, mask="fully-masked-rows")
    inputs = make_inputs(case)
    result = oracle(inputs)
    dead = ~inputs.mask.any(-1)  # (B, 1, Lq)
    assert dead.any()
    rows = dead.expand(case.batch, case.q_heads, case.q_len)
    assert float(result.output[rows].abs().max()) == 0.0
    assert float(result.dq[rows].abs().max()) == 0.0
    assert math.isinf(float(result.lse[rows][0]))


def test_finfo_min_rows_are_ordinary_rows_with_nonzero_gradients():
    # a row that is entirely finfo.min is not "masked": softmax over equal logits is uniform,
    # so the output is the mean of v and dQ is non-zero (torch's semantics).
    case = Case(1, 2, 1, 6, 8, 16, mask="fully-masked-rows", mask_fill="finfo.min")
    inputs = make_inputs(case)
    result = oracle(inputs)
    filled_rows = (inputs.mask == torch.finfo(torch.bfloat16).min).all(-1)[0, 0]
    assert filled_rows.any()
    row = int(filled_rows.nonzero()[0])
    mean_v = inputs.v.double()[0, 0].mean(0)
    assert torch.allclose(result.output[0, 0, row], mean_v, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(result.dq).all() and float(result.dk.abs().max()) > 0


def test_top_left_causal_decode_row_has_exactly_zero_dq():
    inputs = make_inputs(Case(2, 4, 2, 1, 16, 16, causal="top-left"))
    assert float(oracle(inputs).dq.abs().max()) == 0.0


def test_nan_in_an_input_propagates_to_the_oracle():
    from dataclasses import replace

    inputs = make_inputs(Case(1, 2, 1, 4, 4, 8))
    q = inputs.q.clone()
    q[0, 0, 1, 0] = float("nan")
    result = oracle(replace(inputs, q=q))
    assert torch.isnan(result.output[0, 0, 1]).all() and torch.isfinite(result.output[0, 0, 0]).all()

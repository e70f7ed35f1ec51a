"""varlen-attn: the case packed per batch with cumulative sequence lengths (implementations/varlen.py).
torch's varlen kernel has no CPU backend, so the packing and unpacking are checked here against a stand-in
that runs SDPA on each sequence; the kernel itself runs on the GPU (tests/test_gpu.py, the regression cases)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from harness.core.case import parse_case_spec
from harness.core.references import references
from harness.implementations import DeviceFacts, builtin_implementations, resolve
from harness.implementations import varlen
from harness.run.session import Session, run_one

CUDA = DeviceFacts("cuda:0", "cuda", "fake", "sm_90")


def per_sequence(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """What varlen_attn computes: each sequence on its own (a stand-in with its signature)."""
    outs = []
    for i in range(len(cu_q) - 1):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t, a, b in
                      ((q, cu_q[i], cu_q[i + 1]), (k, cu_k[i], cu_k[i + 1]), (v, cu_k[i], cu_k[i + 1])))
        assert qs.shape[1] <= max_q and ks.shape[1] <= max_k
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=window_size == (-1, 0), scale=scale,
                                                   enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(outs)


def per_sequence_torch_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """torch 2.11's signature: no enable_gqa; its flash kernel takes fewer kv heads as they are (seen on an H100)."""
    group = q.shape[1] // k.shape[1]
    return per_sequence(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), cu_q, cu_k, max_q, max_k,
                        scale=scale, window_size=window_size)


@pytest.fixture(params=[per_sequence, per_sequence_torch_2_11], ids=["enable_gqa", "torch-2.11-signature"])
def stand_in(monkeypatch, request):
    calls = []

    @functools.wraps(request.param)  # the harness reads the stand-in's signature
    def record(*args, **kwargs):
        calls.append((args[3].tolist(), args[4].tolist()))
        return request.param(*args, **kwargs)

    monkeypatch.setattr(varlen, "varlen_attn", record)
    monkeypatch.setattr(varlen, "ABSENT", None)
    return calls


@pytest.mark.parametrize("spec", ["b=3,hq=8,hkv=2,lq=8,lk=24,d=40,mask=padding,guard=nan",
                                  "b=2,hq=4,hkv=1,lq=16,lk=16,d=72,causal=top-left,scale=0.2"])
def test_each_batch_is_one_sequence_of_its_own_key_length_and_the_oracle_agrees(stand_in, spec):
    case = parse_case_spec(spec)
    impl = builtin_implementations()["varlen-attn"]
    assert impl.supports(case, CUDA) is None
    result = run_one(Session.open("cpu", known=[]), references(case), impl)
    assert str(result.status) == "PASS", {n: v.reason for n, v in result.tensors.items()}
    cu_q, cu_k = stand_in[0]
    if case.mask == "padding":  # batch i pads (i * lk) // (2b) keys: unequal lengths 24, 20, 16
        assert cu_q == [0, 8, 16, 24] and cu_k == [0, 24, 44, 60]
    else:
        assert cu_k == [0, 16, 32]


def test_varlen_is_unsupported_with_torchs_reason_where_absent_and_off_the_cpu(monkeypatch):
    impl = builtin_implementations()["varlen-attn"]
    case = parse_case_spec("b=2,hq=4,hkv=2,lq=8,lk=8,d=64")
    monkeypatch.setattr(varlen, "ABSENT", "this torch (2.4.0) has no torch.nn.attention.varlen.varlen_attn: "
                                          "No module named 'torch.nn.attention.varlen'")
    assert "No module named" in impl.supports(case, CUDA)
    _, unavailable = resolve([], DeviceFacts("cpu", "cpu"))
    assert "no CPU backend" in unavailable["varlen-attn"]


@pytest.mark.parametrize("spec, why", [("b=2,hq=4,hkv=2,lq=8,lk=8,d=64,dtype=fp32", "fp16 and bf16"),
                                        ("b=2,hq=4,hkv=2,lq=8,lk=8,d=64,mask=bool", "not a per-sequence key length"),
                                        ("b=2,hq=4,hkv=2,lq=4,lk=8,d=64,causal=bottom-right", "causal"),
                                        ("b=1,hq=4,hkv=4,lq=8,lk=8,d=192,dv=128", "value head dim 128"),
                                        ("b=1,hq=4,hkv=4,lq=8,lk=8,d=203", "head dim 203"),
                                        ("b=1,hq=4,hkv=4,lq=8,lk=8,d=512", "head dim 512")])
def test_what_varlen_cannot_express_is_unsupported_with_the_reason(spec, why, monkeypatch):
    monkeypatch.setattr(varlen, "ABSENT", None)
    assert why in builtin_implementations()["varlen-attn"].supports(parse_case_spec(spec), CUDA)

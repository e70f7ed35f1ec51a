"""Guard bands and varlen-attn on a real GPU: every default implementation inside NaN guards flagged by
no guard rule on the issue-20 regression shapes, the stray-access kernels caught on the device as on the
CPU, and varlen_attn (the flash kernel) against the oracle over unequal key lengths. Marked gpu/cuda,
skipped without a GPU; never faked."""

from __future__ import annotations

import pytest
import torch

from harness.core.case import parse_case_spec
from harness.core.results import Status
from harness.implementations import builtin_implementations
from harness.implementations.registry import by_name
from harness.run.session import CaseRunner, Session

pytestmark = [pytest.mark.gpu, pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GUARD_RULES = {"oob-read", "oob-write", "input-modified"}


@pytest.mark.parametrize("spec", ["b=2,hq=8,hkv=2,lq=128,lk=128,d=40,guard=nan",
                                  "b=2,hq=8,hkv=2,lq=97,lk=161,d=104,causal=top-left,guard=nan",
                                  "b=2,hq=8,hkv=2,lq=1,lk=128,d=128,values=negative-lse,guard=nan",
                                  "b=4,hq=8,hkv=2,lq=64,lk=128,d=64,mask=padding,layout=blhd,guard=nan"])
def test_no_default_gpu_implementation_strays_outside_its_inputs(spec):
    session = Session.open("cuda")
    impls, _ = session.resolve([])
    with CaseRunner(session, isolate=True) as runner:
        results = {i.name: runner.run(parse_case_spec(spec), i) for i in impls}
    strays = {n: {t: v.reason for t, v in r.tensors.items() if v.rule in GUARD_RULES} for n, r in results.items()}
    assert not any(strays.values()), strays


@pytest.mark.parametrize("kernel, rule", [("reads_key_past_kv_len", "oob-read"),
                                          ("writes_row_past_input_end", "oob-write"),
                                          ("modifies_value_in_place", "input-modified")])
def test_stray_accesses_are_caught_on_the_device(kernel, rule):
    session = Session.open("cuda", known=[])
    with CaseRunner(session) as runner:
        result = runner.run(parse_case_spec("b=2,hq=8,hkv=2,lq=16,lk=33,d=32,guard=nan"),
                            by_name(f"tests.guard_kernels:{kernel}"))
    assert {v.rule for v in result.tensors.values() if v.status is Status.FAIL} == {rule}


def test_varlen_attn_matches_the_oracle_over_unequal_key_lengths():
    session = Session.open("cuda")
    impl = builtin_implementations()["varlen-attn"]
    with CaseRunner(session, isolate=True) as runner:
        result = runner.run(parse_case_spec("b=4,hq=8,hkv=2,lq=64,lk=128,d=64,mask=padding,guard=nan"), impl)
    assert result.status in (Status.PASS, Status.UNSUPPORTED), (result.error, {n: v.reason for n, v in
                                                                               result.tensors.items()})

"""The oracle's thread pool and its row-sampled form: results that do not depend on the thread
count (bitwise), chunked and row-sampled paths equal to the plain ones, and the long-case rules."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from harness.core.case import Case
from harness.core.inputs import make_inputs
from harness.core.lowprec import designs
from harness.core.oracle import attention, oracle, work_plan
from harness.core.sampling import sample_rows
from harness.core.workplan import PARTIAL_BYTES, TARGET_UNITS, Chunk, lanes, plan_work, simulate
from tests.helpers import judge
from tests.test_oracle import autograd_reference, rel
from tests.wrong_kernels import dq_written_where_grad_out_is_zero, math_sdpa


def _with_threads(n: int, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("case,chunk,rows", [
    (Case(2, 8, 2, 150, 150, 32, causal="top-left"), 7, None),  # parts > 1: partials reduced in order
    (Case(1, 8, 1, 97, 130, 16, causal="bottom-right", mask="bool"), None, None),
    (Case(1, 6, 2, 200, 64, 16, mask="fully-masked-rows"), 9, torch.tensor([0, 1, 63, 64, 65, 130, 199])),
], ids=["causal-parts", "br-mask", "sampled-dead-rows"])
def test_oracle_bits_do_not_depend_on_the_thread_count(case, chunk, rows):
    inputs = make_inputs(case)
    runs = [_with_threads(n, lambda: oracle(inputs, chunk=chunk, rows=rows).tensors()) for n in (1, 2, 7)]
    lowprec = [_with_threads(n, lambda: attention(inputs, torch.float32, designs(torch.bfloat16)[1], chunk).tensors())
               for n in (1, 7)]
    for name in runs[0]:
        assert all(torch.equal(runs[0][name], r[name]) for r in runs[1:]), name
        assert torch.equal(lowprec[0][name], lowprec[1][name]), name


def test_scripted_lanes_compile_on_this_torch_and_give_the_python_lanes_bits(monkeypatch):
    """The fast path is TorchScript (blocks.py); where it cannot compile, the same functions run as
    Python on a thread pool. Both must give one set of bits, on one thread and on several."""
    import harness.core.oracle as oracle_module

    assert oracle_module.scripted_run_lanes() is not None
    case = Case(2, 8, 2, 150, 150, 32, causal="top-left", mask="additive")
    inputs = make_inputs(case)
    scripted = _with_threads(3, lambda: oracle(inputs, chunk=7).tensors())
    design = designs(torch.float16)[0]
    scripted_low = _with_threads(3, lambda: attention(inputs, torch.float32, design, 7).tensors())
    monkeypatch.setattr(oracle_module, "scripted_run_lanes", lambda: None)
    for n in (1, 3):
        plain = _with_threads(n, lambda: oracle(inputs, chunk=7).tensors())
        plain_low = _with_threads(n, lambda: attention(inputs, torch.float32, design, 7).tensors())
        for name in scripted:
            assert torch.equal(scripted[name], plain[name]), name
            assert torch.equal(scripted_low[name], plain_low[name]), name


def test_lanes_deal_every_unit_once_to_at_most_the_thread_count():
    plan = work_plan(Case(1, 32, 8, 1024, 1024, 128, causal="top-left"))
    for threads in (1, 5, 16, 1000):
        dealt = lanes(plan, threads)
        assert len(dealt) == min(threads, len(plan.units))
        assert sorted(map(id, (u for lane in dealt for u in lane))) == sorted(map(id, plan.units))


def test_the_work_plan_covers_every_chunk_of_every_head_block_once_and_bounds_partials():
    chunks = [Chunk(r, r + 5, 0, 40) for r in range(0, 100, 5)]
    plan = plan_work(batch=2, kv_heads=3, heads_per_block=2, chunks=chunks, partial_bytes=10)
    blocks = {(u.batch, u.h0, u.h1) for u in plan.units}
    assert blocks == {(b, 0, 2) for b in range(2)} | {(b, 2, 3) for b in range(2)}
    for block in blocks:
        got = sorted(c.r0 for u in plan.units if (u.batch, u.h0, u.h1) == block for c in u.chunks)
        assert got == [c.r0 for c in chunks]
    assert len(plan.units) >= TARGET_UNITS
    big = plan_work(1, 1, 1, chunks, partial_bytes=PARTIAL_BYTES // 2)
    assert big.parts == 3  # two extra partials fit, a third would not
    assert simulate(plan, 1).efficiency == 1.0 and 0 < simulate(plan, 16).efficiency <= 1.0


def test_llama_8b_on_16_threads_is_split_into_balanced_units():
    case = Case(1, 32, 8, 1024, 1024, 128, causal="top-left")
    balance = simulate(work_plan(case), 16)
    assert balance.units >= 32 and balance.efficiency > 0.9


CASES = [
    Case(2, 8, 2, 33, 40, 16, causal="bottom-right", mask="bool"),
    Case(2, 4, 4, 17, 17, 8, dtype="fp16", mask="fully-masked-rows"),
    Case(1, 6, 1, 9, 31, 8, v_head_dim=12, causal="top-left", mask="additive", mask_per_head=True),
    Case(2, 4, 2, 20, 12, 16, causal="bottom-right"),  # Lq > Lk: the first rows see no key
    Case(1, 4, 2, 16, 16, 16, mask="sliding-window", mask_fill="-65504", dtype="fp16"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_row_sampled_oracle_is_the_exact_gradient_of_its_grad_out(case, chunk):
    """Rows chosen at odd chunk boundaries, dead rows and causal edges; grad_out zero elsewhere: the
    sampled oracle's rows and dK/dV equal fp64 autograd's of the whole problem."""
    rows = torch.tensor(sorted({0, 1, 2, case.q_len // 2, case.q_len - 2, case.q_len - 1}))
    inputs = make_inputs(case)
    keep = torch.zeros(case.q_len, dtype=torch.bool)
    keep[rows] = True
    inputs = replace(inputs, grad_out=inputs.grad_out.masked_fill(~keep[:, None], 0))
    got = oracle(inputs, chunk=chunk, rows=rows).tensors()
    want = autograd_reference(inputs)
    dense = oracle(inputs).tensors()
    for name in ("out", "dq"):
        assert rel(got[name], want[name].index_select(2, rows)) < 1e-12, name
        assert rel(got[name], dense[name].index_select(2, rows)) < 1e-12, name
    assert float(dense["dq"][:, :, ~keep].abs().max()) == 0.0  # the rule unsampled-dq stands on this
    for name in ("dk", "dv"):
        assert rel(got[name], want[name]) < 1e-12, name


def test_a_long_case_zeroes_grad_out_off_its_sample_and_samples_the_edges():
    case = Case(1, 4, 2, 1000, 1000, 16, causal="top-left", long=True, seed=3)
    inputs = make_inputs(case)
    sample = inputs.sample
    assert torch.equal(sample.rows, sample_rows(case).rows) and torch.equal(sample.second, sample_rows(case).second)
    kept = inputs.grad_out.abs().sum((0, 1, 3)) != 0
    assert torch.equal(kept.nonzero().reshape(-1), sample.rows)
    for row in (0, 1, 63, 64, 65, 127, 128, 129, 998, 999):
        assert row in sample.rows.tolist()
    assert not set(sample.rows.tolist()) & set(sample.second.tolist())
    dense = make_inputs(replace(case, long=False))
    assert torch.equal(dense.q, inputs.q) and torch.equal(dense.k, inputs.k)  # the same draws but grad_out
    other = sample_rows(replace(case, seed=4))
    assert not torch.equal(other.rows, sample.rows)


LONG = Case(1, 4, 2, 300, 300, 16, causal="top-left", long=True)


def test_a_correct_kernel_passes_a_long_case_on_its_sampled_rows():
    result = judge(LONG, math_sdpa)
    assert result.status.value == "PASS", result.tensors


def test_a_kernel_writing_dq_where_grad_out_is_zero_fails_unsampled_dq():
    result = judge(LONG, dq_written_where_grad_out_is_zero)
    dq = result.tensors["dq"]
    assert dq.status.value == "FAIL" and dq.rule == "unsampled-dq", dq
    assert "unsampled rows" in dq.reason and result.tensors["out"].status.value == "PASS"

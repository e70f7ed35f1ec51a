"""Issue 17's million tiny slices: a plan of many tiny (batch, head) blocks is merged across batch
elements into about TARGET_UNITS units, and the merged plan gives bitwise the oracle (and every
low-precision design) of the unmerged one-unit-per-batch-element plan, on any thread count."""

from __future__ import annotations

import pytest
import torch

from harness.core.case import Case
from harness.core.inputs import make_inputs
from harness.core.lowprec import designs
from harness.core.oracle import BLOCK_BYTES, attention, work_plan
from harness.core.workplan import TARGET_UNITS, Chunk, batches_per_unit, plan_work


def _with_threads(n: int, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


def test_many_tiny_blocks_become_few_units_covering_every_batch_element_once():
    plan = plan_work(batch=100_000, kv_heads=10, heads_per_block=10, chunks=[Chunk(0, 1, 1, 1)],
                     partial_bytes=10, block_bytes=80, budget_bytes=BLOCK_BYTES)
    assert len(plan.units) == TARGET_UNITS and plan.parts == 1
    covered = sorted(b for u in plan.units for b in range(u.batch, u.batch + u.batches))
    assert covered == list(range(100_000))
    assert plan.cost == 100_000 * 10 * 1  # merging changes who computes what, not how much


@pytest.mark.parametrize("heads_per_block,chunks", [
    (2, [Chunk(0, 1, 1, 1)]),  # a block without every head: batch elements would not be one slab
    (10, [Chunk(0, 1, 1, 4), Chunk(1, 2, 2, 4)]),  # several chunks: blocks are not tiny
], ids=["head-blocks", "row-chunks"])
def test_blocks_that_are_not_whole_batch_elements_are_never_merged(heads_per_block, chunks):
    plan = plan_work(1000, 10, heads_per_block, chunks, 10, block_bytes=80, budget_bytes=BLOCK_BYTES)
    assert all(u.batches == 1 for u in plan.units)


def test_merging_stops_at_the_block_budget_and_at_one_unit_per_element():
    assert batches_per_unit(100_000, BLOCK_BYTES // 100, BLOCK_BYTES) == 100  # the merged block stays in cache
    assert batches_per_unit(8, 80, BLOCK_BYTES) == 1  # few elements: nothing to merge
    assert batches_per_unit(100, 2 * BLOCK_BYTES, BLOCK_BYTES) == 1


def test_the_regression_case_n15_plans_few_units():
    case = Case(100_000, 10, 10, 1, 1, 16, dtype="fp32")
    assert len(work_plan(case).units) == TARGET_UNITS


MERGED = [
    Case(200, 4, 2, 1, 7, 16, dtype="bf16"),  # decode, GQA
    Case(97, 3, 3, 5, 5, 8, dtype="fp16", causal="top-left", mask="bool"),  # odd batch: a short last unit
    Case(64, 4, 1, 3, 9, 16, causal="bottom-right", mask="fully-masked-rows"),  # dead rows, MQA
    Case(40, 2, 2, 2, 6, 8, v_head_dim=12, mask="additive", mask_per_head=True),
    Case(50, 10, 10, 1, 1, 16, dtype="fp32"),  # n15's geometry, smaller
]


@pytest.mark.parametrize("case", MERGED, ids=lambda c: c.id)
def test_the_merged_plan_gives_bitwise_the_unmerged_oracle_and_designs_on_any_thread_count(case):
    assert len(work_plan(case).units) < case.batch  # the case does merge
    inputs = make_inputs(case)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[case.dtype]
    runs = [(torch.float64, None)] + [(torch.float32, d) for d in designs(dtype)]
    for compute, policy in runs:
        extra = () if policy is None else (policy,)
        plain = _with_threads(1, lambda: attention(inputs, compute, *extra, merge=False).tensors())
        for threads in (1, 2, 7):
            merged = _with_threads(threads, lambda: attention(inputs, compute, *extra).tensors())
            for name, t in plain.items():
                assert torch.equal(merged[name], t), (compute, policy and policy.name, threads, name)

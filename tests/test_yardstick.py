"""Judging against a case's yardstick (computed once, shared by every implementation) gives bitwise the
metrics of judging from scratch with every low-precision design, as the per-implementation code did."""

from __future__ import annotations

import math

import torch

from harness.core.case import Case
from harness.core.metrics import LEVELS, _norm, _row_sq, tensor_metrics

from .helpers import cached_references

CASES = [Case(2, 8, 2, 40, 56, 64, "bf16", causal="bottom-right", seed=3),
         Case(1, 4, 4, 33, 33, 32, "fp16", causal="top-left", seed=5)]


def _full_envelope(oracle: torch.Tensor, lowprec: list[torch.Tensor], level: str) -> torch.Tensor:
    """The envelope over every design, repeats included: what the metrics computed per implementation."""
    finite = torch.isfinite(oracle)
    rows = [_row_sq(torch.where(finite & torch.isfinite(lp), lp - oracle, torch.zeros((), dtype=torch.float64)))
            for lp in lowprec]
    return torch.stack([_norm(r, level) for r in rows]).amax(0)


def test_the_yardstick_gives_bitwise_the_metrics_of_judging_from_scratch():
    for case in CASES:
        refs = cached_references(case)
        for name, truth in refs.oracle.items():
            # a plausible wrong-ish kernel output, and one with a NaN (the masked path)
            actual = (truth * (1 + 1e-3 * torch.randn_like(truth))).to(torch.bfloat16 if case.dtype == "bf16" else torch.float16)
            poisoned = actual.clone()
            poisoned.view(-1)[7] = math.nan
            for a in (actual, poisoned):
                fresh = tensor_metrics(name, a, truth, refs.lowprec[name], refs.inputs, refs.row_noise.get(name))
                kept = tensor_metrics(name, a, truth, refs.lowprec[name], refs.inputs, refs.row_noise.get(name),
                                      refs.yardsticks[name])
                assert fresh.to_dict() == kept.to_dict()
                for level in LEVELS:
                    assert torch.equal(fresh.levels[level].ratio, kept.levels[level].ratio)
                    assert torch.equal(kept.levels[level].lowprec, _full_envelope(truth, refs.lowprec[name], level))


def test_metrics_of_inputs_under_the_grain_are_bitwise_the_same_on_one_thread_and_on_two():
    """Small tensors are measured on one thread (metrics.ONE_THREAD_BELOW). Below torch's grain (32,768
    elements, as here) no bit moves; above it a whole-tensor mean may move an ulp (metrics.py says where)."""
    from harness.core import metrics

    refs = cached_references(CASES[0])
    previous = torch.get_num_threads()
    try:
        for name, truth in refs.oracle.items():
            actual = (truth * (1 + 1e-3 * torch.randn_like(truth))).bfloat16()
            got = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                ys = metrics._yardstick(name, truth, refs.lowprec[name], refs.inputs, refs.row_noise.get(name))
                got.append(metrics._tensor_metrics(name, actual, truth, refs.lowprec[name], refs.inputs, None, ys))
            assert got[0].to_dict() == got[1].to_dict()
            assert all(torch.equal(got[0].levels[lv].ratio, got[1].levels[lv].ratio) for lv in LEVELS)
    finally:
        torch.set_num_threads(previous)

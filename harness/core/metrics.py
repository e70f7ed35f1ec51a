"""Error measures of one tensor against the oracle, with their two yardsticks.

All errors are L2 norms over a region at three levels: the whole tensor, each
(batch, head) slice, each row (query row for out/dQ, key row for dK/dV). Beside
each error stand
  * the dtype floor: the oracle correctly rounded to the dtype (a perfect kernel);
  * the low-precision reference: the envelope of the accepted fp32-accumulating designs;
  * an epsilon term: fp32 unit roundoff x a magnitude from the inputs, so a tensor whose
    true value is 0 (dQ of a row that sees one key) has a non-zero scale.
scale = max of the three; ratio = error / scale. No pass/fail here: verdict.py decides.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .inputs import Inputs, torch_dtype
from .oracle import softmax_scale

LEVELS = ("tensor", "slice", "row")
# A report keeps the whole (batch, head) table up to this many slices: past it (regression n15's million
# slices: ~300 MB of JSON) it keeps the shape and the worst slices, and the verdict's failing heads are capped.
SLICE_TABLE_MAX = 131_072  # edge's B·H = 65,540 case keeps its whole table: its bug is in the slices past 65,535
# Tensors below this many elements are measured on one thread: an OpenMP fork/join per small op costs more
# than it gains, and far more on a loaded machine (smoke's yardsticks: 1.07 s CPU per case at 2 threads,
# 0.04 s at 1; docs/benchmarks-calibration.md). Elementwise ops and per-row sums give the same bits; a mean
# over a whole tensor above torch's grain (the epsilon term's input RMS) can move by an ulp with the thread
# count, as it already does between a 2- and a 16-thread host (smoke: <= 5.3e-16 relative, no ratio moved).
ONE_THREAD_BELOW = 2**20


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt()) if t.numel() else 0.0


def magnitude(inputs: Inputs, tensor: str) -> float:
    """Size of the fp32 noise a correct kernel leaves in `tensor` where its true value is 0, per unit roundoff.

    dS = P·(dP - D) is the difference of two fp32 dot products of length Dv (dP = dO·v_j and
    D = rowsum(dO∘O)); where the truth is 0 (a row that sees one key: dP = D exactly) what is left
    is their rounding error, which for a length-n dot product is ~ sqrt(n)·u·Σ|a_i·b_i| (the
    probabilistic bound of Higham and Mary, 2019), with Σ|a_i·b_i| ~ n·rms(a)·rms(b).
    Measured on H100 (torch 2.11, cuDNN 9.19 and flash, b2-h4x4-q97-k97-d64-bf16-causal, row 0):
    dQ of that row was 8.6x the former sqrt(n)-free term; this term is sqrt(n)·n/sqrt(n) = n x it.
    """
    case = inputs.case
    if tensor == "out":  # only the RMS each tensor needs: each is a pass over a whole input (issue 17)
        return _rms(inputs.v)
    # a long case's grad_out is zero off its sampled rows: its size is that of the rows it was kept on
    do = inputs.grad_out if inputs.sample is None else inputs.grad_out.index_select(2, inputs.sample.rows)
    rdo = _rms(do)
    if tensor == "dv":
        return rdo
    n = case.value_dim
    dp_noise = math.sqrt(n) * n * rdo * _rms(inputs.v)  # rounding-error scale of dP - D, in units of u
    scale = softmax_scale(case)
    return scale * dp_noise * _rms(inputs.k if tensor == "dq" else inputs.q)


@dataclass(frozen=True)
class Level:
    """Per-unit L2 norms at one level; all tensors share one shape (units)."""

    err: torch.Tensor
    floor: torch.Tensor
    lowprec: torch.Tensor
    eps: torch.Tensor
    truth: torch.Tensor
    count: int  # elements per unit
    dterm: torch.Tensor | None = None  # the per-row noise a correct kernel cannot avoid (cancellation.row_noise)

    # cached: the verdict, the summaries and the report read them many times, each a pass per access
    @functools.cached_property
    def scale(self) -> torch.Tensor:
        scale = torch.maximum(torch.maximum(self.floor, self.lowprec), self.eps)
        return scale if self.dterm is None else torch.maximum(scale, self.dterm)

    @functools.cached_property
    def ratio(self) -> torch.Tensor:
        return self.err / self.scale


@dataclass(frozen=True)
class TensorMetrics:
    tensor: str
    levels: dict[str, Level]
    nan_count: int
    inf_count: int
    nonfinite_where_oracle_finite: int
    oracle_nonfinite: int
    nonfinite_pattern_matches: bool  # where the oracle is non-finite, so is the actual
    oracle_absmax: float
    worst_index: tuple[int, ...] | None
    worst_actual: float | None
    worst_oracle: float | None
    max_abs_err: float
    # where the kernel is NaN/Inf but the oracle is finite: count, fraction, first index, heads, rows
    nonfinite_where: dict[str, Any] = field(default_factory=dict)

    def summary(self, level: str) -> dict[str, float]:
        lv = self.levels[level]
        i = int(torch.argmax(torch.nan_to_num(lv.ratio, nan=math.inf)).item()) if lv.ratio.numel() else 0
        flat = lambda t: float(t.reshape(-1)[i]) if t.numel() else 0.0  # noqa: E731
        return {
            "ratio": flat(lv.ratio), "err": flat(lv.err), "scale": flat(lv.scale), "floor": flat(lv.floor),
            "lowprec": flat(lv.lowprec), "eps": flat(lv.eps),
            "dterm": flat(lv.dterm) if lv.dterm is not None else 0.0,
            "truth": flat(lv.truth),  # the oracle's L2 norm there: every column / truth is relative
            "rel_err": flat(lv.err) / flat(lv.truth) if flat(lv.truth) > 0 else math.inf,
            "index": [int(x) for x in torch.unravel_index(torch.tensor(i), lv.ratio.shape)] if lv.ratio.dim() else [],
            "count": lv.count,
        }

    def to_dict(self) -> dict[str, Any]:
        slice_ratio = self.levels["slice"].ratio
        bounded = slice_ratio.numel() > SLICE_TABLE_MAX
        return {
            "levels": {name: self.summary(name) for name in LEVELS},
            "slice_ratio": [] if bounded else slice_table(slice_ratio),
            **({"slice_shape": list(slice_ratio.shape), "worst_slices": worst_slices(slice_ratio)} if bounded else {}),
            "nan": self.nan_count, "inf": self.inf_count,
            "nonfinite_where_oracle_finite": self.nonfinite_where_oracle_finite,
            "oracle_nonfinite": self.oracle_nonfinite,
            "oracle_absmax": self.oracle_absmax,
            "max_abs_err": self.max_abs_err,
            "worst": None if self.worst_index is None else {
                "index": list(self.worst_index), "actual": self.worst_actual, "oracle": self.worst_oracle,
            },
            "nonfinite_where": self.nonfinite_where,
        }


def worst_slices(ratio: torch.Tensor, count: int = 32) -> list[list[Any]]:
    """The `count` largest (batch, head) ratios as [b, h, ratio], worst first (a non-finite ratio first, as None):
    what a report keeps of a slice table too large to write whole."""
    flat = torch.nan_to_num(ratio.double().reshape(-1), nan=math.inf)
    top = torch.topk(flat, min(count, flat.numel()))
    heads = ratio.shape[-1]
    return [[i // heads, i % heads, round(x, 4) if math.isfinite(x) else None]
            for i, x in zip(top.indices.tolist(), top.values.tolist())]


def slice_table(ratio: torch.Tensor) -> list[list[float]]:
    """(B, H) ratios as rows of Python floats rounded to 4 decimals, for the report. One tolist() pass
    instead of a tensor per element (issue 17: a million slices took most of a minute); the values are
    the same doubles, and Python's round (correctly rounded, unlike torch.round(decimals=)) stays."""
    return [[round(x, 4) for x in row] for row in ratio.double().tolist()]


def ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out: list[str] = []
    for i in sorted(set(indices)):
        if out and i == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ", ".join(out)


def where_nonfinite(bad: torch.Tensor) -> dict[str, Any]:
    """Where a (B, H, L, D) mask of bad elements sits: count, fraction, first index, (batch, head)
    slices, and the row (sequence position) ranges, for a report that says more than 'NaN'."""
    count = int(bad.sum())
    if not count:
        return {}
    first = [int(x) for x in torch.unravel_index(torch.nonzero(bad.reshape(-1))[0, 0], bad.shape)]
    return {"count": count, "fraction": count / bad.numel(), "first_index": first,
            "heads": [[int(b), int(h)] for b, h in bad.any(-1).any(-1).nonzero().tolist()],
            "rows": ranges(bad.any(-1).any(0).any(0).nonzero().reshape(-1).tolist())}


def _row_sq(t: torch.Tensor) -> torch.Tensor:
    return t.pow(2).sum(-1)


_REDUCE = {"row": (), "slice": (2,), "tensor": (0, 1, 2)}


def _norm(rows2: torch.Tensor, level: str) -> torch.Tensor:
    """Per-row squared sums (B, H, L) aggregated to `level`, as an L2 norm."""
    dims = _REDUCE[level]
    return (rows2.sum(dims) if dims else rows2).sqrt()


def _count(shape: torch.Size, level: str) -> int:
    b, h, l, d = shape
    return {"row": d, "slice": l * d, "tensor": b * h * l * d}[level]


@dataclass(frozen=True)
class Yardstick:
    """What one tensor of a case is judged against, the same for every implementation: the oracle in fp64,
    where it is finite, and at each level the floor, low-precision envelope, epsilon term, truth and D-term
    norms. Computed once per case (references.py), so judging an implementation costs only its own error."""

    oracle: torch.Tensor  # fp64
    finite: torch.Tensor  # where the oracle is finite
    levels: dict[str, Level]  # err unset (zeros): per level, the implementation-independent norms
    oracle_nonfinite: int
    oracle_absmax: float


def distinct(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`tensors` without bitwise repeats: designs that share a rounding give identical tensors (e.g. the
    flash designs' out), and a repeat adds nothing to an envelope (a max) but its cost."""
    out: list[torch.Tensor] = []
    for t in tensors:
        if not any(t.shape == u.shape and torch.equal(t, u) for u in out):
            out.append(t)
    return out


def _yardstick(name: str, oracle: torch.Tensor, lowprec: list[torch.Tensor], inputs: Inputs,
              row_noise: torch.Tensor | None = None) -> Yardstick:
    """The implementation-independent half of `tensor_metrics` (same arithmetic, same order)."""
    dtype = torch_dtype(inputs.case)
    o = oracle.double()
    o_finite = torch.isfinite(o)
    zero = torch.zeros((), dtype=torch.float64)
    # everything finite, the common case: the same values without the masking passes
    all_finite = bool(o_finite.all())
    floor_diff = (torch.sub(o.to(dtype), o) if all_finite
                  else torch.where(o_finite, o.to(dtype).double() - o, zero))
    o_clean = o if all_finite else torch.where(o_finite, o, zero)
    floor2, truth2 = _row_sq(floor_diff), _row_sq(o_clean)
    lp_rows = [_row_sq(lp - o if all_finite and bool(torch.isfinite(lp).all())
                       else torch.where(o_finite & torch.isfinite(lp), lp - o, zero)) for lp in distinct(lowprec)]
    # fp32 unit roundoff: where the truth is exactly 0 a correct (fp32-accumulating) kernel's error is
    # fp32 cancellation noise; a dtype-sized term would dwarf the floor of small outputs.
    eps_elem2 = (torch.finfo(torch.float32).eps / 2 * magnitude(inputs, name)) ** 2
    dterm2 = row_noise.double() ** 2 if row_noise is not None else None
    levels = {}
    for level in LEVELS:
        floor = _norm(floor2, level)
        count = _count(o.shape, level)
        envelope = torch.stack([_norm(r, level) for r in lp_rows]).amax(0) if lp_rows else torch.zeros_like(floor)
        levels[level] = Level(
            err=torch.zeros_like(floor), floor=floor, lowprec=envelope,
            eps=torch.full(floor.shape, math.sqrt(eps_elem2 * count), dtype=torch.float64),
            truth=_norm(truth2, level), count=count,
            dterm=_norm(dterm2, level) if dterm2 is not None else None,
        )
    return Yardstick(o, o_finite, levels, int((~o_finite).sum()), float(o_clean.abs().max()) if o.numel() else 0.0)


def _tensor_metrics(name: str, actual: torch.Tensor, oracle: torch.Tensor, lowprec: list[torch.Tensor],
                   inputs: Inputs, row_noise: torch.Tensor | None = None, ys: Yardstick | None = None) -> TensorMetrics:
    """`actual` must already have the oracle's shape (the verdict checks the contract first).
    `row_noise`: per-row (B, H, L) noise a correct kernel cannot avoid (cancellation.row_noise: D-term, logit term).
    `ys`: the case's yardstick for this tensor, when the caller kept it (else computed here)."""
    ys = ys if ys is not None else _yardstick(name, oracle, lowprec, inputs, row_noise)
    actual = actual.detach().cpu()
    o, o_finite = ys.oracle, ys.finite
    # the common case, both finite everywhere: the same values without an fp64 copy or masking passes
    # (the subtraction promotes to fp64 exactly as a copy would)
    clean = ys.oracle_nonfinite == 0 and bool(torch.isfinite(actual).all())
    a = a_finite = None
    if clean:
        diff = torch.sub(actual, o)
    else:
        a = actual.to(torch.float64)
        a_finite = torch.isfinite(a)
        diff = torch.where(a_finite & o_finite, a - o, torch.zeros((), dtype=torch.float64))
    err2 = _row_sq(diff)
    levels = {level: replace(ys.levels[level], err=_norm(err2, level)) for level in LEVELS}

    worst, max_abs = _worst(diff)
    worst_index = tuple(int(x) for x in torch.unravel_index(torch.tensor(worst), diff.shape)) if worst is not None else None
    return TensorMetrics(
        tensor=name,
        levels=levels,
        nan_count=0 if clean else int(torch.isnan(a).sum()),
        inf_count=0 if clean else int(torch.isinf(a).sum()),
        nonfinite_where_oracle_finite=0 if clean else int((~a_finite & o_finite).sum()),
        oracle_nonfinite=ys.oracle_nonfinite,
        nonfinite_pattern_matches=clean or bool((~a_finite | o_finite).all()),
        oracle_absmax=ys.oracle_absmax,
        worst_index=worst_index,
        worst_actual=float(actual[worst_index]) if worst_index is not None else None,
        worst_oracle=float(o[worst_index]) if worst_index is not None else None,
        max_abs_err=max_abs,
        nonfinite_where={} if clean else where_nonfinite(~a_finite & o_finite),
    )


def _worst(diff: torch.Tensor) -> tuple[int | None, float]:
    """(flat index of the largest |diff|, its value): the first such element in row-major order, as
    argmax over the flattened |diff| gives, found row by row without an |diff| copy of the tensor."""
    if not diff.numel():
        return None, 0.0
    rows = diff.reshape(-1, diff.shape[-1])
    low, high = torch.aminmax(rows, dim=-1)
    row = int(torch.maximum(high, -low).argmax())
    col = int(rows[row].abs().argmax())
    return row * rows.shape[1] + col, float(rows[row, col].abs())


@contextmanager
def _threads_for(elements: int):
    """One torch thread while measuring a tensor below ONE_THREAD_BELOW elements; put back after."""
    previous = torch.get_num_threads()
    if elements >= ONE_THREAD_BELOW or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def yardstick(name: str, oracle: torch.Tensor, lowprec: list[torch.Tensor], inputs: Inputs,
              row_noise: torch.Tensor | None = None) -> Yardstick:
    """The implementation-independent half of `tensor_metrics` (same arithmetic, same order)."""
    with _threads_for(oracle.numel()):
        return _yardstick(name, oracle, lowprec, inputs, row_noise)


def tensor_metrics(name: str, actual: torch.Tensor, oracle: torch.Tensor, lowprec: list[torch.Tensor],
                   inputs: Inputs, row_noise: torch.Tensor | None = None, ys: Yardstick | None = None) -> TensorMetrics:
    """`actual` must already have the oracle's shape (the verdict checks the contract first).
    `row_noise`: per-row (B, H, L) noise a correct kernel cannot avoid (cancellation.row_noise: D-term, logit term).
    `ys`: the case's yardstick for this tensor, when the caller kept it (else computed here)."""
    with _threads_for(oracle.numel()):
        return _tensor_metrics(name, actual, oracle, lowprec, inputs, row_noise, ys)

"""One block of the blocked attention, and the lanes of blocks the oracle runs in parallel.

Why TorchScript. Python threads that each issue single-threaded torch ops do not scale past a few
threads: every op takes the GIL for its dispatch, and at 16 threads the hand-offs cost more than the
arithmetic (a 32 KB `exp_` costs 5 us on one thread and 656 us with 16; the oracle's ratio to the fp64
GEMM fell from 0.58 on 4 threads to 0.18 on 16, docs/benchmarks-calibration.md). A scripted lane runs
on torch's inter-op pool with no Python in the loop, and the calling thread releases the GIL while it
waits. The ops are the same ATen calls in the same order as the plain Python functions below, which
run instead (on a Python thread pool) where TorchScript is unavailable: both give the same bits, and
each op is single-threaded either way, so the thread count never changes a result
(tests/test_oracle_scaling.py).

The functions are written in the subset TorchScript compiles: typed arguments, narrow/copy_ instead
of slice assignment, no keyword-only or default arguments.
"""

# ruff: noqa: UP006, UP035, UP045 - TorchScript reads typing.List / Optional, not list[...] or X | None

import functools
import warnings
from typing import Any, List, Optional

import torch

from .workplan import Unit

FIELDS = 9  # a block in a lane: b0, b1, h0, h1, r0, r1, c0, c1, part (run_lane reads them as a literal 9)


def unit_fields(unit: Unit) -> List[int]:
    """A unit as a lane's flat block list (FIELDS ints per block): a stacked unit is one block per chunk
    over all its batch elements, an unstacked one a block per batch element and chunk."""
    spans = ([(unit.batch, unit.batch + unit.batches)] if unit.stacked
             else [(bi, bi + 1) for bi in range(unit.batch, unit.batch + unit.batches)])
    return [x for b0, b1 in spans for c in unit.chunks for x in (b0, b1, unit.h0, unit.h1, c.r0, c.r1, c.c0, c.c1, unit.part)]


def _round(t: torch.Tensor, dtype: Optional[torch.dtype], when: bool) -> torch.Tensor:
    if dtype is None or not when:
        return t
    return t.to(dtype).to(t.dtype)


def _slab(t: torch.Tensor, b0: int, b1: int, h0: int, h1: int) -> torch.Tensor:
    """t[b0:b1, h0:h1] with (batch, head) as one leading dimension, as a view (a unit spans several
    batch elements only with every head, so the two dimensions always merge)."""
    return t[b0:b1, h0:h1].flatten(0, 1)


def block(where: List[int], causal_offset: int, causal: bool, positions: torch.Tensor,
          qs: torch.Tensor, k: torch.Tensor, ks: Optional[torch.Tensor], v: torch.Tensor,
          do: Optional[torch.Tensor], mask: Optional[torch.Tensor],
          out: torch.Tensor, lse: torch.Tensor, dq: Optional[torch.Tensor],
          dk_acc: Optional[torch.Tensor], dv_acc: Optional[torch.Tensor],
          dtype: Optional[torch.dtype], flags: List[bool]) -> None:
    """Forward and backward of query rows [r0, r1) (at `positions`) of batch elements [b0, b1) and kv
    heads [h0, h1), against keys [0, c1); keys [c0, c1) meet the causal diagonal (`where`).
    Blocks are (batch x head, rows, group, keys): row-major over (row, query head of the group); a
    block of one batch element is exactly the per-head-block computation, a merged one a longer batch
    of the same per-matrix GEMMs and elementwise passes.
    `flags`: the Rounding policy's p_before_pv, p_before_dv, ds_before_gemm, o_as_stored,
    per_head_dkdv, and whether P is normalised in place (needed to round normalised P or dS)."""
    b0, b1, h0, h1, r0, r1, c0, c1 = where[0], where[1], where[2], where[3], where[4], where[5], where[6], where[7]
    p_before_pv, p_before_dv, ds_before_gemm, o_as_stored = flags[0], flags[1], flags[2], flags[3]
    per_head_dkdv, normalise = flags[4], flags[5]
    n = r1 - r0
    g, d, dv_dim = qs.shape[3], qs.shape[4], v.shape[3]
    qc = _slab(qs, b0, b1, h0, h1).narrow(1, r0, n)  # (nh, n, g, d), each head's rows contiguous
    nh = qc.shape[0]  # (batch element, kv head) pairs of the block
    kc = _slab(k, b0, b1, h0, h1).narrow(1, 0, c1)
    vc = _slab(v, b0, b1, h0, h1).narrow(1, 0, c1)
    s = torch.matmul(qc.reshape(nh, n * g, d), kc.transpose(-1, -2)).view(nh, n, g, c1)
    if mask is not None:
        mb0, mb1 = (b0, b1) if mask.shape[0] > 1 else (0, 1)
        mh0, mh1 = (h0, h1) if mask.shape[1] > 1 else (0, 1)
        mc = mask[mb0:mb1, mh0:mh1].narrow(2, r0, n).narrow(4, 0, c1)
        s5 = s.view(b1 - b0, h1 - h0, n, g, c1)  # the mask broadcasts over batch and heads: not one dimension
        if mc.dtype == torch.bool:
            s5.masked_fill_(mc.logical_not(), float("-inf"))
        else:
            s5.add_(mc.to(s.dtype))  # added exactly as quantized
    if causal and c0 < c1:  # the causal diagonal: only keys [c0, c1) are masked for some row of the block
        rows = positions.narrow(0, r0, n).view(n, 1, 1)
        cols = torch.arange(c0, c1)
        s.narrow(-1, c0, c1 - c0).masked_fill_(cols > rows + causal_offset, float("-inf"))

    m = s.amax(-1, keepdim=True)
    dead = m == float("-inf")  # every key masked: torch defines the row as zero
    m.masked_fill_(dead, 0.0)
    p = s.sub_(m).exp_()  # unnormalised P~, in place of the logits
    l = p.sum(-1, keepdim=True)
    l_safe = l.masked_fill(dead, 1.0)
    _slab(lse, b0, b1, h0, h1).narrow(2, r0, n).copy_((m + torch.log(l)).squeeze(-1).transpose(1, 2))
    p_pv = _round(p, dtype, p_before_pv)
    o = torch.matmul(p_pv.view(nh, n * g, c1), vc).view(nh, n, g, dv_dim).div_(l_safe)
    _slab(out, b0, b1, h0, h1).narrow(2, r0, n).copy_(o.transpose(1, 2))
    if dq is None or do is None or ks is None or dk_acc is None or dv_acc is None:
        return

    doc = _slab(do, b0, b1, h0, h1).narrow(1, r0, n)
    delta = (doc * _round(o, dtype, o_as_stored)).sum(-1, keepdim=True)
    dp = torch.matmul(doc.reshape(nh, n * g, dv_dim), vc.transpose(-1, -2)).view(nh, n, g, c1)
    if normalise:
        p.div_(l_safe)  # normalised P
    ds = dp.sub_(delta).mul_(p)  # in place of dP; times 1/l when P is unnormalised
    ds_g = _round(ds, dtype, ds_before_gemm)
    p_dv = _round(p, dtype, p_before_dv)
    q_dk, do_dv = qc, doc
    dq_c = torch.matmul(ds_g.view(nh, n * g, c1), _slab(ks, b0, b1, h0, h1).narrow(1, 0, c1)).view(nh, n, g, d)
    if not normalise:  # 1/l folded into the small row-sized operands instead of a pass over P
        inv_l = torch.reciprocal(l_safe)
        q_dk, do_dv = qc * inv_l, doc * inv_l
        dq_c = dq_c.mul_(inv_l)
    _slab(dq, b0, b1, h0, h1).narrow(2, r0, n).copy_(dq_c.transpose(1, 2))
    dk_s, dv_s = _slab(dk_acc, b0, b1, h0, h1), _slab(dv_acc, b0, b1, h0, h1)
    if per_head_dkdv:
        # (nh, g, c1, n) @ (nh, g, n, d): each query head's own dK/dV, summed (rounded) at the end
        dk_s.narrow(2, 0, c1).add_(torch.matmul(ds_g.permute(0, 2, 3, 1), q_dk.transpose(1, 2)))
        dv_s.narrow(2, 0, c1).add_(torch.matmul(p_dv.permute(0, 2, 3, 1), do_dv.transpose(1, 2)))
    else:
        # stacking the group's rows makes this GEMM's accumulation the group sum; dK^T = Q^T dS
        # (accumulated by the GEMM itself, beta = 1: no temporary, no extra pass)
        dk_s.narrow(2, 0, c1).baddbmm_(q_dk.reshape(nh, n * g, d).transpose(-1, -2), ds_g.view(nh, n * g, c1))
        dv_s.narrow(2, 0, c1).baddbmm_(do_dv.reshape(nh, n * g, dv_dim).transpose(-1, -2), p_dv.view(nh, n * g, c1))


def run_lane(lane: List[int], causal_offset: int, causal: bool, positions: torch.Tensor,
             qs: torch.Tensor, k: torch.Tensor, ks: Optional[torch.Tensor], v: torch.Tensor,
             do: Optional[torch.Tensor], mask: Optional[torch.Tensor],
             out: torch.Tensor, lse: torch.Tensor, dq: Optional[torch.Tensor],
             dk_parts: List[torch.Tensor], dv_parts: List[torch.Tensor],
             dtype: Optional[torch.dtype], flags: List[bool]) -> int:
    """The blocks of one lane in order (FIELDS ints each); each writes its own rows and adds into its
    part's dK/dV partial. Returns the blocks run (a forked call needs a value to wait on)."""
    blocks = len(lane) // 9  # FIELDS: TorchScript reads no module constants
    for i in range(blocks):
        where = lane[i * 9:(i + 1) * 9]
        dk_t: Optional[torch.Tensor] = None
        dv_t: Optional[torch.Tensor] = None
        if len(dk_parts) > 0:
            dk_t, dv_t = dk_parts[where[8]], dv_parts[where[8]]
        block(where, causal_offset, causal, positions, qs, k, ks, v, do, mask, out, lse, dq, dk_t, dv_t,
              dtype, flags)
    return blocks


def run_lanes(lanes: List[List[int]], causal_offset: int, causal: bool, positions: torch.Tensor,
              qs: torch.Tensor, k: torch.Tensor, ks: Optional[torch.Tensor], v: torch.Tensor,
              do: Optional[torch.Tensor], mask: Optional[torch.Tensor],
              out: torch.Tensor, lse: torch.Tensor, dq: Optional[torch.Tensor],
              dk_parts: List[torch.Tensor], dv_parts: List[torch.Tensor],
              dtype: Optional[torch.dtype], flags: List[bool]) -> int:
    """Every lane but the first forked onto the inter-op pool, the first on the calling thread."""
    futures = [torch.jit.fork(run_lane, lane, causal_offset, causal, positions, qs, k, ks, v, do, mask, out, lse,
                              dq, dk_parts, dv_parts, dtype, flags) for lane in lanes[1:]]
    done = run_lane(lanes[0], causal_offset, causal, positions, qs, k, ks, v, do, mask, out, lse, dq,
                    dk_parts, dv_parts, dtype, flags)
    for future in futures:
        done += torch.jit.wait(future)
    return done


@functools.lru_cache(maxsize=1)
def scripted_run_lanes() -> Any:
    """run_lanes compiled once per process, or None where TorchScript cannot (torch 2.13 deprecates
    it; a torch without it runs the Python functions on a thread pool, with the same bits)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.script(run_lanes)
    except Exception:  # noqa: BLE001 - any failure to compile means the Python path
        return None


def lanes_path() -> str:
    """How the oracle's lanes run in this process (bench reports it beside the throughput)."""
    if scripted_run_lanes() is None:
        return "Python threads (TorchScript unavailable)"
    return f"TorchScript lanes on the inter-op pool ({torch.get_num_interop_threads()} threads)"

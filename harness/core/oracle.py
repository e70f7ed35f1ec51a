"""The fp64 CPU oracle: forward output and analytic dQ, dK, dV.

One pass over query-row chunks computes the logits once and uses them for the
forward and the backward (rows are independent, so each chunk's output is final
before its gradient terms are formed). Query heads of one kv group are stacked
into one GEMM, which also makes the dK/dV group sum exact in the GEMM's
accumulation. Memory is O(chunk x kv_len) per head.

The same loop, with a `Rounding` policy and fp32 compute, is the low-precision
reference (lowprec.py): one home for the attention arithmetic, with the oracle
being the policy that never rounds. tests/test_oracle.py checks it against fp64
autograd, finite differences and an independent plain implementation.

Semantics (torch's, since 2.5): a row whose every logit is -inf (all-False bool
row, all -inf additive row, or a causal row with no visible key) has output 0
and gradient 0. Rows filled with finite finfo.min / -65504 are ordinary rows.
"""

from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .blocks import run_lane, scripted_run_lanes, unit_fields
from .case import Case
from .inputs import Inputs
from .workplan import Chunk, WorkPlan, lanes, plan_work

BLOCK_BYTES = 2 * 2**20  # one logits block (kv group x rows x keys); a few live at once, in cache
MIN_GROUP_ROWS = 64  # stacked query rows per GEMM, below which the GEMMs lose efficiency


@dataclass(frozen=True)
class Rounding:
    """Where a low-precision kernel rounds to `dtype`; dtype None never rounds (the oracle)."""

    name: str = "exact"
    dtype: torch.dtype | None = None
    p_before_pv: bool = False  # unnormalised P~ rounded before P~·V
    p_before_dv: bool = False  # P rounded before P^T·dO
    ds_before_gemm: bool = False  # dS rounded before dS·K and dS^T·Q
    o_as_stored: bool = False  # D = rowsum(dO∘O) from O rounded to dtype
    per_head_dkdv: bool = False  # per-query-head dK/dV rounded before an fp32 group sum

    def round(self, t: torch.Tensor, when: bool = True) -> torch.Tensor:
        if self.dtype is None or not when:
            return t
        return t.to(self.dtype).to(t.dtype)


EXACT = Rounding()


@dataclass(frozen=True)
class AttentionResult:
    """Output and gradients in (B, H, L, D) order, in the compute dtype, on the CPU."""

    output: torch.Tensor
    lse: torch.Tensor
    dq: torch.Tensor | None
    dk: torch.Tensor | None
    dv: torch.Tensor | None

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {"out": self.output, "dq": self.dq, "dk": self.dk, "dv": self.dv}
        return {k: v for k, v in named.items() if v is not None}


def softmax_scale(case: Case) -> float:
    return case.scale if case.scale is not None else 1.0 / math.sqrt(case.head_dim)


def causal_keep(case: Case, r0: int, r1: int) -> torch.Tensor | None:
    """(rows, kv_len) bool: True where a query row may see a key. Top-left is torch's is_causal;
    bottom-right aligns the last query with the last key (causal_lower_right)."""
    if case.causal == "none":
        return None
    offset = 0 if case.causal == "top-left" else case.kv_len - case.q_len
    rows = torch.arange(r0, r1)[:, None]
    cols = torch.arange(case.kv_len)[None, :]
    return cols <= rows + offset


def causal_keep_at(case: Case, positions: torch.Tensor) -> torch.Tensor | None:
    """causal_keep for the query rows at `positions` (a row-sampled oracle's rows)."""
    if case.causal == "none":
        return None
    offset = 0 if case.causal == "top-left" else case.kv_len - case.q_len
    return torch.arange(case.kv_len)[None, :] <= positions[:, None] + offset


def chunk_rows(case: Case, itemsize: int, n_rows: int | None = None) -> int:
    """Query rows per block: a kv group's logits block (group x rows x kv_len) of about
    BLOCK_BYTES, so the elementwise passes run in cache, but at least MIN_GROUP_ROWS stacked
    rows so the GEMMs stay efficient; small rows also let causal skip most masked keys."""
    g = case.group_size
    rows = BLOCK_BYTES // (g * case.kv_len * itemsize)
    return max(1, min(n_rows or case.q_len, max(rows, -(-MIN_GROUP_ROWS // g))))


def _heads_per_block(case: Case, rows: int, itemsize: int) -> int:
    """kv heads batched into one block when a head's block is small (short sequences)."""
    per_head = case.group_size * rows * case.kv_len * itemsize
    return max(1, min(case.kv_heads, BLOCK_BYTES // per_head))


def _visible_keys(case: Case, first: int, last: int) -> tuple[int, int]:
    """For query positions first..last (sorted): (first key some row cannot see, end of the keys some
    row can see). Causal masks every key past the end for every row: skipped, not computed and masked."""
    lk = case.kv_len
    if case.causal == "none":
        return lk, lk
    offset = 0 if case.causal == "top-left" else lk - case.q_len
    # at least one key: rows that see none still go through the masked path (dead rows)
    return min(lk, max(0, first + offset + 1)), min(lk, max(1, last + 1 + offset))


def row_chunks(case: Case, positions: torch.Tensor, chunk: int) -> list[Chunk]:
    """The blocks of rows (indices into `positions`) and the keys each must compute."""
    n = len(positions)
    out = []
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        out.append(Chunk(r0, r1, *_visible_keys(case, int(positions[r0]), int(positions[r1 - 1]))))
    return out


def _run_lanes(plan: WorkPlan, args: tuple) -> None:
    """The plan's units in lanes on torch's thread count, every op single-threaded (with one thread too:
    a GEMM's bits may depend on its own thread count, and an OpenMP fork/join per small op costs more
    than it gains). Scripted lanes run on the inter-op pool without the GIL (blocks.py says why)."""
    previous = torch.get_num_threads()
    dealt = [[x for unit in lane for x in unit_fields(unit)] for lane in lanes(plan, previous)]
    script = scripted_run_lanes()
    if script is not None and torch.get_num_interop_threads() < len(dealt) - 1:
        with contextlib.suppress(RuntimeError):  # settable only before the pool first runs
            torch.set_num_interop_threads(len(dealt) - 1)
    torch.set_num_threads(1)
    try:
        if script is not None:
            script(dealt, *args)
        elif len(dealt) == 1:
            run_lane(dealt[0], *args)
        else:
            with ThreadPoolExecutor(len(dealt)) as pool:
                list(pool.map(lambda lane: run_lane(lane, *args), dealt))
    finally:
        torch.set_num_threads(previous)


def _rows_major(t: torch.Tensor, b: int, hkv: int, g: int, compute: torch.dtype,
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hq, L, D) -> contiguous (B, Hkv, L, G, D) in `compute` (only `rows` of L when given): a
    block's rows of all the group's query heads are then one contiguous (rows x G, D) matrix."""
    if rows is not None:
        t = t.index_select(2, rows)
    _, _, length, dim = t.shape
    out = torch.empty(b, hkv, length, g, dim, dtype=compute)
    return out.copy_(t.view(b, hkv, g, length, dim).transpose(2, 3))


def attention(inputs: Inputs, compute: torch.dtype, policy: Rounding = EXACT, chunk: int | None = None,
              rows: torch.Tensor | None = None, merge: bool = True) -> AttentionResult:
    """Blocked attention forward + backward in `compute` precision under a rounding policy.
    `rows` (sorted query positions): only those rows' output, lse and dQ, in that order, and the dK/dV
    that those rows' grad_out feeds: the exact gradient when grad_out is zero on every other row.
    `merge` False: tiny blocks stay one unit per batch element (the same bits, far slower; for tests)."""
    case = inputs.case
    b, hq, hkv, lq, lk = case.batch, case.q_heads, case.kv_heads, case.q_len, case.kv_len
    g, d, dv_dim = case.group_size, case.head_dim, case.value_dim
    positions = torch.arange(lq) if rows is None else rows
    n = len(positions)
    scale = softmax_scale(case)
    itemsize = torch.finfo(compute).bits // 8
    chunk = chunk or chunk_rows(case, itemsize, n)
    nh = _heads_per_block(case, chunk, itemsize)

    # The softmax scale is folded into Q (for S and dK) and K (for dQ): no pass over a logits block.
    qs = _rows_major(inputs.q, b, hkv, g, compute, rows).mul_(scale)
    k = inputs.k.to(compute)
    ks = k * scale if case.grads else None
    v = inputs.v.to(compute)
    do = _rows_major(inputs.grad_out, b, hkv, g, compute, rows)
    mask = inputs.mask
    if mask is not None:
        mask = mask if rows is None or mask.shape[2] == 1 else mask.index_select(2, rows)
        per_head = mask.shape[1] != 1
        mask = mask.view(mask.shape[0], hkv if per_head else 1, g if per_head else 1, mask.shape[2], lk).transpose(2, 3)

    # results are written in their final (B, Hkv, G, L, D) order, block by block: no copy at the end
    out = torch.empty(b, hkv, g, n, dv_dim, dtype=compute)
    lse = torch.empty(b, hkv, g, n, dtype=compute)
    grads = case.grads
    dq = torch.empty(b, hkv, g, n, d, dtype=compute) if grads else None
    dk_acc = dv_acc = None
    if grads and policy.per_head_dkdv:
        dk_acc = torch.zeros(b, hkv, g, lk, d, dtype=compute)
        dv_acc = torch.zeros(b, hkv, g, lk, dv_dim, dtype=compute)
    elif grads:  # transposed, (D, keys): the GEMM then has the wide key dimension as its columns
        dk_acc = torch.zeros(b, hkv, d, lk, dtype=compute)
        dv_acc = torch.zeros(b, hkv, dv_dim, lk, dtype=compute)
    partial = (dk_acc.numel() + dv_acc.numel()) * itemsize if grads else 0
    chunks = row_chunks(case, positions, chunk)
    plan = plan_work(b, hkv, nh, chunks, partial, *(_merge_bytes(case, nh, chunks, itemsize) if merge else ()))
    # parts after the first accumulate apart; allocated zero, summed in part order at the end
    extra = [(torch.zeros_like(dk_acc), torch.zeros_like(dv_acc)) for _ in range(plan.parts - 1)] if grads else []
    # Rounding the normalised P or dS needs P normalised in place (one more pass); otherwise 1/l
    # is folded into the small row-sized operands (O, dQ rows, the Q and dO rows of dK and dV).
    normalise = policy.dtype is not None and (policy.p_before_dv or policy.ds_before_gemm)

    offset = 0 if case.causal != "bottom-right" else lk - lq
    flags = [policy.p_before_pv, policy.p_before_dv, policy.ds_before_gemm, policy.o_as_stored,
             policy.per_head_dkdv, normalise]
    dk_parts = [dk_acc, *(p[0] for p in extra)] if grads else []
    dv_parts = [dv_acc, *(p[1] for p in extra)] if grads else []
    # each unit writes only its own rows and its own partial: results do not depend on threads
    _run_lanes(plan, (offset, case.causal != "none", positions, qs, k, ks, v, do, mask, out, lse, dq,
                      dk_parts, dv_parts, policy.dtype, flags))
    for dk_p, dv_p in extra:  # the fixed-order reduction
        dk_acc += dk_p
        dv_acc += dv_p
    del extra

    fin = policy.round
    output = fin(out.view(b, hq, n, dv_dim))
    lse_out = lse.view(b, hq, n)
    if not grads:
        return AttentionResult(output, lse_out, None, None, None)
    if policy.per_head_dkdv:
        dk_acc = fin(dk_acc).sum(2)
        dv_acc = fin(dv_acc).sum(2)
    else:
        dk_acc = dk_acc.transpose(-1, -2).contiguous()
        dv_acc = dv_acc.transpose(-1, -2).contiguous()
    return AttentionResult(output, lse_out, fin(dq.view(b, hq, n, d)), fin(dk_acc), fin(dv_acc))


def work_plan(case: Case, rows: torch.Tensor | None = None, itemsize: int = 8) -> WorkPlan:
    """The units the oracle would run `case` as (bench's thread-balance simulation)."""
    positions = torch.arange(case.q_len) if rows is None else rows
    chunk = chunk_rows(case, itemsize, len(positions))
    nh = _heads_per_block(case, chunk, itemsize)
    partial = case.batch * case.kv_heads * case.kv_len * (case.head_dim + case.value_dim) * itemsize if case.grads else 0
    chunks = row_chunks(case, positions, chunk)
    return plan_work(case.batch, case.kv_heads, nh, chunks, partial, *_merge_bytes(case, nh, chunks, itemsize))


def _merge_bytes(case: Case, heads_per_block: int, chunks: list[Chunk], itemsize: int) -> tuple[int, int]:
    """(one batch element's logits block, the budget a merged block keeps to) for plan_work."""
    rows = max(c.r1 - c.r0 for c in chunks)
    return heads_per_block * case.group_size * rows * case.kv_len * itemsize, BLOCK_BYTES


def oracle(inputs: Inputs, chunk: int | None = None, rows: torch.Tensor | None = None) -> AttentionResult:
    """The truth: fp64 on the CPU, on the same quantized values every device saw (only `rows`' output
    and dQ when given: the row-sampled oracle of long cases)."""
    return attention(inputs, torch.float64, EXACT, chunk, rows)

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

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .case import Case
from .inputs import Inputs
from .workplan import Chunk, WorkPlan, plan_work

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


def _parallel(units: tuple, fn) -> None:
    """Run fn over units on torch's thread count, each op single-threaded, with one thread too: a
    GEMM's bits may depend on its own thread count, and an OpenMP fork/join per small op costs more
    than it gains (far more on a shared, loaded machine)."""
    previous = torch.get_num_threads()
    workers = min(previous, len(units))
    torch.set_num_threads(1)
    try:
        if workers <= 1:
            for unit in units:
                fn(unit)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(fn, units))
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

    def run_unit(unit) -> None:
        dk_t, dv_t = (dk_acc, dv_acc) if unit.part == 0 or not grads else extra[unit.part - 1]
        spans = ([(unit.batch, unit.batch + unit.batches)] if unit.stacked
                 else [(bi, bi + 1) for bi in range(unit.batch, unit.batch + unit.batches)])
        for b0, b1 in spans:
            for c in unit.chunks:
                _block(case, policy, normalise, (b0, b1, unit.h0, unit.h1), c.r0, c.r1, c.c0, c.c1, positions,
                       qs, k, ks, v, do, mask, out, lse, dq, dk_t, dv_t)

    # each unit writes only its own rows and its own partial: results do not depend on threads
    _parallel(plan.units, run_unit)
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


def _slab(t: torch.Tensor, b0: int, b1: int, h0: int, h1: int) -> torch.Tensor:
    """t[b0:b1, h0:h1] with (batch, head) as one leading dimension, as a view (never a copy: a unit
    spans several batch elements only with every head, so the two dimensions always merge)."""
    return t[b0:b1, h0:h1].view(-1, *t.shape[2:])


def _block(case, policy, normalise, where, r0, r1, c0, c1, positions, qs, k, ks, v, do, mask, out, lse, dq,
           dk_acc, dv_acc):
    """Forward and backward of query rows [r0, r1) (at `positions`) of batch elements [b0, b1) and kv
    heads [h0, h1) (`where`), against keys [0, c1).
    Blocks are (batch x head, rows, group, keys): row-major over (row, query head of the group); a
    block of one batch element is exactly the per-head-block computation, a merged one a longer batch
    of the same per-matrix GEMMs and elementwise passes."""
    b0, b1, h0, h1 = where
    g, n = case.group_size, r1 - r0
    d, dv_dim = case.head_dim, case.value_dim
    qc = _slab(qs, b0, b1, h0, h1)[:, r0:r1]  # (nh, n, g, d), each head's rows contiguous
    nh = qc.shape[0]  # (batch element, kv head) pairs of the block
    kc, vc = _slab(k, b0, b1, h0, h1)[:, :c1], _slab(v, b0, b1, h0, h1)[:, :c1]
    s = torch.matmul(qc.reshape(nh, n * g, d), kc.transpose(-1, -2)).view(nh, n, g, c1)
    if mask is not None:
        mb = slice(b0, b1) if mask.shape[0] > 1 else slice(0, 1)
        mh = slice(h0, h1) if mask.shape[1] > 1 else slice(None)
        mc = mask[mb, mh, r0:r1, :, :c1]
        s5 = s.view(b1 - b0, h1 - h0, n, g, c1)  # the mask broadcasts over batch and heads: not one dimension
        if mc.dtype == torch.bool:
            s5.masked_fill_(~mc, float("-inf"))
        else:
            s5.add_(mc.to(s.dtype))  # added exactly as quantized
    if c0 < c1:  # the causal diagonal: only keys [c0, c1) are masked for some row of the block
        offset = 0 if case.causal == "top-left" else case.kv_len - case.q_len
        rows = positions[r0:r1, None, None]
        cols = torch.arange(c0, c1)
        s[..., c0:c1].masked_fill_(cols > rows + offset, float("-inf"))

    m = s.amax(-1, keepdim=True)
    dead = m == float("-inf")  # every key masked: torch defines the row as zero
    m.masked_fill_(dead, 0.0)
    p = s.sub_(m).exp_()  # unnormalised P~, in place of the logits
    l = p.sum(-1, keepdim=True)
    l_safe = l.masked_fill(dead, 1.0)
    _slab(lse, b0, b1, h0, h1)[:, :, r0:r1] = (m + torch.log(l)).squeeze(-1).transpose(1, 2)
    p_pv = policy.round(p, policy.p_before_pv)
    o = torch.matmul(p_pv.view(nh, n * g, c1), vc).view(nh, n, g, dv_dim).div_(l_safe)
    _slab(out, b0, b1, h0, h1)[:, :, r0:r1] = o.transpose(1, 2)
    if dq is None:
        return

    doc = _slab(do, b0, b1, h0, h1)[:, r0:r1]
    delta = (doc * policy.round(o, policy.o_as_stored)).sum(-1, keepdim=True)
    dp = torch.matmul(doc.reshape(nh, n * g, dv_dim), vc.transpose(-1, -2)).view(nh, n, g, c1)
    if normalise:
        p.div_(l_safe)  # normalised P
        inv_l = None
    else:
        inv_l = 1.0 / l_safe
    ds = dp.sub_(delta).mul_(p)  # in place of dP; times 1/l when P is unnormalised
    ds_g = policy.round(ds, policy.ds_before_gemm)
    p_dv = policy.round(p, policy.p_before_dv)
    q_dk = qc if inv_l is None else qc * inv_l
    do_dv = doc if inv_l is None else doc * inv_l
    dq_c = torch.matmul(ds_g.view(nh, n * g, c1), _slab(ks, b0, b1, h0, h1)[:, :c1]).view(nh, n, g, d)
    _slab(dq, b0, b1, h0, h1)[:, :, r0:r1] = (dq_c if inv_l is None else dq_c.mul_(inv_l)).transpose(1, 2)
    dk_s, dv_s = _slab(dk_acc, b0, b1, h0, h1), _slab(dv_acc, b0, b1, h0, h1)
    if policy.per_head_dkdv:
        # (nh, g, c1, n) @ (nh, g, n, d): each query head's own dK/dV, summed (rounded) at the end
        dk_s[:, :, :c1] += torch.matmul(ds_g.permute(0, 2, 3, 1), q_dk.transpose(1, 2))
        dv_s[:, :, :c1] += torch.matmul(p_dv.permute(0, 2, 3, 1), do_dv.transpose(1, 2))
    else:
        # stacking the group's rows makes this GEMM's accumulation the group sum; dK^T = Q^T dS
        # (accumulated by the GEMM itself, beta = 1: no temporary, no extra pass)
        dk_s[:, :, :c1].baddbmm_(q_dk.reshape(nh, n * g, d).transpose(-1, -2), ds_g.view(nh, n * g, c1))
        dv_s[:, :, :c1].baddbmm_(do_dv.reshape(nh, n * g, dv_dim).transpose(-1, -2), p_dv.view(nh, n * g, c1))


def oracle(inputs: Inputs, chunk: int | None = None, rows: torch.Tensor | None = None) -> AttentionResult:
    """The truth: fp64 on the CPU, on the same quantized values every device saw (only `rows`' output
    and dQ when given: the row-sampled oracle of long cases)."""
    return attention(inputs, torch.float64, EXACT, chunk, rows)

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


def chunk_rows(case: Case, itemsize: int) -> int:
    """Query rows per block: a kv group's logits block (group x rows x kv_len) of about
    BLOCK_BYTES, so the elementwise passes run in cache, but at least MIN_GROUP_ROWS stacked
    rows so the GEMMs stay efficient; small rows also let causal skip most masked keys."""
    g = case.group_size
    rows = BLOCK_BYTES // (g * case.kv_len * itemsize)
    return max(1, min(case.q_len, max(rows, -(-MIN_GROUP_ROWS // g))))


def _heads_per_block(case: Case, rows: int, itemsize: int) -> int:
    """kv heads batched into one block when a head's block is small (short sequences)."""
    per_head = case.group_size * rows * case.kv_len * itemsize
    return max(1, min(case.kv_heads, BLOCK_BYTES // per_head))


def _visible_keys(case: Case, r0: int, r1: int) -> tuple[int, int]:
    """(first key any row of [r0, r1) cannot see, end of the keys some row can see): causal masks
    every key past the end for every row, so those keys are skipped, not computed and masked."""
    lk = case.kv_len
    if case.causal == "none":
        return lk, lk
    offset = 0 if case.causal == "top-left" else lk - case.q_len
    # at least one key: rows that see none still go through the masked path (dead rows)
    return min(lk, max(0, r0 + offset + 1)), min(lk, max(1, r1 + offset))


def _parallel(units: list, fn) -> None:
    """Run fn over units on torch's thread count, each op single-threaded: blocks are small, and
    an OpenMP fork/join per small op costs more than it gains (far more on a shared, loaded machine)."""
    workers = min(torch.get_num_threads(), len(units))
    if workers <= 1:
        for unit in units:
            fn(unit)
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fn, units))
    finally:
        torch.set_num_threads(previous)


def _rows_major(t: torch.Tensor, b: int, hkv: int, g: int, compute: torch.dtype) -> torch.Tensor:
    """(B, Hq, L, D) -> contiguous (B, Hkv, L, G, D) in `compute`: a block's rows of all the group's
    query heads are then one contiguous (rows x G, D) matrix, a GEMM operand without a copy."""
    _, _, length, dim = t.shape
    out = torch.empty(b, hkv, length, g, dim, dtype=compute)
    return out.copy_(t.view(b, hkv, g, length, dim).transpose(2, 3))


def attention(inputs: Inputs, compute: torch.dtype, policy: Rounding = EXACT, chunk: int | None = None) -> AttentionResult:
    """Blocked attention forward + backward in `compute` precision under a rounding policy."""
    case = inputs.case
    b, hq, hkv, lq, lk = case.batch, case.q_heads, case.kv_heads, case.q_len, case.kv_len
    g, d, dv_dim = case.group_size, case.head_dim, case.value_dim
    scale = softmax_scale(case)
    itemsize = torch.finfo(compute).bits // 8
    chunk = chunk or chunk_rows(case, itemsize)
    nh = _heads_per_block(case, chunk, itemsize)

    # The softmax scale is folded into Q (for S and dK) and K (for dQ): no pass over a logits block.
    qs = _rows_major(inputs.q, b, hkv, g, compute).mul_(scale)
    k = inputs.k.to(compute)
    ks = k * scale
    v = inputs.v.to(compute)
    do = _rows_major(inputs.grad_out, b, hkv, g, compute)
    mask = inputs.mask
    if mask is not None:
        per_head = mask.shape[1] != 1
        mask = mask.view(mask.shape[0], hkv if per_head else 1, g if per_head else 1, lq, lk).transpose(2, 3)

    # results are written in their final (B, Hkv, G, L, D) order, block by block: no copy at the end
    out = torch.empty(b, hkv, g, lq, dv_dim, dtype=compute)
    lse = torch.empty(b, hkv, g, lq, dtype=compute)
    grads = case.grads
    dq = torch.empty(b, hkv, g, lq, d, dtype=compute) if grads else None
    if grads and policy.per_head_dkdv:
        dk_acc = torch.zeros(b, hkv, g, lk, d, dtype=compute)
        dv_acc = torch.zeros(b, hkv, g, lk, dv_dim, dtype=compute)
    elif grads:  # transposed, (D, keys): the GEMM then has the wide key dimension as its columns
        dk_acc = torch.zeros(b, hkv, d, lk, dtype=compute)
        dv_acc = torch.zeros(b, hkv, dv_dim, lk, dtype=compute)
    # Rounding the normalised P or dS needs P normalised in place (one more pass); otherwise 1/l
    # is folded into the small row-sized operands (O, dQ rows, the Q and dO rows of dK and dV).
    normalise = policy.dtype is not None and (policy.p_before_dv or policy.ds_before_gemm)

    def heads(unit: tuple[int, int, int]) -> None:
        bi, h0, h1 = unit
        for r0 in range(0, lq, chunk):
            r1 = min(lq, r0 + chunk)
            c0, c1 = _visible_keys(case, r0, r1)
            _block(case, policy, normalise, bi, h0, h1, r0, r1, c0, c1, qs, k, ks, v, do, mask,
                   out, lse, dq, dk_acc if grads else None, dv_acc if grads else None)

    # each unit writes only its own heads' slices, in a fixed order: results do not depend on threads
    _parallel([(bi, h0, min(hkv, h0 + nh)) for bi in range(b) for h0 in range(0, hkv, nh)], heads)

    fin = policy.round
    output = fin(out.view(b, hq, lq, dv_dim))
    lse_out = lse.view(b, hq, lq)
    if not grads:
        return AttentionResult(output, lse_out, None, None, None)
    if policy.per_head_dkdv:
        dk_acc = fin(dk_acc).sum(2)
        dv_acc = fin(dv_acc).sum(2)
    else:
        dk_acc = dk_acc.transpose(-1, -2).contiguous()
        dv_acc = dv_acc.transpose(-1, -2).contiguous()
    return AttentionResult(output, lse_out, fin(dq.view(b, hq, lq, d)), fin(dk_acc), fin(dv_acc))


def _block(case, policy, normalise, bi, h0, h1, r0, r1, c0, c1, qs, k, ks, v, do, mask, out, lse, dq, dk_acc, dv_acc):
    """Forward and backward of query rows [r0, r1) of kv heads [h0, h1) of batch bi, against keys [0, c1).
    Blocks are (heads, rows, group, keys): row-major over (row, query head of the group)."""
    nh, g, n = h1 - h0, case.group_size, r1 - r0
    d, dv_dim = case.head_dim, case.value_dim
    qc = qs[bi, h0:h1, r0:r1]  # (nh, n, g, d), each head's rows contiguous
    kc, vc = k[bi, h0:h1, :c1], v[bi, h0:h1, :c1]
    s = torch.matmul(qc.reshape(nh, n * g, d), kc.transpose(-1, -2)).view(nh, n, g, c1)
    if mask is not None:
        mh = slice(h0, h1) if mask.shape[1] > 1 else slice(None)
        mc = mask[bi if mask.shape[0] > 1 else 0, mh, r0:r1, :, :c1]
        if mc.dtype == torch.bool:
            s.masked_fill_(~mc, float("-inf"))
        else:
            s.add_(mc.to(s.dtype))  # added exactly as quantized
    if c0 < c1:  # the causal diagonal: only keys [c0, c1) are masked for some row of the block
        offset = 0 if case.causal == "top-left" else case.kv_len - case.q_len
        rows = torch.arange(r0, r1)[:, None, None]
        cols = torch.arange(c0, c1)
        s[..., c0:c1].masked_fill_(cols > rows + offset, float("-inf"))

    m = s.amax(-1, keepdim=True)
    dead = m == float("-inf")  # every key masked: torch defines the row as zero
    m.masked_fill_(dead, 0.0)
    p = s.sub_(m).exp_()  # unnormalised P~, in place of the logits
    l = p.sum(-1, keepdim=True)
    l_safe = l.masked_fill(dead, 1.0)
    lse[bi, h0:h1, :, r0:r1] = (m + torch.log(l)).squeeze(-1).transpose(1, 2)
    p_pv = policy.round(p, policy.p_before_pv)
    o = torch.matmul(p_pv.view(nh, n * g, c1), vc).view(nh, n, g, dv_dim).div_(l_safe)
    out[bi, h0:h1, :, r0:r1] = o.transpose(1, 2)
    if dq is None:
        return

    doc = do[bi, h0:h1, r0:r1]
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
    dq_c = torch.matmul(ds_g.view(nh, n * g, c1), ks[bi, h0:h1, :c1]).view(nh, n, g, d)
    dq[bi, h0:h1, :, r0:r1] = (dq_c if inv_l is None else dq_c.mul_(inv_l)).transpose(1, 2)
    if policy.per_head_dkdv:
        # (nh, g, c1, n) @ (nh, g, n, d): each query head's own dK/dV, summed (rounded) at the end
        dk_acc[bi, h0:h1, :, :c1] += torch.matmul(ds_g.permute(0, 2, 3, 1), q_dk.transpose(1, 2))
        dv_acc[bi, h0:h1, :, :c1] += torch.matmul(p_dv.permute(0, 2, 3, 1), do_dv.transpose(1, 2))
    else:
        # stacking the group's rows makes this GEMM's accumulation the group sum; dK^T = Q^T dS
        # (accumulated by the GEMM itself, beta = 1: no temporary, no extra pass)
        dk_acc[bi, h0:h1, :, :c1].baddbmm_(q_dk.reshape(nh, n * g, d).transpose(-1, -2), ds_g.view(nh, n * g, c1))
        dv_acc[bi, h0:h1, :, :c1].baddbmm_(do_dv.reshape(nh, n * g, dv_dim).transpose(-1, -2), p_dv.view(nh, n * g, c1))


def oracle(inputs: Inputs, chunk: int | None = None) -> AttentionResult:
    """The truth: fp64 on the CPU, on the same quantized values every device saw."""
    return attention(inputs, torch.float64, EXACT, chunk)

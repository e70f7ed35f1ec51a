"""The error a correct kernel cannot avoid where dS is pure cancellation.

dS_ij = P_ij (dP_ij - D_i) with D_i = rowsum(dO_i ∘ O_i), and O as stored is rounded to
the dtype. On a row whose softmax sits on a few keys, dP_ij ≈ D_i and dQ, dK are mostly
what is left of that cancellation, so they inherit the rounding of O through D:
    δD_i   ~ ||dO_i ∘ (O_i as stored - O_i)||         (O's rounding; 0 where O is exact, e.g. one key)
    δdQ_i  = -scale · δD_i · Σ_j P_ij k_j             (the attention-weighted mean key)
    δdK_j  = -scale · Σ_i P_ij δD_i q_i               (independent δD_i add in quadrature)
Which realisation of δO a kernel gets depends on its own rounding of O, so a handful of
reference designs, each one realisation, can land far under it: measured, the accepted
designs scored up to 15x the envelope of the others on such dQ rows (calibration, CPU),
and real kernels alike. This module gives the magnitude, per row. The rounding magnitude is the
correctly rounded O's, element by element, so a row whose O is exact in the dtype (a row that
sees one key: O = v_j) gets no allowance at all.
"""

from __future__ import annotations

import torch

from .inputs import Inputs
from .oracle import causal_keep_at, softmax_scale

CHUNK_BYTES = 64 * 2**20


def d_term_noise(inputs: Inputs, oracle_out: torch.Tensor, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-row noise of dQ (B, Hq, Lq) and dK (B, Hkv, Lk) from D's rounding, in the tensors' units.
    `rows`: the query rows `oracle_out` holds (a long case's); dQ's noise is then for those rows, and
    dK's is exact as long as grad_out is zero on every other row (their weight is zero)."""
    case = inputs.case
    b, hq, hkv, lk, g = case.batch, case.q_heads, case.kv_heads, case.kv_len, case.group_size
    positions = torch.arange(case.q_len) if rows is None else rows
    lq = len(positions)
    scale = softmax_scale(case)
    q_rows = inputs.q if rows is None else inputs.q.index_select(2, rows)
    do_rows = inputs.grad_out if rows is None else inputs.grad_out.index_select(2, rows)
    q = q_rows.double().view(b, hkv, g, lq, case.head_dim)
    # (B, Hkv, Lk, D): the group's rows are stacked into one GEMM per kv head; a K broadcast over the
    # group made matmul copy K once per query head and chunk (65 % of this function's time at 8k keys)
    k = inputs.k.double()
    o = oracle_out.double()
    o_rounding = o.to(inputs.q.dtype).double() - o  # what storing O in the dtype does to it
    weight = (do_rows.double() * o_rounding).norm(dim=-1).view(b, hkv, g, lq)
    weight = torch.nan_to_num(weight, nan=0.0, posinf=0.0)
    qnorm = q.norm(dim=-1)
    mask = inputs.mask
    if mask is not None:
        mask = mask if rows is None else mask.index_select(2, rows)
        per_head = mask.shape[1] != 1
        mask = mask.view(mask.shape[0], hkv if per_head else 1, g if per_head else 1, lq, lk)
        mask = mask if mask.dtype == torch.bool else mask.double()
    dq = torch.zeros(b, hkv, g, lq, dtype=torch.float64)
    dk2 = torch.zeros(b, hkv, lk, dtype=torch.float64)
    step = max(1, min(lq, CHUNK_BYTES // (8 * b * hq * lk)))
    for r0 in range(0, lq, step):
        r1 = min(lq, r0 + step)
        n = r1 - r0
        s = torch.matmul(q[:, :, :, r0:r1].reshape(b, hkv, g * n, -1), k.transpose(-1, -2)).mul_(scale)
        s = s.view(b, hkv, g, n, lk)
        if mask is not None:
            mc = mask[..., r0:r1, :]
            s = s.masked_fill(~mc, float("-inf")) if mc.dtype == torch.bool else s + mc
        keep = causal_keep_at(case, positions[r0:r1])
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)  # rows that see no key are zero
        w = weight[..., r0:r1]
        dq[..., r0:r1] = scale * w * torch.matmul(p.reshape(b, hkv, g * n, lk), k).view(b, hkv, g, n, -1).norm(dim=-1)
        dk2 += (scale**2) * torch.einsum("bhgnk,bhgn->bhk", p * p, (w * qnorm[..., r0:r1]) ** 2)
    return {"dq": dq.view(b, hq, lq), "dk": dk2.sqrt()}

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
from dataclasses import dataclass

import torch

from .case import Case
from .inputs import Inputs

CHUNK_BYTES = 64 * 2**20  # per logits-sized temporary; a few live at once


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
    per_row = case.batch * case.q_heads * case.kv_len * itemsize
    return max(1, min(case.q_len, CHUNK_BYTES // per_row))


def attention(inputs: Inputs, compute: torch.dtype, policy: Rounding = EXACT, chunk: int | None = None) -> AttentionResult:
    """Blocked attention forward + backward in `compute` precision under a rounding policy."""
    case = inputs.case
    b, hq, hkv, lq, lk = case.batch, case.q_heads, case.kv_heads, case.q_len, case.kv_len
    g, d, dv_dim = case.group_size, case.head_dim, case.value_dim
    scale = softmax_scale(case)
    chunk = chunk or chunk_rows(case, torch.finfo(compute).bits // 8)

    q = inputs.q.to(compute).view(b, hkv, g, lq, d)
    k = inputs.k.to(compute)
    v = inputs.v.to(compute)
    do = inputs.grad_out.to(compute).view(b, hkv, g, lq, dv_dim)
    mask = inputs.mask
    if mask is not None:
        mask = mask if mask.dtype == torch.bool else mask.to(compute)
        mask = mask.view(mask.shape[0], hkv if mask.shape[1] != 1 else 1, g if mask.shape[1] != 1 else 1, lq, lk)
    kt, vt = k.transpose(-1, -2), v.transpose(-1, -2)

    out = torch.empty(b, hkv, g, lq, dv_dim, dtype=compute)
    lse = torch.empty(b, hkv, g, lq, dtype=compute)
    grads = case.grads
    dq = torch.empty_like(q) if grads else None
    if grads and policy.per_head_dkdv:
        dk_acc = torch.zeros(b, hkv, g, lk, d, dtype=compute)
        dv_acc = torch.zeros(b, hkv, g, lk, dv_dim, dtype=compute)
    elif grads:
        dk_acc = torch.zeros(b, hkv, lk, d, dtype=compute)
        dv_acc = torch.zeros(b, hkv, lk, dv_dim, dtype=compute)

    for r0 in range(0, lq, chunk):
        r1 = min(lq, r0 + chunk)
        n = r1 - r0
        qc = q[:, :, :, r0:r1]
        s = torch.matmul(qc.reshape(b, hkv, g * n, d), kt).mul_(scale).view(b, hkv, g, n, lk)
        if mask is not None:
            mc = mask[..., r0:r1, :]
            if mc.dtype == torch.bool:
                s.masked_fill_(~mc, float("-inf"))
            else:
                s.add_(mc)
        keep = causal_keep(case, r0, r1)
        if keep is not None:
            s.masked_fill_(~keep, float("-inf"))

        m = s.amax(-1, keepdim=True)
        dead = m == float("-inf")  # every key masked: torch defines the row as zero
        m.masked_fill_(dead, 0.0)
        p = s.sub_(m).exp_()  # unnormalised P~, in place of the logits
        l = p.sum(-1, keepdim=True)
        l_safe = l.masked_fill(dead, 1.0)
        lse[:, :, :, r0:r1] = (m + torch.log(l)).squeeze(-1)
        p_pv = policy.round(p, policy.p_before_pv)
        o = torch.matmul(p_pv.view(b, hkv, g * n, lk), v).view(b, hkv, g, n, dv_dim).div_(l_safe)
        out[:, :, :, r0:r1] = o
        if not grads:
            continue

        p.div_(l_safe)  # normalised P
        doc = do[:, :, :, r0:r1]
        delta = (doc * policy.round(o, policy.o_as_stored)).sum(-1, keepdim=True)
        dp = torch.matmul(doc.reshape(b, hkv, g * n, dv_dim), vt).view(b, hkv, g, n, lk)
        ds = dp.sub_(delta).mul_(p)  # in place of dP
        ds_g = policy.round(ds, policy.ds_before_gemm)
        p_dv = policy.round(p, policy.p_before_dv)
        dq[:, :, :, r0:r1] = torch.matmul(ds_g.view(b, hkv, g * n, lk), k).view(b, hkv, g, n, d).mul_(scale)
        if policy.per_head_dkdv:
            dk_acc += torch.matmul(ds_g.transpose(-1, -2), qc).mul_(scale)
            dv_acc += torch.matmul(p_dv.transpose(-1, -2), doc)
        else:
            # stacking the group's rows makes this GEMM's accumulation the group sum
            dk_acc += torch.matmul(ds_g.view(b, hkv, g * n, lk).transpose(-1, -2), qc.reshape(b, hkv, g * n, d)).mul_(scale)
            dv_acc += torch.matmul(p_dv.view(b, hkv, g * n, lk).transpose(-1, -2), doc.reshape(b, hkv, g * n, dv_dim))

    fin = policy.round
    output = fin(out.view(b, hq, lq, dv_dim))
    if not grads:
        return AttentionResult(output, lse.view(b, hq, lq), None, None, None)
    if policy.per_head_dkdv:
        dk_acc = fin(dk_acc).sum(2)
        dv_acc = fin(dv_acc).sum(2)
    return AttentionResult(output, lse.view(b, hq, lq), fin(dq.view(b, hq, lq, d)), fin(dk_acc), fin(dv_acc))


def oracle(inputs: Inputs, chunk: int | None = None) -> AttentionResult:
    """The truth: fp64 on the CPU, on the same quantized values every device saw."""
    return attention(inputs, torch.float64, EXACT, chunk)

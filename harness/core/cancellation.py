"""Per-row noise a correct fp32-accumulating kernel cannot avoid, beside the designs' envelope.

The D-term (dQ, dK). dS_ij = P_ij (dP_ij - D_i) with D_i = rowsum(dO_i ∘ O_i), and O as stored is
rounded to the dtype. On a row whose softmax sits on a few keys, dP_ij ≈ D_i and dQ, dK are mostly
what is left of that cancellation, so they inherit the rounding of O through D:
    δD_i   ~ ||dO_i ∘ (O_i as stored - O_i)||         (O's rounding; 0 where O is exact, e.g. one key)
    δdQ_i  = -scale · δD_i · Σ_j P_ij k_j             (the attention-weighted mean key)
    δdK_j  = -scale · Σ_i P_ij δD_i q_i               (independent δD_i add in quadrature)
Which realisation of δO a kernel gets depends on its own rounding of O, so a handful of
reference designs, each one realisation, can land far under it: measured, the accepted
designs scored up to 15x the envelope of the others on such dQ rows (calibration, CPU),
and real kernels alike. The rounding magnitude is the correctly rounded O's, element by element,
so a row whose O is exact in the dtype (a row that sees one key: O = v_j) gets no allowance at all.

The near-threshold terms (docs/benchmarks-calibration.md, "Near-threshold families: -65504 rows and
negative LSE"), each the RMS of roundings a correct kernel makes, propagated like the D-term:
  1. logit: relative P errors of RMS sqrt(2/12)·ulp32(|S_ij|) in the forward (the logit and its exp2-domain
     product) and sqrt(2/12)·sqrt(ulp32(|S_ij|)² + ulp32(|LSE_i|)²) in the backward (P = exp(S - LSE) from an
     fp32 LSE), each capped at 2^-8 (so a row that loses its logits entirely, finfo.min, stays judged),
     into out (Σ_j P_ij e_ij (v_j - O_i)), dV, dQ and dK (through dS = P (dP - D));
  2. coherent dQ/dK parts (fp16/bf16): the D-term with O's error its rounding plus the variance P~'s
     rounding before P~V leaves in O ("Dpv"), and the part of dS's rounding (once per element to the dtype)
     along the attention-weighted mean key (dQ row i: scale·|k̄_i|·sqrt(Σ_j var dS_ij)) or mean query (dK);
  3. per head (fp16/bf16, G > 1): rounding each query head's dK and dV to the dtype before an fp32 group
     sum, sqrt(Σ_h Σ_c ulp(X_hjc)²/12) per key row (the flash-per-head-dkdv design's statistical form).
row_noise: out = logit, dV = sqrt(logit² + head²), dQ = max(D, sqrt(Dpv² + dS² + logit²)),
dK = sqrt(max(D, sqrt(Dpv² + dS² + logit²))² + head²); fp32 cases: dQ/dK = max(D, logit), no terms 2-3.
One pass over the logits in blocks of query rows (memory O(rows x Lk) per block, accumulators O(H·Lk·D)),
in a fixed order.
"""

from __future__ import annotations

import math

import torch

from .inputs import Inputs
from .oracle import _parallel, causal_keep_at, softmax_scale

CHUNK_BYTES = 64 * 2**20
LOGIT_CAP = 2.0**-8  # the logit term's relative P error at most fp32's resolution at |S| = 2^16
_BITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}


_EXPONENT = 0x7FF0000000000000  # an fp64's exponent bits: 2^floor(log2 |x|)


def _ulp(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ulp of |x| (x >= 0, fp64) in `dtype`, 0 where x is 0 (inf where x is inf); fp16's subnormal spacing 2^-24
    below 2^-14. From the exponent bits: 2^floor(log2 x) · 2^(1 - significant bits)."""
    ulp = (x.view(torch.int64) & _EXPONENT).view(torch.float64).mul_(2.0 ** (1 - _BITS[dtype]))
    if dtype == torch.float16:
        ulp = torch.where(x > 0, ulp.clamp_min_(2.0**-24), 0.0)
    return ulp


def _by_key(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ over the group and the rows of x (B, Hkv, G, r, Lk) weighted by w (B, Hkv, G, r): one GEMM, no copy of x."""
    b, h, g, r, lk = x.shape
    return torch.matmul(w.reshape(b, h, 1, g * r), x.reshape(b, h, g * r, lk))[..., 0, :]


def rounding_terms(inputs: Inputs, oracle_out: torch.Tensor, rows: torch.Tensor | None = None,
                   terms: bool = True) -> dict[str, torch.Tensor]:
    """Each term apart, per row, in the tensors' units: "d_dq"/"d_dk" (the D-term), "logit_out"/"_dq"/"_dk"/"_dv",
    "dpv_dq"/"_dk", "ds_dq"/"_dk", "head_dk"/"_dv" (only those that apply: grads, dtype, group).
    `rows`: the query rows `oracle_out` holds (a long case's); out and dQ rows are then those rows', and the
    dK/dV terms exact as long as grad_out is zero on every other row (their weight is zero).
    `terms` False: the D-term alone (the yardstick before the near-threshold terms)."""
    case = inputs.case
    b, hq, hkv, lk, g = case.batch, case.q_heads, case.kv_heads, case.kv_len, case.group_size
    positions = torch.arange(case.q_len) if rows is None else rows
    lq, d, dv = len(positions), case.head_dim, case.value_dim
    scale = softmax_scale(case)
    grads = case.grads
    dtype = inputs.q.dtype
    lowp = terms and grads and dtype != torch.float32
    per_head = lowp and g > 1

    def rows_of(t: torch.Tensor, dim: int) -> torch.Tensor:
        t = t if rows is None else t.index_select(2, rows)
        return t.double().view(b, hkv, g, lq, dim)

    q = rows_of(inputs.q, d)
    k = inputs.k.double()[:, :, None]  # (B, Hkv, 1, Lk, D): broadcast over the group
    v = inputs.v.double()[:, :, None]
    o_raw = oracle_out.double().view(b, hkv, g, lq, dv)
    o = torch.nan_to_num(o_raw, nan=0.0, posinf=0.0, neginf=0.0)
    do = rows_of(inputs.grad_out, dv)
    o_rounding = o_raw.to(dtype).double() - o_raw  # what storing O in the dtype does to it
    weight = torch.nan_to_num((do * o_rounding).norm(dim=-1), nan=0.0, posinf=0.0)  # (B, Hkv, G, Lq)
    qnorm = q.norm(dim=-1)
    qnorm2 = q.pow(2).sum(-1)
    k2 = k.pow(2).sum(-1, keepdim=True)  # (B, Hkv, 1, Lk, 1)
    v2 = v.pow(2).sum(-1)[..., None, :]  # (B, Hkv, 1, 1, Lk)
    do2 = do.pow(2).sum(-1, keepdim=True)
    delta = (do * o).sum(-1, keepdim=True)
    mask = inputs.mask
    if mask is not None:
        mask = mask if rows is None or mask.shape[2] == 1 else mask.index_select(2, rows)
        ph = mask.shape[1] != 1
        mask = mask.view(mask.shape[0], hkv if ph else 1, g if ph else 1, mask.shape[2], lk)
        mask = mask if mask.dtype == torch.bool else mask.double()

    f64 = {"dtype": torch.float64}
    acc = {name: torch.zeros(b, hkv, g, lq, **f64) for name in
           (["d_dq"] if grads else []) + (["logit_out", "logit_dq"] if terms else [])
           + (["dpv_dq", "ds_dq"] if lowp else [])}
    key_acc = {name: torch.zeros(b, hkv, lk, **f64) for name in
               (["d_dk"] if grads else []) + (["logit_dk", "logit_dv"] if terms and grads else [])
               + (["dpv_dk", "ds_dk", "psum"] if lowp else [])}
    pq = torch.zeros(b, hkv, lk, d, **f64) if lowp else None
    head = {"dk": torch.zeros(b, hkv, g, lk, d, **f64), "dv": torch.zeros(b, hkv, g, lk, dv, **f64)} if per_head else {}
    v_sq = v.pow(2)
    # Units of (batch, kv head), each on one thread (oracle._parallel): every sum is within a unit and in a fixed
    # order, so the bits do not depend on the thread count. A unit keeps about eight blocks of its logits alive at
    # once, each a 128th of CHUNK_BYTES (4 MiB): 32 MiB per worker.
    step = max(1, min(lq, CHUNK_BYTES // (128 * g * lk)))

    def run_unit(unit: tuple[int, int]) -> None:
        bi, hi = unit

        def at(t: torch.Tensor) -> torch.Tensor:  # the unit's view (writes go to the whole)
            return t[bi:bi + 1, hi:hi + 1]

        q_u, k_u, v_u, v_sq_u, do_u, o_u, o_rounding_u = map(at, (q, k, v, v_sq, do, o, o_rounding))
        acc_u = {name: at(t) for name, t in acc.items()}
        key_u = {name: at(t) for name, t in key_acc.items()}
        head_u = {name: at(t) for name, t in head.items()}
        pq_u = at(pq) if pq is not None else None
        weight_u, qnorm_u, qnorm2_u, k2_u, v2_u, do2_u, delta_u = map(at, (weight, qnorm, qnorm2, k2, v2, do2, delta))
        mask_u = None
        if mask is not None:
            bm, hm = (bi if mask.shape[0] > 1 else 0), (hi if mask.shape[1] > 1 else 0)
            mask_u = mask[bm:bm + 1, hm:hm + 1]
        _unit_loop(case, positions, step, scale, dtype, terms, lowp, per_head, q_u, k_u, v_u, v_sq_u, do_u, o_u,
                   o_rounding_u, weight_u, qnorm_u, qnorm2_u, k2_u, v2_u, do2_u, delta_u, mask_u, acc_u, key_u,
                   head_u, pq_u)

    _parallel(tuple((bi, hi) for bi in range(b) for hi in range(hkv)), run_unit)

    out = {name: t.view(b, hq, lq) for name, t in acc.items()}
    for name in ("logit_out", "logit_dq"):
        if name in out:
            out[name] = torch.nan_to_num(out[name].sqrt(), nan=0.0)
    for name, t in key_acc.items():
        out[name] = torch.nan_to_num(t.sqrt(), nan=0.0)
    if lowp:  # |q̄_j|: the P-weighted mean query over the rows (and the group's heads) that see key j
        psum = key_acc["psum"]
        qbar = (pq / psum.clamp_min(1e-300)[..., None]).norm(dim=-1)
        out["ds_dk"] = scale * qbar * out["ds_dk"]
        del out["psum"]
    for name, t in head.items():
        out[f"head_{name}"] = (_ulp(t.abs(), dtype).square_().sum(-1).sum(2) / 12).sqrt()
    return out


def _unit_loop(case, positions, step, scale, dtype, terms, lowp, per_head, q_u, k_u, v_u, v_sq_u, do_u, o_u,
               o_rounding_u, weight_u, qnorm_u, qnorm2_u, k2_u, v2_u, do2_u, delta_u, mask_u, acc_u, key_u, head_u,
               pq_u) -> None:
    """One (batch, kv head) unit of `rounding_terms`, in blocks of `step` query rows; writes into the views."""
    grads = case.grads
    c2 = 2 / 12  # two roundings, each of variance ulp²/12
    cap2 = LOGIT_CAP**2
    zero = torch.zeros((), dtype=torch.float64)
    for r0 in range(0, len(positions), step):
        r1 = min(len(positions), r0 + step)
        qc, doc, oc = q_u[:, :, :, r0:r1], do_u[:, :, :, r0:r1], o_u[:, :, :, r0:r1]
        s = torch.matmul(qc, k_u.transpose(-1, -2)).mul_(scale)
        if mask_u is not None:
            mc = mask_u if mask_u.shape[3] == 1 else mask_u[..., r0:r1, :]
            s = s.masked_fill(~mc, float("-inf")) if mc.dtype == torch.bool else s + mc
        keep = causal_keep_at(case, positions[r0:r1])
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)  # rows that see no key are zero
        p2 = p * p if grads else None
        pk = torch.matmul(p, k_u).norm(dim=-1) if grads else None  # |k̄_i|, (B, Hkv, G, r)
        if grads:
            w = weight_u[..., r0:r1]
            acc_u["d_dq"][..., r0:r1] = scale * w * pk
            key_u["d_dk"] += (scale**2) * _by_key(p2, (w * qnorm_u[..., r0:r1]) ** 2)
        if not terms:
            continue
        # 1. logit rounding: relative P errors at the logits' and the LSE's own magnitude (masked keys: |S| = inf,
        # capped, times P = 0)
        a2 = _ulp(s.abs()).mul_(math.sqrt(c2)).square_()  # c2 · ulp32(|S|)²
        wf = (p2 if grads else p * p) * a2.clamp_max(cap2)  # P² σ_f²
        # out_i: Σ_j P_ij² σ_ij² |v_j - O_i|², the distance per element (a one-key row's O = v_j: 0)
        vo2 = torch.matmul(oc, v_u.transpose(-1, -2)).mul_(-2).add_(v2_u).add_(oc.pow(2).sum(-1, keepdim=True))
        out2 = (wf * vo2.clamp_min_(0)).sum(-1)
        del vo2
        acc_u["logit_out"][..., r0:r1] = out2
        del wf
        if not grads:
            continue
        lse = torch.logsumexp(s, -1, keepdim=True)
        u_l2 = _ulp(torch.nan_to_num(lse.abs(), posinf=0.0)).square_().mul_(c2)
        wb = a2.add_(u_l2).clamp_max_(cap2).mul_(p2)  # P² σ_b²
        key_u["logit_dv"] += _by_key(wb, do2_u[..., r0:r1, 0])
        dpd = torch.matmul(doc, v_u.transpose(-1, -2)).sub_(delta_u[..., r0:r1, :])  # dP - D
        wl = wb.mul_(dpd.square())
        acc_u["logit_dq"][..., r0:r1] = scale**2 * torch.matmul(wl, k2_u)[..., 0]
        key_u["logit_dk"] += scale**2 * _by_key(wl, qnorm2_u[..., r0:r1])
        del wl, wb, a2
        if not lowp:
            continue
        # 2. coherent parts: dS's rounding along the mean key / query, and P~'s rounding into O and D
        ds = dpd.mul_(p)
        var = _ulp(ds.abs(), dtype).square_()  # 12 · var(dS_ij)
        acc_u["ds_dq"][..., r0:r1] = scale * pk * (var.sum(-1) / 12).sqrt()
        key_u["ds_dk"] += var.sum((2, 3)) / 12
        del var
        pq_u += torch.matmul(p.reshape(1, 1, -1, p.shape[-1]).transpose(-1, -2), qc.reshape(1, 1, -1, qc.shape[-1]))
        key_u["psum"] += p.sum((2, 3))
        m = s.amax(-1, keepdim=True)
        pt = s.sub_(torch.where(torch.isfinite(m), m, zero)).exp_()  # P~, the unnormalised P a kernel rounds
        ell = pt.sum(-1, keepdim=True)
        ell = torch.where(ell > 0, ell, 1.0)
        u_pt = _ulp(pt.masked_fill_(pt >= 1, 0.0), dtype).square_()  # P~ = 1 (the row max) is exact
        del pt, s
        d_pv2 = torch.matmul(u_pt, v_sq_u).div_(ell.square().mul_(12))  # the variance P~'s rounding leaves in O
        del u_pt
        wpv = torch.nan_to_num((doc.pow(2) * (o_rounding_u[..., r0:r1, :].pow(2) + d_pv2)).sum(-1).sqrt(), nan=0.0)
        acc_u["dpv_dq"][..., r0:r1] = scale * wpv * pk
        key_u["dpv_dk"] += scale**2 * _by_key(p2, (wpv * qnorm_u[..., r0:r1]) ** 2)
        if per_head:  # 3. each query head's dK, dV (fp64) before the group sum
            head_u["dk"] += scale * torch.matmul(ds.transpose(-1, -2), qc)
            head_u["dv"] += torch.matmul(p.transpose(-1, -2), doc)
        del ds, p, p2


def d_term_noise(inputs: Inputs, oracle_out: torch.Tensor, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The D-term alone: per-row noise of dQ (B, Hq, Lq) and dK (B, Hkv, Lk) from D's rounding."""
    t = rounding_terms(inputs, oracle_out, rows, terms=False)
    return {"dq": t["d_dq"], "dk": t["d_dk"]}


def row_noise(inputs: Inputs, oracle_out: torch.Tensor, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The per-row noise of every tensor the yardstick takes (module docstring: how the terms combine)."""
    t = rounding_terms(inputs, oracle_out, rows)
    noise = {"out": t["logit_out"]}
    if not inputs.case.grads:
        return noise
    for name in ("dq", "dk"):
        extra = t[f"logit_{name}"].pow(2)
        if f"dpv_{name}" in t:
            extra = extra + t[f"dpv_{name}"].pow(2) + t[f"ds_{name}"].pow(2)
        noise[name] = torch.maximum(t[f"d_{name}"], extra.sqrt())
    noise["dv"] = t["logit_dv"]
    for name in ("dk", "dv"):
        if f"head_{name}" in t:
            noise[name] = (noise[name].pow(2) + t[f"head_{name}"].pow(2)).sqrt()
    return noise

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

The logit term (out, dQ, dK, dV). A kernel holds the logits S_ij in fp32, so where |S| is large (a row
every key of which carries a finite mask fill such as fp16's -65504, or huge logits) each logit is rounded
at fp32's resolution at |S|, not at |S - LSE|: relative errors in P of RMS sqrt(2/12)·ulp32(|S_ij|) (the
logit and its exp2-domain product). The forward normalises by the row sum, so its error is centred on O:
    out_i : Σ_j P_ij² σ_f² |v_j - O_i|²   (0 on a row that sees one key: O = v_j)
The backward recomputes P = exp(S - LSE) from the saved LSE, and an exp2-domain kernel rescales S and the LSE
by log2 e in fp32 with its own roundings (FlashAttention-2's exp2(S·c - LSE·c)), so nothing cancels, not even
on a row that sees one key: σ_b² = (2/12)(ulp32(|S_ij|)² + ulp32(|LSE_i|)²), rows independent,
    dV_j : Σ_i P_ij² σ_b² |dO_i|²      dQ_i : scale² Σ_j P_ij² σ_b² g_ij² |k_j|²      dK_j : the same over i, |q_i|²
with g_ij = dP_ij - D_i. σ_f and σ_b are capped at 2^-8, so that a row which loses its logits entirely
(finfo.min fills: fl(M + log n) = M) stays judged. On ordinary logits it stays under the scale's other terms
(edge, smoke and the calibration on the CPU: no scale changed); a textbook fp32 FlashAttention-2 needs it on
the -65504 rows (docs/benchmarks-calibration.md, "Near-threshold families"). dQ and dK take the larger of
the two terms.

The group-sum term (dK, dV; GQA only). A kernel that takes K/V per query head (FlashAttention-2's GQA
backward, `dk_expanded` in the dtype; every path that expands K/V by hand) rounds each head's dK_h and dV_h to
the dtype and then sums the group. Where the heads' dK cancel (negative LSE) those roundings are the whole
error, and the flash-per-head-dkdv design's envelope holds one realisation of them. Per key row, in quadrature:
    head_dk_j : sqrt(Σ_h Σ_c ulp(dK_hjc)² / 12)      head_dv_j : the same over dV_h
(0 for G = 1, whose one rounding is the dtype floor). It needs every row's dS for a key, so it runs over key
blocks after the row loop, with P recomputed from the log-sum-exp (docs/benchmarks-calibration.md, "The
group-sum term").
"""

from __future__ import annotations

import functools

import torch

from .inputs import Inputs
from .oracle import causal_keep_at, softmax_scale

CHUNK_BYTES = 64 * 2**20
LOGIT_CAP = 2.0**-8  # the logit term's relative P error at most fp32's resolution at |S| = 2^16
_ROUNDINGS = 2 / 12  # two roundings, each of variance ulp²/12
_EXPONENT = 0x7FF0000000000000  # an fp64's exponent bits: 2^floor(log2 |x|)


SIGNIFICAND_BITS = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}


def ulp(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ulp of x in `dtype` (x >= 0, fp64, finite), 0 where x is 0: 2^floor(log2 x) · 2^(1 - bits), from the
    exponent bits; fp16's subnormal spacing 2^-24 below 2^-14."""
    u = (x.view(torch.int64) & _EXPONENT).view(torch.float64).mul_(2.0 ** (1 - SIGNIFICAND_BITS[dtype]))
    return torch.where(x > 0, u.clamp_min(2.0**-24), u) if dtype == torch.float16 else u


def _stacked(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """(B, Hkv, G, Lq, X) rows r0:r1 -> (B, Hkv, G·n, X): the group's rows as one GEMM per kv head."""
    b, h, g = t.shape[:3]
    return t[:, :, :, r0:r1].reshape(b, h, g * (r1 - r0), -1)


def _by_key(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ over the group and the rows of x (B, Hkv, G, n, Lk) weighted by w (B, Hkv, G, n): one GEMM, no copy."""
    b, h, g, n, lk = x.shape
    return torch.matmul(w.reshape(b, h, 1, g * n), x.reshape(b, h, g * n, lk))[..., 0, :]


def row_terms(inputs: Inputs, oracle_out: torch.Tensor, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Each term apart, per row, in the tensors' units: "logit_out" (B, Hq, Lq), and for a case with gradients
    "d_dq", "logit_dq" (B, Hq, Lq), "d_dk", "logit_dk", "logit_dv", "head_dk", "head_dv" (B, Hkv, Lk).
    `rows`: the query rows `oracle_out` holds (a long case's); out and dQ are then those rows', and dK/dV exact
    as long as grad_out is zero on every other row (their weight is zero)."""
    case = inputs.case
    b, hq, hkv, lk, g = case.batch, case.q_heads, case.kv_heads, case.kv_len, case.group_size
    grads = case.grads
    positions = torch.arange(case.q_len) if rows is None else rows
    lq = len(positions)
    scale = softmax_scale(case)

    def rows_of(t: torch.Tensor) -> torch.Tensor:
        return (t if rows is None else t.index_select(2, rows)).double().view(b, hkv, g, lq, t.shape[-1])

    q = rows_of(inputs.q)
    # (B, Hkv, Lk, D): the group's rows are stacked into one GEMM per kv head; a K broadcast over the
    # group made matmul copy K once per query head and chunk (65 % of this function's time at 8k keys)
    k, v = inputs.k.double(), inputs.v.double()
    o_raw = oracle_out.double().view(b, hkv, g, lq, -1)
    o = torch.nan_to_num(o_raw, nan=0.0, posinf=0.0, neginf=0.0)
    v2 = v.pow(2).sum(-1)[:, :, None, None, :]  # (B, Hkv, 1, 1, Lk)
    if grads:
        do = rows_of(inputs.grad_out)
        o_rounding = o_raw.to(inputs.q.dtype).double() - o_raw  # what storing O in the dtype does to it
        weight = torch.nan_to_num((do * o_rounding).norm(dim=-1), nan=0.0, posinf=0.0)
        qnorm2 = q.pow(2).sum(-1)
        k2 = k.pow(2).sum(-1, keepdim=True)  # (B, Hkv, Lk, 1)
        do2 = do.pow(2).sum(-1)
        delta = (do * o).sum(-1, keepdim=True)
    logits = functools.partial(_logits, inputs, q, k, positions, rows)
    f64 = {"dtype": torch.float64}
    out2 = torch.zeros(b, hkv, g, lq, **f64)
    if grads:
        d_dq, logit_dq2 = torch.zeros(b, hkv, g, lq, **f64), torch.zeros(b, hkv, g, lq, **f64)
        d_dk2, logit_dk2, logit_dv2 = (torch.zeros(b, hkv, lk, **f64) for _ in range(3))
        lse_rows = torch.empty(b, hkv, g, lq, **f64)
    # about six (rows x Lk) fp64 temporaries live at once: a block is a sixth of CHUNK_BYTES
    step = max(1, min(lq, CHUNK_BYTES // (48 * b * hq * lk)))
    for r0 in range(0, lq, step):
        r1 = min(lq, r0 + step)
        n = r1 - r0
        stacked = functools.partial(_stacked, r0=r0, r1=r1)

        s = logits(slice(r0, r1), slice(0, lk))
        p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)  # rows that see no key are zero
        p2 = p * p
        # the logit term; masked keys (|S| = inf) carry P = 0
        var_s = ulp(torch.where(p > 0, s.abs(), 0.0)).square_().mul_(_ROUNDINGS)
        vo2 = torch.matmul(stacked(o), v.transpose(-1, -2)).mul_(-2).view(b, hkv, g, n, lk)
        vo2.add_(v2).add_(o[:, :, :, r0:r1].pow(2).sum(-1, keepdim=True)).clamp_min_(0)  # |v_j - O_i|²
        out2[..., r0:r1] = (var_s.clamp_max(LOGIT_CAP**2).mul_(p2).mul_(vo2)).sum(-1)
        del vo2
        if not grads:
            continue
        dw = weight[..., r0:r1]
        pk = torch.matmul(p.reshape(b, hkv, g * n, lk), k).view(b, hkv, g, n, -1).norm(dim=-1)  # |k̄_i|
        d_dq[..., r0:r1] = scale * dw * pk
        d_dk2 += scale**2 * _by_key(p2, dw.square() * qnorm2[..., r0:r1])
        lse = torch.logsumexp(s, -1, keepdim=True)
        del s
        var_l = ulp(torch.nan_to_num(lse.abs(), posinf=0.0)).square_().mul_(_ROUNDINGS)
        wb = var_s.add_(var_l).clamp_max_(LOGIT_CAP**2).mul_(p2)  # P² var(r_ij)
        logit_dv2 += _by_key(wb, do2[..., r0:r1])
        gap = torch.matmul(stacked(do), v.transpose(-1, -2)).view(b, hkv, g, n, lk).sub_(delta[..., r0:r1, :])
        wl = wb.mul_(gap.square_())
        logit_dq2[..., r0:r1] = scale**2 * torch.matmul(wl.reshape(b, hkv, g * n, lk), k2).view(b, hkv, g, n)
        logit_dk2 += scale**2 * _by_key(wl, qnorm2[..., r0:r1])
        lse_rows[..., r0:r1] = lse[..., 0]
    terms = {"logit_out": out2.sqrt().view(b, hq, lq)}
    if grads:
        terms |= {"d_dq": d_dq.view(b, hq, lq), "logit_dq": logit_dq2.sqrt().view(b, hq, lq),
                  "d_dk": d_dk2.sqrt(), "logit_dk": logit_dk2.sqrt(), "logit_dv": logit_dv2.sqrt()}
        terms |= _group_sum_terms(inputs, logits, positions, q, v, do, delta[..., 0], lse_rows)
    return terms


def _logits(inputs: Inputs, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None,
            rs: slice, ks: slice) -> torch.Tensor:
    """fp64 logits (B, Hkv, G, n, m) of query rows `rs` (of q, (B, Hkv, G, Lq, D)) and keys `ks`, masked ones -inf
    (a bool mask's False and causal) or with the additive mask added."""
    case = inputs.case
    b, hkv, g = q.shape[:3]
    s = torch.matmul(_stacked(q, rs.start, rs.stop), k[:, :, ks].transpose(-1, -2)).mul_(softmax_scale(case))
    s = s.view(b, hkv, g, rs.stop - rs.start, -1)
    mask = inputs.mask
    if mask is not None:
        mask = mask[..., ks]
        if mask.shape[2] != 1:
            mask = mask[:, :, rs] if rows is None else mask.index_select(2, rows[rs])
        per_head = mask.shape[1] != 1
        mask = mask.reshape(mask.shape[0], hkv if per_head else 1, g if per_head else 1, mask.shape[2], -1)
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s.add_(mask.double())
    keep = causal_keep_at(case, positions[rs])
    if keep is not None:
        s = s.masked_fill(~keep[:, ks], float("-inf"))
    return s


def _group_sum_terms(inputs: Inputs, logits, positions: torch.Tensor, q: torch.Tensor, v: torch.Tensor,
                     do: torch.Tensor, delta: torch.Tensor, lse: torch.Tensor) -> dict[str, torch.Tensor]:
    """"head_dk", "head_dv" (B, Hkv, Lk): the rounding of each query head's dK and dV to the dtype before the group
    sum (the module's docstring). Over key blocks, each head's dK/dV block summed over every row chunk in fp64."""
    case = inputs.case
    b, hkv, g, lq = q.shape[:4]
    lk, d, dv = case.kv_len, case.head_dim, case.value_dim
    f64 = {"dtype": torch.float64}
    head_dk2, head_dv2 = torch.zeros(b, hkv, lk, **f64), torch.zeros(b, hkv, lk, **f64)
    if g == 1:
        return {"head_dk": head_dk2, "head_dv": head_dv2}
    dtype, scale = inputs.q.dtype, softmax_scale(case)
    # a key block's accumulators take half of CHUNK_BYTES, a (rows x keys) block's temporaries (about four) the rest
    kstep = max(1, min(lk, CHUNK_BYTES // (16 * b * hkv * g * (d + dv))))
    rstep = max(1, min(lq, CHUNK_BYTES // (64 * b * hkv * g * kstep)))
    offset = 0 if case.causal != "bottom-right" else lk - case.q_len
    dead = torch.isneginf(lse)[..., None]  # rows that see no key: P = 0
    lse = lse.masked_fill(dead[..., 0], 0.0)[..., None]
    for k0 in range(0, lk, kstep):
        ks = slice(k0, min(lk, k0 + kstep))
        dk_h = torch.zeros(b, hkv, g, ks.stop - k0, d, **f64)
        dv_h = torch.zeros(b, hkv, g, ks.stop - k0, dv, **f64)
        # causal: the rows before the first that sees key k0 see none of the block
        first = 0 if case.causal == "none" else int(torch.searchsorted(positions, k0 - offset))
        for r0 in range(first, lq, rstep):
            rs = slice(r0, min(lq, r0 + rstep))
            p = logits(rs, ks).sub_(lse[..., rs, :]).exp_().masked_fill_(dead[..., rs, :], 0.0)
            n = rs.stop - r0
            dp = torch.matmul(_stacked(do, r0, rs.stop), v[:, :, ks].transpose(-1, -2)).view(b, hkv, g, n, -1)
            ds = dp.sub_(delta[..., rs, None]).mul_(p)
            dk_h += torch.matmul(ds.transpose(-1, -2), q[..., rs, :]).mul_(scale)
            dv_h += torch.matmul(p.transpose(-1, -2), do[..., rs, :])
        head_dk2[..., ks] = ulp(dk_h.abs_(), dtype).square_().sum(-1).sum(2).div_(12)
        head_dv2[..., ks] = ulp(dv_h.abs_(), dtype).square_().sum(-1).sum(2).div_(12)
    return {"head_dk": head_dk2.sqrt_(), "head_dv": head_dv2.sqrt_()}


def row_noise(inputs: Inputs, oracle_out: torch.Tensor, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The per-row noise of every tensor the yardstick takes (`row_terms`: shapes and `rows`)."""
    return combined(row_terms(inputs, oracle_out, rows))


def combined(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`row_terms` as the yardstick takes them: out the logit term; dQ the larger of the D-term and the logit
    term; dK that, and dV the logit term, each with the group-sum term in quadrature."""
    noise = {"out": t["logit_out"]}
    if "d_dq" in t:
        dk = torch.maximum(t["d_dk"], t["logit_dk"])
        noise |= {"dq": torch.maximum(t["d_dq"], t["logit_dq"]), "dk": torch.hypot(dk, t["head_dk"]),
                  "dv": torch.hypot(t["logit_dv"], t["head_dv"])}
    return noise

"""Plain reference kernels as user implementations, for the near-threshold question
(docs/benchmarks-calibration.md, "Near-threshold families: -65504 rows and negative LSE").

Each has F.scaled_dot_product_attention's signature (`--impl harness.lab.refkernels:flash_b64`) and
works in fp32 on fp16/bf16 inputs, the way a textbook-correct kernel does:

* `math_fp32`: whole fp32 logits, the additive mask converted to fp32 and added to them, softmax,
  fp32 autograd; results cast to the dtype once.
* `flash_b64`, `flash_b128`: a FlashAttention-2 design. Forward: online softmax over blocks of 64 / 128
  keys, S = (Q K^T) * scale in fp32, the mask added in fp32, running max with rescaling of l and the
  fp32 accumulator, P~ rounded to the dtype before P~V (tensor cores), O stored in the dtype, the
  log-sum-exp saved in fp32. Backward: D = rowsum(dO * O) in fp32 from O as stored, P recomputed
  as exp(S - LSE) in fp32, P and dS rounded to the dtype before their GEMMs, fp32 accumulation of
  dQ, dK, dV (the group sum of dK/dV too), each cast to the dtype once.
* `flash_b64_log2`: the same in the exp2 domain (logits times log2(e) in fp32, exp2, the LSE saved in log2
  units), as the CUDA kernels (FlashAttention-2, memory-efficient) compute it.
* `flash_b64_fp32p`: the same without rounding P and dS (a pure fp32 inner loop).
* `flash_b64_lse64`: diagnostic, not a design: the saved LSE held in fp64, to isolate what the fp32 LSE costs.
* `flash_b64_normp`: diagnostic: the backward's P normalised by its own row sum (P / sum P) instead of
  exp(S - LSE): what a kernel that stores (m, l) and recomputes P~ / l would get.
* `flash_b64_lse_dtype`: wrong on purpose: the LSE saved in the input dtype (fp16/bf16).

Dead rows (every key -inf) are zero with zero gradient, as torch defines them.
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def _scale(scale, d):
    return scale if scale is not None else 1.0 / math.sqrt(d)


LOG2E = math.log2(math.e)


def _logits(qf, kb, scale, mask_b, causal_b, log2=False):
    """fp32 logits of one key block: (Q K^T) * scale, then the mask added (or filled) in fp32;
    `log2`: then times log2(e), rounded to fp32 (the exp2 domain of the CUDA kernels)."""
    s = torch.matmul(qf, kb.transpose(-1, -2)) * scale
    if mask_b is not None:
        s = s.masked_fill(~mask_b, NEG_INF) if mask_b.dtype == torch.bool else s + mask_b.float()
    if causal_b is not None:
        s = s.masked_fill(~causal_b, NEG_INF)
    return s * LOG2E if log2 else s


def _round_bits(x, bits):
    """x (fp32) rounded to nearest with `bits` significant bits; inf stays inf."""
    m, e = torch.frexp(x.double())
    r = torch.ldexp(torch.round(torch.ldexp(m, torch.full_like(e, bits))), e - bits).float()
    return torch.where(torch.isfinite(x), r, x)


def _has(round_p, what: str) -> bool:
    """round_p: True (P~ before PV "f", P before dV "v", dS before its GEMMs "s"), False, or a string of those."""
    return (round_p is True and what != "o") or (isinstance(round_p, str) and what in round_p)


def _round(t, dtype, when):
    return t.to(dtype).float() if when else t


class _Flash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale, block, round_p, lse_mode, log2=False):
        dtype = q.dtype
        b, hq, lq, _ = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        g = hq // hkv
        qf = q.float()
        kf = k.float().repeat_interleave(g, 1)
        vf = v.float().repeat_interleave(g, 1)
        maskx = mask.expand(b, hq, lq, lk) if mask is not None else None
        keep = torch.ones(lq, lk, dtype=torch.bool).tril() if causal else None
        m = torch.full((b, hq, lq, 1), NEG_INF)
        l = torch.zeros(b, hq, lq, 1)
        acc = torch.zeros(b, hq, lq, v.shape[-1])
        for c0 in range(0, lk, block):
            c1 = min(lk, c0 + block)
            s = _logits(qf, kf[:, :, c0:c1], scale, None if maskx is None else maskx[..., c0:c1],
                        None if keep is None else keep[:, c0:c1], log2)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            m_safe = m_new.masked_fill(torch.isneginf(m_new), 0.0)
            ex = torch.exp2 if log2 else torch.exp
            p = ex(s - m_safe)
            alpha = ex(m - m_safe)  # 0 where m was -inf
            l = alpha * l + p.sum(-1, keepdim=True)
            acc = alpha * acc + torch.matmul(_round(p, dtype, _has(round_p, "f")), vf[:, :, c0:c1])
            m = m_new
        dead = l == 0
        out = (acc / l.masked_fill(dead, 1.0)).masked_fill(dead, 0.0)
        # fp32: P = exp(S - inf) = 0 on dead rows; log2: kept in log2 units (m2 + log2 l), as exp2 wants it
        lse = (m + (torch.log2(l) if log2 else torch.log(l))).masked_fill(dead, float("inf"))
        if lse_mode == "fp64":
            lse = (m.double() + torch.log(l.double())).masked_fill(dead, float("inf"))
        elif lse_mode == "dtype":
            lse = lse.to(dtype).float()
        elif lse_mode.startswith("bits:"):  # wrong on purpose: the LSE kept to `bits` significant bits (fp32: 24)
            lse = _round_bits(lse, int(lse_mode[5:]))
        o = out.to(dtype)
        ctx.save_for_backward(q, k, v, o, lse, out)  # out: the fp32 O, for the d_from="fp32" diagnostic
        ctx.mask, ctx.causal, ctx.scale, ctx.block, ctx.round_p, ctx.lse_mode = mask, causal, scale, block, round_p, lse_mode
        ctx.log2 = log2
        return o

    @staticmethod
    def backward(ctx, dout):
        q, k, v, o, lse, o32 = ctx.saved_tensors
        dtype = q.dtype
        b, hq, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        g = hq // hkv
        scale, block, round_p = ctx.scale, ctx.block, ctx.round_p
        qf, dof = q.float(), dout.float()
        kf = k.float().repeat_interleave(g, 1)
        vf = v.float().repeat_interleave(g, 1)
        maskx = ctx.mask.expand(b, hq, lq, lk) if ctx.mask is not None else None
        keep = torch.ones(lq, lk, dtype=torch.bool).tril() if ctx.causal else None
        # D = rowsum(dO * O as stored), fp32 (round_p containing "o": from the fp32 O instead, a diagnostic)
        delta = (dof * (o32 if _has(round_p, "o") else o.float())).sum(-1, keepdim=True)
        dq = torch.zeros(b, hq, lq, d)
        dk = torch.zeros(b, hkv, lk, d)
        dv = torch.zeros(b, hkv, lk, v.shape[-1])
        rowsum = None
        if ctx.lse_mode == "normp":  # P / sum(P): the row sum of exp(S - LSE) over every key first
            rowsum = torch.zeros(b, hq, lq, 1)
            for c0 in range(0, lk, block):
                c1 = min(lk, c0 + block)
                s = _logits(qf, kf[:, :, c0:c1], scale, None if maskx is None else maskx[..., c0:c1],
                            None if keep is None else keep[:, c0:c1])
                rowsum += torch.exp(s - lse).sum(-1, keepdim=True)
            rowsum = rowsum.masked_fill(rowsum == 0, 1.0)
        for c0 in range(0, lk, block):
            c1 = min(lk, c0 + block)
            s = _logits(qf, kf[:, :, c0:c1], scale, None if maskx is None else maskx[..., c0:c1],
                        None if keep is None else keep[:, c0:c1], ctx.log2)
            if ctx.lse_mode == "fp64":
                p = torch.exp(s.double() - lse).float()
            else:
                p = torch.exp2(s - lse) if ctx.log2 else torch.exp(s - lse)
            if rowsum is not None:
                p = p / rowsum
            dp = torch.matmul(dof, vf[:, :, c0:c1].transpose(-1, -2))
            ds = p * (dp - delta)
            p_r, ds_r = _round(p, dtype, _has(round_p, "v")), _round(ds, dtype, _has(round_p, "s"))
            if isinstance(round_p, str) and "S" in round_p:  # wrong on purpose: dS kept to fewer significant bits
                ds_r = _round_bits(ds, int(round_p.split("S")[1]))
            dq += torch.matmul(ds_r, kf[:, :, c0:c1]) * scale
            # (B, Hq, n, D) -> group sum in fp32 per kv head
            dk[:, :, c0:c1] += (torch.matmul(ds_r.transpose(-1, -2), qf) * scale).view(b, hkv, g, c1 - c0, d).sum(2)
            dv[:, :, c0:c1] += torch.matmul(p_r.transpose(-1, -2), dof).view(b, hkv, g, c1 - c0, -1).sum(2)
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), None, None, None, None, None, None, None


def _flash(query, key, value, attn_mask, is_causal, scale, block, round_p=True, lse_mode="fp32", log2=False):
    return _Flash.apply(query, key, value, attn_mask, bool(is_causal), _scale(scale, query.shape[-1]), block,
                        round_p, lse_mode, log2)


def flash_b64(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _flash(query, key, value, attn_mask, is_causal, scale, 64)


def flash_b128(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _flash(query, key, value, attn_mask, is_causal, scale, 128)


def flash_b64_fp32p(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _flash(query, key, value, attn_mask, is_causal, scale, 64, round_p=False)


def flash_b64_lse64(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _flash(query, key, value, attn_mask, is_causal, scale, 64, lse_mode="fp64")


def flash_b64_normp(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _flash(query, key, value, attn_mask, is_causal, scale, 64, lse_mode="normp")


def flash_b64_lse_dtype(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False):
    return _flash(query, key, value, attn_mask, is_causal, scale, 64, lse_mode="dtype")


def flash_b64_log2(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _flash(query, key, value, attn_mask, is_causal, scale, 64, log2=True)


def variant(round_p, block=64, lse_mode="fp32", log2=False):
    """A diagnostic variant (round_p: a string of f, v, s, o; see _has)."""
    def fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return _flash(query, key, value, attn_mask, is_causal, scale, block, round_p, lse_mode, log2)
    fn.__name__ = f"flash_{round_p or 'none'}"
    return fn


def lse_bits(bits: int):
    """Wrong on purpose for bits < 24 (a dial): the textbook flash with its saved LSE kept to `bits` bits."""
    def fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return _flash(query, key, value, attn_mask, is_causal, scale, 64, lse_mode=f"bits:{bits}")
    fn.__name__ = f"flash_b64_lse{bits}bits"
    return fn


def ds_bits(bits: int):
    """Wrong on purpose below the dtype's bits (fp16 11, bf16 8): the textbook flash with dS rounded to `bits`."""
    fn = variant(f"fvS{bits}")
    fn.__name__ = f"flash_b64_ds{bits}bits"
    return fn


def math_fp32(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Whole fp32 logits, mask added in fp32, fp32 autograd; dK/dV summed over the group in fp32."""
    g = query.shape[1] // key.shape[1]
    q = query.float()
    k = key.float().repeat_interleave(g, 1)  # autograd sums the group's gradients in fp32 (k is fp32 here)
    v = value.float().repeat_interleave(g, 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * _scale(scale, query.shape[-1])
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, NEG_INF) if attn_mask.dtype == torch.bool else s + attn_mask.float()
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool).tril(), NEG_INF)
    dead = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    return torch.matmul(p, v).to(query.dtype)

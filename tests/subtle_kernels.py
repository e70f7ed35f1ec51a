"""Subtle wrong kernels: each loses a little precision in one place, the way real vendor kernels differ.

Each has F.scaled_dot_product_attention's signature (`--impl tests.subtle_kernels:NAME`). The
single-case verdict (factor x scale) passes them on the differential families (cases/families.toml);
a differential rule (harness/core/differential.py) flags each. `attention(...)` is a correct
fp32-accumulating kernel (forward and an explicit backward) with one knob per bug, so a test can
dial a loss; `dialled` is the kernel whose loss is dialled for the detection threshold.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Bugs:
    group_sum_in_dtype: bool = False  # dK/dV per head rounded, then summed sequentially in the input dtype
    group_sum_min_group: int = 2  # ... only for group sizes >= this
    pv_block: int = 0  # P and the output accumulator rounded to the dtype after every `pv_block` keys
    pv_min_kv_len: int = 0  # ... only when Lk > this
    dq_block: int = 0  # the dQ accumulator rounded to the dtype after every `dq_block` keys
    gqa_scale_ulps: float = 0  # GQA path only: every second head's scale off by this many ulps of the dtype
    sum_bits: int = 0  # dialled loss: the dK/dV group sum (G > 1) kept to this many mantissa bits after each add
    pv_bits: int = 0  # dialled loss: the output accumulated per 32-key block, kept to this many mantissa bits


def _mask(q, k, attn_mask, is_causal):
    lq, lk = q.shape[-2], k.shape[-2]
    bias = torch.zeros(lq, lk, dtype=torch.float32, device=q.device)
    if is_causal:
        bias = bias.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if attn_mask is not None:
        bias = (bias + attn_mask.float()) if attn_mask.dtype != torch.bool else bias.masked_fill(~attn_mask, float("-inf"))
    return bias


def _scales(hq: int, group: int, scale: float, dtype: torch.dtype, bugs: Bugs) -> torch.Tensor:
    s = torch.full((hq, 1, 1), scale, dtype=torch.float32)
    if bugs.gqa_scale_ulps and group > 1:
        s[1::2] = scale * (1 + bugs.gqa_scale_ulps * torch.finfo(dtype).eps)  # heads 1, 3, ...
    return s


def round_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x rounded to `bits` mantissa bits (bf16 keeps 8 with the implicit bit, fp16 11)."""
    m, e = torch.frexp(x)
    return torch.ldexp(torch.round(m * 2.0 ** bits) / 2.0 ** bits, e)


def _blocked(a: torch.Tensor, b: torch.Tensor, block: int, dtype: torch.dtype, round_a: bool) -> torch.Tensor:
    """a @ b over the shared (key) axis in blocks, the accumulator rounded to `dtype` after each block."""
    acc = torch.zeros(*a.shape[:-1], b.shape[-1], dtype=dtype)
    for j in range(0, b.shape[-2], block):
        blk = a[..., j:j + block]
        blk = blk.to(dtype).float() if round_a else blk
        acc = (acc.float() + blk @ b[..., j:j + block, :]).to(dtype)
    return acc.float()


def _group_sum(x: torch.Tensor, kv_heads: int, dtype: torch.dtype, bugs: Bugs) -> torch.Tensor:
    """Per query head -> per kv head (repeat_interleave order)."""
    b, hq = x.shape[:2]
    g = hq // kv_heads
    per = x.reshape(b, kv_heads, g, *x.shape[2:])
    if bugs.sum_bits and g > 1:
        acc = per[:, :, 0]
        for i in range(1, g):
            acc = round_bits(acc + per[:, :, i], bugs.sum_bits)
        return acc.to(dtype)
    if not bugs.group_sum_in_dtype or g < bugs.group_sum_min_group:
        return per.sum(2).to(dtype)
    acc = per[:, :, 0].to(dtype)
    for i in range(1, g):
        acc = (acc.float() + per[:, :, i].to(dtype).float()).to(dtype)
    return acc


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, scale, bugs):
        group = q.shape[1] // k.shape[1]
        kf, vf = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
        s = _scales(q.shape[1], group, scale, q.dtype, bugs)
        p = torch.softmax(q.float() @ kf.transpose(-1, -2) * s + bias, dim=-1)
        long = bugs.pv_block and v.shape[-2] > bugs.pv_min_kv_len
        out = _blocked(p, vf, bugs.pv_block, q.dtype, True) if long else p @ vf
        if bugs.pv_bits:
            out = torch.zeros_like(out)
            for j in range(0, v.shape[-2], 32):
                out = round_bits(out + p[..., j:j + 32] @ vf[..., j:j + 32, :], bugs.pv_bits)
        ctx.save_for_backward(q, k, v, p, out)
        ctx.bugs, ctx.s = bugs, s
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, p, out = ctx.saved_tensors
        bugs, s = ctx.bugs, ctx.s
        group = q.shape[1] // k.shape[1]
        kf, vf, do = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1), grad_out.float()
        dv = p.transpose(-1, -2) @ do
        dp = do @ vf.transpose(-1, -2)
        ds = p * (dp - (do * out).sum(-1, keepdim=True))
        dq = (_blocked(ds, kf, bugs.dq_block, q.dtype, False) if bugs.dq_block else ds @ kf) * s
        dk = (ds.transpose(-1, -2) @ q.float()) * s
        kv = k.shape[1]
        return (dq.to(q.dtype), _group_sum(dk, kv, k.dtype, bugs), _group_sum(dv, kv, v.dtype, bugs), None, None, None)


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
              bugs: Bugs = Bugs()):
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return _Attention.apply(query, key, value, _mask(query, key, attn_mask, is_causal), scale, bugs)


def _kernel(bugs: Bugs, doc: str):
    fn = functools.partial(attention, bugs=bugs)

    def kernel(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    kernel.__doc__ = doc
    return kernel


correct = _kernel(Bugs(), "Correct: fp32 accumulation everywhere, dK/dV group sum in fp32.")
group_sum_in_dtype = _kernel(Bugs(group_sum_in_dtype=True),
                             "dK/dV: per-head values summed sequentially in the dtype (bf16/fp16), not fp32.")
group_sum_in_dtype_g4 = _kernel(Bugs(group_sum_in_dtype=True, group_sum_min_group=4),
                                "dK/dV: summed in the dtype only for group sizes >= 4 (a second code path).")
pv_blocks_in_dtype = _kernel(Bugs(pv_block=32), "out: P and the accumulator rounded to the dtype every 32 keys.")
out_in_dtype_long = _kernel(Bugs(pv_block=64, pv_min_kv_len=256),
                            "out: accumulated in the dtype per 64-key block only when Lk > 256 (a long path).")
dq_blocks_in_dtype = _kernel(Bugs(dq_block=64), "dQ: the accumulator rounded to the dtype every 64 keys.")
gqa_scale_ulp = _kernel(Bugs(gqa_scale_ulps=0.25),
                        "GQA path only: every second query head's softmax scale is a quarter ulp of the dtype too large.")

SUBTLE = ("group_sum_in_dtype", "group_sum_in_dtype_g4", "pv_blocks_in_dtype", "out_in_dtype_long",
          "dq_blocks_in_dtype", "gqa_scale_ulp")


def dialled(sum_bits: int = 0, pv_bits: int = 0):
    """A loss you dial: the dK/dV group sum and/or the output's per-block accumulation kept to so many bits."""
    return _kernel(Bugs(sum_bits=sum_bits, pv_bits=pv_bits), f"group sum {sum_bits} bits, out {pv_bits} bits")

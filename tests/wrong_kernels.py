"""The catalogue of deliberately wrong (and a few correct) kernels every verdict test draws on.

Each has F.scaled_dot_product_attention's exact signature, so it also works as a user
kernel (`--impl tests.wrong_kernels:tiled_kv_heads`). Wrong ones are gross or subtle;
the docstring says which tensor should fail and how.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def _math(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=enable_gqa)


def _group(query, key) -> int:
    return query.shape[1] // key.shape[1]


# --- correct -------------------------------------------------------------------------------


def math_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Correct: the math backend."""
    return _math(query, key, value, attn_mask, is_causal, scale, enable_gqa)


def _plain_fp32(query, key, value, attn_mask, is_causal, scale, zero_dead_rows: bool):
    g = _group(query, key)
    q, k, v = query.float(), key.float().repeat_interleave(g, 1), value.float().repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.float()
    if not zero_dead_rows:
        return (torch.softmax(s, -1) @ v).to(query.dtype)
    # all-masked rows are zero with zero gradient, as torch defines them; masking the row before the
    # softmax (not nan_to_num after it) keeps its NaN out of the backward too
    dead = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    return (p @ v).to(query.dtype)


def fp32_reference(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Correct: plain fp32 attention written out by hand, cast back to the input dtype."""
    return _plain_fp32(query, key, value, attn_mask, is_causal, scale, zero_dead_rows=True)


# --- gross ---------------------------------------------------------------------------------


def tiled_kv_heads(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Wrong: query head h reads kv head h % Hkv instead of h // group. Fails out (and grads) on the
    heads where the two mappings differ; heads 0 and the last one are right."""
    g = _group(query, key)
    return _math(query, key.repeat(1, g, 1, 1), value.repeat(1, g, 1, 1), attn_mask, is_causal, scale)


def ignores_scale(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Wrong: drops the caller's scale (uses 1/sqrt(d)). Fails only cases with a custom scale."""
    return _math(query, key, value, attn_mask, is_causal, None, enable_gqa)


def nan_on_masked_rows(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Wrong: softmax of an all -inf row is 0/0 = NaN (torch < 2.5 behaviour). Fails out with NaN."""
    return _plain_fp32(query, key, value, attn_mask, is_causal, scale, zero_dead_rows=False)


def wrong_output_dtype(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Wrong: returns fp32 for bf16/fp16 inputs (a contract break)."""
    return _math(query, key, value, attn_mask, is_causal, scale, enable_gqa).float()


def missing_value_gradient(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Wrong: the value path is cut from autograd, so no gradient reaches V (contract: dv missing)."""
    return _math(query, key, value.detach(), attn_mask, is_causal, scale, enable_gqa)


class _GroupExpand(torch.autograd.Function):
    """Expand kv heads for the group (forward); subclasses get the group's per-head grads wrong."""

    @staticmethod
    def forward(ctx, kv, group):
        ctx.group = group
        return kv.repeat_interleave(group, 1)


class _FirstHeadOnlyGrad(_GroupExpand):
    """Backward keeps only the group's first query head (no group sum)."""

    @staticmethod
    def backward(ctx, grad):
        b, hq, l, d = grad.shape
        return grad.view(b, hq // ctx.group, ctx.group, l, d)[:, :, 0].clone(), None


def no_group_sum(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Wrong: dK/dV take only the first query head of each group instead of the group sum.
    Forward and dQ are right; dK and dV fail for group size > 1."""
    g = _group(query, key)
    return _math(query, _FirstHeadOnlyGrad.apply(key, g), _FirstHeadOnlyGrad.apply(value, g), attn_mask, is_causal, scale)


class _LowPrecisionGroupSum(_GroupExpand):
    """Backward sums the group's per-head gradients one by one in the input dtype."""

    @staticmethod
    def backward(ctx, grad):
        b, hq, l, d = grad.shape
        per_head = grad.view(b, hq // ctx.group, ctx.group, l, d)
        acc = per_head[:, :, 0].clone()
        for i in range(1, ctx.group):
            acc = acc + per_head[:, :, i]  # each add rounds to bf16/fp16: the bug
        return acc, None


def bf16_group_sum(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Subtly wrong: dK/dV group sum accumulated in the dtype (a rounding per add). Error grows like
    sqrt(group size): dK/dV fail at the tensor level for large groups; out and dQ are right."""
    g = _group(query, key)
    return _math(query, _LowPrecisionGroupSum.apply(key, g), _LowPrecisionGroupSum.apply(value, g),
                 attn_mask, is_causal, scale)


def causal_off_by_one_when_lengths_differ(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                          scale=None, enable_gqa=False):
    """Subtly wrong: bottom-right causal sees one key too many, only when Lq != Lk (right when equal)."""
    lq, lk = query.shape[-2], key.shape[-2]
    if attn_mask is not None and attn_mask.dtype == torch.bool and lq != lk:
        rows = torch.arange(lq, device=query.device)[:, None]
        cols = torch.arange(lk, device=query.device)[None, :]
        attn_mask = attn_mask | (cols == rows + (lk - lq) + 1)
    return _math(query, key, value, attn_mask, is_causal, scale, enable_gqa)


def drops_last_key_when_kv_len_1_mod_32(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                        scale=None, enable_gqa=False):
    """Subtly wrong: a tail-tile bug. When kv_len = 1 (mod 32) and > 1 the last key is ignored."""
    lk = key.shape[-2]
    if lk % 32 == 1 and lk > 1:
        keep = torch.ones(lk, dtype=torch.bool, device=query.device)
        keep[-1] = False
        mask = keep.expand(query.shape[-2], lk)
        if attn_mask is not None:
            mask = attn_mask & mask if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~mask, float("-inf"))
        attn_mask = mask
    return _math(query, key, value, attn_mask, is_causal, scale, enable_gqa)


class _LeakIntoDq(torch.autograd.Function):
    """Identity forward; backward adds 1e-6·q to dQ: a term that does not go through grad_out."""

    @staticmethod
    def forward(ctx, query):
        ctx.save_for_backward(query)
        return query.clone()

    @staticmethod
    def backward(ctx, grad):
        (query,) = ctx.saved_tensors
        return grad + 1e-6 * query


def dq_written_where_grad_out_is_zero(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                      enable_gqa=False):
    """Wrong (long cases): dQ gets 1e-6·q on every row, also on rows whose grad_out is zero; rule
    unsampled-dq fails its dQ (gross), whatever the sampled rows score."""
    return _math(_LeakIntoDq.apply(query), key, value, attn_mask, is_causal, scale, enable_gqa)

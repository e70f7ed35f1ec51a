"""Kernels for the shrink and repro tests, importable by a generated repro script on its own
(`tests.repro_kernels:tiled_kv_heads`): each needs only torch, and has
F.scaled_dot_product_attention's exact signature."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def _math(query, key, value, attn_mask, is_causal, scale):
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


def correct(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Correct: kv heads interleaved (h // group) by hand, then the math backend."""
    g = query.shape[1] // key.shape[1]
    return _math(query, key.repeat_interleave(g, 1), value.repeat_interleave(g, 1), attn_mask, is_causal, scale)


def tiled_kv_heads(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Wrong (gross): query head h reads kv head h % Hkv instead of h // group. Needs Hkv >= 2 and a
    group of >= 2 to show: the smallest failing case has 2 kv heads of 2 query heads each."""
    g = query.shape[1] // key.shape[1]
    return _math(query, key.repeat(1, g, 1, 1), value.repeat(1, g, 1, 1), attn_mask, is_causal, scale)


def late_rows_scaled(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Wrong (subtle, forward only): query rows from 64 on come out 1% too large, as a tail-tile bug
    would. Fails `out` at the row level; needs q_len > 64."""
    out = correct(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    bump = torch.ones(out.shape[-2], 1, dtype=out.dtype, device=out.device)
    bump[64:] = 1.01
    return out * bump


class _GradTimes(torch.autograd.Function):
    """Identity forward; the backward hands back the gradient times `factor`."""

    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def dq_scaled(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Wrong (subtle, backward only): dQ comes out 3% too large; out, dK and dV are right."""
    return correct(_GradTimes.apply(query, 1.03), key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def dk_scaled(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Wrong (subtle, backward only): dK comes out 3% too large; out, dQ and dV are right."""
    return correct(query, _GradTimes.apply(key, 1.03), value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


_PLAN: dict[str, int] = {}


def reset_stale_plan() -> None:
    _PLAN.clear()


def stale_plan(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Wrong only after another call: the first call's kv length is cached as a 'plan' and reused, so a
    later call with more keys ignores the extra ones. Right alone in a fresh process (order-dependent)."""
    n = min(_PLAN.setdefault("kv_len", key.shape[-2]), key.shape[-2])
    mask = None if attn_mask is None else attn_mask[..., :n]
    return correct(query, key[..., :n, :], value[..., :n, :], mask, dropout_p, is_causal, scale, enable_gqa)

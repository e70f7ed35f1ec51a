"""Deliberately wrong kernels that are wrong only in a corner none of smoke/models/edge hits: what
`gqa-harness search` must find (tests/test_search.py), each with the Case predicate of its corner.

Each has F.scaled_dot_product_attention's signature (`--impl tests.search_kernels:wide_window_off_by_one`)
and is the math backend outside its corner. `CORNERS[name](case)` is True for every case whose
inputs can trigger the bug (a superset where the trigger depends on the drawn values); the tests
check that no case of smoke, models or edge (also under --max-tokens 128/256) is in any corner,
and that each search shrinks to a case in its kernel's corner.
"""

from __future__ import annotations

from typing import Callable

import torch

from harness.core.case import Case
from tests.wrong_kernels import _group, _GroupExpand, _math

WIDE_WINDOW = 32  # keys: the suites' widest sliding window (edge, kv_len 128); the generated space reaches 128
SMALL_SCALE = 0.06  # models use 1/12 = 0.083; the generated space draws 0.05
SHARED_MASK_KEYS = 64  # a 1x1xLqxLk bool mask on a batch of one leaves keys from here on unmasked
LARGE_RAW_LOGIT = 2048.0  # |q.k| before the scale where fp16 spacing reaches 2
LARGE_GROUP = 6  # the suites' per-head masks come with groups of 4


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, int(n**0.5) + 1))


def _masked(query, key, attn_mask, is_causal, drop: torch.Tensor):
    """attn_mask as the kernel gets it, top-left causal folded in, with the positions `drop` masked too."""
    if is_causal:
        attn_mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
    if attn_mask is None:
        return ~drop
    if attn_mask.dtype == torch.bool:
        return attn_mask & ~drop
    return attn_mask.masked_fill(drop, float("-inf"))


def _drop_last_key(query, key, value, attn_mask, is_causal, scale, enable_gqa):
    drop = torch.zeros(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device)
    drop[:, -1] = True
    return _math(query, key, value, _masked(query, key, attn_mask, is_causal, drop), False, scale, enable_gqa)


# --- the catalogue ---------------------------------------------------------------------------


def _band(mask: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(first kept key per row, widest row) when every row keeps one run of keys that moves along the rows
    like a sliding window's (not a block-diagonal, padding or causal pattern); else None."""
    rows = mask.reshape(-1, mask.shape[-2], mask.shape[-1])
    count = rows.sum(-1)
    first = rows.int().argmax(-1)
    last = mask.shape[-1] - 1 - rows.flip(-1).int().argmax(-1)
    contiguous = bool(((count == 0) | (count == last - first + 1)).all())
    moving = first[0].unique().numel() > 4
    return (first, int(count.max())) if contiguous and moving else None


def wide_window_off_by_one(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                           enable_gqa=False):
    """Wrong only for a sliding-window bool mask wider than 32 keys (the suites' widest): each row's oldest
    key is dropped (a window one key short). Fails out and the gradients, at the row level at least."""
    band = _band(attn_mask) if isinstance(attn_mask, torch.Tensor) and attn_mask.dtype == torch.bool else None
    if band is None or band[1] <= WIDE_WINDOW:
        return _math(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    first, _ = band
    drop = torch.nn.functional.one_hot(first, key.shape[-2]).bool().reshape(attn_mask.shape)
    return _math(query, key, value, attn_mask & ~drop, False, scale, enable_gqa)


def small_scale_clamped(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False):
    """Wrong only for an explicit scale below 0.06: it is clamped to 1/16. Fails out and the gradients."""
    if scale is not None and scale < SMALL_SCALE:
        scale = 1 / 16
    return _math(query, key, value, attn_mask, is_causal, scale, enable_gqa)


def shared_mask_tail_unmasked(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False):
    """Wrong only for a bool mask of shape 1x1xLqxLk (broadcast over batch and heads) on a batch of one with
    more than 64 keys: keys from index 64 on are never masked. Fails where such keys were masked. (The
    suites' 1x1 masks, bottom-right causal ones, all come with a batch of two or more.)"""
    shared = (isinstance(attn_mask, torch.Tensor) and attn_mask.dtype == torch.bool and attn_mask.dim() == 4
              and attn_mask.shape[:2] == (1, 1) and query.shape[0] == 1 and key.shape[-2] > SHARED_MASK_KEYS)
    if shared:
        attn_mask = attn_mask.clone()
        attn_mask[..., SHARED_MASK_KEYS:] = True
    return _math(query, key, value, attn_mask, is_causal, scale, enable_gqa)


def _heads_inner(t: torch.Tensor) -> bool:
    """The heads are not the outer dim: a BLHD view (several heads) or kv heads expanded with stride 0.
    Strides, not is_contiguous(): run's guard bands make every input non-contiguous (padded rows)."""
    return t.stride(1) < t.stride(2)


def noncontig_v_tail_dropped(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                             enable_gqa=False):
    """Wrong only when V's heads are inner (BLHD, or expanded kv heads) and kv_len = 1 (mod 64), kv_len > 1:
    the last key (a tail tile of one) is skipped. Fails out and the gradients on the rows that see that key."""
    lk = key.shape[-2]
    if _heads_inner(value) and lk % 64 == 1 and lk > 1:
        return _drop_last_key(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    return _math(query, key, value, attn_mask, is_causal, scale, enable_gqa)


def decode_prime_kv_drops_last_key(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                   enable_gqa=False):
    """Wrong only for one query (decode) over a prime number of keys below 256: the last key is dropped
    (a split-KV path that only divides evenly). smoke's decode over 257 keys stays right."""
    lk = key.shape[-2]
    if query.shape[-2] == 1 and _is_prime(lk) and lk < 256:
        return _drop_last_key(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    return _math(query, key, value, attn_mask, is_causal, scale, enable_gqa)


def value_channels_beyond_d_zeroed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                   enable_gqa=False):
    """Wrong only when the value head dim is larger than the query's: the extra output channels are zero
    (and no gradient reaches them). Fails out and dV gross."""
    out = _math(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    d = query.shape[-1]
    if value.shape[-1] <= d:
        return out
    return torch.cat([out[..., :d], torch.zeros_like(out[..., d:])], -1)


def fp16_large_logits_rounded(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False):
    """Wrong only in fp16 at head dim >= 128 when some |q.k| exceeds 2048 (large-logit or outlier values):
    q.k is rounded to fp16 before the scale, so logits are off by up to scale x 1 (fp16 spacing 2 there).
    Fails out and the gradients; everything else is the math backend."""
    if query.dtype != torch.float16 or query.shape[-1] < 128:
        return _math(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    g = _group(query, key)
    q, k, v = query.float(), key.float().repeat_interleave(g, 1), value.float().repeat_interleave(g, 1)
    raw = (q @ k.transpose(-1, -2)).detach()
    if raw.abs().max() <= LARGE_RAW_LOGIT:
        return _math(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    bias = (raw.half().float() - raw) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        bias = bias.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else bias + attn_mask.float()
    return _math(q, k, v, bias, False, scale, False).to(query.dtype)


def _toward_zero(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 `x` rounded to `dtype` toward zero (truncated), back in fp32."""
    r = x.to(dtype)
    return torch.where(r.float().abs() > x.abs(), torch.nextafter(r, torch.zeros_like(r)), r).float()


class _TruncatedGroupSum(_GroupExpand):
    """Backward sums the group's per-head gradients one by one, truncating each partial sum to the dtype."""

    @staticmethod
    def backward(ctx, grad):
        b, hq, l, d = grad.shape
        per_head = grad.view(b, hq // ctx.group, ctx.group, l, d).float()
        acc = per_head[:, :, 0]
        for i in range(1, ctx.group):
            acc = _toward_zero(acc + per_head[:, :, i], grad.dtype)  # a bias of ~eps/2 per add: the bug
        return acc.to(grad.dtype), None


def per_head_mask_truncated_group_sum(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                      enable_gqa=False):
    """Subtly wrong only with a per-head mask and a group of 6 or more query heads: dK/dV of the group are
    summed one head at a time, each partial sum truncated to bf16/fp16, a bias that grows linearly with the
    group size (dK/dV tensor level ~1.5x the factor at G=6, ~4x at G=16). Forward and dQ are right."""
    g = _group(query, key)
    per_head = isinstance(attn_mask, torch.Tensor) and attn_mask.dim() == 4 and attn_mask.shape[1] > 1
    if not per_head or g < LARGE_GROUP:
        return _math(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    return _math(query, _TruncatedGroupSum.apply(key, g), _TruncatedGroupSum.apply(value, g), attn_mask,
                 is_causal, scale)


def noncontig_q_wide_head_drops_last_key(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                         scale=None, enable_gqa=False):
    """Wrong only for a BLHD query (heads inner) with a head dim above 64: the last key is dropped.
    The suites' BLHD cases have head dims 32 and 64."""
    if _heads_inner(query) and query.shape[-1] > 64:
        return _drop_last_key(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    return _math(query, key, value, attn_mask, is_causal, scale, enable_gqa)


# --- each kernel's corner, as a property of the case ---------------------------------------------

_BOOL_MASKS = ("bool", "fully-masked-rows", "block-diagonal", "sliding-window")

CORNERS: dict[str, Callable[[Case], bool]] = {
    "wide_window_off_by_one": lambda c: c.mask == "sliding-window" and c.mask_fill == "-inf"
    and c.kv_len // 4 > WIDE_WINDOW,
    "small_scale_clamped": lambda c: c.scale is not None and c.scale < SMALL_SCALE,
    "shared_mask_tail_unmasked": lambda c: c.batch == 1 and c.kv_len > SHARED_MASK_KEYS and (
        (c.mask in _BOOL_MASKS and c.mask_fill == "-inf" and not c.mask_per_head)
        or (c.mask == "none" and c.causal == "bottom-right")),
    "noncontig_v_tail_dropped": lambda c: c.layout in ("blhd", "v-noncontig", "kv-expanded")
    and c.kv_len % 64 == 1 and c.kv_len > 1,
    "decode_prime_kv_drops_last_key": lambda c: c.q_len == 1 and _is_prime(c.kv_len) and c.kv_len < 256,
    "value_channels_beyond_d_zeroed": lambda c: c.v_head_dim is not None and c.v_head_dim > c.head_dim,
    "fp16_large_logits_rounded": lambda c: c.dtype == "fp16" and c.head_dim >= 128
    and c.values in ("large-logits", "outlier-channels"),
    "per_head_mask_truncated_group_sum": lambda c: c.mask_per_head and c.group_size >= LARGE_GROUP,
    "noncontig_q_wide_head_drops_last_key": lambda c: c.layout == "blhd" and c.head_dim > 64,
}


# --- where a search finds them ---------------------------------------------------------------

# Three small spaces (batch 1, the ci profile's 8 MiB bound) that still reach every corner: one kv head
# and lengths up to 65 (kv_len 65 reaches a shared mask's unmasked tail); up to 160 for the window wider
# than 32 keys (kv_len >= 132; bf16 only: that corner is not about the dtype); and two kv heads for the
# kv_len = 1 (mod 64) tail, since a BLHD view of a single kv head is contiguous (only v-noncontig is
# not), which left that corner too rare to meet in 150 examples of the first space.
# Budgets are example counts with a fixed seed, so what is found does not depend on the machine's speed.
SMALL_SPACE = ("--max-batch", "1", "--max-kv-heads", "1", "--profile", "ci")
SEARCHES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # group -> (kernels, search options)
    "short": (("small_scale_clamped", "shared_mask_tail_unmasked", "decode_prime_kv_drops_last_key",
               "value_channels_beyond_d_zeroed", "fp16_large_logits_rounded", "per_head_mask_truncated_group_sum",
               "noncontig_q_wide_head_drops_last_key"),
              (*SMALL_SPACE, "--max-tokens", "65")),
    "long": (("wide_window_off_by_one",), (*SMALL_SPACE, "--max-tokens", "160", "--dtype", "bf16")),
    "two-kv-heads": (("noncontig_v_tail_dropped",),
                     ("--max-batch", "1", "--max-kv-heads", "2", "--profile", "ci", "--max-tokens", "65")),
}
# Examples per group from seed 0. A kernel's corner is rare by design: on 1,500 generated examples of its space
# the shared-mask kernel differs from math on ~2%, the wide window on 0.1-0.4% (docs/benchmarks-calibration.md,
# 'Search'), so 150 examples left them to chance. These budgets are what ~100-150 examples/min (2 loaded cores,
# after the per-example cuts) buys in a few minutes per group, well inside the 1800 s guard.
SEARCH_EXAMPLES = {"short": 300, "long": 2000, "two-kv-heads": 150}
SEARCH_SEED = 0

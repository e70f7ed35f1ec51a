"""Kernels that read or write out of bounds, or modify their input: what guard bands (run/guards.py) catch.

Each has F.scaled_dot_product_attention's signature (`--impl tests.guard_kernels:NAME`) and computes the
right attention; its only fault is a stray memory access, made through the input's storage as a fused
kernel's pointer arithmetic would. Without guards the stray read lands on finite numbers (the next head's
rows, or zeros standing for whatever memory follows the allocation) and the stray write has nowhere to go
inside the storage, so nothing is flagged: that is what guards add. With NaN guards each is caught by
exactly one rule (docstring), at the place it says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def _math(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=enable_gqa)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """Every element of `t`'s storage, 1-d, sharing it (no autograd: a kernel's raw pointer)."""
    numel = t.untyped_storage().nbytes() // t.element_size()
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), 0, (numel,))


def _last_index(shape, strides, offset: int) -> int:
    return offset + sum((n - 1) * s for n, s in zip(shape, strides))


def read_strided(t: torch.Tensor, shape, offset: int) -> torch.Tensor:
    """A read of `shape` with `t`'s strides from storage element `offset`; past the end of the storage the
    memory is taken as zeros (an allocation's neighbour holding finite numbers)."""
    flat = _flat(t).detach()
    need = _last_index(shape, t.stride(), offset) + 1 - flat.numel()
    if need > 0:
        flat = torch.cat([flat, flat.new_zeros(need)])
    return flat.as_strided(shape, t.stride(), offset).clone()


def reads_key_past_kv_len(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False):
    """oob-read on every output and gradient: each head's tile loads one key and value row past kv_len (row
    kv_len through the strides) and masks it by adding -inf, which keeps a finite stray row out of the result
    but not a NaN (NaN + -inf = NaN)."""
    b, h, lk, d = key.shape
    extra_k = read_strided(key, (b, h, 1, d), key.storage_offset() + lk * key.stride(2))
    extra_v = read_strided(value, (b, h, 1, value.shape[-1]), value.storage_offset() + lk * value.stride(2))
    k_ext, v_ext = torch.cat([key, extra_k], 2), torch.cat([value, extra_v], 2)
    lq = query.shape[-2]
    bias = torch.zeros(lq, lk + 1, dtype=torch.float32, device=query.device)
    bias[:, -1] = float("-inf")
    if is_causal:
        bias[:, :lk] = bias[:, :lk].masked_fill(~torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril(),
                                                float("-inf"))
    if attn_mask is not None:
        own = attn_mask if attn_mask.dtype != torch.bool else torch.zeros(attn_mask.shape, device=query.device).masked_fill(
            ~attn_mask, float("-inf"))
        bias = bias + F.pad(own.float(), (0, 1))
    return _math(query, k_ext, v_ext, bias.to(query.dtype), False, scale, enable_gqa)


def reads_next_batch_key_for_last_head(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                       scale=None, enable_gqa=False):
    """oob-read on out and dq of the last batch, the query heads of the last kv head: that head prefetches
    batch b + 1's first K tile (a missing batch bound) and folds it in times zero, harmless while the row
    holds numbers; past the last batch it is guard, and NaN x 0 = NaN."""
    b, h, lk, d = key.shape
    out = _math(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    group = query.shape[1] // h
    k_next = read_strided(key, (b, 1, lk, d), key.storage_offset() + key.stride(0))  # (b + 1, head 0)
    last = query[:, (h - 1) * group:]
    ghost = (last @ k_next.transpose(-1, -2).to(last.dtype)).sum(-1, keepdim=True) * 0
    return torch.cat([out[:, :(h - 1) * group], out[:, (h - 1) * group:] + ghost], 1)


def writes_row_past_input_end(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False):
    """oob-write on k: the last head's epilogue stores one row at index kv_len, one row past the end of the
    input (a copy of its last row). Without guards that memory is not the input's: the write is dropped
    here (on a device it would corrupt a neighbour)."""
    b, h, lk, d = key.shape
    start = key.storage_offset() + (b - 1) * key.stride(0) + (h - 1) * key.stride(1) + lk * key.stride(2)
    flat = _flat(key)
    if _last_index((d,), (key.stride(3),), start) < flat.numel():
        with torch.no_grad():
            flat.as_strided((d,), (key.stride(3),), start).copy_(key[-1, -1, -1].detach())
    return _math(query, key, value, attn_mask, is_causal, scale, enable_gqa)


def modifies_value_in_place(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                            enable_gqa=False):
    """input-modified on v: computes with its own copy of V (so every result is right), then scribbles on
    the caller's V: the last key row of the last batch and kv head gets + 1."""
    out = _math(query, key, value.clone(), attn_mask, is_causal, scale, enable_gqa)
    value.detach()[-1, -1, -1].add_(1.0)
    return out

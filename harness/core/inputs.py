"""Seeded CPU inputs, quantized to the case dtype, and their placement on a device.

Inputs are made on the CPU from the case seed so that every device and every
implementation sees bit-identical q, k, v, grad_out and mask; their SHA-256 go
into the report because torch does not promise RNG streams across releases.
Layouts are applied on the device after the copy: `.to()` turns a strided or
stride-0 view into a contiguous tensor, so a layout applied before it vanishes.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .case import Case
from .sampling import RowSample, sample_rows, zero_unsampled

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def torch_dtype(case: Case) -> torch.dtype:
    return TORCH_DTYPES[case.dtype]


def mask_fill_value(case: Case) -> float:
    if case.mask_fill == "-inf":
        return float("-inf")
    if case.mask_fill == "-65504":
        return -65504.0
    return torch.finfo(torch_dtype(case)).min


@dataclass(frozen=True)
class Inputs:
    """Quantized CPU tensors (contiguous B, H, L, D) plus the mask as the kernel gets it."""

    case: Case
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor
    mask: torch.Tensor | None  # bool, or float in the case dtype; broadcastable to (B, Hq, Lq, Lk)
    sample: RowSample | None = None  # a long case's row sample: grad_out is zero off sample.rows

    def hashes(self) -> dict[str, str]:
        named = {"q": self.q, "k": self.k, "v": self.v, "grad_out": self.grad_out}
        if self.mask is not None:
            named["mask"] = self.mask
        if sum(t.numel() for t in named.values()) < PARALLEL_HASH_ELEMENTS:
            return {name: tensor_sha256(t) for name, t in named.items()}
        # hashlib lets go of the GIL on large buffers: the tensors hash side by side
        with ThreadPoolExecutor(len(named)) as pool:
            return dict(zip(named, pool.map(tensor_sha256, named.values())))


PARALLEL_HASH_ELEMENTS = 1 << 20


def tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    raw = t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)
    h = hashlib.sha256()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(memoryview(raw.reshape(-1).numpy()))  # the tensor's own bytes, not a copy of them
    return h.hexdigest()


def _draw(gen: torch.Generator, shape: tuple[int, ...], values: str) -> torch.Tensor:
    if values == "uniform":
        return torch.rand(shape, generator=gen, dtype=torch.float32)
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def _shape_values(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Bend the distributions into the numerically hard regions named by `case.values`."""
    if case.values == "large-logits":
        # Scaled logits with std ~64 and raw q·k up to ~1e4·sqrt(d): fp16 overflow territory
        # for a kernel that forms q·k before applying the scale.
        q.mul_(8.0)
        k.mul_(8.0)
    elif case.values == "negative-lse":
        # One key channel of magnitude 120·sqrt(d): every logit near -120, log-sum-exp < -88.7
        # (fp32 exp underflow), the ill-conditioned case of upstream #196678.
        q.mul_(0.1)
        k.mul_(0.1)
        q[..., 0] = 1.0
        k[..., 0] = -120.0 * case.head_dim**0.5
    elif case.values == "outlier-channels":
        channels = max(1, case.head_dim // 32)
        q[..., :channels].mul_(20.0)
        k[..., :channels].mul_(20.0)
        v[..., :channels].mul_(20.0)


def _structured_bool(case: Case, gen: torch.Generator, heads: int) -> torch.Tensor:
    b, lq, lk = case.batch, case.q_len, case.kv_len
    rows = torch.arange(lq)[:, None]
    cols = torch.arange(lk)[None, :]
    if case.mask == "block-diagonal":
        blocks = max(2, min(4, lq, lk))
        keep = (rows * blocks // lq) == (cols * blocks // lk)
        return keep.expand(b, heads, lq, lk).clone()
    if case.mask == "sliding-window":
        window = max(1, lk // 4)
        diag = rows * lk // lq  # aligned diagonal when lengths differ
        keep = (cols <= diag) & (cols > diag - window)
        return keep.expand(b, heads, lq, lk).clone()
    if case.mask == "padding":
        keep = torch.ones(b, heads, lq, lk, dtype=torch.bool)
        for i in range(b):
            pad = (i * lk) // (2 * b)  # batch 0 unpadded, later batches pad up to half the keys
            if pad:
                keep[i, :, :, lk - pad:] = False
        return keep
    keep = torch.rand((b, heads, lq, lk), generator=gen) < 0.8
    keep[..., torch.randint(lk, (1,), generator=gen).item()] |= ~keep.any(-1)  # every row keeps a key
    keep[..., 0] |= ~keep.any(-1)
    if case.mask == "fully-masked-rows":
        dead = torch.arange(lq) % 3 == 1  # every third row, starting at row 1
        keep[:, :, dead, :] = False
    return keep


def make_mask(case: Case, gen: torch.Generator) -> torch.Tensor | None:
    if not case.has_mask:
        return None
    heads = case.q_heads if case.mask_per_head else 1
    if case.mask == "additive":
        bias = torch.randn((case.batch, heads, case.q_len, case.kv_len), generator=gen)
        drop = torch.rand(bias.shape, generator=gen) < 0.2
        drop[..., 0] = False  # every row keeps a finite key
        bias = bias.masked_fill(drop, mask_fill_value(case))
        return bias.to(torch_dtype(case))
    keep = _structured_bool(case, gen, heads)
    if case.mask_fill != "-inf":
        # a bool pattern delivered as an additive mask filled with -65504 / finfo.min: those rows
        # are ordinary softmax rows with non-zero gradients, not "masked" rows.
        return torch.zeros(keep.shape).masked_fill(~keep, mask_fill_value(case)).to(torch_dtype(case))
    return keep


def make_inputs(case: Case) -> Inputs:
    gen = torch.Generator().manual_seed(case.seed)
    b, hq, hkv, lq, lk = case.batch, case.q_heads, case.kv_heads, case.q_len, case.kv_len
    q = _draw(gen, (b, hq, lq, case.head_dim), case.values)
    k = _draw(gen, (b, hkv, lk, case.head_dim), case.values)
    v = _draw(gen, (b, hkv, lk, case.value_dim), case.values)
    grad_out = torch.randn((b, hq, lq, case.value_dim), generator=gen, dtype=torch.float32)
    _shape_values(case, q, k, v)
    mask = make_mask(case, gen)
    dt = torch_dtype(case)
    sample = sample_rows(case) if case.long else None
    if sample is not None:
        zero_unsampled(grad_out, sample)
    return Inputs(case, q.to(dt), k.to(dt), v.to(dt), grad_out.to(dt), mask, sample)


# --- placement on the device -------------------------------------------------------------


def _blhd_view(t: torch.Tensor) -> torch.Tensor:
    """The same values as a (B, H, L, D) view of (B, L, H, D) storage, as HF models pass them."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def wants_blhd(case: Case, role: str) -> bool:
    return (
        (case.layout == "blhd" and role in ("q", "k", "v"))
        or (case.layout == "v-noncontig" and role == "v")
        or (case.layout == "grad-out-noncontig" and role == "grad_out")
    )


def expected_strides(case: Case, role: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    b, h, l, d = shape
    if case.layout == "kv-expanded" and role in ("k", "v"):
        return (l * d, 0, d, 1)
    if wants_blhd(case, role):
        return (l * h * d, d, h * d, 1)
    return (h * l * d, l * d, d, 1)


def apply_layout(case: Case, role: str, leaf: torch.Tensor) -> torch.Tensor:
    """Kernel-facing view of a device tensor; differentiable so grads reach the leaf."""
    if case.layout == "kv-expanded" and role in ("k", "v"):
        return leaf.expand(leaf.shape[0], case.q_heads, *leaf.shape[2:])
    if wants_blhd(case, role):
        return _blhd_view(leaf)
    return leaf


def check_strides(case: Case, role: str, t: torch.Tensor) -> str | None:
    """None when `t` has the layout the case asks for, else a one-line reason."""
    want = expected_strides(case, role, tuple(t.shape))
    got = tuple(t.stride())
    if t.shape[1] == 1 or t.shape[2] == 1:
        return None  # size-1 dims make strides ambiguous; nothing to check
    if got != want:
        return f"{role} has strides {got}, layout {case.layout!r} needs {want}"
    return None

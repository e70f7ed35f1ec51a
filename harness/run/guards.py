"""Guard bands: each input placed on the device inside a larger buffer whose padding holds NaN or a sentinel.

The padding lies before and after each tensor, after every row (the head dim is padded to a multiple
of 16 elements, then 16 more) and between the blocks of the next dim out (two rows between heads, or
between tokens in a (B, L, H, D) layout); the margin after the tensor holds a whole batch block, so a
kernel that reads "the next batch" past the last one lands in guard, not in another allocation. The
kernel sees an ordinary strided view; the leaf it differentiates against is that view.

After forward and after backward `GuardedInput.findings` says what changed: guard elements whose bits
are no longer the fill (an out-of-bounds write, with the byte range) and elements of the input itself
(the kernel modified its input). Whether an output read a guard is decided in core/verdict.py, from the
output against the same call without guards (`baseline` in `Outputs.guard`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.case import SENTINEL, Case
from ..core.inputs import Inputs, wants_blhd

ROW_ALIGN = 16  # elements: rows start 16-element aligned, as fused kernels want
ROW_GUARD = 16  # guard elements after every row
GAP_ROWS = 2  # guard rows between the blocks of the next dim out (heads in BHLD)
MIN_MARGIN = 256  # elements before and after the tensor at least (512 bytes in bf16)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class GuardLayout:
    """Where a tensor sits in its guard buffer, in elements."""

    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int
    numel: int  # elements of the whole buffer


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def guard_layout(shape: tuple[int, ...], order: tuple[int, ...]) -> GuardLayout:
    """The guarded layout of a 4-d tensor whose dims, outermost first, are stored in `order`
    ((0, 1, 2, 3) for BHLD, (0, 2, 1, 3) for BLHD); the last dim is contiguous."""
    row = _round_up(shape[order[3]], ROW_ALIGN) + ROW_GUARD
    strides = [0] * 4
    strides[order[3]], strides[order[2]] = 1, row
    block = (shape[order[2]] + GAP_ROWS) * row  # the next dim out: its blocks are GAP_ROWS rows apart
    strides[order[1]] = block
    strides[order[0]] = shape[order[1]] * block
    extent = (shape[order[0]] - 1) * strides[order[0]] + strides[order[0]]  # up to the end of the last block
    lead = _round_up(max(MIN_MARGIN, block), 128)
    tail = max(MIN_MARGIN, strides[order[0]]) + MIN_MARGIN  # a whole batch block: "the next batch" is guard
    return GuardLayout(tuple(shape), tuple(strides), lead, lead + extent + tail)


def fill_value(mode: str, dtype: torch.dtype) -> float | bool:
    if dtype == torch.bool:
        return False  # a bool guard cannot hold NaN; False (masked out) keeps a stray read harmless: writes only
    return float("nan") if mode == "nan" else SENTINEL


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bool else t.view(_BITS[t.element_size()])


@dataclass
class GuardedInput:
    """One input in its guard buffer: the view the kernel gets, and what to check it against."""

    role: str  # q, k, v, grad_out, mask
    buffer: torch.Tensor  # 1-d, on the device
    layout: GuardLayout
    original: torch.Tensor  # the CPU input, for input-modified
    fill_bits: int

    @property
    def view(self) -> torch.Tensor:
        return self.buffer.as_strided(self.layout.shape, self.layout.strides, self.layout.offset)

    def inside(self) -> torch.Tensor:
        """True where the buffer holds the tensor, False in guard."""
        mask = torch.zeros(self.layout.numel, dtype=torch.bool, device=self.buffer.device)
        mask.as_strided(self.layout.shape, self.layout.strides, self.layout.offset).fill_(True)
        return mask

    def findings(self, phase: str) -> list[dict[str, Any]]:
        """oob-write and input-modified findings now (after `phase`): plain data for Outputs.guard."""
        found = []
        changed = (_bits(self.buffer) != self.fill_bits) & ~self.inside()
        if bool(changed.any()):
            at = changed.nonzero().flatten().cpu()
            size = self.buffer.element_size()
            first, last = int(at[0]), int(at[-1])
            found.append({"rule": "oob-write", "tensor": self.role, "phase": phase, "elements": int(at.numel()),
                          "bytes": [(first - self.layout.offset) * size, (last + 1 - self.layout.offset) * size],
                          "where": self.describe(first)})
        now = self.view.detach().cpu()
        diff = _bits(now) != _bits(self.original.contiguous())
        if bool(diff.any()):
            idx = diff.nonzero()
            found.append({"rule": "input-modified", "tensor": self.role, "phase": phase,
                          "elements": int(idx.shape[0]), "first_index": idx[0].tolist()})
        return found

    def describe(self, element: int) -> str:
        """Where a buffer element lies relative to the tensor: before it, or just after which element."""
        rel = element - self.layout.offset
        if rel < 0:
            return f"{-rel} elements before {self.role}[0, 0, 0, 0]"
        dims = sorted(range(4), key=lambda d: -self.layout.strides[d])
        index = [0] * 4
        for d in dims:
            index[d] = min(rel // self.layout.strides[d], self.layout.shape[d] - 1)
            rel -= index[d] * self.layout.strides[d]
        index[dims[-1]] = min(index[dims[-1]], self.layout.shape[dims[-1]] - 1)
        return f"after {self.role}{index}"


def place(role: str, cpu: torch.Tensor, device: torch.device, mode: str, order: tuple[int, ...]) -> GuardedInput:
    """`cpu` copied into a fresh guard buffer on `device`, stored in `order`."""
    layout = guard_layout(tuple(cpu.shape), order)
    value = fill_value(mode, cpu.dtype)
    buffer = torch.full((layout.numel,), value, dtype=cpu.dtype, device=device)
    fill_bits = int(_bits(torch.full((1,), value, dtype=cpu.dtype))[0])
    guarded = GuardedInput(role, buffer, layout, cpu, fill_bits)
    guarded.view.copy_(cpu.to(device))
    return guarded


def storage_order(strides: tuple[int, ...]) -> tuple[int, ...]:
    """Dims outermost first, as a compact tensor with these strides stores them (ties keep dim order)."""
    return tuple(sorted(range(len(strides)), key=lambda d: -strides[d]))


@dataclass
class Placement:
    """A case's inputs on the device: the leaves gradients are taken against, what the kernel gets, and the
    guard buffers to check (empty without guards)."""

    leaves: dict[str, torch.Tensor]
    kernel: dict[str, torch.Tensor]  # q, k, v as the kernel sees them, plus grad_out
    mask: torch.Tensor | None
    guarded: list[GuardedInput]

    def findings(self, phase: str, seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """New findings after `phase` (one per rule and tensor: the first phase it showed in)."""
        known = {(f["rule"], f["tensor"]) for f in seen}
        return [f for g in self.guarded for f in g.findings(phase) if (f["rule"], f["tensor"]) not in known]


def place_guarded(case: Case, inputs: Inputs, device: torch.device) -> Placement:
    """Every input in its guard buffer, stored in the case's layout (BLHD where the layout asks for it;
    one kv head expanded with stride 0 for kv-expanded), so the layout survives without a copy."""
    leaves, kernel, guarded = {}, {}, []
    for role in ("q", "k", "v", "grad_out"):
        order = (0, 2, 1, 3) if wants_blhd(case, role) else (0, 1, 2, 3)
        g = place(role, getattr(inputs, role), device, case.guard, order)
        guarded.append(g)
        leaf = g.view.detach()
        if role != "grad_out":
            leaves[role] = leaf.requires_grad_(case.grads)
        expand = case.layout == "kv-expanded" and role in ("k", "v")
        kernel[role] = leaf.expand(leaf.shape[0], case.q_heads, *leaf.shape[2:]) if expand else leaf
    mask = None
    if inputs.mask is not None:
        g = place("mask", inputs.mask, device, case.guard, (0, 1, 2, 3))
        guarded.append(g)
        mask = g.view
    return Placement(leaves, kernel, mask, guarded)

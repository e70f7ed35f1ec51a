#!/usr/bin/env python3
"""Memory-efficient SDPA with an attn_mask and sequence length S > 65536: rows wrong (CUDA).

Same family as pytorch/pytorch#162588 / #187227 (32-bit overflow of query_start * bias_strideM,
fixed by #187225). The fp64 truth is computed only on a few query rows (a full fp64 reference at
S = 69632 would need terabytes), at the start, around row 2**32 // S and at the end.

    python repro.py            # cuda, S = 69632: exits 1 while the bug is present
    python repro.py cpu 4096   # the same check on the CPU's math kernel (exits 0): the check itself
"""
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"
S = int(sys.argv[2]) if len(sys.argv) > 2 else 69632
H, D, DTYPE = 4, 128, torch.bfloat16
WINDOW = S // 4  # sliding window: row i sees keys (i - WINDOW, i]
ROW_FACTOR = 5.0  # a correct bf16 kernel stays near 1-2x the rounding floor per row

gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, H, S, D, generator=gen).to(DTYPE) for _ in range(3))  # made on the CPU: same bits everywhere
rows = torch.arange(S)[:, None]
cols = torch.arange(S)[None, :]
mask = ((cols <= rows) & (cols > rows - WINDOW)).to(DEVICE)  # (S, S) bool, True = attend

backend = SDPBackend.EFFICIENT_ATTENTION if DEVICE.startswith("cuda") else SDPBackend.MATH
with torch.no_grad(), sdpa_kernel(backend):
    out = torch.nn.functional.scaled_dot_product_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), attn_mask=mask)

edge = 2**32 // S  # first row whose query_start * S no longer fits in 32 bits
regions = {"first rows": range(0, 64), f"rows {edge - 32}..{edge - 1} (below 2**32/S)": range(max(0, edge - 32), min(edge, S)),
           f"rows {edge}..{edge + 31} (from 2**32/S)": range(edge, min(edge + 32, S)), "last rows": range(S - 64, S)}
kd, vd = k.to(DEVICE, torch.float64), v.to(DEVICE, torch.float64)
worst = 0.0
print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if DEVICE.startswith('cuda') else 'cpu'}, "
      f"S = {S}, H = {H}, D = {D}, bf16, sliding-window bool mask, backend {backend.name}")
for name, idx in regions.items():
    if not len(idx):
        continue
    r = torch.tensor(list(idx), device=DEVICE)
    s = q.to(DEVICE, torch.float64)[:, :, r] @ kd.transpose(-1, -2) / D**0.5
    s = s.masked_fill(~mask[r], float("-inf"))
    truth = torch.softmax(s, -1) @ vd
    err = (out[:, :, r].double() - truth).norm(dim=-1)
    floor = (truth.to(DTYPE).double() - truth).norm(dim=-1).clamp_min(1e-30)
    ratio = (err / floor).max().item()
    worst = max(worst, ratio if ratio == ratio else float("inf"))
    print(f"  {name:42s} max row error / bf16 rounding floor = {ratio:10.3g}   max |err| = {err.max().item():.3g}")
if worst > ROW_FACTOR:
    print(f"BUG: rows beyond {ROW_FACTOR}x the bf16 rounding floor (worst {worst:.3g}x)")
    sys.exit(1)
print(f"OK: every checked row within {ROW_FACTOR}x the bf16 rounding floor (worst {worst:.3g}x)")

#!/usr/bin/env python3
"""Repro: rows whose every visible key carries an additive mask of finfo.min (bf16/fp32, about -3.4e38).

torch's definition (sdpa-math, the fp64 oracle): a finite additive mask is added to the logits, so a row
whose keys all carry the same finite fill is an ordinary softmax row over (nearly) equal logits: its
output is the mean of V over those keys. On the H100 (torch 2.11.0+cu130, cuDNN 9.19) the
memory-efficient and cuDNN kernels returned 0 for such rows, and zero/wrong gradients
(reports/cuda-h100/2026-12-06/README.md, group B1).

Written on a CPU machine on 2026-12-06 and checked there only through its control path
(`python repro.py cpu`, MATH backend: exit 0). NOT YET RUN ON A GPU: run `python repro.py cuda:0`
and record the exit code next to this file. Only torch needed. Exit 1 while the bug is present.
"""
import sys
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda:0"
if DEVICE.startswith("cuda"):
    BACKENDS = {"EFFICIENT": SDPBackend.EFFICIENT_ATTENTION, "CUDNN": SDPBackend.CUDNN_ATTENTION,
                "MATH (control)": SDPBackend.MATH}
else:
    BACKENDS = {"MATH (control)": SDPBackend.MATH}

gen = torch.Generator().manual_seed(0)
bad = False
for dtype in (torch.bfloat16, torch.float32):
    B, H, L, D = 1, 1, 2, 64
    q, k, v, do = (torch.randn(B, H, L, D, generator=gen).to(dtype) for _ in range(4))
    mask = torch.zeros(B, H, L, L)
    mask[:, :, 1, :] = torch.finfo(dtype).min  # row 1: every key filled with finfo.min (finite)
    mask = mask.to(dtype)
    # fp64 reference, torch's formula: softmax(q k^T * scale + mask) v; row 1 = mean of v over the keys
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref = torch.softmax(qd @ kd.transpose(-1, -2) / D**0.5 + mask.double(), -1) @ vd
    rq, rk, rv = torch.autograd.grad(ref, (qd, kd, vd), do.double())
    print(f"{dtype}: reference out row 1 (first 4) {ref[0, 0, 1, :4].tolist()}  (mean of v: "
          f"{vd[0, 0, :, :4].mean(0).tolist()})")
    for name, backend in BACKENDS.items():
        leaves = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
        try:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(*leaves, attn_mask=mask.to(DEVICE))
            grads = torch.autograd.grad(out, leaves, do.to(DEVICE))
        except RuntimeError as exc:  # e.g. cuDNN refuses fp32
            print(f"  {name:15} not run: {str(exc).splitlines()[0][:100]}")
            continue
        errs = {n: (a.detach().double().cpu() - b).abs().max().item()
                for n, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, rq, rk, rv))}
        row1 = out[0, 0, 1].detach().double().cpu()
        wrong = errs["out"] > 0.1 or any(e > 0.25 for e in errs.values())  # O(1), far past bf16 rounding
        bad |= wrong and not name.startswith("MATH")
        print(f"  {name:15} out row 1 (first 4) {[round(x, 4) for x in row1[:4].tolist()]}  max|err| "
              + " ".join(f"{n} {e:.3g}" for n, e in errs.items()) + ("  WRONG" if wrong else "  ok"))
print("BUG: a finfo.min-filled row is not the softmax over its keys" if bad else "OK")
sys.exit(1 if bad else 0)

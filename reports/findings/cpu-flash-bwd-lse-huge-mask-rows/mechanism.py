#!/usr/bin/env python3
"""Why CPU flash's backward is wrong on rows whose every logit is a huge mask value: it recomputes
P = exp(S - LSE) from a logsumexp kept in fp32, and fl(M + log n) == M once ulp(|M|) > log n.

Emulates that recomputation next to torch's CPU flash backward (FLASH_ATTENTION pinned) on one row
masked with bf16 finfo.min and one with -65504 (fp16): flash's dV agrees with the emulation, not
with the true softmax. Only torch is needed: `python mechanism.py`.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

torch.manual_seed(0)
L, D = 4, 64
for dtype, fill in ((torch.bfloat16, torch.finfo(torch.bfloat16).min), (torch.float16, -65504.0)):
    q, k, v, do = (torch.randn(1, 1, L, D).to(dtype) for _ in range(4))
    mask = torch.zeros(1, 1, L, L, dtype=dtype)
    mask[..., 1, :] = fill  # row 1: every key carries the fill value; a plain softmax row (uniform-ish)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = F.scaled_dot_product_attention(*leaves, attn_mask=mask)
    out.backward(do)
    s = (q.float() @ k.float().transpose(-1, -2)) * D**-0.5 + mask.float()
    p_from_lse = torch.exp(s - torch.logsumexp(s, -1, keepdim=True))  # fp32, as the backward recomputes it
    p_true = torch.softmax(s.double(), -1)
    dv_emulated = p_from_lse.transpose(-1, -2) @ do.float()
    dv_true = p_true.transpose(-1, -2) @ do.double()
    print(f"{dtype} fill {fill:.6g}: row 1 P from fp32 LSE {[round(x, 4) for x in p_from_lse[0, 0, 1].tolist()]}, "
          f"true {[round(x, 4) for x in p_true[0, 0, 1].tolist()]}")
    print(f"    max |flash dV - emulated| = {(leaves[2].grad.float() - dv_emulated).abs().max().item():.3g}, "
          f"max |flash dV - true| = {(leaves[2].grad.double() - dv_true).abs().max().item():.3g}")

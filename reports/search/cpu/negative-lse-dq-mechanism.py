"""CPU flash dQ on negative-lse rows: is its error what D = rowsum(dO * O_flash) gives (O as flash stored it)?"""
import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from harness.core.case import parse_case_spec
from harness.core.inputs import make_inputs
torch.set_num_threads(1)
for spec in ["b=1,hq=2,hkv=2,lq=145,lk=145,d=64,dtype=fp16,scale=0.3,values=negative-lse",
             "b=1,hq=6,hkv=2,lq=160,lk=160,d=128,dtype=fp16,scale=0.3,values=negative-lse,s=771"]:
    case = parse_case_spec(spec); inp = make_inputs(case); g = case.q_heads // case.kv_heads
    q, k, v, do = inp.q, inp.k.repeat_interleave(g, 1), inp.v.repeat_interleave(g, 1), inp.grad_out
    sc = case.scale
    # fp64 truth
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64 = F.scaled_dot_product_attention(q64, k64, v64, scale=sc); o64.backward(do.double())
    def run(backend):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(qq, kk, vv, scale=sc)
        o.backward(do)
        return o.detach(), qq.grad
    of, dqf = run(SDPBackend.FLASH_ATTENTION)
    om, dqm = run(SDPBackend.MATH)
    # D from flash's stored O, and from the correctly rounded O, against D exact
    P = torch.softmax(sc * q64 @ k64.transpose(-1, -2), -1).detach()
    def pred(o_stored):
        dD = (do.double() * (o_stored.double() - o64.detach())).sum(-1)  # D error
        return -sc * dD[..., None] * (P @ k64.detach())               # predicted dQ error (all channels)
    err_f = (dqf.double() - q64.grad)[..., 0]
    for name, o_st in [("flash O", of), ("correctly rounded O", o64.detach().half())]:
        p = pred(o_st)[..., 0]
        print(spec, name, "| predicted dQ[...,0] err L2", f"{p.norm():.4g}", "| flash actual", f"{err_f.norm():.4g}",
              "| corr(actual, predicted)", f"{torch.corrcoef(torch.stack([err_f.flatten(), p.flatten()]))[0,1]:.4f}")
    print("  math dQ[...,0] err L2", f"{(dqm.double()-q64.grad)[...,0].norm():.4g}",
          "| flash O err vs fp64 (L2 rel)", f"{(of.double()-o64).norm()/o64.norm():.3g}", "math O", f"{(om.double()-o64).norm()/o64.norm():.3g}",
          "| correctly rounded", f"{(o64.half().double()-o64).norm()/o64.norm():.3g}")

"""Near-threshold families (-65504 rows, negative LSE): reference kernels against the yardstick before and
after the logit and group-sum terms (in the core since they left the prototype: harness/core/cancellation.py), and
against the coherent allowances still in proposal here (the harness's verdict is not changed by them).

    python -m harness.lab.nearthreshold [--seeds N] [--family c1|c2|control|all]
    python -m harness.lab.nearthreshold cli calibrate --device cpu --seeds 1   # any command, proposal installed
    python -m pytest -p harness.lab.nearthreshold tests/test_lowprec.py        # tests, proposal installed

Prints, per case and implementation, the largest error / scale at the tensor / slice / row level for each
tensor, under
  now   — the yardstick before the logit term (floor, low-precision designs, epsilon term, D-term);
  +lse  — the core as committed: plus the logit-rounding term (cancellation.row_terms: relative P errors of the RMS
          of fp32 roundings at the logits' and the log-sum-exp's own magnitude, capped at 2^-8), and on dK/dV the
          group-sum term (each query head's dK/dV rounded to the dtype before the group sum);
  +Dpv  — +lse, and the D-term's O error taken as O's final rounding plus the rounding of P~ before P~V
          (dterm_pv), the larger of the two D-terms;
  +all  — for dQ/dK: the larger of the D-term as committed and sqrt(Dpv^2 + dS^2 + lse^2), where dS is the
          coherent part of dS's rounding (each dS element rounded once to the dtype, RMS ulp/sqrt(12), along the
          mean key / mean query), dK's with the group-sum term in quadrature; out and dV as +lse.
See docs/benchmarks-calibration.md, "Near-threshold families: -65504 rows and negative LSE".
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import runpy
import sys

import torch

import harness.core.references as core_refs
from harness.core.cancellation import combined, row_terms, ulp
from harness.core.case import parse_case_spec
from harness.core.metrics import tensor_metrics, yardstick
from harness.core.oracle import causal_keep_at, softmax_scale
from harness.core.references import references
from harness.implementations.sdpa import implementations as sdpa_implementations
from harness.implementations.user import implementation_from_callable
from harness.run.execute import run_implementation

from . import refkernels

FAMILIES = {
    "c1": [
        "b=3,hq=2,hkv=1,lq=63,lk=63,d=64,dtype=fp16,causal=top-left,mask=fully-masked-rows,mask_fill=-65504",
        "b=2,hq=2,hkv=2,lq=9,lk=9,d=64,dtype=fp16,mask=fully-masked-rows,mask_fill=-65504,values=large-logits",
        "b=2,hq=2,hkv=2,lq=86,lk=86,d=64,dtype=fp16,mask=fully-masked-rows,mask_fill=-65504,values=large-logits",
    ],
    "c2": [
        "b=1,hq=1,hkv=1,lq=704,lk=704,d=128,dtype=bf16,causal=top-left,mask=bool,values=negative-lse",
        "b=1,hq=1,hkv=1,lq=768,lk=768,d=64,dtype=bf16,causal=top-left,mask=bool,values=negative-lse",
        "b=2,hq=4,hkv=2,lq=192,lk=192,d=64,dtype=bf16,mask=bool,values=negative-lse",
        "b=2,hq=4,hkv=2,lq=192,lk=192,d=64,dtype=fp16,mask=bool,values=negative-lse",
        "b=2,hq=4,hkv=2,lq=192,lk=192,d=64,dtype=bf16,values=negative-lse",
        "b=1,hq=2,hkv=2,lq=145,lk=145,d=64,dtype=fp16,scale=0.3,values=negative-lse",
        "b=2,hq=8,hkv=8,lq=1,lk=128,d=128,dtype=bf16,values=negative-lse",
        "b=2,hq=8,hkv=2,lq=1,lk=128,d=64,dtype=bf16,values=negative-lse",
    ],
    "control": [  # ordinary logits, and the finfo.min rows whose zeroing (B1) must stay gross
        "b=2,hq=8,hkv=2,lq=96,lk=96,d=64",
        "b=2,hq=4,hkv=2,lq=97,lk=97,d=64,causal=top-left,dtype=fp16",
        "b=1,hq=1,hkv=1,lq=2,lk=2,d=64,mask=fully-masked-rows,mask_fill=finfo.min",
        "b=1,hq=1,hkv=1,lq=2,lk=2,d=64,dtype=fp16,mask=fully-masked-rows,mask_fill=-65504",
    ],
}

KERNELS = ["math_fp32", "flash_b64", "flash_b128", "flash_b64_log2", "flash_b64_fp32p", "flash_b64_lse64",
           "flash_b64_lse_dtype"]


def zero_huge_rows(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Wrong (the H100's B1 bug): rows whose every key carries a mask at or below -65504 come back 0."""
    out = refkernels.math_fp32(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return out
    huge = (attn_mask.float() <= -65504).all(-1, keepdim=True)
    return out.masked_fill(huge.expand_as(out), 0.0)


def ds_rounding_noise(inputs, oracle_out):
    """Per-row noise of dQ (B, Hq, Lq) and dK (B, Hkv, Lk) from rounding dS to the dtype before its GEMMs (one
    rounding per element, RMS ulp/sqrt(12)), only its coherent part: along the attention-weighted mean key
    (dQ row i: scale ||k_bar_i|| sqrt(sum_j var_ij)) and the weighted mean query (dK row j). That part is one
    scalar per row, so the designs' envelope holds one realisation of it, and on inputs whose keys share a
    huge channel (negative LSE) it is the whole dQ row error; on ordinary inputs k_bar averages out (small)."""
    case = inputs.case
    b, hkv, g, lk = case.batch, case.kv_heads, case.group_size, case.kv_len
    scale = softmax_scale(case)
    q, k, v, do, _, p = _dense(inputs)
    o = oracle_out.double()
    ds = p * (torch.matmul(do, v.transpose(-1, -2)) - (do * o).sum(-1, keepdim=True))
    var = (ulp(ds.abs(), inputs.q.dtype) ** 2) / 12  # (B, Hq, Lq, Lk)
    kbar = torch.matmul(p, k).norm(dim=-1)  # (B, Hq, Lq)
    dq = scale * kbar * var.sum(-1).sqrt()
    # dK row j (per kv head, the group's rows together): the P-weighted mean query over the rows that see j
    pq = torch.einsum("bhnk,bhnd->bhkd", p, q).view(b, hkv, g, lk, -1).sum(2)
    psum = p.sum(-2).view(b, hkv, g, lk).sum(2)
    qbar = (pq / psum.clamp_min(1e-300)[..., None]).norm(dim=-1)
    dk = scale * qbar * var.sum(-2).view(b, hkv, g, lk).sum(2).sqrt()
    return {"dq": dq, "dk": dk}


def _dense(inputs):
    """fp64 (q, k, v, dO, logits, P) with K/V expanded over the group; masked logits -inf, dead rows P = 0."""
    case = inputs.case
    g, lq = case.group_size, case.q_len
    scale = softmax_scale(case)
    q = inputs.q.double()
    k = inputs.k.double().repeat_interleave(g, 1)
    v = inputs.v.double().repeat_interleave(g, 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if inputs.mask is not None:
        m = inputs.mask
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.double()
    keep = causal_keep_at(case, torch.arange(lq))
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    return q, k, v, inputs.grad_out.double(), s, p


def dterm_pv(inputs, oracle_out):
    """The D-term with O's error taken as its final rounding plus the rounding of P~ before P~V (each P~
    element rounded once to the dtype relative to the row max, RMS ulp/sqrt(12)), in quadrature."""
    case = inputs.case
    b, hkv, g, lk = case.batch, case.kv_heads, case.group_size, case.kv_len
    scale = softmax_scale(case)
    q, k, v, do, s, p = _dense(inputs)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=torch.float64))
    pt = torch.exp(s - m)  # P~, the unnormalised P a kernel rounds (P = P~ / l)
    l = pt.sum(-1, keepdim=True)
    l = torch.where(l > 0, l, torch.ones((), dtype=torch.float64))
    # per (row, key): the variance P~'s rounding adds to P; P~ = 1 (the row's max) is exact
    sig2 = torch.where(pt < 1, (ulp(pt, inputs.q.dtype) / l) ** 2 / 12, torch.zeros((), dtype=torch.float64))
    o = oracle_out.double()
    d_round = o.to(inputs.q.dtype).double() - o
    d_pv2 = torch.matmul(sig2, v.pow(2))  # (B, H, Lq, Dv): variance of O from P~'s rounding
    w = torch.nan_to_num((do.pow(2) * (d_round.pow(2) + d_pv2)).sum(-1).sqrt(), nan=0.0)  # (B, H, Lq)
    dq = scale * w * torch.matmul(p, k).norm(dim=-1)
    dk2 = (scale**2 * torch.einsum("bhnk,bhn->bhk", p * p, (w * q.norm(dim=-1)) ** 2)).view(b, hkv, g, lk).sum(2)
    return {"dq": dq, "dk": dk2.sqrt()}


def proposed_noise(inputs, oracle_out):
    """The proposal (+all) as per-row noise for every tensor: out and dV the core's; dQ the larger of the D-term
    and sqrt(Dpv^2 + dS^2 + logit^2), dK that with the core's group-sum term in quadrature. fp32 cases: the core's
    noise."""
    terms = row_terms(inputs, oracle_out)
    core = combined(terms)
    if "dq" not in core or inputs.q.dtype == torch.float32:
        return core
    dsn = ds_rounding_noise(inputs, oracle_out)
    dpv = dterm_pv(inputs, oracle_out)
    noise = {"out": core["out"], "dv": core["dv"]}
    for name in ("dq", "dk"):
        coherent = (dpv[name] ** 2 + dsn[name] ** 2 + terms[f"logit_{name}"] ** 2).sqrt()
        noise[name] = torch.maximum(terms[f"d_{name}"], coherent)
    noise["dk"] = torch.hypot(noise["dk"], terms["head_dk"])  # the core's group-sum term, as combined() adds it
    return noise


def _proposed_references(original):
    def wrapped(case):
        refs = original(case)
        if refs.rows is not None:  # a long case's row-sampled references: left as they are
            return refs
        noise = proposed_noise(refs.inputs, refs.oracle["out"])
        sticks = {name: yardstick(name, t, refs.lowprec[name], refs.inputs, noise.get(name))
                  for name, t in refs.oracle.items()}
        return dataclasses.replace(refs, row_noise=noise, yardsticks=sticks)

    return wrapped


def install() -> None:
    """Put the proposal into every module that judges (a prototype for measuring it: calibrate, audit, tests)."""
    if getattr(core_refs.references, "_proposal", False):
        return
    wrapped = _proposed_references(core_refs.references)
    wrapped._proposal = True
    core_refs.references = wrapped
    for mod in ("harness.lab.calibrate", "harness.lab.audit", "harness.lab.diffaudit", "harness.strategies",
                "harness.run.order", "harness.run.session", "tests.helpers", "tests.test_differential",
                "tests.test_calibrate", "tests.test_guards", "tests.test_varlen"):
        try:
            m = importlib.import_module(mod)
        except ImportError:  # a module this checkout lacks (tests outside a source checkout)
            continue
        if hasattr(m, "references"):
            m.references = wrapped


def pytest_configure(config) -> None:
    """`python -m pytest -p harness.lab.nearthreshold ...`: the tests with the proposal installed."""
    install()


def _ratios(m):
    return tuple(float(m.levels[lv].ratio.max()) for lv in ("tensor", "slice", "row"))


def measure(spec: str, impls) -> list[str]:
    case = parse_case_spec(spec)
    refs = references(case)
    terms = row_terms(refs.inputs, refs.oracle["out"])
    before = {"dq": terms.get("d_dq"), "dk": terms.get("d_dk")}  # the D-term alone
    lowp = refs.inputs.q.dtype != torch.float32
    dsn = ds_rounding_noise(refs.inputs, refs.oracle["out"]) if lowp else {}
    dpv = dterm_pv(refs.inputs, refs.oracle["out"]) if lowp else {}
    lines = []
    for impl in impls:
        try:
            outs = run_implementation(impl, refs.inputs, "cpu")
        except Exception as exc:  # noqa: BLE001 - a refusal: report and go on
            lines.append(f"{case.id} {impl.name}: {type(exc).__name__} {str(exc)[:60]}")
            continue
        cells = []
        for name in ("out", "dq", "dk", "dv"):
            actual = outs.tensors.get(name)
            if actual is None:
                continue
            truth, lp, dterm = refs.oracle[name], refs.lowprec[name], before.get(name)
            now = tensor_metrics(name, actual, truth, lp, refs.inputs, dterm)
            comb = refs.row_noise.get(name)  # the core: the larger of the D-term and the logit term
            plus_lse = tensor_metrics(name, actual, truth, lp, refs.inputs, comb)
            d2 = dpv.get(name)
            comb2 = comb if d2 is None else torch.maximum(comb, d2)
            plus_do = tensor_metrics(name, actual, truth, lp, refs.inputs, comb2)
            d3 = dsn.get(name)
            comb3 = comb if d3 is None else torch.maximum(dterm, (d2**2 + d3**2 + terms[f"logit_{name}"] ** 2).sqrt())
            if d3 is not None and name == "dk":
                comb3 = torch.hypot(comb3, terms["head_dk"])
            plus_ds = tensor_metrics(name, actual, truth, lp, refs.inputs, comb3)
            fmt = lambda r: "/".join(f"{x:.2f}" if x < 1e4 else f"{x:.1e}" for x in r)
            cells.append(f"{name} {fmt(_ratios(now))} | {fmt(_ratios(plus_lse))} | {fmt(_ratios(plus_do))}"
                         f" | {fmt(_ratios(plus_ds))}")
        lines.append(f"{case.id} {impl.name.split(':')[-1]}: " + "; ".join(cells))
    return lines


def main(argv=None) -> None:

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cli"]:  # python -m harness.lab.nearthreshold cli calibrate ...: any command with the proposal
        install()
        sys.argv = ["gqa-harness", *argv[1:]]
        # the command line is the top layer: run it as a script, not imported by the lab
        runpy.run_module("harness.cli", run_name="__main__", alter_sys=True)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--family", default="all")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--torch", default="sdpa-math,sdpa-flash")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    impls = [i for i in sdpa_implementations() if i.name in args.torch.split(",")]
    impls += [implementation_from_callable(getattr(refkernels, n), n) for n in args.kernels.split(",") if n]
    impls.append(implementation_from_callable(zero_huge_rows, "zero_huge_rows"))
    specs = [s for f, ss in FAMILIES.items() if args.family in ("all", f) for s in ss]
    print("now | +lse | +lse+Dpv | +all   (tensor/slice/row; factors 2/2.5/5)")
    for spec in specs:
        for seed in range(args.seeds):
            for line in measure(f"{spec},s={seed}", impls):
                print(line, flush=True)


if __name__ == "__main__":
    main()

"""Near-threshold families (-65504 rows, negative LSE): reference kernels against the yardstick with and
without the near-threshold terms (harness/core/cancellation.py, applied in the core since 2026-12-06).

    python -m harness.lab.nearthreshold [--seeds N] [--family c1|c2|control|all]

Prints, per case and implementation, the largest error / scale at the tensor / slice / row level for each
tensor, under
  before — the yardstick before the terms (floor, low-precision designs, epsilon term, D-term);
  +logit — plus the logit-rounding term (term 1 of cancellation.py) on every tensor;
  +Dpv   — +logit, and dQ/dK's D-term the larger of it and sqrt(Dpv² + logit²);
  core   — the yardstick as it is (cancellation.row_noise: all three terms).
See docs/benchmarks-calibration.md, "Near-threshold families: -65504 rows and negative LSE".
"""

from __future__ import annotations

import argparse
import sys

import torch

from harness.core.cancellation import rounding_terms
from harness.core.case import parse_case_spec
from harness.core.metrics import tensor_metrics
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


def _ratios(m):
    return tuple(float(m.levels[lv].ratio.max()) for lv in ("tensor", "slice", "row"))


def _fmt(r) -> str:
    return "/".join(f"{x:.2f}" if x < 1e4 else f"{x:.1e}" for x in r)


def measure(spec: str, impls) -> list[str]:
    case = parse_case_spec(spec)
    refs = references(case)
    t = rounding_terms(refs.inputs, refs.oracle["out"], refs.rows)
    before = {name: t[f"d_{name}"] for name in ("dq", "dk") if f"d_{name}" in t}
    logit = {name: t[f"logit_{name}"] for name in ("out", "dq", "dk", "dv") if f"logit_{name}" in t}
    plus_logit = {n: torch.maximum(before[n], x) if n in before else x for n, x in logit.items()}
    plus_dpv = dict(plus_logit)
    for name in ("dq", "dk"):
        if f"dpv_{name}" in t:
            plus_dpv[name] = torch.maximum(before[name], (t[f"dpv_{name}"].pow(2) + logit[name].pow(2)).sqrt())
    columns = (before, plus_logit, plus_dpv, refs.row_noise)
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
            truth, lp = refs.oracle[name], refs.lowprec[name]
            ratios = [_fmt(_ratios(tensor_metrics(name, actual, truth, lp, refs.inputs, col.get(name))))
                      for col in columns]
            cells.append(f"{name} " + " | ".join(ratios))
        lines.append(f"{case.id} {impl.name.split(':')[-1]}: " + "; ".join(cells))
    return lines


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    print("before | +logit | +logit+Dpv | core   (tensor/slice/row; factors 2/2.5/5)")
    for spec in specs:
        for seed in range(args.seeds):
            for line in measure(f"{spec},s={seed}", impls):
                print(line, flush=True)


if __name__ == "__main__":
    main()

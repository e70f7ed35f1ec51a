"""The text of a standalone repro script for one (case, implementation, tensor).

The script imports only torch (and the user's module for a user kernel). It rebuilds the
inputs from the seed exactly as harness/core/inputs.py does (or loads them from inputs.pt beside
it when the case has a mask or bent value distributions, which would take more lines to
explain than a file), checks their SHA-256 against the harness's, runs the kernel forward
and backward with the backend pinned, computes the fp64 reference and the low-precision
reference (the harness's four accepted fp32-accumulating designs) inline, prints error vs
the dtype floor and the reference per level and per (batch, head), and exits 1 while the
error is beyond the harness's factor at some level, 0 otherwise.
"""

from __future__ import annotations

import torch

from ..core.cancellation import LOGIT_CAP, SIGNIFICAND_BITS
from ..core.case import Case
from ..core.inputs import Inputs
from ..core.metrics import magnitude
from ..core.oracle import softmax_scale
from ..core.sampling import sample_rows
from ..core.verdict import Tolerances

BACKENDS = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
TORCH_DTYPE = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}


class ReproError(ValueError):
    """This (case, implementation) cannot be written as a standalone script; one line why."""


DENSE_REFERENCE_LIMIT_GIB = 96.0  # what a repro script's fp64 reference may ask of a GPU host (the 128k long cases: ~68)
SAVED_MASK_LIMIT_GIB = 2.0  # what inputs.pt may weigh to be attached to an issue


def reference_rows(case: Case) -> int:
    """Query rows the script's fp64 reference computes: all of them, or a long case's row sample."""
    return len(sample_rows(case).checked) if case.long else case.q_len


def dense_reference_gib(case: Case) -> float:
    """Host memory the script's fp64 reference takes: about four B x Hq x rows x Lk fp64 tensors (logits,
    probabilities, dP, dS) alive at once, K/V repeated to Hq heads, and the per-head dK/dV before their
    group sum; a long case computes only its sampled rows."""
    logits = 4 * case.batch * case.q_heads * reference_rows(case) * case.kv_len
    per_key = case.batch * case.q_heads * case.kv_len * (case.head_dim + case.value_dim) * 2
    return 8 * (logits + per_key) / 2**30


def saved_mask_gib(case: Case) -> float:
    """inputs.pt's mask: bool, or additive in the case dtype, per query head when the case says so."""
    if not case.has_mask:
        return 0.0
    additive = case.mask == "additive" or case.mask_fill != "-inf"
    itemsize = {"fp32": 4}.get(case.dtype, 2) if additive else 1
    heads = case.q_heads if case.mask_per_head else 1
    return case.batch * heads * case.q_len * case.kv_len * itemsize / 2**30


BY_HAND = "check a few rows by hand as reports/findings/h100-sm90/efficient-mask-rows-past-2e32-over-s/repro.py does"


def check_scriptable(case: Case) -> None:
    """Refuse, before any kernel runs, a case whose standalone script could not run anywhere."""
    need = dense_reference_gib(case)
    if need > DENSE_REFERENCE_LIMIT_GIB:
        raise ReproError(f"{case.id}: the standalone script's fp64 reference would need ~{need:,.0f} GiB "
                         f"(limit {DENSE_REFERENCE_LIMIT_GIB:g}); shrink the case (--shrink), or {BY_HAND}")
    if saved_mask_gib(case) > SAVED_MASK_LIMIT_GIB:
        raise ReproError(f"{case.id}: its mask alone would make inputs.pt ~{saved_mask_gib(case):,.1f} GiB "
                         f"(limit {SAVED_MASK_LIMIT_GIB:g}); {BY_HAND}")


def inline_inputs(case: Case) -> bool:
    """Inputs rebuilt from the seed in the script (else loaded from inputs.pt)."""
    return not case.has_mask and case.values in ("normal", "uniform")


def backend_of(impl: str) -> tuple[str, bool] | None:
    """(SDPBackend name or "" for unpinned, whether kv is expanded by hand) for a built-in, else None."""
    if impl == "sdpa-default":
        return "", False
    for prefix, expanded in (("sdpa-", False), ("expanded-kv-", True)):
        if impl.startswith(prefix) and impl[len(prefix):] in BACKENDS:
            return BACKENDS[impl[len(prefix):]], expanded
    return None


def _layout(case: Case, role: str, name: str) -> str:
    if case.layout == "kv-expanded" and role in ("k", "v"):
        return f"{name}.expand(B, HQ, *{name}.shape[2:])"
    if (case.layout == "blhd" and role in "qkv") or (case.layout == "v-noncontig" and role == "v") or (
            case.layout == "grad-out-noncontig" and role == "do"):
        return f"{name}.transpose(1, 2).contiguous().transpose(1, 2)"
    return name


def _call(case: Case, impl: str, user: str | None) -> tuple[list[str], str]:
    """Import lines and the forward call, with attn_mask / is_causal as the harness passes them."""
    bottom_right = case.causal == "bottom-right"
    materialise = user is not None or (case.causal != "none" and case.has_mask)
    if case.causal == "top-left" and not case.has_mask:
        mask_arg, causal_arg = "None", "True"
    elif case.causal == "none":
        mask_arg, causal_arg = ("MASK.to(DEVICE)" if case.has_mask else "None"), "False"
    elif bottom_right and not case.has_mask and not materialise:
        mask_arg, causal_arg = "causal_lower_right(LQ, LK)", "False"
    elif not case.has_mask:
        mask_arg, causal_arg = "KEEP.to(DEVICE)", "False"
    else:
        mask_arg = "(MASK & KEEP if MASK.dtype == torch.bool else MASK.masked_fill(~KEEP, float('-inf'))).to(DEVICE)"
        causal_arg = "False"
    scale = "None" if case.scale is None else repr(case.scale)
    imports = ["import torch.nn.functional as F", "from torch.nn.attention import SDPBackend, sdpa_kernel"]
    if mask_arg.startswith("causal_lower_right"):
        imports.append("from torch.nn.attention.bias import causal_lower_right")
    if user is not None:
        module, _, attr = user.partition(":")
        imports = ["sys.path.insert(0, os.getcwd())  # the user's module, importable where they run it",
                   f"import {module} as user_module"]
        return imports, (f"out = user_module.{attr}(query=qa, key=ka, value=va, attn_mask={mask_arg}, dropout_p=0.0, "
                         f"is_causal={causal_arg}, scale={scale}, enable_gqa=HQ != HKV)")
    found = backend_of(impl)
    if found is None:
        raise ReproError(f"repro writes scripts for sdpa-*, expanded-kv-* and user kernels, not {impl!r}")
    backend, expanded = found
    kv = "ka.repeat_interleave(HQ // HKV, 1), va.repeat_interleave(HQ // HKV, 1)" if expanded else "ka, va"
    call = (f"F.scaled_dot_product_attention(qa, {kv}, attn_mask={mask_arg}, is_causal={causal_arg}, "
            f"scale={scale}, enable_gqa={'False' if expanded else 'HQ != HKV'})")
    if backend:
        return imports, f"with sdpa_kernel([SDPBackend.{backend}]):  # the backend under test, pinned\n    out = {call}"
    return imports, f"out = {call}  # unpinned: dispatch picks the backend"


def _replay(after: list[tuple[Case, str]], user: str | None) -> tuple[list[str], list[str]]:
    """Imports and lines that replay the calls which preceded an order-dependent failure."""
    if not after:
        return [], []
    lines = [
        "",
        "def replay(shape, seed, dtype, causal, scale, run):  # a call that ran before the failing one, same process",
        "    g = torch.Generator().manual_seed(seed)",
        "    b, hq, hkv, lq, lk, d, dv = shape",
        "    q, k, v = (torch.randn(b, h, n, e, generator=g).to(dtype).to(DEVICE).requires_grad_()",
        "               for h, n, e in ((hq, lq, d), (hkv, lk, d), (hkv, lk, dv)))",
        "    do = torch.randn(b, hq, lq, dv, generator=g).to(dtype).to(DEVICE)",
        "    torch.autograd.grad(run(q, k, v, causal, scale), (q, k, v), do)",
        "",
        "def pinned(backend, expand):",
        "    def run(q, k, v, causal, scale):",
        "        if expand:",
        "            k, v = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1)",
        "        with sdpa_kernel([backend]) if backend else contextlib.nullcontext():",
        "            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])",
        "    return run",
        "",
    ]
    imports = ["import contextlib", "import torch.nn.functional as F", "from torch.nn.attention import SDPBackend, sdpa_kernel"]
    for case, impl in after:
        if not inline_inputs(case) or case.causal == "bottom-right" or case.layout != "bhld":
            raise ReproError(f"cannot replay {case.id}: only unmasked, bhld, non-bottom-right calls are replayed")
        found = backend_of(impl)
        if found is not None:
            run = f"pinned({'SDPBackend.' + found[0] if found[0] else 'None'}, {found[1]})"
        elif impl == user:
            attr = impl.partition(":")[2]
            run = (f"lambda q, k, v, c, s: user_module.{attr}(query=q, key=k, value=v, attn_mask=None, dropout_p=0.0, "
                   "is_causal=c, scale=s, enable_gqa=q.shape[1] != k.shape[1])")
        else:
            raise ReproError(f"cannot replay {impl!r}: only built-in SDPA paths and the failing user kernel are replayed")
        shape = (case.batch, case.q_heads, case.kv_heads, case.q_len, case.kv_len, case.head_dim, case.value_dim)
        lines.append(f"replay({shape}, {case.seed}, {TORCH_DTYPE[case.dtype]}, {case.causal == 'top-left'}, "
                     f"{case.scale!r}, {run})  # {case.id} {impl}")
    return imports, lines


def _row_sample(case: Case) -> list[str]:
    """ROWS: the query rows the reference computes (all, or a long case's sample); GRAD_ROWS: those whose
    grad_out is kept (the rest of ROWS is checked on the output only)."""
    if not case.long:
        return ["ROWS = slice(None)  # every query row"]
    sample = sample_rows(case)
    return [f"GRAD_ROWS = {sample.rows.tolist()!r}  # the harness's row sample: grad_out is zero elsewhere",
            f"ROWS = {sample.checked.tolist()!r}  # ... and the rows whose output is checked too",
            "OFF_GRAD = ~torch.isin(torch.arange(LQ), torch.tensor(GRAD_ROWS))",
            "# a long case: the fp64 reference computes these rows only (their dK/dV share is exact: every other",
            "# row's grad_out is zero, so its dS is zero)"]


LOGIT_TERM_FROM = 2.0**10  # |S| under which fp32 resolves logits 10x finer than fp16 rounds P: the term decides nothing


def logit_term_matters(inputs: Inputs) -> bool:
    """Whether any logit can reach LOGIT_TERM_FROM (Cauchy-Schwarz bound plus the largest additive mask value):
    below it the harness's logit term never exceeds the scale's other terms (edge on the CPU: no ratio moved by
    1e-6), and the script stays without it."""
    bound = (softmax_scale(inputs.case) * float(inputs.q.double().norm(dim=-1).max())
             * float(inputs.k.double().norm(dim=-1).max()))
    mask = inputs.mask
    if mask is not None and mask.dtype != torch.bool:
        bound += float(mask.double().abs().max())
    return bound >= LOGIT_TERM_FROM


def _row_noise(tensor: str, logit_term: bool, group_sum: bool) -> list[str]:
    """The script's share of harness/core/cancellation.py: the per-row noise a correct kernel cannot avoid (the
    D-term for dQ/dK; the logit term where `logit_term`, the larger of the two; for dK/dV with a group, the
    group-sum term in quadrature; `group_sum`: dK/dV of a case with a group). No lines where no term applies: the
    attention returns `res` alone."""
    fold = ".view(B, HKV, G, LK).sum(2)"  # the group's query heads onto their kv head
    d_term = {"dq": "SCALE * w * (p @ k_).norm(dim=-1)",
              "dk": "(SCALE ** 2 * ((p * p).transpose(-1, -2) @ (w * q_.norm(dim=-1)).pow(2).unsqueeze(-1))"
                    f".squeeze(-1){fold}).sqrt()"}.get(tensor)
    if d_term is None and not logit_term and not group_sum:
        return ["    return res"]
    lines = ["    if not noise:", "        return res"]
    terms = []
    if d_term:
        lines += ["    # where dS is cancellation a correct kernel keeps D's rounding of O (the harness's D-term), per row",
                  "    w = (do_ * (o.to(DTYPE).to(compute) - o)).norm(dim=-1).nan_to_num(0.0, 0.0)"]
        terms.append(d_term)
    if logit_term:
        logit = {
            "out": "(a2.clamp_max(CAP) * p * p * (v_.pow(2).sum(-1).unsqueeze(-2) - 2 * o @ v_.transpose(-1, -2)"
                   " + o.pow(2).sum(-1, keepdim=True)).clamp_min(0)).sum(-1)",
            "dv": f"(b2 * do_.pow(2).sum(-1, keepdim=True)).sum(-2){fold}",
            "dq": "SCALE ** 2 * (wl @ k_.pow(2).sum(-1, keepdim=True)).squeeze(-1)",
            "dk": f"SCALE ** 2 * (wl.transpose(-1, -2) @ q_.pow(2).sum(-1, keepdim=True)).squeeze(-1){fold}",
        }[tensor]
        lines += ["    # fp32 logits and log-sum-exp put relative errors of fp32's resolution at |S| on P (two roundings",
                  "    # each, capped at 2^-8): the harness's logit term, per row",
                  "    ulp2 = lambda x: torch.where(x > 0, 2.0 ** (2 * torch.frexp(x)[1] - 48).double(), 0.0) / 6",
                  "    a2 = ulp2(torch.where(p > 0, s.abs(), 0.0))"]
        if tensor != "out":  # the backward recomputes P = exp(S - LSE): the logit's roundings again, and the LSE's
            lines += ["    lse = (m + l.log()).nan_to_num(0.0, 0.0, 0.0)",
                      "    b2 = (a2 + ulp2(lse.abs())).clamp_max(CAP) * p * p",
                      "    wl = b2 * (do_ @ v_.transpose(-1, -2) - (do_ * o).sum(-1, keepdim=True)).pow(2)"]
        lines.append(f"    logit = ({logit}).clamp_min(0).sqrt()")
        terms.append("logit")
    noise = f"torch.maximum({terms[0]}, {terms[1]})" if len(terms) == 2 else (terms[0] if terms else None)
    if group_sum:
        heads = "ds.transpose(-1, -2) @ q_ * SCALE" if tensor == "dk" else "p.transpose(-1, -2) @ do_"
        lines += ["    # each query head's share rounded to the dtype before the group sum (FlashAttention-2's GQA backward,",
                  "    # K/V expanded by hand): the harness's group-sum term, per key row",
                  "    ulp = lambda x: torch.where(x > 0, (2.0 ** (torch.frexp(x)[1] - BITS).double()).clamp_min(TINY), 0.0)",
                  f"    group = (ulp(({heads}).abs()).pow(2) / 12).sum(-1){fold}.sqrt()"]
        noise = "group" if noise is None else f"torch.hypot({noise}, group)"
    return [*lines, f"    return res, {noise}"]


def render_script(inputs: Inputs, impl: str, tensor: str, tol: Tolerances, header: str, device: str = "cpu",
                  user: str | None = None, after: list[tuple[Case, str]] | None = None) -> str:
    """`after`: (case, implementation) calls to replay first, for an order-dependent failure."""
    case = inputs.case
    imports, call = _call(case, impl, user)
    replay_imports, replay = _replay(after or [], user)
    imports = [*imports, *(i for i in replay_imports if i not in imports)]
    pinned = backend_of(impl)
    rules = {lv: (tol.rule(case.dtype, lv).factor, tol.rule(case.dtype, lv).min_count) for lv in ("tensor", "slice", "row")}
    draw = "torch.rand" if case.values == "uniform" else "torch.randn"
    if inline_inputs(case):
        make = [
            f"g = torch.Generator().manual_seed({case.seed})  # the harness's draws, in its order, then quantized",
            f"q, k, v = ({draw}(B, h, n, d, generator=g) for h, n, d in ((HQ, LQ, D), (HKV, LK, D), (HKV, LK, DV)))",
            "do = torch.randn(B, HQ, LQ, DV, generator=g)",
            *(["do[:, :, OFF_GRAD] = 0.0  # long case: grad_out only on the sampled rows"] if case.long else []),
            "q, k, v, do = (t.to(DTYPE) for t in (q, k, v, do))",
            "MASK = None",
        ]
    else:
        make = ["t = torch.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'inputs.pt'))  # saved beside",
                "q, k, v, do, MASK = t['q'], t['k'], t['v'], t['grad_out'], t.get('mask')"]
    keep = "None"
    rows_keep = case.long and "KEEP" not in call  # the kernel call needs no dense KEEP: the reference's rows will do
    if case.causal != "none":
        offset = 0 if case.causal == "top-left" else case.kv_len - case.q_len
        rows = "torch.tensor(ROWS)" if rows_keep else "torch.arange(LQ)"  # a long case: its sampled rows only
        keep = f"torch.arange(LK)[None, :] <= {rows}[:, None] + {offset}  # causal ({case.causal})"
    hashes = inputs.hashes()
    logit_term = logit_term_matters(inputs)
    group_sum = case.group_size > 1 and case.grads and tensor in ("dk", "dv")
    noise_lines = _row_noise(tensor, logit_term, group_sum)
    lines = [
        "#!/usr/bin/env python3",
        f'"""{header}',
        "",
        "Exits 1 while the bug is present, 0 once the error is within what a correct kernel reaches.",
        '"""',
        "import hashlib, os, sys",
        "import torch",
        *imports,
        "",
        f"DEVICE = sys.argv[1] if len(sys.argv) > 1 else {device!r}",
        f"DTYPE, T = {TORCH_DTYPE[case.dtype]}, {tensor!r}  # the tensor that is wrong",
        f"B, HQ, HKV, LQ, LK, D, DV = {case.batch}, {case.q_heads}, {case.kv_heads}, {case.q_len}, {case.kv_len}, "
        f"{case.head_dim}, {case.value_dim}",
        f"SCALE = {softmax_scale(case)!r}",
        f"FACTORS = {rules!r}  # level: (factor, min elements per unit), from harness/tolerances.toml",
        f"MAG = {magnitude(inputs, tensor)!r}  # fp32 noise where {tensor} is truly 0, per unit roundoff (the harness's)",
        *([f"CAP = {LOGIT_CAP**2!r}  # the logit term's relative P variance at most (2^-8)^2 (the harness's)"]
          if logit_term else []),
        *([f"BITS, TINY = {SIGNIFICAND_BITS[inputs.q.dtype]}, {2.0**-24 if case.dtype == 'fp16' else 0.0!r}"
           "  # the dtype's significand, fp16's subnormal spacing"] if group_sum else []),
        f"HASHES = {hashes!r}",
        *_row_sample(case),
        *make,
        f"KEEP = {keep}",
        "def sha(t):  # as the harness hashes its inputs (through numpy where there is one: GiB-sized inputs)",
        "    raw, h = (t.to(torch.uint8) if t.dtype == torch.bool else t.contiguous().view(torch.uint8)).flatten(), hashlib.sha256(f'{tuple(t.shape)}|{t.dtype}|'.encode())",
        "    try: h.update(memoryview(raw.numpy()))",
        "    except (ImportError, RuntimeError): h.update(bytes(raw.tolist()))",
        "    return h.hexdigest()",
        "named = {'q': q, 'k': k, 'v': v, 'grad_out': do, **({'mask': MASK} if MASK is not None else {})}",
        "if any(sha(x) != HASHES[n] for n, x in named.items()):",
        "    print('note: these inputs differ from the harness run (torch RNG stream changed?)')",
        "",
        *(["torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(False)  # as the harness pins it"]
          if pinned and pinned[0] == "MATH" else []),
        *replay,
        "leaves = [x.to(DEVICE).requires_grad_() for x in (q, k, v)]",
        *(["# the kernel gets (B, H, L, D) views of (B, L, H, D) storage, as HF models pass them"]
          if case.layout in ("blhd", "v-noncontig", "grad-out-noncontig") else []),
        f"qa, ka, va = {_layout(case, 'q', 'leaves[0]')}, {_layout(case, 'k', 'leaves[1]')}, "
        f"{_layout(case, 'v', 'leaves[2]')}",
        call,
        (f"grads = torch.autograd.grad(out, leaves, {_layout(case, 'do', 'do.to(DEVICE)')})"
         if case.grads else "grads = (None, None, None)  # forward-only case"),
        "got = dict(zip(('out', 'dq', 'dk', 'dv'), (out, *grads)))[T].detach().cpu().double()",
        *(["off_sample = got[:, :, OFF_GRAD] if T == 'dq' else None",
           "got = got[:, :, ROWS] if T in ('out', 'dq') else got  # the rows the reference computes"] if case.long else []),
        "",
        "def attention(compute, lowp=False, rp=False, rds=False, ro=False, rh=False, noise=False):",
        "    \"\"\"fp64 and no rounding: the truth. fp32 with roundings: a correct bf16/fp16 kernel (rp: P before",
        "    P·V and P^T·dO; rds: dS before its GEMMs; ro: O as stored in D = rowsum(dO*O); rh: per-head dK/dV).\"\"\"",
        "    r = lambda t, on=True: t.to(DTYPE).to(compute) if lowp and on else t",
        "    G = HQ // HKV",
        "    q_, k_, v_, do_ = (t.to(compute) for t in (q[:, :, ROWS], k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),",
        "                                              do[:, :, ROWS]))",
        "    s = q_ @ k_.transpose(-1, -2) * SCALE",
        "    if MASK is not None:",
        "        m_ = MASK[..., ROWS, :]",
        "        s = s.masked_fill(~m_, float('-inf')) if m_.dtype == torch.bool else s + m_.to(compute)",
        "    if KEEP is not None:",
        f"        s = s.masked_fill(~{'KEEP' if rows_keep else 'KEEP[ROWS]'}, float('-inf'))",
        "    m = s.amax(-1, keepdim=True)",
        "    p = (s - m.masked_fill(m == float('-inf'), 0)).exp()",
        "    l = p.sum(-1, keepdim=True).clamp_min(1)  # l >= 1 on live rows; rows with no visible key are 0",
        "    o = r(p, rp) @ v_ / l",
        "    p = p / l",
        "    ds = p * (do_ @ v_.transpose(-1, -2) - (do_ * r(o, ro)).sum(-1, keepdim=True))",
        "    dk = r(r(ds, rds).transpose(-1, -2) @ q_ * SCALE, rh).view(B, HKV, G, LK, D).sum(2)",
        "    dv = r(r(p, rp).transpose(-1, -2) @ do_, rh).view(B, HKV, G, LK, DV).sum(2)",
        "    res = {'out': r(o), 'dq': r(r(ds, rds) @ k_ * SCALE), 'dk': r(dk), 'dv': r(dv)}[T].double()",
        *noise_lines,
        "",
        ("truth, noise = attention(torch.float64, noise=True)" if len(noise_lines) > 1
         else "truth, noise = attention(torch.float64), None"),
        "designs = [dict(rp=1, rds=1, ro=1), dict(rp=1, rds=1, ro=1, rh=1), dict(ro=1), dict(rp=1, rds=1)]",
        "lowprec = [attention(torch.float32, True, **d) for d in designs]",
        "sq = lambda t: t.pow(2).sum(-1)  # per row",
        "norms = {'tensor': lambda t: sq(t).sum().sqrt(), 'slice': lambda t: sq(t).sum(-1).sqrt(), 'row': lambda t: sq(t).sqrt()}",
        "bad = not bool(torch.isfinite(got).all())",
        *(["if off_sample is not None and bool((off_sample != 0).any()):  # grad_out is zero there: dQ must be too",
           "    print(f'dq is nonzero on {int((off_sample != 0).any(-1).sum())} (batch, head, row) rows whose grad_out is "
           "zero (max |dq| {off_sample.abs().max():.3g})')",
           "    bad = True"] if case.long else []),
        "print(f'{T} of {tuple(truth.shape)} on {DEVICE}, torch {torch.__version__}; non-finite: {(~torch.isfinite(got)).sum().item()}')",
        "print('level   error/scale  factor   rel-L2     floor      low-prec   (worst unit)')",
        "for level, norm in norms.items():",
        "    count = {'tensor': got.numel(), 'slice': got.shape[-2] * got.shape[-1], 'row': got.shape[-1]}[level]",
        "    err, floor = norm(got - truth), norm(truth.to(DTYPE).double() - truth)",
        "    ref = torch.stack([norm(x - truth) for x in lowprec]).amax(0)",
        "    scale = torch.maximum(torch.maximum(floor, ref), torch.full_like(err, 2 ** -24 * MAG * count ** 0.5))",
        "    ratio = err / (scale if noise is None else torch.maximum(scale, norm(noise.unsqueeze(-1))))",
        "    i = int(ratio.flatten().nan_to_num(float('inf')).argmax())",
        "    at = [int(x) for x in torch.unravel_index(torch.tensor(i), ratio.shape)] if ratio.dim() else []",
        "    rel = err.flatten()[i] / norm(truth).flatten()[i].clamp_min(1e-300)",
        "    judged = count >= FACTORS[level][1]",
        "    bad |= judged and ratio.flatten()[i].item() > FACTORS[level][0]",
        "    print(f'{level:7} {ratio.flatten()[i]:11.3g}  {FACTORS[level][0] if judged else \"-\":6}  {rel:.2e}  '",
        "          f'{floor.flatten()[i]:.2e}  {ref.flatten()[i]:.2e}  {at}')",
        "    if level == 'slice':",
        "        worst = ratio.flatten().nan_to_num(float('inf')).argsort(descending=True)[:16].tolist()",
        "        print(f'  worst (batch, head) error/scale of {ratio.numel()}:', ' '.join(f'b{i // ratio.shape[1]}h{i % ratio.shape[1]}={ratio.flatten()[i]:.3g}' for i in worst))",
        "print(('BUG: ' if bad else 'OK: ') + f'{T} is ' + ('beyond' if bad else 'within') + ' what a correct kernel reaches')",
        "sys.exit(1 if bad else 0)",
    ]
    return "\n".join(lines) + "\n"

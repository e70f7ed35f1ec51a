"""flash-attn and xformers adapters, with fake packages injected into sys.modules.

Each fake implements its package's documented semantics in plain torch (layout, GQA convention,
causal alignment), so a test can show the adapter's mapping passes the verdict where it is
faithful, refuses what it cannot express, and FAILs when the mapping is deliberately wrong.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from harness.core.case import Case
from harness.run.env import gpu_facts
from harness.implementations import Implementation, builtin_implementations
from harness.implementations import thirdparty
from harness.core.results import ImplResult
from harness.run.session import run_one
from harness.core.results import Status

from .helpers import CPU, cached_references, session, tolerances

CUDA = gpu_facts("cuda:0", types.SimpleNamespace(name="H100", major=9, minor=0), None)


def _attend(q, k, v, keep, scale):
    """(B, H, L, D) attention with kv heads already matched to query heads; keep: bool (Lq, Lk) or None."""
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)


def _keep(lq: int, lk: int, bottom_right: bool) -> torch.Tensor:
    offset = lk - lq if bottom_right else 0
    return torch.arange(lq)[:, None] + offset >= torch.arange(lk)[None, :]


def fake_flash_attn_func(q, k, v, softmax_scale=None, causal=False, returns_lse=False):
    """FlashAttention's contract: (B, L, H, D), Hq a multiple of Hkv, causal aligned bottom-right."""
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    assert hq % hkv == 0 and q.stride(-1) == 1, "flash_attn_func takes (B, L, H, D) with contiguous D"
    group = hq // hkv
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(group, 1), v.transpose(1, 2).repeat_interleave(group, 1)
    out = _attend(qt, kt, vt, _keep(lq, lk, True) if causal else None, softmax_scale).transpose(1, 2)
    return (out, None) if returns_lse else out


@pytest.fixture
def fake_flash(monkeypatch):
    module = types.ModuleType("flash_attn")
    module.flash_attn_func = fake_flash_attn_func
    module.__version__ = "2.fake"
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return module


def judge(case: Case, impl: Implementation) -> ImplResult:
    reason = impl.supports(case, CPU)
    assert reason is None, reason
    return run_one(session(), cached_references(case), impl)


def test_absent_packages_are_unavailable_with_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # None in sys.modules: import fails, as if absent
    impls = builtin_implementations()
    assert "flash-attn is not installed" in impls["flash-attn"].available(CUDA)


def test_an_installed_package_is_available_on_gpus_only(fake_flash):
    impl = builtin_implementations()["flash-attn"]
    assert impl.available(CUDA) is None
    assert "CUDA/ROCm GPUs only" in impl.available(CPU)


FLASH_CASES = [
    Case(2, 8, 2, 24, 40, 32),
    Case(2, 8, 2, 24, 40, 32, causal="bottom-right"),
    Case(2, 8, 2, 1, 40, 32, causal="bottom-right"),
    Case(2, 8, 1, 32, 32, 32, causal="top-left", scale=0.2),
    Case(2, 8, 2, 32, 32, 32, dtype="fp16", causal="top-left", layout="blhd"),
]


@pytest.mark.parametrize("case", FLASH_CASES, ids=lambda c: c.id)
def test_flash_attn_mapping_passes_what_it_expresses(fake_flash, case):
    result = judge(case, builtin_implementations()["flash-attn"])
    assert result.status is Status.PASS, {k: v.reason for k, v in result.tensors.items()}
    assert result.notes["flash_attn"] == "2.fake"


@pytest.mark.parametrize("case,why", [
    (Case(2, 8, 2, 24, 40, 32, causal="top-left"), "aligns causal bottom-right"),
    (Case(2, 8, 2, 24, 40, 32, mask="bool"), "no attention mask"),
    (Case(2, 8, 2, 24, 24, 32, dtype="fp32"), "fp16/bf16 only"),
])
def test_flash_attn_refuses_what_it_cannot_express(case, why):
    assert why in builtin_implementations()["flash-attn"].supports(case, CPU)


def test_mapping_top_left_to_flash_causal_when_lengths_differ_fails_the_verdict(fake_flash):
    case = Case(2, 8, 2, 24, 40, 32, causal="top-left")
    wrong = Implementation(name="fa-wrong", family="t", forward=thirdparty.flash_forward("flash_attn"))
    assert judge(case, wrong).tensors["out"].status is Status.FAIL


def test_fa3_style_tuple_return_is_unpacked(monkeypatch):
    module = types.ModuleType("flash_attn_interface")
    module.flash_attn_func = lambda q, k, v, **kw: fake_flash_attn_func(q, k, v, returns_lse=True, **kw)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
    result = judge(Case(2, 8, 2, 16, 24, 32, causal="bottom-right"), builtin_implementations()["flash-attn3"])
    assert result.status is Status.PASS


# --- xformers -------------------------------------------------------------------------------


class LowerTriangularMask:
    bottom_right = False


class LowerTriangularFromBottomRightMask:
    bottom_right = True


def fake_memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
    """xformers' 5-D GQA contract: (B, M, G, H, K) with K/V broadcast over H; bias classes set alignment."""
    b, lq, g, h, d = query.shape
    lk = key.shape[1]
    q, k, v = (t.reshape(b, t.shape[1], g * h, t.shape[4]).transpose(1, 2) for t in (query, key, value))
    keep = _keep(lq, lk, attn_bias.bottom_right) if attn_bias is not None else None
    out = _attend(q, k, v, keep, scale)
    return out.transpose(1, 2).reshape(b, lq, g, h, out.shape[-1])


@pytest.fixture
def fake_xformers(monkeypatch):
    root, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = fake_memory_efficient_attention
    ops.fmha = types.SimpleNamespace(attn_bias=types.SimpleNamespace(
        LowerTriangularMask=LowerTriangularMask, LowerTriangularFromBottomRightMask=LowerTriangularFromBottomRightMask))
    root.ops, root.__version__ = ops, "0.fake"
    monkeypatch.setitem(sys.modules, "xformers", root)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


@pytest.mark.parametrize("case", [
    Case(2, 8, 2, 24, 40, 32), Case(2, 8, 2, 24, 40, 32, causal="top-left"),
    Case(2, 8, 2, 24, 40, 32, causal="bottom-right"), Case(2, 8, 8, 16, 16, 32, causal="top-left"),
], ids=lambda c: c.id)
def test_xformers_mapping_passes(fake_xformers, case):
    result = judge(case, builtin_implementations()["xformers"])
    assert result.status is Status.PASS, {k: v.reason for k, v in result.tensors.items()}


def test_xformers_with_query_heads_grouped_the_wrong_way_fails(fake_xformers, monkeypatch):
    def tiled(query, key, value):  # query head h paired with kv head h % Hkv instead of h // group
        b, hq, lq, d = query.shape
        hkv = key.shape[1]
        q = query.transpose(1, 2).reshape(b, lq, hq // hkv, hkv, d).transpose(2, 3)
        k, v = (t.transpose(1, 2).unsqueeze(3).expand(b, t.shape[2], hkv, hq // hkv, t.shape[3]) for t in (key, value))
        return q, k, v
    monkeypatch.setattr(thirdparty, "to_bmghk", tiled)
    result = judge(Case(2, 8, 2, 24, 40, 32), builtin_implementations()["xformers"])
    assert result.tensors["out"].status is Status.FAIL


def test_xformers_refuses_masks():
    assert "no attention masks" in builtin_implementations()["xformers"].supports(Case(2, 8, 2, 8, 8, 8, mask="bool"), CPU)

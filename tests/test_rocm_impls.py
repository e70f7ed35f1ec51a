"""ROCm flash-library implementations, tested with injected device facts and a fake library setter.

The CPU's torch has `preferred_rocm_fa_library` (a no-op here); the fake stands in for a ROCm build's
process-global choice so the tests can see which library each kernel dispatch ran under.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch.nn.attention import SDPBackend

from harness.core.case import Case
from harness.run.env import gpu_facts
from harness.implementations import Implementation, builtin_implementations
from harness.implementations import rocm
from harness.run.session import run_one
from harness.core.results import Status

from .helpers import CPU, cached_references, session, tolerances

MI300X = gpu_facts("cuda:0", types.SimpleNamespace(name="AMD Instinct MI300X", gcnArchName="gfx942:sramecc+:xnack-"), "6.2")
H100 = gpu_facts("cuda:0", types.SimpleNamespace(name="H100", major=9, minor=0), None)
NAMES = ["sdpa-flash-ck", "sdpa-efficient-ck", "sdpa-flash-aotriton", "sdpa-efficient-aotriton"]


class FakeLibrary:
    """preferred_rocm_fa_library: get with no argument, set with one; `accepts` models a build without CK."""

    def __init__(self, accepts=("default", "aotriton", "ck")):
        self.current, self.accepts, self.sets = "default", accepts, []

    def __call__(self, backend=None):
        if backend is not None:
            self.sets.append(backend)
            if backend in self.accepts:
                self.current = backend
        return f"_ROCmFABackend.{ {'ck': 'Ck', 'aotriton': 'AOTriton'}.get(self.current, 'Default') }"


@pytest.fixture
def library(monkeypatch):
    fake = FakeLibrary()
    monkeypatch.setattr(torch.backends.cuda, "preferred_rocm_fa_library", fake)
    return fake


def test_available_only_on_rocm_devices():
    impls = builtin_implementations()
    for name in NAMES:
        assert impls[name].available(MI300X) is None
        assert "only on ROCm devices, not cuda" in impls[name].available(H100)
        assert "only on ROCm devices, not cpu" in impls[name].available(CPU)


def test_a_torch_without_the_setter_offers_no_library(monkeypatch):
    monkeypatch.delattr(torch.backends.cuda, "preferred_rocm_fa_library")
    assert rocm.offered_libraries() == ()
    assert "does not offer preferred_rocm_fa_library('ck')" in builtin_implementations()["sdpa-flash-ck"].available(MI300X)


def test_this_torch_offers_both_libraries_and_names_parse():
    assert set(rocm.offered_libraries()) == {"ck", "aotriton"}
    assert rocm.library_name(torch._C._ROCmFABackend.Ck) == "ck"
    assert rocm.library_name("_ROCmFABackend.AOTriton") == "aotriton"


class _RecordLibrary(torch.autograd.Function):
    """Identity around the attention: records the library in force when its forward and backward run."""

    @staticmethod
    def forward(ctx, seen, out):
        ctx.seen = seen
        seen.append(("forward", rocm.library_name(torch.backends.cuda.preferred_rocm_fa_library())))
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.seen.append(("backward", rocm.library_name(torch.backends.cuda.preferred_rocm_fa_library())))
        return None, grad


def test_the_library_holds_for_the_attention_forward_and_backward_and_is_restored(library):
    seen: list[tuple[str, str]] = []
    pinned = rocm.pinned_kernel(SDPBackend.MATH)  # the CPU's stand-in for the ROCm flash kernel
    impl = Implementation(name="ck-test", family="t",
                          forward=rocm.library_forward("ck", lambda call: _RecordLibrary.apply(seen, pinned(call))))
    result = run_one(session(), cached_references(Case(2, 4, 2, 16, 24, 16, causal="bottom-right")), impl)
    assert result.status is Status.PASS, {k: v.reason for k, v in result.tensors.items()}
    assert seen == [("forward", "ck"), ("backward", "ck")]
    assert result.notes["rocm_fa_library"] == "ck"
    assert library.current == "default"  # restored after the backward too


def test_a_library_the_torch_does_not_take_is_unsupported_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "preferred_rocm_fa_library", FakeLibrary(accepts=("default", "aotriton")))
    impl = Implementation(name="ck-test", family="t", forward=rocm.library_forward("ck", rocm.pinned_kernel(SDPBackend.MATH)))
    result = run_one(session(), cached_references(Case(1, 2, 1, 8, 8, 8)), impl)
    assert result.status is Status.UNSUPPORTED
    assert "preferred_rocm_fa_library('ck') not supported by this torch build" in result.error

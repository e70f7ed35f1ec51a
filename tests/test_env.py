"""Device facts with injected environments: the CUDA and ROCm code paths without a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from harness.run.env import (DeviceError, device_facts, device_label, fingerprint, gpu_facts, pin_math_reduction,
                         rocm_version)
from harness.implementations import builtin_implementations, resolve, RegistryError


def test_cuda_facts_give_the_sm_architecture():
    facts = gpu_facts("cuda:0", SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0), None)
    assert (facts.kind, facts.arch, device_label(facts)) == ("cuda", "sm_90", "cuda-sm_90")


def test_rocm_facts_come_from_gcn_arch_name_when_torch_has_hip():
    props = SimpleNamespace(name="AMD Instinct MI300X", gcnArchName="gfx942:sramecc+:xnack-", major=9, minor=4)
    facts = gpu_facts("cuda:0", props, "6.2.41133")
    assert (facts.kind, facts.arch, device_label(facts)) == ("rocm", "gfx942", "rocm-gfx942")


def test_backend_availability_follows_the_device_kind():
    impls = builtin_implementations()
    cuda = gpu_facts("cuda:0", SimpleNamespace(name="H100", major=9, minor=0), None)
    rocm = gpu_facts("cuda:0", SimpleNamespace(name="MI300X", gcnArchName="gfx942"), "6.2")
    cpu = device_facts("cpu")
    assert impls["sdpa-cudnn"].available(cuda) is None
    assert "no cudnn SDPA kernel for rocm" in impls["sdpa-cudnn"].available(rocm)
    assert impls["sdpa-efficient"].available(rocm) is None
    assert "no efficient SDPA kernel for cpu" in impls["sdpa-efficient"].available(cpu)
    chosen, unavailable = resolve([], cuda)
    assert {"sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "sdpa-default"} <= {i.name for i in chosen}
    assert not any(i.canary for i in chosen)
    chosen, unavailable = resolve([], cpu)
    assert {i.name for i in chosen} == {"sdpa-math", "sdpa-flash", "sdpa-default", "expanded-kv-math", "expanded-kv-flash"}
    assert {"sdpa-efficient", "sdpa-cudnn", "expanded-kv-efficient", "expanded-kv-cudnn"} <= set(unavailable)


def test_asking_for_an_unavailable_or_unknown_implementation_is_bad_input():
    with pytest.raises(RegistryError, match="not available on cpu"):
        resolve(["sdpa-cudnn"], device_facts("cpu"))
    with pytest.raises(RegistryError, match="unknown implementation 'sdpa-fast'"):
        resolve(["sdpa-fast"], device_facts("cpu"))


def test_a_gpu_that_is_not_there_is_a_one_line_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="is not there"):
        device_facts("cuda:3")
    with pytest.raises(DeviceError, match="unknown device"):
        device_facts("tpu9")


def test_fingerprint_records_the_pinned_math_reduction_setting():
    assert pin_math_reduction(False) is False
    fp = fingerprint(device_facts("cpu"))
    assert fp["math_fp16_bf16_reduction_allowed"] is False
    assert {"torch", "cuda", "hip", "cudnn", "device_label", "cpu", "python", "harness"} <= set(fp)


def test_rocm_version_is_read_from_the_rocm_install_and_absent_without_one(tmp_path):
    (tmp_path / ".info").mkdir()
    (tmp_path / ".info" / "version").write_text("7.2.4-43\n")
    assert rocm_version({"ROCM_PATH": str(tmp_path)}) == "7.2.4-43"
    assert rocm_version({"ROCM_PATH": str(tmp_path / "nowhere")}) is None


def test_the_cli_keeps_freed_blocks_through_mallopt_and_skips_where_the_c_library_has_none():
    from harness.run.env import KEEP_BLOCKS_BELOW, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_blocks

    calls = []

    class Glibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    assert keep_freed_blocks(Glibc()) is True
    assert calls == [(M_TRIM_THRESHOLD, 1 << 30), (M_MMAP_THRESHOLD, KEEP_BLOCKS_BELOW)]
    assert keep_freed_blocks(object()) is False  # musl, macOS: no mallopt


def test_default_dispatch_note_names_the_choice_and_leaves_causal_bias_to_itself():
    """CausalBias is a Tensor subclass: handed to the private choice it read as a dense mask (MATH on the CPU,
    RuntimeError on CUDA, where the H100 models report said 'unknown' for every bottom-right case)."""
    import torch
    from torch.nn.attention.bias import causal_lower_right

    from harness.core.case import parse_case_spec
    from harness.implementations.base import SdpaCall
    from harness.implementations.sdpa import dispatch_choice

    case = parse_case_spec("b=1,hq=4,hkv=2,lq=1,lk=16,d=64,causal=bottom-right")
    q, k = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 16, 64)
    assert dispatch_choice(SdpaCall(case, q, k, k, causal_lower_right(1, 16), False, None, True)) == \
        "n/a (CausalBias dispatches itself)"
    assert dispatch_choice(SdpaCall(case, q, k, k, None, True, None, True)) == "FLASH_ATTENTION"  # the CPU's choice

"""Reports for the compare and diff tests, made by the real pipeline: real kernels judged by
run_one, streamed through JsonlSink, read back and assembled by build_report. Only the
fingerprint (which device) and the choice of kernel behind an implementation name are
synthetic, so several 'devices' can be built on one CPU."""

from __future__ import annotations

import copy
import dataclasses
from functools import lru_cache
from pathlib import Path
import tempfile

from harness.core.case import Case, case_spec
from harness.implementations.user import implementation_from_callable
from harness.reports.report import build_report
from harness.reports.store import JsonlSink, read_stream
from harness.run.session import run_one
from tests.helpers import cached_references, session
from tests import repro_kernels, wrong_kernels

# Tiny but judged at every level (tensor and slice >= 256 elements, rows of 64).
CASES = (Case(1, 4, 2, 16, 16, 64), Case(1, 4, 2, 16, 16, 64, causal="top-left"))
# name -> a kernel callable, or a built-in implementation's name (run under the report's implementation name)
KERNELS = {"correct": repro_kernels.correct, "tiled": repro_kernels.tiled_kv_heads,
           "fp32-reference": wrong_kernels.fp32_reference, "bf16-group-sum": wrong_kernels.bf16_group_sum,
           "expanded-kv-flash": "expanded-kv-flash"}

DEVICES = {
    "cpu": {"device_label": "cpu-x86_64", "device_name": "x86_64", "device": "cpu", "torch": "2.13.0+cpu"},
    "h100": {"device_label": "cuda-sm_90", "device_name": "NVIDIA H100 80GB HBM3", "device": "cuda:0",
             "torch": "2.11.0+cu128", "cuda": "12.8", "cudnn": 91900},
    "h200": {"device_label": "cuda-sm_90", "device_name": "NVIDIA H200", "device": "cuda:0", "torch": "2.11.0+cu128"},
    "mi300x": {"device_label": "rocm-gfx942", "device_name": "AMD Instinct MI300X", "device": "cuda:0",
               "torch": "2.11.0+rocm6.4", "hip": "6.4"},
}


@lru_cache(maxsize=32)
def _records(case: Case, kernel: str, impl_name: str) -> tuple[dict, dict]:
    refs = cached_references(case)
    target = KERNELS[kernel]
    if isinstance(target, str):
        impl = dataclasses.replace(session().resolve([target])[0][0], name=impl_name)
    else:
        impl = implementation_from_callable(target, impl_name)
    result = run_one(session(), refs, impl)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.jsonl"
        sink = JsonlSink(path)
        sink({"type": "case", "case_id": case.id, "case": case.to_dict(), "spec": case_spec(case),
              "input_sha256": refs.inputs.hashes()})
        sink({"type": "result", **result.to_dict()})
        sink.close()
        case_rec, result_rec = read_stream(path)
    return case_rec, result_rec


def make_report(device: str, kernels: dict[str, str], cases: tuple[Case, ...] = CASES) -> dict:
    """A report of `device` where implementation name -> which real kernel ran behind it."""
    records = []
    for case in cases:
        for impl_name, kernel in kernels.items():
            case_rec, result_rec = _records(case, kernel, impl_name)
            records += [copy.deepcopy(case_rec), copy.deepcopy(result_rec)]
    fp = {"harness": "0.1.0", "cuda": None, "hip": None, "cudnn": None, **DEVICES[device]}
    return build_report(records, fp, {"command": "synthetic"})

"""The CUDA path for real, on a GPU: device selection, results synchronised back, every default CUDA
implementation isolated in a worker, and a genuine device-side assert (a sticky error) costing one
result and a worker restart, not the run. Marked gpu/cuda and skipped where there is no GPU (CI never
has one); never faked."""

from __future__ import annotations

import pytest
import torch

from harness.core.case import Case
from harness.core.inputs import make_inputs
from harness.core.results import Status
from harness.implementations import builtin_implementations
from harness.implementations.user import load_user_implementation
from harness.run.env import device_facts
from harness.run.execute import run_implementation
from harness.run.session import CaseRunner, Session

pytestmark = [pytest.mark.gpu, pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CASE = Case(batch=2, q_heads=8, kv_heads=2, q_len=64, kv_len=64, head_dim=64)


def test_the_default_device_is_the_gpu_and_its_label_names_the_architecture():
    facts = device_facts(None)
    assert facts.device.startswith("cuda:") and facts.kind in ("cuda", "rocm")
    assert Session.open().label.startswith(f"{facts.kind}-")


def test_results_come_back_from_the_gpu_synchronised_in_their_dtype():
    outputs = run_implementation(builtin_implementations()["sdpa-math"], make_inputs(CASE), "cuda")
    assert outputs.devices["out"].startswith("cuda") and outputs.tensors["out"].device.type == "cpu"
    assert outputs.tensors["dq"].dtype == torch.bfloat16 and torch.isfinite(outputs.tensors["dq"]).all()


def test_every_default_implementation_runs_isolated_and_the_canary_fails():
    session = Session.open("cuda")
    impls, _ = session.resolve([])
    with CaseRunner(session, isolate=True) as runner:
        results = {i.name: runner.run(CASE, i) for i in [*impls, *session.canaries()]}
    assert results["sdpa-math"].status is Status.PASS
    assert results["canary-tiled-kv"].status is Status.FAIL
    assert all(r.status is not Status.ERROR for r in results.values()), {n: r.error for n, r in results.items()}


def test_a_device_side_assert_costs_one_result_and_a_worker_restart():
    session = Session.open("cuda")
    with CaseRunner(session, isolate=True, timeout=120.0) as runner:
        broken = runner.run(CASE, load_user_implementation("tests.faulty_kernels:device_assert"))
        after = runner.run(CASE, builtin_implementations()["sdpa-math"])
        starts = runner.worker.starts
    assert broken.status is Status.ERROR and broken.error_kind == "crash", broken.error
    assert after.status is Status.PASS and starts == 2  # a fresh worker, a clean context

"""Isolation: crashing, hanging, OOM and raising kernels in the same run as healthy ones.

The faulty kernels (tests/faulty_kernels.py) run as user kernels in the worker process; each
must be recorded as what it did, and every healthy result must come out exactly as it does
when run in-process.
"""

from __future__ import annotations

import pytest
import torch

from harness.core.case import Case
from harness.run.determinism import compare_runs, run_repeated
from harness.core.results import Outputs
from harness.implementations import builtin_implementations
from harness.implementations.user import load_user_implementation
from harness.run.memory import OomTracker, device_bytes, skip_reason
from harness.reports.report import build_report
from harness.reports.store import JsonlSink, read_stream
from harness.run.plan import RunPlan, execute_plan
from harness.run.session import run_one
from harness.core.results import Status
from harness.run.worker import last_words, timeout_budget

from .helpers import cached_references, session

CASE = Case(batch=1, q_heads=4, kv_heads=2, q_len=32, kv_len=32, head_dim=64)


def _faulty(name: str):
    return load_user_implementation(f"tests.faulty_kernels:{name}")


def _plan(cases, impls, **kw) -> RunPlan:
    return RunPlan(cases=tuple(cases), impls=tuple(impls), **kw)


@pytest.mark.slow
def test_faulty_kernels_are_recorded_and_healthy_results_survive(tmp_path):
    builtins = builtin_implementations()
    impls = [builtins["sdpa-math"], _faulty("abort"), _faulty("healthy"), _faulty("hang"), builtins["sdpa-flash"],
             _faulty("oom"), _faulty("wrong_shape"), _faulty("raises"), _faulty("device_fault"),
             builtins["expanded-kv-math"]]
    sink = JsonlSink(tmp_path / "run.jsonl")
    plan = _plan([CASE], impls, isolate=True, timeout=10.0, order_check=False, log_dir=tmp_path / "logs")
    results = {r.impl: r for r in execute_plan(session(), plan, sink)}
    sink.close()

    def err(name):
        r = results[f"tests.faulty_kernels:{name}"]
        assert r.status is Status.ERROR, (name, r)
        return r

    assert err("abort").error_kind == "crash"
    assert "SIGABRT" in err("abort").error and "assertion `tile < num_tiles' failed" in err("abort").error
    assert err("hang").error_kind == "timeout" and "10 s" in err("hang").error
    assert err("oom").error_kind == "oom" and "out of memory" in err("oom").error
    assert err("raises").error_kind == "exception"
    assert err("raises").error.startswith("ValueError: injected failure")
    assert err("device_fault").error_kind == "crash" and "context poisoned" in err("device_fault").error
    shaped = results["tests.faulty_kernels:wrong_shape"]  # a contract FAIL with its reason, not an ERROR
    wrong = shaped.tensors["out"]
    assert shaped.status is Status.FAIL and wrong.rule == "contract" and "shape (1, 32, 4, 64)" in wrong.reason
    assert shaped.tensors["dq"].rule == "contract" and "not run" in shaped.tensors["dq"].reason

    # healthy kernels before, between and after the faulty ones: exactly the in-process result
    refs = cached_references(CASE)
    for name in ("sdpa-math", "sdpa-flash", "expanded-kv-math", "tests.faulty_kernels:healthy"):
        isolated = results[name]
        impl = builtins.get(name) or _faulty("healthy")
        alone = run_one(session(), refs, impl)
        assert isolated.status is Status.PASS, (name, isolated)
        for t, v in isolated.tensors.items():
            assert v.metrics.levels["tensor"].err == alone.tensors[t].metrics.levels["tensor"].err, (name, t)

    # and the stream holds every one of them, so the report does too
    report = build_report(read_stream(tmp_path / "run.jsonl"), {}, {})
    assert {r["impl"] for r in report["results"]} == {i.name for i in impls}


def test_oom_is_recorded_and_bigger_siblings_of_that_implementation_are_skipped():
    mid = CASE.replace(q_len=64, kv_len=64)
    big, small = mid.replace(q_len=128, kv_len=128), CASE
    oom, healthy = _faulty("oom"), builtin_implementations()["sdpa-math"]
    results = {(r.case_id, r.impl): r for r in execute_plan(session(), _plan([mid, big, small], [oom, healthy]), lambda rec: None)}
    assert results[(mid.id, oom.name)].error_kind == "oom"
    skipped = results[(big.id, oom.name)]
    assert skipped.status is Status.ERROR and skipped.error_kind == "oom" and mid.id in skipped.error
    assert "skipped" in skipped.error
    assert "skipped" not in results[(small.id, oom.name)].error  # a smaller case is still tried
    assert all(results[(c.id, healthy.name)].status is Status.PASS for c in (mid, big, small))


def test_a_case_whose_references_cannot_fit_is_skipped_up_front(monkeypatch):
    assert skip_reason(CASE, available=1_000) is not None and "host memory" in skip_reason(CASE, available=1_000)
    assert skip_reason(CASE, available=1 << 40) is None
    monkeypatch.setattr("harness.run.memory.available_host_bytes", lambda: 1_000)
    (result,) = execute_plan(session(), _plan([CASE], [builtin_implementations()["sdpa-math"]]), lambda rec: None)
    assert result.status is Status.UNSUPPORTED and result.error_kind == "memory"


def test_oom_tracker_orders_cases_by_device_footprint():
    tracker = OomTracker()
    tracker.record("k", CASE.replace(q_len=64, kv_len=64))
    assert device_bytes(CASE.replace(q_len=128, kv_len=128)) > device_bytes(CASE)
    assert tracker.skip_reason("k", CASE.replace(q_len=128, kv_len=128))
    assert tracker.skip_reason("k", CASE) is None
    assert tracker.skip_reason("other", CASE.replace(q_len=128, kv_len=128)) is None


def test_timeout_budget_scales_with_flops_and_can_be_overridden():
    small, big = CASE, CASE.replace(q_len=4096, kv_len=4096)
    assert timeout_budget(big, "cpu") > timeout_budget(small, "cpu") > 0
    assert timeout_budget(big, "cuda") < timeout_budget(big, "cpu")
    assert timeout_budget(big, "cpu", repeat=3) > timeout_budget(big, "cpu")
    assert timeout_budget(big, "cpu", override=7.0) == 7.0


def test_last_words_quote_the_kernel_not_the_faulthandler_dump():
    dump = ("my_kernel.cu:88: block 3: assertion failed\nFatal Python error: Aborted\n\n"
            "Current thread 0x00007f (most recent call first):\n  File \"k.py\", line 3 in abort\n\n"
            "Extension modules: numpy, torch._C (total: 2)")
    assert last_words(dump) == "my_kernel.cu:88: block 3: assertion failed"
    assert last_words("") == ""


def test_repeat_reports_bitwise_nondeterminism_per_tensor():
    base = {"out": torch.ones(2, 3), "dq": torch.zeros(2, 3)}
    calls = iter(range(10))

    def run():
        i = next(calls)
        return Outputs(tensors={"out": base["out"].clone(), "dq": base["dq"] + (1e-3 if i == 2 else 0.0)})

    det = run_repeated(run, 3).notes["determinism"]
    assert det["out"] == {"runs": 3, "differing_runs": 0, "deterministic": True, "max_abs_diff": 0.0}
    assert det["dq"]["deterministic"] is False and det["dq"]["differing_runs"] == 1
    assert det["dq"]["max_abs_diff"] == pytest.approx(1e-3)
    # -0.0 and 0.0 compare equal as numbers but not as bits
    assert not compare_runs({"x": torch.zeros(1)}, [{"x": -torch.zeros(1)}])["x"]["deterministic"]


def test_repeat_in_a_run_records_determinism_beside_the_verdict():
    (result,) = execute_plan(session(), _plan([CASE], [builtin_implementations()["sdpa-math"]], repeat=2), lambda rec: None)
    assert result.status is Status.PASS
    assert set(result.notes["determinism"]) == {"out", "dq", "dk", "dv"}
    assert all(d["deterministic"] for d in result.notes["determinism"].values())


def test_repeat_flag_puts_a_determinism_section_in_the_report(tmp_path):
    from harness.cli import main

    assert main(["run", "--device", "cpu", "--quiet", "--in-process", "--no-canary", "--case", "b=1,hq=2,hkv=1,lq=16,d=32",
                 "--impl", "sdpa-math", "--repeat", "2", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "cpu-x86_64.md").read_text()
    assert "## Determinism (--repeat)" in md and "bitwise identical" in md


def test_a_worker_draws_a_cases_inputs_once_for_its_implementations_and_afresh_after_a_call_wrote_into_them(
        monkeypatch):
    from harness.run import worker

    drawn, real_make, real_execute = [], worker.make_inputs, worker.execute
    monkeypatch.setattr(worker, "make_inputs", lambda case: drawn.append(case) or real_make(case))
    worker.case_inputs.cache_clear()
    task = {"case": CASE.to_dict(), "impl": "sdpa-math", "device": "cpu"}
    first, second = worker.serve(task), worker.serve({**task, "impl": "expanded-kv-math"})
    assert len(drawn) == 1 and first["hashes"] == second["hashes"]

    def writes_into_grad_out(impl, inputs, device, repeat=1):
        inputs.grad_out.add_(1)  # on the CPU grad_out reaches autograd uncopied
        return real_execute(impl, inputs, device, repeat)

    monkeypatch.setattr(worker, "execute", writes_into_grad_out)
    assert worker.serve(task)["hashes"] != first["hashes"]  # the parent's hash check names this call
    monkeypatch.setattr(worker, "execute", real_execute)
    assert worker.serve(task)["hashes"] == first["hashes"] and len(drawn) == 2
    worker.case_inputs.cache_clear()


def test_stopping_a_worker_interrupted_between_its_start_and_its_pipe_kills_it_without_a_second_error(tmp_path):
    """Ctrl-C can land after the process started and before its pipe was kept: close must still kill it."""
    import multiprocessing
    import time as _time

    from harness.run.worker import Worker

    worker = Worker("cpu", log_dir=tmp_path)
    proc = multiprocessing.get_context("spawn").Process(target=_time.sleep, args=(60,), daemon=True)
    proc.start()
    worker._proc, worker._conn = proc, None
    worker.stop()
    assert not proc.is_alive() and worker.pid is None


def test_outputs_come_back_through_the_spool_file_or_inline_and_the_file_is_gone_after(tmp_path):
    from harness.run.worker import spool_outputs, unspool_outputs

    outcome = Outputs({"out": torch.arange(12, dtype=torch.bfloat16).view(3, 4), "dq": None}, notes={"a": 1})
    spooled = spool_outputs(outcome, str(tmp_path))
    assert list(tmp_path.iterdir()) and "outputs" not in spooled
    back = Outputs(**unspool_outputs(spooled))
    assert torch.equal(back.tensors["out"], outcome.tensors["out"]) and back.notes == {"a": 1}
    assert not list(tmp_path.iterdir())
    inline = spool_outputs(outcome, None)
    assert torch.equal(Outputs(**unspool_outputs(inline)).tensors["out"], outcome.tensors["out"])


def test_outputs_that_cannot_be_spooled_come_back_inline(tmp_path, monkeypatch):
    from harness.run import worker

    def short_write(obj, fh):
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")  # what a file size limit gives

    outcome = Outputs({"out": torch.ones(2, 2)})
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, fh: short_write(obj, fh) if not hasattr(fh, "getvalue")
                        else real_save(obj, fh))
    reply = worker.spool_outputs(outcome, str(tmp_path))
    assert "outputs" in reply and not list(tmp_path.iterdir())

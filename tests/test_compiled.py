"""compiled-sdpa: a compiled graph really runs (never a silent eager fallback), pinning holds under
compile, and the verdict catches a translation that drops the causal mask inside the compiled region.

Compile time on a 2-core CPU is the cost here: most tests use dynamo's "eager"/"aot_eager" backends
(dynamo still traces and the graph counter still counts); one test runs the inductor build."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.nn.attention import SDPBackend

from harness.core.case import Case
from harness.implementations import Implementation, builtin_implementations, resolve
from harness.implementations.compiled import EagerFallback, compiled_forward, kernel_refusal, run_compiled
from harness.core.results import ImplResult
from harness.run.session import run_one
from harness.core.results import Status

from .helpers import CPU, cached_references, session, tolerances


def judge(case: Case, impl: Implementation) -> ImplResult:
    return run_one(session(), cached_references(case), impl)


def test_a_call_that_compiled_no_graph_is_an_error_not_a_silent_eager_run():
    q = torch.randn(1, 2, 4, 8)
    with torch.compiler.set_stance("force_eager"):  # a process-wide setting under which torch.compile runs eagerly
        with pytest.raises(EagerFallback, match="compiled no graph"):
            run_compiled(lambda x: x * 2, (q,), "eager")
    notes: dict[str, str] = {}
    # The flag is read while dynamo traces: 2 under the harness's setting, 3 if a recompile could fall back.
    out = run_compiled(lambda x: x * (2 if torch._dynamo.config.fail_on_recompile_limit_hit else 3), (q,), "eager", notes)
    assert torch.equal(out, q * 2)
    assert notes == {"compiler": "eager", "compiled_graphs": "1"}


def test_more_shapes_than_the_recompile_limit_each_run_a_compiled_graph():
    # A suite has far more cases than dynamo's recompile limit (8); each call must still compile.
    limit = torch._dynamo.config.recompile_limit
    for n in range(1, limit + 3):
        notes: dict[str, str] = {}
        q = torch.randn(1, 2, n, 8)
        run_compiled(lambda x, k: F.scaled_dot_product_attention(x, k, k), (q, q), "eager", notes)
        assert notes["compiled_graphs"] == "1"


def _aten_ops_capture(ops: list[str]):
    def fw(gm, example_inputs):
        ops.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return make_boxed_func(gm)
    return aot_autograd(fw_compiler=fw)


@pytest.mark.parametrize("backend,flash_op_expected", [(SDPBackend.FLASH_ATTENTION, True), (SDPBackend.MATH, False)])
def test_pinning_holds_under_compile(backend, flash_op_expected):
    ops: list[str] = []
    case = Case(1, 4, 2, 8, 8, 16)
    refs = cached_references(case)
    impl = Implementation(name="pin", family="t", forward=compiled_forward(backend, _aten_ops_capture(ops)))
    run_one(session(), refs, impl)
    assert ops, "no forward graph reached the compiler"
    assert any("_scaled_dot_product_flash_attention_for_cpu" in op for op in ops) == flash_op_expected


def test_a_backend_refusing_the_case_under_compile_is_unsupported_with_torchs_reason():
    # Under compile the refusal surfaces while dynamo traces with fake tensors, wrapped in its own error.
    impl = Implementation(name="eff", family="t", forward=compiled_forward(SDPBackend.EFFICIENT_ATTENTION, "eager"))
    result = judge(Case(1, 4, 2, 8, 8, 16), impl)
    assert result.status is Status.UNSUPPORTED
    assert "No viable backend for scaled_dot_product_attention" in result.error


def test_kernel_refusal_finds_torchs_text_inside_inductor_errors_and_nothing_else():
    lowering = RuntimeError("LoweringException: NotImplementedError: NYI: embedding dimension of the query, key, "
                            "and value must be at least 16 but got E=8 and Ev=8\n  target: flex_attention")
    assert kernel_refusal(lowering) == ("Unsupported under torch.compile: NYI: embedding dimension of the query, "
                                        "key, and value must be at least 16 but got E=8 and Ev=8")
    assert kernel_refusal(RuntimeError("CUDA error: an illegal memory access was encountered")) is None


def _dropping_the_mask(backend):
    inner = compiled_forward(backend, "aot_eager")
    return lambda call: inner(dataclasses.replace(call, attn_mask=None))


def test_bottom_right_causal_passes_compiled_and_fails_when_the_translation_drops_it():
    case = Case(2, 8, 2, 24, 40, 32, causal="bottom-right")
    right = judge(case, Implementation(name="c", family="t", forward=compiled_forward(SDPBackend.MATH, "aot_eager")))
    assert right.status is Status.PASS, {k: v.reason for k, v in right.tensors.items()}
    wrong = judge(case, Implementation(name="w", family="t", forward=_dropping_the_mask(SDPBackend.MATH)))
    assert wrong.tensors["out"].status is Status.FAIL


def test_compiled_paths_are_opt_in_and_listed_with_the_reason():
    impls = builtin_implementations()
    assert all(impls[n].opt_in for n in impls if n.startswith("compiled-sdpa-"))
    chosen, unavailable = resolve([], CPU)
    assert not any(i.name.startswith("compiled-sdpa-") for i in chosen)
    assert "opt-in" in unavailable["compiled-sdpa-math"]
    assert "no efficient SDPA kernel for cpu" in unavailable["compiled-sdpa-efficient"]
    chosen, _ = resolve(["compiled-sdpa-math"], CPU)
    assert [i.name for i in chosen] == ["compiled-sdpa-math"]


@pytest.mark.slow
def test_registered_compiled_math_runs_an_inductor_graph_and_passes_forward_and_backward():
    result = judge(Case(2, 4, 2, 16, 24, 16, causal="bottom-right"), builtin_implementations()["compiled-sdpa-math"])
    assert result.status is Status.PASS, {k: v.reason for k, v in result.tensors.items()}
    assert result.notes["compiler"] == "inductor" and int(result.notes["compiled_graphs"]) >= 1

"""Order dependence: a FAIL that passes alone in a fresh process is reported with what preceded it."""

from __future__ import annotations

import shlex

import pytest

from harness.core.case import Case
from harness.implementations import builtin_implementations
from harness.implementations.user import load_user_implementation
from harness.cli import _parse_call, main
from harness.run.order import candidate_singles, shrink
from harness.reports.report import order_section
from harness.reports.report import build_report
from harness.run.plan import RunPlan, execute_plan, layout_sibling_key, plan_work
from harness.core.results import Status
from harness.run.worker import Call

from .helpers import session

SHAPE = Case(batch=1, q_heads=4, kv_heads=2, q_len=32, kv_len=32, head_dim=64)


def _plan(cases, impls, **kw) -> RunPlan:
    return RunPlan(cases=tuple(cases), impls=tuple(impls), **kw)


@pytest.mark.slow
def test_a_plan_cache_bug_is_reported_order_dependent_naming_the_call_before_it(tmp_path):
    stateful = load_user_implementation("tests.faulty_kernels:stateful")
    first, second = SHAPE, SHAPE.replace(layout="grad-out-noncontig")  # same shape, another grad_out layout
    records: list[dict] = []
    results = {r.case_id: r for r in execute_plan(session(), _plan([first, second], [stateful], isolate=True,
                                                        log_dir=tmp_path), records.append)}
    assert results[first.id].status is Status.PASS
    failed = results[second.id]
    assert failed.status is Status.FAIL  # in the run, after the first layout built the plan
    order = failed.notes["order"]
    assert order["alone"] == "PASS"  # a fresh process: first call for this shape, right
    assert order["order_dependent"] is True
    assert order["after"] == [[first.id, stateful.name]]
    assert order["summary"] == f"order-dependent: passes alone, fails after {first.id} {stateful.name}"
    calls = [_parse_call(x) for x in shlex.split(order["replay"]) if "@" in x]
    assert [(c.case.id, c.impl) for c in calls] == [(first.id, stateful.name), (second.id, stateful.name)]
    assert main(shlex.split(order["replay"])[1:]) == 1  # the printed reproduce command reproduces

    report = build_report(records, {}, {})  # the re-streamed record wins
    assert "order-dependent: passes alone" in "\n".join(order_section(report))


def test_shrink_finds_the_shortest_sequence_that_still_fails():
    calls = [Call(SHAPE.replace(seed=i), "k") for i in range(8)]
    culprits = {calls[2].case.id, calls[6].case.id}
    fails = lambda seq: culprits <= {c.case.id for c in seq}  # noqa: E731
    found, tries = shrink(calls, fails, budget=50)
    assert [c.case.id for c in found] == [calls[2].case.id, calls[6].case.id] and tries <= 50
    assert shrink(calls, lambda seq: False, budget=50) == (None, 1)


def test_single_candidates_are_most_recent_first_same_implementation_first():
    a, b, c = (Call(SHAPE.replace(seed=i), impl) for i, impl in enumerate(["k", "other", "k"]))
    assert candidate_singles([a, b, c], "k") == [c, a, b]


def test_layout_siblings_run_back_to_back_and_shuffle_is_seeded():
    cases = [SHAPE, SHAPE.replace(seed=1), SHAPE.replace(layout="grad-out-noncontig"), SHAPE.replace(seed=2),
             SHAPE.replace(layout="blhd")]
    impls = [builtin_implementations()[n] for n in ("sdpa-math", "sdpa-flash", "expanded-kv-math")]
    plain = [c.id for c, _ in plan_work(_plan(cases, impls))]
    assert plain[:3] == [SHAPE.id, SHAPE.replace(layout="grad-out-noncontig").id, SHAPE.replace(layout="blhd").id]

    def order(seed):
        return [(c.id, [i.name for i in impls]) for c, impls in plan_work(_plan(cases, impls, shuffle=seed))]

    assert order(1) == order(1) and order(1) != order(2)
    assert sorted(order(1)) != order(1) or sorted(order(2)) != order(2)
    keys = [layout_sibling_key(Case(**{**SHAPE.to_dict(), "layout": "bhld"}))]
    shuffled = [c for c, _ in plan_work(_plan(cases, impls, shuffle=3))]
    positions = [i for i, c in enumerate(shuffled) if layout_sibling_key(c) in keys]
    assert positions == list(range(positions[0], positions[0] + 3))  # siblings stay together


def test_one_fail_per_signature_is_re_run_alone_and_stands_for_the_rest():
    """A layout bug fails most cases the same way: one fresh-process check per (implementation, tensor, rule)
    that reproduced alone; later FAILs of that signature say which FAIL stood for them."""
    from harness.core.results import ImplResult, TensorVerdict
    from harness.run.order import OrderChecker, Pending

    def fail(case_id, rules):
        tensors = {t: TensorVerdict(t, Status.FAIL, rule) for t, rule in rules.items()}
        return ImplResult(case_id=case_id, impl="k", status=Status.FAIL, tensors=tensors)

    class Counting(OrderChecker):
        def __init__(self, alone):
            super().__init__(session())
            self.alone, self.checked = alone, []

        def check(self, p):
            self.checked.append(p.result.case_id)
            dependent = self.alone[p.result.case_id] == "PASS"
            return {"checked": True, "alone": self.alone[p.result.case_id], "order_dependent": dependent,
                    "summary": "order-dependent" if dependent else "reproduces alone in a fresh process"}

    results = [fail("c1", {"dq": "row"}), fail("c2", {"dq": "row"}), fail("c3", {"dq": "row", "dk": "tensor"}),
               fail("c4", {"dk": "tensor"}), fail("o1", {"out": "slice"}), fail("o2", {"out": "slice"})]
    checker = Counting({"c1": "FAIL", "c2": "FAIL", "c3": "FAIL", "c4": "FAIL", "o1": "PASS", "o2": "FAIL"})
    for r in results:
        checker.pending.append(Pending(r, None, None, []))
    streamed: list[dict] = []
    notes = {r.case_id: r.notes["order"] for r in checker.finish(results, streamed.append)}
    # c2 is covered by c1; c3 adds dk tensor, so it runs; c4 is then covered; o1 was order-dependent: o2 runs too
    assert checker.checked == ["c1", "c3", "o1", "o2"]
    assert notes["c2"] == {"checked": False, "same_as": [["c1", "k"]],
                           "summary": "not re-run alone: the same failure (dq row) reproduces alone in c1 k"}
    assert notes["c4"]["same_as"] == [["c3", "k"]] and not notes["c4"]["checked"]
    assert len(streamed) == len(results)  # every FAIL carries an order note (resume reads it as checked)


def test_a_resumed_run_keeps_the_representatives_its_stream_holds_so_its_order_notes_are_the_uninterrupted_ones():
    from harness.core.results import ImplResult, Status, TensorVerdict
    from harness.run.order import OrderChecker, Pending, representatives
    from tests.helpers import session

    def fail(case_id: str) -> ImplResult:
        return ImplResult(case_id, "k", Status.FAIL, {"dk": TensorVerdict("dk", Status.FAIL, "tensor")})
    first = {"type": "result", **fail("a").to_dict()}
    first["notes"] = {"order": {"checked": True, "order_dependent": False, "summary": "fails alone too"}}
    unchecked = {"type": "result", **fail("b").to_dict()}  # killed before its order note was written
    prior = representatives([first, unchecked])
    assert list(prior) == [("k", "dk", "tensor")] and prior[("k", "dk", "tensor")].case_id == "a"
    checker = OrderChecker(session(), prior=prior)
    checker.pending.append(Pending(fail("b"), None, None, []))  # the resumed run's FAIL: covered, not re-run
    written: list = []
    (result,) = checker.finish([fail("b")], written.append)
    assert result.notes["order"]["checked"] is False and result.notes["order"]["same_as"] == [["a", "k"]]


def test_a_fail_checked_before_the_kill_and_run_again_with_its_layout_siblings_keeps_its_own_order_note():
    """The kill fell after the first FAIL's order note and before its layout sibling's: resume runs the sibling
    group again, the first FAIL included. Its note is the one it had, not "the same failure as" itself (the
    resume property test found this)."""
    from harness.core.results import ImplResult, Status, TensorVerdict
    from harness.run.order import OrderChecker, Pending, recorded_verdicts, representatives
    from tests.helpers import session

    def fail(case_id: str) -> ImplResult:
        return ImplResult(case_id, "k", Status.FAIL, {"dk": TensorVerdict("dk", Status.FAIL, "tensor")})
    own = {"checked": True, "order_dependent": False, "alone": "FAIL", "summary": "reproduces alone in a fresh process"}
    first = {"type": "result", **fail("a").to_dict()}
    first["notes"] = {"order": own}
    sibling = {"type": "result", **fail("a-blhd").to_dict()}  # killed before its order note was written
    records = [first, sibling]
    checker = OrderChecker(session(), prior=representatives(records), recorded=recorded_verdicts(records))
    for case_id in ("a", "a-blhd"):  # the group runs again, in order
        checker.pending.append(Pending(fail(case_id), None, None, []))
    a, blhd = checker.finish([fail("a"), fail("a-blhd")], [].append)
    assert a.notes["order"] == own
    assert blhd.notes["order"]["same_as"] == [["a", "k"]]

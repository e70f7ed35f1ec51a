"""Differential verdicts (harness/core/differential.py): the rules, families in suites, the run and report
plumbing, and the catalogue of subtle wrong kernels (tests/subtle_kernels.py) that only these rules see."""

from __future__ import annotations

import math

import pytest
import torch

from harness.core.case import Case
from harness.core.differential import (DiffRules, Point, absorb, family_label, group_sum, load_rules, loglog_slope,
                                       pair_differences, pair_verdicts, trend_verdicts)
from harness.core.known import parse_entry
from harness.core.references import references
from harness.core.results import Status
from harness.core.suites import SuiteError, load_suite, load_suite_text
from harness.implementations import builtin_implementations
from harness.implementations.registry import by_name, expanded_user
from harness.implementations.user import implementation_from_callable
from harness.reports.report import build_report, exit_status, render_markdown
from harness.reports.store import SCHEMA_VERSION
from harness.run.execute import execute
from harness.run.execute import capturing
from harness.run.pairs import family_judgements, pair_judgements
from harness.run.plan import RunPlan, execute_plan
from harness.run.session import Session, run_one
from tests import subtle_kernels

RULES = DiffRules({"group-trend": 0.15, "length-trend": 0.15}, 3, {"out": 1.0, "dq": 1.0, "dk": 2.5, "dv": 2.5})
BASE = Case(batch=1, q_heads=2, kv_heads=2, q_len=64, kv_len=64, head_dim=32)


@pytest.fixture(scope="module")
def session() -> Session:
    return Session.open("cpu")


def _points(ratios: dict[int, float], impl: str = "k", tensor: str = "dk") -> list[Point]:
    return [Point(BASE.replace(q_heads=2 * g), impl, tensor, r) for g, r in ratios.items()]


# --- pure rules -------------------------------------------------------------------------------------


def test_slope_is_flat_for_constant_and_half_for_sqrt():
    assert loglog_slope([(1, 1.0), (4, 1.0), (16, 1.0)]) == pytest.approx(0.0)
    assert loglog_slope([(g, 0.8 * math.sqrt(g)) for g in (1, 2, 4, 8)]) == pytest.approx(0.5)
    assert loglog_slope([(2, 1.0)]) is None


def test_group_trend_passes_flat_and_fails_growth_with_evidence():
    flat, = trend_verdicts(_points({1: 1.0, 2: 1.05, 4: 0.98, 8: 1.02}), RULES)
    assert flat.status is Status.PASS and flat.rule == "group-trend"
    grows, = trend_verdicts(_points({1: 0.7, 2: 0.8, 4: 1.1, 8: 1.4, 16: 1.87}), RULES)
    assert grows.status is Status.FAIL and grows.value == pytest.approx(0.36, abs=0.02)
    assert grows.evidence["ratios"] == {"1": 0.7, "2": 0.8, "4": 1.1, "8": 1.4, "16": 1.87}
    assert grows.reproduce.count("--case") == 5 and "--impl k" in grows.reproduce
    assert grows.family == family_label(BASE, "group-trend") == "b1-h*x2-q64-k64-d32-bf16-s0"


def test_families_need_min_points_and_only_differ_in_their_axis():
    assert trend_verdicts(_points({1: 1.0, 8: 3.0}), RULES) == []  # two group sizes: no trend judged
    other = [Point(BASE.replace(q_heads=4, head_dim=64), "k", "dk", 9.0)]
    verdicts = trend_verdicts(_points({1: 1.0, 2: 1.0, 4: 1.0}) + other, RULES)
    assert len(verdicts) == 1 and verdicts[0].status is Status.PASS


def test_group_sum_follows_repeat_interleave_and_pair_difference_is_in_floor_units():
    case = BASE.replace(q_heads=4, kv_heads=2, dtype="bf16")
    per_head = torch.randn(1, 4, 8, 4, dtype=torch.float64)
    assert torch.equal(group_sum(per_head, 2)[:, 0], per_head[:, 0] + per_head[:, 1])
    truth = {"out": torch.randn(1, 4, 8, 4, dtype=torch.float64), "dk": group_sum(per_head, 2)}
    native = {"out": truth["out"].bfloat16(), "dk": truth["dk"].bfloat16()}
    expanded = {"out": truth["out"].bfloat16(), "dk": per_head.bfloat16()}
    d = pair_differences(case, native, expanded, truth)
    assert d["out"].difference == 0.0 and 0.5 < d["dk"].difference < 3.0
    assert 0.99 < d["out"].native_error < 1.01 and 0.99 < d["dk"].native_error < 1.01  # one rounding of the truth


def test_pair_rule_fails_a_native_loss_but_not_two_correct_roundings_apart():
    """GPU decode: flash/cuDNN native GQA and expanded K/V take different kernels; both sit at the oracle's
    rounding and differ by ~1.5 floor units. A loss of native GQA's own still fails."""
    case = BASE.replace(q_heads=4, kv_heads=2, dtype="bf16")
    gen = torch.Generator().manual_seed(0)
    truth = {"out": torch.randn(1, 4, 64, 16, dtype=torch.float64, generator=gen)}
    ulp = lambda t: torch.finfo(torch.bfloat16).eps * t.abs()
    jitter = lambda: truth["out"] + 0.5 * ulp(truth["out"]) * torch.randn(truth["out"].shape, generator=gen,
                                                                           dtype=torch.float64)
    two_correct = pair_differences(case, {"out": jitter().bfloat16()}, {"out": jitter().bfloat16()}, truth)
    pair = two_correct["out"]
    assert pair.difference > 1.0 and pair.native_excess < 1.0, pair
    [verdict] = pair_verdicts(case, "k", "expanded-kv-k", two_correct, {"out": 1.0})
    assert verdict.status is Status.PASS and "no further from the oracle than the expanded run" in verdict.reason
    lossy = truth["out"] + 3 * ulp(truth["out"]) * torch.randn(truth["out"].shape, generator=gen, dtype=torch.float64)
    native_loss = pair_differences(case, {"out": lossy.bfloat16()}, {"out": truth["out"].bfloat16()}, truth)
    [verdict] = pair_verdicts(case, "k", "expanded-kv-k", native_loss, {"out": 1.0})
    assert verdict.status is Status.FAIL and verdict.evidence["native_excess_floor_units"] > 1.0, verdict.reason


def test_known_entry_absorbs_a_differential_fail_under_its_ceiling_only():
    entry = parse_entry({"id": "x", "case": "*", "impl": "k", "tensors": ["dk"], "max_ratio": 1.2, "evidence": "e",
                         "cite": ["https://example.com/1"], "differential": {"group-trend": 0.4}}, "test")
    fail, = trend_verdicts(_points({1: 0.7, 2: 0.8, 4: 1.1, 8: 1.4, 16: 1.87}), RULES)
    known = absorb(fail, [entry], "cpu-x86_64", {}, 16)
    assert known.status is Status.KNOWN and known.known_entry == "x"
    worse, = trend_verdicts(_points({1: 0.5, 4: 1.5, 16: 4.5}), RULES)
    assert absorb(worse, [entry], "cpu-x86_64", {}, 16).status is Status.FAIL


def test_rules_load_from_tolerances_toml():
    rules = load_rules()
    assert 0 < rules.max_slope["group-trend"] < 0.5 and rules.min_points >= 3
    assert rules.pair_factor["dk"] >= rules.pair_factor["out"] > 0


# --- suites -------------------------------------------------------------------------------------------


def test_family_entries_expand_into_members_differing_only_in_their_axis():
    cases = load_suite_text("[[family]]\nb = 1\nhkv = 2\ngroup_sizes = [1, 2, 4]\nlq = 16\nd = 16\n"
                            "[[family]]\nb = 1\nhq = 2\nhkv = 2\nlq = 16\nkv_lens = [32, 64, 128]\nd = 16\n", "f.toml")
    assert [c.case.q_heads for c in cases[:3]] == [2, 4, 8] and [c.case.kv_len for c in cases[3:]] == [32, 64, 128]
    assert all("family" in c.tags for c in cases) and cases[3].line == 7
    with pytest.raises(SuiteError, match="f.toml:3.*at least two"):
        load_suite_text("[[family]]\nhkv = 2\ngroup_sizes = [1]\nlq = 16\nd = 16\nb = 1\n", "f.toml")
    with pytest.raises(SuiteError, match="sets hq"):
        load_suite_text("[[family]]\nhkv = 2\nhq = 4\ngroup_sizes = [1, 2]\nlq = 16\nd = 16\nb = 1\n", "f.toml")
    assert len(load_suite("families")) >= 20


# --- run and report -------------------------------------------------------------------------------------


def _family(dtype: str = "bf16") -> list[Case]:
    return [sc.case for sc in load_suite("families") if sc.name == "group-trend" and sc.case.dtype == dtype
            and sc.case.group_size <= 8]


def test_a_run_streams_differential_verdicts_into_the_report(session):
    kernel = implementation_from_callable(subtle_kernels.group_sum_in_dtype, "tests.subtle_kernels:group_sum_in_dtype")
    builtins = builtin_implementations()
    plan = RunPlan(cases=tuple(_family()), impls=(kernel, expanded_user(kernel), builtins["sdpa-flash"],
                                                  builtins["expanded-kv-flash"]))
    records: list[dict] = []
    results = execute_plan(session, plan, records.append)
    assert all(r.status in (Status.PASS, Status.KNOWN) for r in results)  # each case alone passes
    report = build_report(records, {"device_label": "cpu-x86_64"}, {})
    assert report["schema_version"] == SCHEMA_VERSION
    verdicts = {(v["rule"], v["impl"], v["tensor"], v["status"]) for v in report["differential"]}
    assert ("group-trend", kernel.name, "dk", "FAIL") in verdicts
    # the recorded CPU flash finding now comes out of the trend rule, absorbed by its entry
    flash = [v for v in report["differential"] if v["impl"] == "sdpa-flash" and v["rule"] == "group-trend"
             and v["tensor"] == "dk"]
    assert flash and flash[0]["status"] == "KNOWN" and flash[0]["known_entry"] == "cpu-flash-gqa-dkdv-group-sum"
    assert exit_status(report) == 1
    md = render_markdown(report)
    assert "## Trends" in md and "## GQA vs expanded" in md and "## Failures" in md


def test_expanded_form_of_a_user_kernel_resolves_by_name():
    impl = by_name("expanded-kv-tests.subtle_kernels:correct")
    assert impl.name == "expanded-kv-tests.subtle_kernels:correct" and impl.family == "user"


# --- the catalogue: each subtle kernel passes every case alone and fails a differential rule -----------------

# Small families (cases/families.toml holds the larger ones the audit and the docs' table use)
FAMILIES = {
    "group": "[[family]]\nb = 1\nhkv = 2\ngroup_sizes = [1, 2, 4, 8]\nlq = 64\nd = 64\ndtype = '{dtype}'\n",
    "length": "[[family]]\nb = 1\nhq = 2\nhkv = 1\nlq = 32\nkv_lens = [{lens}]\nd = 32\ndtype = '{dtype}'\n",
}
CATALOGUE = {  # kernel -> (family, key lengths of a length family, dtype, the rule that must flag it)
    "group_sum_in_dtype": ("group", "", "bf16", "group-trend"),
    "group_sum_in_dtype_g4": ("group", "", "fp16", "group-trend"),
    "pv_blocks_in_dtype": ("length", "32, 64, 128, 256", "bf16", "length-trend"),
    "out_in_dtype_long": ("length", "128, 256, 384, 512", "bf16", "length-trend"),
    "dq_blocks_in_dtype": ("length", "64, 128, 256, 512", "fp16", "length-trend"),
    "gqa_scale_ulp": ("group", "", "bf16", "gqa-vs-expanded"),
}


def judge_family(session: Session, kernel_name: str, family: str, lens: str, dtype: str):
    """(single-case results, differential verdicts) of one subtle kernel over one family."""
    rules = load_rules()
    impl = implementation_from_callable(getattr(subtle_kernels, kernel_name), f"tests.subtle_kernels:{kernel_name}")
    cases = [sc.case for sc in load_suite_text(FAMILIES[family].format(dtype=dtype, lens=lens), "test.toml")]
    results, verdicts = [], []
    for case in cases:
        refs, kept = references(case), {}
        results.append(run_one(session, refs, impl, capturing(execute, kept)))
        if case.group_size > 1:
            run_one(session, refs, expanded_user(impl), capturing(execute, kept))
        verdicts += pair_judgements(session, rules, refs, kept)
    return results, verdicts + family_judgements(session, rules, results, cases)


def test_catalogue_has_six_subtle_kernels():
    assert set(CATALOGUE) == set(subtle_kernels.SUBTLE) and len(CATALOGUE) >= 6


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_subtle_kernel_passes_alone_and_is_flagged_by_a_differential_rule(session, name):
    family, lens, dtype, rule = CATALOGUE[name]
    results, verdicts = judge_family(session, name, family, lens, dtype)
    assert [str(r.status) for r in results] == ["PASS"] * len(results), [r.tensors for r in results]
    assert any(v.rule == rule and v.status is Status.FAIL for v in verdicts), [v.reason for v in verdicts]


def test_correct_kernel_is_flagged_by_no_rule(session):
    for family, lens, dtype in (("group", "", "bf16"), ("length", "64, 128, 256, 512", "fp16")):
        results, verdicts = judge_family(session, "correct", family, lens, dtype)
        assert all(str(r.status) == "PASS" for r in results)
        assert not [v.reason for v in verdicts if v.status is not Status.PASS]

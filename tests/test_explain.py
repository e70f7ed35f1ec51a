"""The one failure-text renderer: evidence per failing tensor, and a reproduce command that reproduces
(the replay for an order-dependent FAIL, whose lone case passes)."""

from __future__ import annotations

import shlex

from harness.cli import main
from harness.core.case import Case, case_spec
from harness.reports.explain import reproduce_command, result_text

from . import wrong_kernels
from .helpers import judge

CASE = Case(batch=1, q_heads=4, kv_heads=2, q_len=32, kv_len=32, head_dim=64)


def test_result_text_names_each_failing_tensor_its_level_and_the_command():
    result = judge(CASE, wrong_kernels.tiled_kv_heads).to_dict()
    text = result_text(result, case_spec(CASE), "cpu")
    assert text.splitlines()[0] == f"{CASE.id} [tiled_kv_heads]: FAIL"
    assert "out FAIL gross at tensor level" in text and "failing q-heads " in text
    assert text.endswith(f"reproduce: gqa-harness run --device cpu --case '{case_spec(CASE)}' --impl tiled_kv_heads")


def test_an_order_dependent_failure_reproduces_by_its_replay_not_the_lone_case():
    replay = "gqa-harness replay --device cpu --call 'b=1@k' --call 'b=2@k'"
    notes = {"order": {"order_dependent": True, "replay": replay}}
    assert reproduce_command("b=2", "k", "cpu", notes) == replay
    assert reproduce_command("b=2", "k", "cpu", {"order": {"order_dependent": False}}).startswith("gqa-harness run")


def test_a_printed_command_is_shell_quoted():
    cmd = reproduce_command("b=1,hq=2", "mod:fn;rm -rf x", "cpu")
    assert shlex.split(cmd)[-1] == "mod:fn;rm -rf x"


def test_replay_judges_the_last_call_and_exits_1_when_it_fails(capsys):
    spec = case_spec(CASE)
    assert main(["replay", "--device", "cpu", "--call", f"{spec}@sdpa-math",
                 "--call", f"{spec}@tests.wrong_kernels:tiled_kv_heads"]) == 1
    assert "[tests.wrong_kernels:tiled_kv_heads]: FAIL" in capsys.readouterr().out
    assert main(["replay", "--device", "cpu", "--call", f"{spec}@sdpa-math"]) == 0
    assert main(["replay", "--device", "cpu", "--call", "no-at-sign"]) == 2


def test_every_reproduce_command_a_report_prints_reproduces_the_failure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the printed commands write to ./gqa-report, as a user's would
    cases = [case_spec(CASE), case_spec(CASE.replace(causal="top-left", q_heads=8))]
    assert main(["run", "--device", "cpu", "--quiet", "--out", "first", "--no-canary", "--in-process", "--impl",
                 "tests.wrong_kernels:tiled_kv_heads", *(x for c in cases for x in ("--case", c))]) == 1
    lines = (tmp_path / "first" / "cpu-x86_64.md").read_text().splitlines()
    commands = [lines[i + 2].strip() for i, line in enumerate(lines) if line == "Reproduce:"]
    assert len(commands) == 2 and all(c.startswith("gqa-harness run ") for c in commands)
    for command in commands:
        assert main(shlex.split(command)[1:]) == 1, command


def _five_percent_high(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False):
    return wrong_kernels.math_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) * 1.05


def test_a_slice_table_past_the_limit_keeps_its_shape_its_worst_slices_and_the_failing_head_count(monkeypatch):
    """Regression n15 (B·H > 65,535) wrote ~300 MB of per-slice tables: past SLICE_TABLE_MAX a report keeps the
    table's shape and its worst slices, lists FAILING_HEADS_MAX failing slices and counts the rest."""
    from harness.core import metrics, results
    from harness.reports.explain import tensor_line

    monkeypatch.setattr(metrics, "SLICE_TABLE_MAX", 4)
    monkeypatch.setattr(results, "FAILING_HEADS_MAX", 3)
    verdict = judge(Case(batch=2, q_heads=8, kv_heads=2, q_len=16, kv_len=16, head_dim=32),
                    _five_percent_high).tensors["out"]
    out = verdict.to_dict()
    assert out["status"] == "FAIL" and len(verdict.failing_heads) == 16  # every (batch, head) slice fails
    kept = out["metrics"]
    assert kept["slice_ratio"] == [] and kept["slice_shape"] == [2, 8]
    ratios = [r for _, _, r in kept["worst_slices"]]
    assert len(ratios) == 16 and ratios == sorted(ratios, reverse=True)
    assert ratios[0] == round(float(verdict.metrics.levels["slice"].ratio.max()), 4)
    assert len(out["failing_heads"]) == 3 and out["failing_heads_total"] == 16
    assert "all 8 q-heads of all 2 batches" in tensor_line("out", out)


def test_a_capped_failing_head_list_says_how_many_slices_fail_in_all():
    from harness.reports.explain import failing_heads_text

    tensor = {"failing_heads": [[0, 0], [0, 1]], "failing_heads_total": 5000,
              "metrics": {"slice_ratio": [], "slice_shape": [100, 64]}}
    assert failing_heads_text(tensor, "dq") == "q-heads 0-1; 5,000 slices in all"

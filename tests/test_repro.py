"""repro: a standalone script that reproduces while the bug is there, and an issue body."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.core.case import parse_case_spec
from harness.implementations import builtin_implementations
from harness.implementations.user import load_user_implementation
from harness.core.inputs import make_inputs
from harness.repro.issue import write_repro
from harness.repro.script import ReproError, render_script
from harness.core.verdict import load_tolerances
from harness.run.session import run_one
from tests.helpers import cached_references, session

ROOT = Path(__file__).resolve().parent.parent
WRONG = "tests.repro_kernels:tiled_kv_heads"
# Runs the script as __main__ with the harness made unimportable: only torch (and the user's module) may be used.
NO_HARNESS = "import runpy, sys; sys.modules['harness'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def run_fresh(script: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_HARNESS, str(script), "cpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def _imports(text: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
    return names


@pytest.fixture(scope="module")
def wrong(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    case = parse_case_spec("b=1,hq=4,hkv=2,lq=16,lk=16,d=64,causal=top-left")
    return case, write_repro(case, load_user_implementation(WRONG), session(), out)


def test_the_script_reproduces_in_a_fresh_interpreter_with_only_torch(wrong):
    case, repro = wrong
    text = repro.script.read_text()
    assert _imports(text) <= {"hashlib", "os", "sys", "torch", "torch.nn.functional", "torch.nn.attention",
                              "tests.repro_kernels"}
    assert len(text.splitlines()) <= 90
    proc = run_fresh(repro.script)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "BUG: out is beyond" in proc.stdout and "note: these inputs differ" not in proc.stdout
    assert repro.reproduces and repro.script_exit == 1


def test_the_script_agrees_with_the_harness_and_exits_0_once_the_kernel_is_fixed(wrong, tmp_path):
    case, repro = wrong
    harness_ratio = float(re.search(r"\*\*([0-9.e+]+)×\*\*", repro.issue.read_text()).group(1))
    script_ratio = float(re.search(r"^tensor\s+([0-9.e+]+)", repro.script_output, re.M).group(1))
    assert script_ratio == pytest.approx(harness_ratio, rel=0.01)
    fixed = tmp_path / "repro.py"
    fixed.write_text(repro.script.read_text().replace("user_module.tiled_kv_heads(", "user_module.correct("))
    proc = run_fresh(fixed)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: out is within" in proc.stdout


def test_issue_body_follows_the_bug_template(wrong):
    _, repro = wrong
    body = repro.issue.read_text()
    assert body.startswith("Title: [CPU][SDPA] ")
    for section in ("### 🐛 Describe the bug", "```python", "### Observed vs expected", "### Why this is beyond normal",
                    "### Versions", "backend that ran: user kernel `tests.repro_kernels:tiled_kv_heads`",
                    "batch |", "sdpa-math", "torch: "):
        assert section in body, section
    assert "did not reproduce" not in body


def test_a_masked_case_ships_its_inputs_in_a_pt_file_beside_the_script(tmp_path):
    case = parse_case_spec("b=1,hq=4,hkv=2,lq=16,lk=20,d=64,mask=bool,causal=bottom-right")
    repro = write_repro(case, load_user_implementation(WRONG), session(), tmp_path)
    assert (tmp_path / "inputs.pt").exists() and "torch.load" in repro.script.read_text()
    assert run_fresh(repro.script).returncode == 1


def test_a_builtin_backend_is_pinned_and_a_correct_one_exits_0(tmp_path):
    case = parse_case_spec("b=1,hq=4,hkv=2,lq=16,lk=24,d=64,causal=bottom-right,layout=blhd")
    text = render_script(make_inputs(case), "sdpa-math", "dk", load_tolerances(), "test", "cpu")
    assert "sdpa_kernel([SDPBackend.MATH])" in text and "causal_lower_right(LQ, LK)" in text
    script = tmp_path / "repro.py"
    script.write_text(text)
    proc = run_fresh(script)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_nothing_to_reproduce_and_unknown_implementations_are_refused(tmp_path):
    case = parse_case_spec("b=1,hq=4,hkv=2,lq=16,d=64")
    with pytest.raises(ReproError, match="does not fail"):
        write_repro(case, builtin_implementations()["sdpa-math"], session(), tmp_path)
    with pytest.raises(ReproError, match="not 'flex"):
        render_script(make_inputs(case), "flex-attention", "out", load_tolerances(), "t")
    dense = parse_case_spec("b=8,hq=64,hkv=8,lq=16384,d=128")  # refused before any kernel runs
    with pytest.raises(ReproError, match=r"fp64 reference would need ~4,128 GiB.*--shrink"):
        write_repro(dense, builtin_implementations()["expanded-kv-efficient"], session(), tmp_path)
    masked_long = parse_case_spec("b=1,hq=32,hkv=8,lq=69632,d=128,mask=sliding-window,long=True")
    with pytest.raises(ReproError, match=r"its mask alone would make inputs.pt ~4.5 GiB"):
        write_repro(masked_long, builtin_implementations()["expanded-kv-efficient"], session(), tmp_path)


LONG = "b=1,hq=4,hkv=2,lq=1536,d=64,causal=top-left,long=True"
M65504 = "b=2,hq=2,hkv=2,lq=9,lk=9,d=64,dtype=fp16,mask=fully-masked-rows,mask_fill=-65504,values=large-logits"
NEG_LSE_GQA = "b=2,hq=4,hkv=2,lq=40,lk=40,d=64,dtype=fp16,values=negative-lse,s=10003"
M65504_CAUSAL = "b=3,hq=2,hkv=1,lq=63,lk=63,d=64,dtype=fp16,causal=top-left,mask=fully-masked-rows,mask_fill=-65504"


@pytest.mark.parametrize("tensor", ["out", "dq", "dk"])
def test_a_long_case_script_computes_only_its_sampled_rows_and_a_correct_kernel_exits_0(tmp_path, tensor):
    inputs = make_inputs(parse_case_spec(LONG))
    text = render_script(inputs, "sdpa-math", tensor, load_tolerances(), "test", "cpu")
    assert "GRAD_ROWS = [0, 1," in text and "q[:, :, ROWS]" in text
    (tmp_path / "repro.py").write_text(text)
    proc = run_fresh(tmp_path / "repro.py")
    assert proc.returncode == 0 and "differ from the harness run" not in proc.stdout, proc.stdout + proc.stderr
    rows = 1536 if tensor == "dk" else len(inputs.sample.checked)  # dK: every key, from the sampled rows only
    assert f"{tensor} of (1, {2 if tensor == 'dk' else 4}, {rows}, 64)" in proc.stdout, proc.stdout


@pytest.mark.parametrize("spec,tensor", [
    ("b=1,hq=4,hkv=2,lq=64,lk=64,d=64,values=negative-lse", "dq"),  # dS is cancellation: the D-term sets the row scale
    ("b=1,hq=4,hkv=2,lq=64,lk=64,d=64,values=negative-lse", "dk"),
    (LONG, "dq"),  # grad_out zero off the sample: the eps term's magnitude is that of the sampled rows
    # rows whose every logit carries -65504: the logit term sets the scale (math's dV tensor ratio 0.97 -> 0.15)
    (M65504, "dv"), (M65504_CAUSAL, "out"), (M65504_CAUSAL, "dk"),
    # heads whose dK/dV cancel in the group sum: the group-sum term sets the row scale (fp16: its subnormal spacing)
    (NEG_LSE_GQA, "dk"), (NEG_LSE_GQA, "dv"),
])
def test_the_script_scales_errors_as_the_harness_does_at_every_level(tmp_path, spec, tensor):
    """The script's error / scale is the harness's, level by level (its eps magnitude, D-term and logit term
    included): else a correct kernel's script exits 1 on rows whose truth is ~0 (H100: a 128k dQ row at 232x)."""
    case = parse_case_spec(spec)
    result = run_one(session(), cached_references(case), builtin_implementations()["sdpa-math"])
    inputs = make_inputs(case)
    torch.save({"q": inputs.q, "k": inputs.k, "v": inputs.v, "grad_out": inputs.grad_out,
                **({"mask": inputs.mask} if inputs.mask is not None else {})}, tmp_path / "inputs.pt")
    (tmp_path / "repro.py").write_text(render_script(inputs, "sdpa-math", tensor, load_tolerances(), "test", "cpu"))
    proc = run_fresh(tmp_path / "repro.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for level in ("tensor", "slice", "row"):
        printed = float(re.search(rf"^{level}\s+([0-9.e+-]+)", proc.stdout, re.M).group(1))
        assert printed == pytest.approx(result.tensors[tensor].metrics.summary(level)["ratio"], rel=0.01), level


@pytest.mark.parametrize("tensor", ["dq", "dk"])
def test_a_dq_or_dk_script_with_its_d_term_still_fails_a_kernel_a_few_percent_off(tmp_path, tensor):
    """The D-term widens a dQ/dK row's scale only where dS is cancellation: on ordinary rows a 3 % error
    in the one wrong tensor stays beyond what a correct kernel reaches, in the harness and in the script."""
    case = parse_case_spec("b=1,hq=4,hkv=2,lq=96,lk=96,d=64,causal=top-left")
    repro = write_repro(case, load_user_implementation(f"tests.repro_kernels:{tensor}_scaled"), session(), tmp_path,
                        tensor=tensor)
    assert repro.script_exit == 1 and f"BUG: {tensor} is beyond" in repro.script_output, repro.script_output
    assert "def attention(compute, lowp=False, rp=False, rds=False, ro=False, rh=False, noise=False)" in \
        repro.script.read_text()


@pytest.mark.parametrize("kernel", ["tiled_kv_heads", "dq_written_where_grad_out_is_zero"])
def test_a_long_case_script_fails_a_wrong_kernel(tmp_path, kernel):
    repro = write_repro(parse_case_spec(LONG), load_user_implementation(f"tests.wrong_kernels:{kernel}"), session(),
                        tmp_path)
    proc = run_fresh(repro.script)
    assert proc.returncode == 1 and "BUG" in proc.stdout, proc.stdout + proc.stderr


def test_plots_are_optional_and_drawn_when_matplotlib_is_there(tmp_path, monkeypatch):
    from harness.repro import plots
    from tests.helpers import judge
    from tests import repro_kernels

    result = judge(parse_case_spec("b=2,hq=4,hkv=2,lq=80,d=64"), repro_kernels.late_rows_scaled)
    verdict = result.tensors["out"]
    assert verdict.status.value == "FAIL" and verdict.rule == "row"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plots.available() and plots.draw_failure(verdict, tmp_path, "t") == []
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    paths = plots.draw_failure(verdict, tmp_path, "late rows", {"row": 5.0})
    assert [p.name for p in paths] == ["heads.png", "positions.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_an_order_dependent_failure_is_replayed_before_the_call(tmp_path):
    from tests import repro_kernels

    stale = load_user_implementation("tests.repro_kernels:stale_plan")
    target = parse_case_spec("b=1,hq=4,hkv=2,lq=16,lk=32,d=64")
    before = parse_case_spec("b=1,hq=4,hkv=2,lq=16,lk=8,d=64")
    repro_kernels.reset_stale_plan()
    with pytest.raises(ReproError, match="does not fail"):  # alone it is right
        write_repro(target, stale, session(), tmp_path / "alone")
    repro_kernels.reset_stale_plan()
    repro = write_repro(target, stale, session(), tmp_path, after=[(before, stale),
                                                             (before, builtin_implementations()["sdpa-math"])])
    text = repro.script.read_text()
    assert text.index("replay((1, 4, 2, 16, 8, 64, 64)") < text.index("out = user_module.stale_plan(")
    assert "Order-dependent: it fails only after" in repro.issue.read_text()
    assert run_fresh(repro.script).returncode == 1
    alone = tmp_path / "alone.py"
    alone.write_text("\n".join(line for line in text.splitlines() if not line.startswith("replay(")))
    assert run_fresh(alone).returncode == 0


def test_the_issue_body_is_short_above_its_details_and_says_what_passes_on_the_same_inputs(wrong):
    _, repro = wrong
    body = repro.issue.read_text()
    above = body[: body.index("<details>")]
    assert len(above.splitlines()) <= 80
    assert "What passes on the same inputs" in above and "group size 1 (MHA)" in above and "dtype fp16" in above
    assert "| same inputs" in above and "sdpa-math" in above
    assert "```python" not in above  # the script folds away


def test_a_second_devices_report_joins_the_triage(tmp_path, wrong):
    case, repro = wrong
    other = {"schema_version": 1, "fingerprint": {"device_name": "NVIDIA H200", "torch": "2.11.0+cu130"},
             "settings": {}, "cases": {}, "results": [{"case_id": case.id, "impl": WRONG, "status": "PASS", "tensors": {
                 "out": {"status": "PASS", "metrics": {"levels": {"tensor": {"ratio": 0.9}}}}}}]}
    again = write_repro(case, load_user_implementation(WRONG), session(), tmp_path, compare=other)
    assert "NVIDIA H200 (torch 2.11.0+cu130)" in again.issue.read_text()

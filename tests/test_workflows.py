"""The GitHub workflows and action.yml: their shell steps run here on the CPU as written
(a fake $GITHUB_STEP_SUMMARY and $GITHUB_OUTPUT, the real gqa-harness), and their
security rules hold (fork gate on GPU jobs, read-only token, SHA-pinned actions).

A GPU job's steps run with only GQA_DEVICE (cuda -> cpu) and the suite (a tiny one) changed.
What does not run here is listed in NOT_RUN_HERE with its reason: the install (this
environment is installed; its text is checked against the README), this test suite itself,
GPU-marked tests (they would only skip), and steps whose text is identical to one that runs
in another job's test (checked).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import tomllib
from pathlib import Path

import pytest

from harness.cli import main
from tests.test_plugin import statuses
from tests.workflow_steps import (ACTION, REPO, WORKFLOWS, action_steps, all_steps, download, jobs, load_yaml, resolve,
                                  run_job, triggers, uploads, workflow_files, workflow_steps)

README, TESTS = "the README's install (already done here)", "this test suite itself"
GPU = "GPU-marked tests: on a CPU they only skip"
# Same text as a step that runs in another job's test (checked below); its output is placed here.
SAME = "identical to a step executed in another job's test"
NOT_RUN_HERE = {
    ("cpu.yml", "tests"): {"install": README, "tests": TESTS},
    ("cpu.yml", "smoke"): {"install": README},
    ("cuda.yml", "plan"): {},
    ("cuda.yml", "gpu"): {"install": README, "unit": GPU},
    ("cuda.yml", "merge"): {"install": README},
    ("rocm.yml", "plan"): {"plan": SAME},
    ("rocm.yml", "gpu"): {"install": README, "env": SAME, "gpus": SAME, "run": SAME, "unit": GPU, "gate": SAME},
    ("rocm.yml", "merge"): {"install": README, "merge": SAME, "summary": SAME, "gate": SAME},
    ("nightly.yml", "plan"): {"plan": SAME},
    ("nightly.yml", "cpu"): {"install": README, "env": SAME, "edge": SAME, "hypothesis": TESTS},
    ("nightly.yml", "cuda"): {"install": README, "env": SAME, "gpus": SAME, "models": SAME, "edge": SAME},
    ("nightly.yml", "rocm"): {"install": README, "env": SAME, "gpus": SAME, "models": SAME, "edge": SAME,
                              "search": SAME},
    ("nightly.yml", "merge-cpu"): {"install": README},
    ("nightly.yml", "merge-cuda"): {"install": README, "models": SAME, "edge": SAME, "summary": SAME},
    ("nightly.yml", "merge-rocm"): {"install": README, "models": SAME, "edge": SAME, "summary": SAME},
    ("nightly.yml", "compare"): {"install": README},
    ("action.yml", "action"): {"install": README},
}
HOSTED = "ubuntu-latest"
FORK_GATE = "github.event.pull_request.head.repo.full_name == github.repository"
PINNED = re.compile(r"^\s*(?:-\s*)?uses:\s*([\w.-]+/[\w./-]+)@([0-9a-f]{40})\s+#\s*v\d+(\.\d+)+\s*$")
TINY_SUITE = """[[case]]
name = "tiny-gqa"
b = 1
hq = 2
hkv = 1
lq = 8
d = 16
dtype = "bf16"
"""
# The nightly search steps run as written with a one-second budget (the canary, the report, no example).
SEARCH_BUDGET = {"GQA_SEARCH_BUDGET": "1"}
SHARD_SUITE = TINY_SUITE.replace("hq = 2", "hq = [2, 4]").replace('dtype = "bf16"', 'dtype = ["bf16", "fp16"]')  # 2+2


# ---- checks, each shown failing on something deliberately wrong ----------------------

def pin_problems(text: str) -> list[str]:
    """Remote `uses:` lines not pinned to a full commit SHA with a `# vX.Y` comment."""
    bad = []
    for line in text.splitlines():
        m = re.match(r"^\s*(?:-\s*)?uses:\s*(\S+)", line)
        if m and not m.group(1).startswith("./") and not PINNED.match(line):
            bad.append(line.strip())
    return bad


def fork_gate_problems(doc: dict) -> list[str]:
    """Self-hosted jobs of a workflow that pull requests trigger, without the same-repository gate."""
    on = triggers(doc)
    bad = [f"trigger {t}" for t in ("pull_request_target", "workflow_run") if t in on]
    for name, job in doc["jobs"].items():
        if job.get("runs-on") != HOSTED and "pull_request" in on and FORK_GATE not in str(job.get("if", "")):
            bad.append(f"job {name}")
    return bad


def permission_problems(doc: dict) -> list[str]:
    bad = [] if doc.get("permissions") == {"contents": "read"} else ["workflow permissions"]
    return bad + [f"job {n}" for n, j in doc["jobs"].items() if "write" in json.dumps(j.get("permissions", {}))]


def test_pin_check_accepts_full_shas_and_refuses_tags_branches_and_missing_versions():
    good = "      - uses: actions/checkout@de0fac2e4500dabe0009e67214ff5f5447ce83dd # v6.0.2"
    assert pin_problems(good) == []
    for wrong in ("- uses: actions/checkout@v6", "- uses: actions/checkout@main",
                  "- uses: actions/checkout@de0fac2e4500dabe0009e67214ff5f5447ce83dd",
                  "- uses: actions/checkout@de0fac2e # v6.0.2"):
        assert pin_problems(wrong) == [wrong.strip()]


@pytest.mark.parametrize("path", [*workflow_files(), ACTION], ids=lambda p: p.name)
def test_every_third_party_action_is_pinned_by_full_commit_sha_with_its_version(path):
    assert pin_problems(path.read_text()) == []


def test_fork_gate_check_flags_a_gpu_job_without_it_and_pull_request_target():
    doc = load_yaml(WORKFLOWS / "cuda.yml")
    assert fork_gate_problems(doc) == []
    doc["jobs"]["gpu"]["if"] = "vars.GQA_CUDA_RUNNERS != ''"
    assert fork_gate_problems(doc) == ["job gpu"]
    doc[True]["pull_request_target"] = None
    assert "trigger pull_request_target" in fork_gate_problems(doc)


@pytest.mark.parametrize("path", workflow_files(), ids=lambda p: p.name)
def test_self_hosted_gpu_jobs_never_run_code_from_fork_pull_requests(path):
    assert fork_gate_problems(load_yaml(path)) == []


@pytest.mark.parametrize("path", workflow_files(), ids=lambda p: p.name)
def test_the_token_is_read_only(path):
    doc = load_yaml(path)
    assert permission_problems(doc) == []
    doc["jobs"][next(iter(doc["jobs"]))]["permissions"] = {"contents": "write"}
    assert permission_problems(doc) != []


def test_gpu_jobs_run_only_where_runner_labels_are_configured():
    for path in workflow_files():
        for name, job in jobs(path).items():
            if job.get("runs-on") != HOSTED:
                assert re.search(r"vars\.GQA_(CUDA|ROCM)_RUNNERS", str(job.get("if"))), (path.name, name)


def test_no_secrets_no_expressions_inside_shell_and_checkout_keeps_no_credentials():
    texts = [p.read_text() for p in (*workflow_files(), ACTION)]
    assert not any("secrets." in t for t in texts)
    for step in all_steps():
        where = f"{step.source}:{step.job}:{step.id or step.name}"
        assert step.run is None or "${{" not in step.run, f"{where}: pass expressions through env:"
        if step.uses and step.uses.startswith("actions/checkout@"):
            assert step.with_.get("persist-credentials") == "False", where


def test_rocm_jobs_run_in_the_digest_pinned_container_with_the_gpu_devices():
    flags = ("--device=/dev/kfd", "--device=/dev/dri", "--group-add video", "--security-opt seccomp=unconfined",
             "--shm-size=8g")
    rocm_jobs = [(p, j) for p in workflow_files() for n, j in jobs(p).items()
                 if ("rocm" in n or p.name == "rocm.yml") and j.get("runs-on") != HOSTED]  # not the hosted plan/merge
    assert len(rocm_jobs) == 2
    for path, job in rocm_jobs:
        assert re.fullmatch(r"rocm/pytorch:[\w.-]+@sha256:[0-9a-f]{64}", job["container"]["image"]), path.name
        assert all(f in job["container"]["options"] for f in flags), path.name


def test_every_run_step_is_a_short_gqa_harness_line_or_an_install_test_or_runner_fact():
    allowed = re.compile(r"gqa-harness |python -m pip install |python -m pytest |pip install |GITHUB_OUTPUT|GITHUB_PATH|"
                         r"^exit ")
    for step in all_steps():
        if step.run is None:
            continue
        lines = [ln for ln in step.run.strip().splitlines() if ln.strip()]
        assert len(lines) <= 7 and any(allowed.search(ln) for ln in lines), f"{step.source}:{step.job}:{step.id}"


def test_every_run_step_has_an_id_and_is_run_here_or_skipped_for_a_stated_reason():
    for step in all_steps():
        if step.run is None:
            continue
        assert step.id, f"{step.source}:{step.job} step {step.index} has no id"
        skipped = NOT_RUN_HERE.get((step.source, step.job))
        assert skipped is not None, f"{step.source}:{step.job} has no execution test"
    executed = {s.run.strip() for s in all_steps() if s.run and s.id not in NOT_RUN_HERE[(s.source, s.job)]}
    for (source, job), skipped in NOT_RUN_HERE.items():
        steps = {s.id: s for s in (action_steps() if source == "action.yml" else workflow_steps(WORKFLOWS / source, job))}
        assert set(skipped) <= set(steps), (source, job)
        for step_id, reason in skipped.items():
            assert reason != SAME or steps[step_id].run.strip() in executed, f"{source}:{job}:{step_id} runs nowhere"


def _readme_commands() -> tuple[str, str]:
    blocks = re.findall(r"^    (\S.*)$", (REPO / "README.md").read_text(), flags=re.M)
    install = next(b for b in blocks if b.startswith("pip install torch=="))
    test = next(b for b in blocks if b.startswith("pip install -e '.[test]' && python -m pytest"))
    return install.split(" && ")[0], test


def test_install_and_test_steps_are_the_readme_commands_and_gpu_installs_keep_torch():
    install, test = _readme_commands()
    deps = [d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
            if not d.startswith("torch")]
    gpu_install = f"python -m pip install --no-deps -e . && python -m pip install {' '.join(shlex.quote(d) for d in deps)}"
    for step in all_steps():
        if step.id == "install":
            if step.source == "action.yml":
                expected = gpu_install.replace(" -e .", ' -e "$GITHUB_ACTION_PATH"')
            elif jobs(WORKFLOWS / step.source)[step.job].get("runs-on") == HOSTED:
                expected = install
            else:
                expected = gpu_install
            assert step.run.strip() == expected, f"{step.source}:{step.job}"
        if step.id == "tests":
            assert step.run.strip() == test


def test_suites_the_workflows_name_exist_in_cases():
    names = {s.env["GQA_SUITE"] for s in all_steps() if "GQA_SUITE" in s.env and "${{" not in s.env["GQA_SUITE"]}
    names |= {"smoke"}  # the GPU workflows' default (inputs.suite || 'smoke')
    missing = sorted(n for n in names if not (REPO / "cases" / f"{n}.toml").is_file())
    assert missing == [], f"workflows run suites that cases/ does not have: {missing}"


# ---- the steps, executed -------------------------------------------------------------

def _suite_file(tmp_path_factory, name: str, text: str) -> Path:
    path = tmp_path_factory.mktemp("suite") / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory) -> Path:
    return _suite_file(tmp_path_factory, "tiny.toml", TINY_SUITE)


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory, tiny_suite) -> Path:
    """One small real CPU report, standing in for what a GPU job's run step writes."""
    out = tmp_path_factory.mktemp("report")
    assert main(["run", "--device", "cpu", "--suite", str(tiny_suite), "--impl", "sdpa-math", "--out", str(out), "--quiet",
                 "--in-process"]) == 0
    return out / "cpu-x86_64.json"


def _place(report: Path, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for suffix in (".json", ".md"):
        shutil.copy(report.with_suffix(suffix), directory / report.with_suffix(suffix).name)


def _place_baseline(report: Path, baselines: Path, report_json: dict | None = None) -> None:
    """reports/baselines/<label>.json with the noise band diff reads beside it (<label>.noise.json)."""
    from harness.core.metrics import LEVELS

    baselines.mkdir(parents=True, exist_ok=True)
    (baselines / report.name).write_text(json.dumps(report_json or json.loads(report.read_text())))
    (baselines / f"{report.stem}.noise.json").write_text(json.dumps({"bands": {lv: 1.5 for lv in LEVELS}}))


def _as_device(report: Path, directory: Path, label: str) -> None:
    """The report as if another device wrote it (for a matrix with two columns)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = json.loads(report.read_text())
    data["fingerprint"].update(device_label=label, device_kind=label.split("-")[0], device_arch=label.split("-")[1],
                               device_name=f"fake {label}", device=f"{label.split('-')[0]}:0")
    (directory / f"{label}.json").write_text(json.dumps(data))
    shutil.copy(report.with_suffix(".md"), directory / f"{label}.md")


def _context(job: str, runner: str, shard: int = 1, count: int = 1) -> dict[str, str]:
    return {"github.job": job, "github.run_number": "0", "join(matrix.runner, '-')": runner,
            "inputs.suite || 'smoke'": "smoke",
            "env.GQA_OUT": "gqa-out", "env.GQA_MATRIX": "gqa-matrix", "env.GQA_REPORTS": "nightly-reports",
            "env.GQA_SHARDS_DIR": "gqa-shards", "matrix.shard": str(shard), "needs.plan.outputs.count": str(count),
            **{f"inputs.shards || vars.GQA_{kind}_SHARDS || '1'": "1" for kind in ("CUDA", "ROCM", "NIGHTLY")}}


def _run(source: str, job: str, tmp_path: Path, runner: str, overrides: dict[str, str], extra_skip=frozenset(),
         shard: int = 1, count: int = 1):
    steps = workflow_steps(WORKFLOWS / source, job)
    skip = set(NOT_RUN_HERE[(source, job)]) | set(extra_skip)
    context = _context(job, runner, shard, count)
    run = run_job(steps, context, overrides, skip, tmp_path, tmp_path / ".steps")
    for step_id, outcome in run.outcomes.items():
        assert outcome.returncode == 0, f"{source}:{job}:{step_id}\n{outcome.stdout}\n{outcome.stderr}"
    ((name, path),) = uploads(steps, context, run.outputs, tmp_path).items()
    return run, name, path


def test_cpu_workflow_smoke_job_runs_writes_the_summary_and_names_the_artifact(tmp_path, tiny_suite):
    run, name, path = _run("cpu.yml", "smoke", tmp_path, "", {"GQA_SUITE": str(tiny_suite)})
    assert json.loads(run.outcomes["env"].stdout)["device_label"] == "cpu-x86_64"
    assert run.summary.startswith("# gqa-harness report") and "## Canary: failed as expected" in run.summary
    assert name == "gqa-report-cpu-x86_64-smoke" and (path / "cpu-x86_64.json").is_file()


@pytest.fixture(scope="module")
def shard_suite(tmp_path_factory) -> Path:
    return _suite_file(tmp_path_factory, "four.toml", SHARD_SUITE)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, shard_suite) -> Path:
    """The tiny suite in two shards with every default implementation, as a shard job's run step writes them
    (shard 1 via the CLI, as another runner of the pool would), the unsharded run, and an sdpa-math baseline; and
    an sdpa-math run as shard 1/1 (the nightly's placed edge report: only its shard settings are read)."""
    root = tmp_path_factory.mktemp("sharded")
    common = ["run", "--device", "cpu", "--suite", str(shard_suite), "--quiet", "--in-process"]
    for args, out in (([], "full"), (["--shard", "1/2"], "shard1"), (["--shard", "2/2"], "shard2"),
                      (["--shard", "1/1", "--impl", "sdpa-math"], "one-shard"), (["--impl", "sdpa-math"], "baseline")):
        assert main([*common, *args, "--out", str(root / out)]) == 0
    return root


def test_plan_job_turns_the_shard_count_into_the_matrix(tmp_path):
    steps = workflow_steps(WORKFLOWS / "cuda.yml", "plan")
    for count, shards in (("1", "[1]"), ("4", "[1,2,3,4]")):
        run = run_job(steps, _context("plan", ""), {"GQA_SHARDS": count}, set(), tmp_path, tmp_path / f".s{count}")
        assert run.outputs["plan"] == {"count": count, "shards": shards}
    for source in ("cuda.yml", "rocm.yml", "nightly.yml"):
        spec = jobs(WORKFLOWS / source)
        shard_jobs = [n for n, j in spec.items() if "matrix.shard" in json.dumps(j)]
        assert shard_jobs and all(spec[n]["needs"] == "plan" for n in shard_jobs), source
        assert all("fromJSON(needs.plan.outputs.shards)" in str(spec[n]["strategy"]["matrix"]["shard"])
                   for n in shard_jobs)


@pytest.mark.parametrize("source,runner", [("cuda.yml", "nvidia-h100"), ("rocm.yml", "linux.rocm.gpu.gfx942.1")])
def test_gpu_shard_jobs_then_the_merge_job_run_as_written(tmp_path, shard_suite, sharded, source, runner):
    """Shard 2/2 runs the gpu job's steps on the CPU (only the device and suite changed; rocm.yml's
    run steps are cuda.yml's, so its shards are placed), shard 1/2 is what another runner uploaded;
    the merge job gets them as download-artifact leaves them and must give the unsharded statuses."""
    assert {s.env.get("GQA_DEVICE") for s in workflow_steps(WORKFLOWS / source, "gpu")} == {"cuda"}
    assert "--gqa-shard" in next(s.run for s in workflow_steps(WORKFLOWS / source, "gpu") if s.id == "run")
    artifacts = {}
    for shard in (1, 2):
        job_dir = tmp_path / f"job{shard}"
        _place_baseline(sharded / "baseline" / "cpu-x86_64.json", job_dir / "reports" / "baselines")
        placed = "run" in NOT_RUN_HERE[(source, "gpu")] or shard == 1
        if placed:  # what this shard's run step writes, made by the CLI
            shutil.copytree(sharded / f"shard{shard}", job_dir / "gqa-out")
        skip = {"env", "gpus", "run", "gate"} if placed else set()  # the gate: as the other shard's, run below
        run, name, path = _run(source, "gpu", job_dir, runner, {"GQA_DEVICE": "cpu", "GQA_SUITE": str(shard_suite)},
                               skip, shard=shard, count=2)
        if not placed:
            assert run.outputs["gpus"] == {"count": "0"}  # here: pytest -n 0; on a GPU runner, one worker per GPU
            assert json.loads(run.outcomes["env"].stdout)["device_label"] == "cpu-x86_64"
        assert name == f"gqa-shard-cpu-x86_64-{runner}-shard{shard}of2" and (path / "cpu-x86_64.json").is_file()
        if not placed:
            assert "--partial: compared the 2 case(s)" in run.outcomes["gate"].summary  # it gated its own cases
        assert "::error" not in run.outcomes["summary"].stdout  # annotations come once, from the merge job
        artifacts[name] = path
    artifacts["gqa-shard-cpu-x86_64-nvidia-h100-80gb-shard1of2"] = artifacts[name]  # another label's: not ours
    merge_dir = tmp_path / "merge"
    _place_baseline(sharded / "baseline" / "cpu-x86_64.json", merge_dir / "reports" / "baselines")
    merge_steps = workflow_steps(WORKFLOWS / source, "merge")
    assert download(merge_steps, _context("merge", runner), artifacts, merge_dir) == sorted(
        n for n in artifacts if "80gb" not in n)
    if source == "cuda.yml":
        run, name, path = _run(source, "merge", merge_dir, runner, {})
        merged = json.loads((path / "cpu-x86_64.json").read_text())
        assert statuses(merged) == statuses(json.loads((sharded / "full" / "cpu-x86_64.json").read_text()))
        assert name == f"gqa-report-cpu-x86_64-{runner}" and "# gqa-harness report" in run.summary
        assert "Gate: pass" in run.outcomes["gate"].summary
    else:  # rocm.yml's merge steps are cuda.yml's (SAME): what it downloads is what the cuda test merged
        assert [s.run for s in merge_steps if s.run] == [s.run for s in workflow_steps(WORKFLOWS / "cuda.yml", "merge")
                                                         if s.run]


def test_gpu_regression_gate_fails_when_the_baseline_has_a_row_the_new_report_lost(tmp_path, cpu_report):
    _place(cpu_report, tmp_path / "gqa-out")
    baseline = json.loads(cpu_report.read_text())
    baseline["results"].append(dict(baseline["results"][0], impl="sdpa-gone"))
    _place_baseline(cpu_report, tmp_path / "reports" / "baselines", baseline)
    steps = workflow_steps(WORKFLOWS / "cuda.yml", "gpu")
    only = {"summary", "gate"}
    run = run_job(steps, _context("gpu", "nvidia-h100"), {}, {s.id for s in steps} - only, tmp_path,
                  tmp_path / ".steps")
    assert run.outcomes["summary"].returncode == 0 and run.outcomes["gate"].returncode == 1
    assert "sdpa-gone" in run.outcomes["gate"].summary  # the gate's table went to the job summary too


def test_nightly_cpu_shard_then_its_merge_job_give_one_report_per_suite(tmp_path, tiny_suite, sharded):
    shutil.copytree(sharded / "one-shard", tmp_path / "gqa-out" / "edge")  # the edge step is the models step (SAME)
    run, name, path = _run("nightly.yml", "cpu", tmp_path, "", {"GQA_SUITE": str(tiny_suite), **SEARCH_BUDGET})
    assert json.loads((path / "search" / "cpu-x86_64.json").read_text())["search"]["seed"] == 0
    assert name == "gqa-shard-nightly-cpu-x86_64-cpu-shard1of1"
    assert json.loads((path / "models" / "cpu-x86_64.json").read_text())["settings"]["shard"]["shard"] == "1/1"
    assert (path / "edge" / "cpu-x86_64.json").is_file()
    merge_dir = tmp_path / "merge"
    steps = workflow_steps(WORKFLOWS / "nightly.yml", "merge-cpu")
    assert download(steps, _context("merge-cpu", ""), {name: path, "gqa-shard-nightly-cuda-sm_90-nvidia-h100-shard1of1":
                                                        path}, merge_dir) == [name]
    run, name, path = _run("nightly.yml", "merge-cpu", merge_dir, "", {})
    assert name == "gqa-nightly-cpu-x86_64-cpu"  # what the compare job downloads (gqa-nightly-*)
    for suite in ("models", "edge"):
        assert json.loads((path / suite / "cpu-x86_64.json").read_text())["settings"]["merged"]["present"] == [1]
    assert run.summary.count("# gqa-harness report") == 2


@pytest.mark.parametrize("job,runner", [("cuda", "nvidia-h100"), ("rocm", "linux.rocm.gpu.gfx942.1")])
def test_nightly_gpu_jobs_post_run_steps_work_on_cpu_reports(tmp_path, cpu_report, job, runner):
    for suite in ("models", "edge"):
        _place(cpu_report, tmp_path / "gqa-out" / suite)
    run, name, path = _run("nightly.yml", job, tmp_path, runner, {"GQA_DEVICE": "cpu", **SEARCH_BUDGET})
    if "search" not in NOT_RUN_HERE[("nightly.yml", job)]:  # rocm's is cuda's step (SAME)
        assert (path / "search" / "cpu-x86_64.md").read_text().count("## Findings") == 1
    assert name == f"gqa-shard-nightly-cpu-x86_64-{runner}-shard1of1" and run.summary.count("# gqa-harness report") == 2
    merge = workflow_steps(WORKFLOWS / "nightly.yml", f"merge-{job}")
    assert download(merge, _context(f"merge-{job}", runner), {name: path}, tmp_path / "merge") == [name]


def test_nightly_compare_job_builds_the_matrix_from_every_downloaded_artifact(tmp_path, cpu_report):
    # What download-artifact leaves: one folder per artifact, named by the device jobs' summaries.
    for suite in ("models", "edge"):
        _place(cpu_report, tmp_path / "nightly-reports" / "gqa-nightly-cpu-x86_64-cpu" / suite)
        _as_device(cpu_report, tmp_path / "nightly-reports" / "gqa-nightly-cuda-sm_90-nvidia-h100" / suite,
                   "cuda-sm_90")
    run, name, path = _run("nightly.yml", "compare", tmp_path, "", {})
    assert (path / "models.md").is_file() and (path / "edge.md").is_file()
    assert "cuda-sm_90" in run.summary and "cpu-x86_64" in run.summary
    assert name.startswith("gqa-matrix-")


# ---- the reusable action ---------------------------------------------------------------

USER_KERNELS = """import torch.nn.functional as F


def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=attn_mask,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa).to(query.dtype)


def wrong_scale(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    scale = 1.5 * (scale if scale is not None else query.shape[-1] ** -0.5)
    return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
"""


def _action(tmp_path: Path, suite: Path, impls: str, baseline: str, skip: set[str], shard: str = "", shards: str = ""):
    (tmp_path / "usermod.py").write_text(USER_KERNELS)
    inputs = {"suite": str(suite), "implementations": impls, "device": "cpu", "dtype": "", "strict": "false",
              "baseline": baseline, "out": "gqa-report", "artifact-suffix": "kernels", "install": "true",
              "shard": shard, "shards": shards}
    context = {f"inputs.{k}": v for k, v in inputs.items()}
    return run_job(action_steps(), context, {}, set(NOT_RUN_HERE[("action.yml", "action")]) | skip, tmp_path,
                   tmp_path / ".steps")


def test_action_runs_a_user_kernel_by_module_function_and_gates_against_a_baseline(tmp_path, tiny_suite, cpu_report):
    _place_baseline(cpu_report, tmp_path / "baselines")
    run = _action(tmp_path, tiny_suite, "sdpa-math\nusermod:sdpa\n", "baselines/cpu-x86_64.json", set())
    assert {k: o.returncode for k, o in run.outcomes.items()} == {k: 0 for k in run.outcomes}, \
        {k: o.stderr[-2000:] for k, o in run.outcomes.items()}
    assert run.outputs["run"] == {"exit-code": "0"}
    assert run.outputs["summary"]["artifact-name"] == "gqa-report-cpu-x86_64-kernels"
    report = json.loads((tmp_path / run.outputs["summary"]["report-json"]).read_text())
    assert {r["impl"] for r in report["results"] if not r.get("canary")} == {"sdpa-math", "usermod:sdpa"}
    assert report["summary"]["counts"] == {"PASS": 2}


def test_action_writes_summary_and_artifact_name_then_fails_on_a_wrong_kernel(tmp_path, tiny_suite):
    run = _action(tmp_path, tiny_suite, "usermod:wrong_scale", "", {"gate"})
    assert run.outcomes["run"].returncode == 0 and run.outputs["run"] == {"exit-code": "1"}
    assert run.outputs["summary"]["artifact-name"] == "gqa-report-cpu-x86_64-kernels"
    assert "usermod:wrong_scale" in run.summary and "FAIL" in run.summary
    assert run.outcomes["status"].returncode == 1


def test_action_runs_one_shard_names_its_artifact_apart_and_gates_only_its_cases(tmp_path, shard_suite, sharded):
    _place_baseline(sharded / "baseline" / "cpu-x86_64.json", tmp_path / "baselines")
    run = _action(tmp_path, shard_suite, "sdpa-math", "baselines/cpu-x86_64.json", set(), shard="2", shards="2")
    assert {k: o.returncode for k, o in run.outcomes.items()} == {k: 0 for k in run.outcomes}, \
        {k: o.stderr[-2000:] for k, o in run.outcomes.items()}
    assert run.outputs["summary"]["artifact-name"] == "gqa-report-cpu-x86_64-kernels-shard2of2"
    report = json.loads((tmp_path / run.outputs["summary"]["report-json"]).read_text())
    assert report["fingerprint"]["shard"] == "2/2" and len(report["settings"]["shard"]["assigned"]) == 2
    assert "--partial: compared the 2 case(s)" in run.outcomes["gate"].summary

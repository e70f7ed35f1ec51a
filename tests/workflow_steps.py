"""Reads the GitHub workflows and action.yml with a YAML parser and runs their shell steps
the way a runner would (bash -eo pipefail, env merged workflow < job < step, fresh
$GITHUB_OUTPUT / $GITHUB_STEP_SUMMARY per step, step outputs fed to later steps), so the
tests prove the `run:` lines work as written. `${{ }}` expressions are only allowed in
`env:`/`with:` values (never inside `run:`), and each one must have a value in the test's
context: an unknown expression fails the test instead of passing silently.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / ".github" / "workflows"
ACTION = REPO / "action.yml"
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
STEP_OUTPUT = re.compile(r"steps\.([\w-]+)\.outputs\.([\w-]+)")
# What GitHub runs for `shell: bash` (the workflows set it as the default).
BASH = ["bash", "--noprofile", "--norc", "-eo", "pipefail"]


@dataclass(frozen=True)
class Step:
    source: str  # file name, e.g. cpu.yml or action.yml
    job: str  # job key; "action" for action.yml
    index: int
    id: str
    name: str
    run: str | None
    uses: str | None
    env: dict[str, str]  # workflow < job < step, expressions unresolved
    with_: dict[str, str]
    shell: str | None


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    outputs: dict[str, str]
    summary: str


@dataclass
class JobRun:
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        return "".join(o.summary for o in self.outcomes.values())


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def triggers(doc: dict[str, Any]) -> dict[str, Any]:
    """`on:`, which YAML 1.1 reads as the boolean True."""
    on = doc.get("on", doc.get(True))
    return on if isinstance(on, dict) else {name: None for name in ([on] if isinstance(on, str) else on)}


def _strs(mapping: dict | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (mapping or {}).items()}


def _steps(source: str, job: str, raw_steps: list[dict], env: dict[str, str], shell: str | None) -> list[Step]:
    out = []
    for i, raw in enumerate(raw_steps):
        out.append(Step(source=source, job=job, index=i, id=str(raw.get("id", "")), name=str(raw.get("name", "")),
                        run=raw.get("run"), uses=raw.get("uses"), env={**env, **_strs(raw.get("env"))},
                        with_=_strs(raw.get("with")), shell=raw.get("shell", shell)))
    return out


def workflow_files() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.yml"))


def jobs(path: Path) -> dict[str, dict[str, Any]]:
    return load_yaml(path)["jobs"]


def workflow_steps(path: Path, job: str) -> list[Step]:
    doc = load_yaml(path)
    spec = doc["jobs"][job]
    env = {**_strs(doc.get("env")), **_strs(spec.get("env"))}
    shell = (spec.get("defaults") or doc.get("defaults") or {}).get("run", {}).get("shell")
    return _steps(path.name, job, spec["steps"], env, shell)


def action_steps(path: Path = ACTION) -> list[Step]:
    return _steps(path.name, "action", load_yaml(path)["runs"]["steps"], {}, None)


def all_steps() -> list[Step]:
    steps = [s for p in workflow_files() for job in jobs(p) for s in workflow_steps(p, job)]
    return steps + action_steps()


def resolve(text: str, context: dict[str, str], outputs: dict[str, dict[str, str]]) -> str:
    def value(match: re.Match) -> str:
        expr = match.group(1)
        step = STEP_OUTPUT.fullmatch(expr)
        if step:
            return outputs.get(step[1], {}).get(step[2], "")
        if expr not in context:
            raise KeyError(f"no test value for the expression ${{{{ {expr} }}}}")
        return context[expr]

    return EXPRESSION.sub(value, text)


def parse_outputs(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k: v for k, v in pairs}


def run_step(step: Step, env: dict[str, str], cwd: Path, scratch: Path) -> Outcome:
    assert step.run is not None and step.shell == "bash", f"{step.source}:{step.job}:{step.id} must use bash"
    scratch.mkdir(parents=True, exist_ok=True)
    files = {"GITHUB_OUTPUT": scratch / "output", "GITHUB_STEP_SUMMARY": scratch / "summary",
             "GITHUB_PATH": scratch / "path", "GITHUB_ENV": scratch / "env"}
    for f in files.values():
        f.write_text("")
    script = scratch / "step.sh"
    script.write_text(step.run)
    proc = subprocess.run([*BASH, str(script)], cwd=cwd, env={**env, **{k: str(v) for k, v in files.items()}},
                          capture_output=True, text=True, timeout=600)
    return Outcome(proc.returncode, proc.stdout, proc.stderr, parse_outputs(files["GITHUB_OUTPUT"]),
                   files["GITHUB_STEP_SUMMARY"].read_text())


def uploads(steps: list[Step], context: dict[str, str], outputs: dict[str, dict[str, str]], cwd: Path) -> dict[str, Path]:
    """Artifact name -> the directory each upload-artifact step of a finished job would upload."""
    return {resolve(s.with_["name"], context, outputs): cwd / resolve(s.with_["path"], context, outputs)
            for s in steps if s.uses and s.uses.startswith("actions/upload-artifact@")}


def download(steps: list[Step], context: dict[str, str], artifacts: dict[str, Path], cwd: Path) -> list[str]:
    """What the job's download-artifact step leaves, from `artifacts` (name -> uploaded directory): the
    ones its `pattern` matches, each in a directory of its own name under its `path` (no merge-multiple)."""
    (step,) = [s for s in steps if s.uses and s.uses.startswith("actions/download-artifact@")]
    pattern, target = resolve(step.with_["pattern"], context, {}), cwd / resolve(step.with_["path"], context, {})
    names = sorted(n for n in artifacts if fnmatch.fnmatchcase(n, pattern))
    for name in names:
        shutil.copytree(artifacts[name], target / name, ignore=shutil.ignore_patterns(".*"))  # hidden files stay out
    return names


def run_job(steps: list[Step], context: dict[str, str], overrides: dict[str, str], skip: set[str], cwd: Path,
            scratch: Path, base_env: dict[str, str] | None = None) -> JobRun:
    """Every `run:` step not in `skip`, in order, as a runner would (step `if:`s are not
    evaluated: all run). `overrides` replace env values after resolution (e.g. a tiny suite)."""
    job = JobRun()
    # A runner has none of this test process's pytest/xdist variables (PYTEST_XDIST_WORKER would
    # make the plugin in a step think it is an xdist worker) nor another job's GITHUB_* files.
    base = {k: v for k, v in (os.environ if base_env is None else base_env).items()
            if not k.startswith(("PYTEST_", "GITHUB_"))}
    # `python` and `gqa-harness` in the steps are this interpreter's, as setup-python would make them.
    base["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", "")])
    for step in steps:
        if step.run is None or step.id in skip:
            continue
        env = {k: resolve(v, context, job.outputs) for k, v in step.env.items()}
        env.update({k: v for k, v in overrides.items() if k in env})
        outcome = run_step(step, {**base, **env}, cwd, scratch / f"{step.index}-{step.id}")
        job.outcomes[step.id] = outcome
        job.outputs[step.id] = outcome.outputs
    return job

"""pytest plugin (entry point `pytest11: gqa_harness`): every (case, implementation) is a pytest item.

    pytest --gqa-suite models --gqa-device cuda -n 8        # one worker per GPU
    pytest --gqa-suite smoke -k "h8x2 and flash" --lf       # select, rerun what failed

Items are `gqa::<case id>[<implementation>]`; FAIL and ERROR fail the item with the report's
evidence, KNOWN is an expected failure (xfail) unless --gqa-strict, UNSUPPORTED and
OUT_OF_RANGE skip with the reason; metrics become JUnit properties. Under xdist each worker
is pinned to one GPU in pytest_configure (before anything touches the device), gets
cores / workers CPU threads, and all implementations of a case run on one worker
(`--dist loadgroup`, the default here when -n is given) so its oracle is computed once.
Workers stream records to --gqa-out/.parts/; the controller merges them into one report of
the same form as `gqa-harness run`'s. Only the pytest wiring lives here; the work is
runner.run_one and report.build_report.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from . import strategies  # noqa: F401 - registers the dev/ci/nightly Hypothesis profiles before --hypothesis-profile loads one
from .pinning import pin_worker

PARTS = ".parts"
MARKERS = {
    "gpu": "needs a CUDA or ROCm device",
    "cuda": "needs an NVIDIA CUDA device",
    "rocm": "needs an AMD ROCm device",
    "slow": "takes more than a few seconds",
}
SLOW_FLOPS = 2e10  # forward+backward GEMM FLOPs above which a case is marked slow
_STATE = pytest.StashKey["RunState"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("gqa-harness", "gqa-harness: SDPA cases as pytest items")
    g.addoption("--gqa-suite", action="append", default=[], metavar="NAME",
                help="run cases/NAME.toml (or a directory of them) as items; repeatable")
    g.addoption("--gqa-case", action="append", default=[], metavar="SPEC",
                help="inline case, e.g. b=2,hq=32,hkv=8,lq=128,d=128; repeatable")
    g.addoption("--gqa-device", default=None, help="cpu, cuda or cuda:N (default: the GPU if there is one)")
    g.addoption("--gqa-impl", action="append", default=[], metavar="IMPL",
                help="built-in name or package.module:function; repeatable (default: every built-in)")
    g.addoption("--gqa-dtype", default=None, help="comma list of dtypes to keep, e.g. bf16,fp16")
    g.addoption("--gqa-max-tokens", type=int, default=None, help="cap q/kv lengths, keeping head geometry")
    g.addoption("--gqa-out", default="gqa-report", help="merged JSON + Markdown report directory (default: gqa-report)")
    g.addoption("--gqa-strict", action="store_true", help="KNOWN failures fail their items")
    g.addoption("--gqa-in-process", action="store_true",
                help="run kernels in the pytest process (default: a worker process, so a crash or hang is a result)")


def active(config: pytest.Config) -> bool:
    return bool(config.getoption("gqa_suite", None) or config.getoption("gqa_case", None))


# --- hooks -----------------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_cmdline_main(config: pytest.Config):
    # `-n N` alone means `--dist load` (xdist decides that in its own cmdline_main, which this
    # wrapper precedes); for gqa items default to loadgroup so that every implementation of a
    # case runs on one worker and its oracle is computed once. An explicit --dist is kept.
    if active(config) and getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", "no") == "no":
        config.option.dist = "loadgroup"
    return (yield)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    # Workers re-parse the command line, where -n alone says nothing of loadgroup: tell them.
    node.workerinput["gqa_loadgroup"] = node.config.getoption("dist", "no") == "loadgroup"


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    if not active(config):
        return
    if getattr(config, "workerinput", {}).get("gqa_loadgroup"):
        config.option.loadgroup = True  # xdist then suffixes node ids with their group, as with --dist loadgroup
    pinned = pin_worker(config)
    out = Path(config.getoption("gqa_out"))
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(out / PARTS, ignore_errors=True)  # the controller starts each run clean
    config.stash[_STATE] = RunState(out=out, pinned=pinned, strict=config.getoption("gqa_strict"),
                                    isolate=not config.getoption("gqa_in_process"),
                                    started=datetime.now(timezone.utc).isoformat(timespec="seconds"))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    # tryfirst: the items must exist before -k/-m/--lf deselect and before xdist reads xdist_group.
    if not active(config):
        return
    items.extend(make_items(session, config.stash[_STATE]))


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if not active(config) or _STATE not in config.stash:
        return
    state = config.stash[_STATE]
    state.close()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # the controller merges
    state.merged = merge_parts(state.out, {"started": state.started, **_settings(config)})


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None) if active(config) else None
    if state is None or not state.merged:
        return
    report, path = state.merged
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report["summary"]["counts"].items()))
    terminalreporter.write_line(f"gqa-harness: {counts}; report {path}")


# --- the run state of one process --------------------------------------------------------------


@dataclass
class RunState:
    """Per process: device facts, oracle cache (the current case only), the JSONL part file."""

    out: Path
    pinned: dict[str, Any]
    strict: bool = False
    isolate: bool = True  # kernels in a spawn-started worker (worker.py), as `gqa-harness run` does
    started: str = ""
    facts: Any = None
    label: str = ""
    impls: list = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    tol: Any = None
    known: list = field(default_factory=list)
    sink: Any = None
    refs: Any = None
    too_big: str | None = None
    worker: Any = None
    merged: tuple[dict[str, Any], Path] | None = None

    def setup(self, device: str | None, impl_names: list[str]) -> None:
        from .env import device_facts, device_label, pin_math_reduction
        from .implementations import canaries, resolve
        from .known import load_known
        from .verdict import load_tolerances

        self.facts = device_facts(device)
        self.label = device_label(self.facts)
        impls, self.unavailable = resolve(impl_names, self.facts)
        self.impls = impls + canaries(self.facts)
        pin_math_reduction(False)
        self.tol, self.known = load_tolerances(), load_known()

    def _open(self) -> None:
        from .env import fingerprint
        from .runner import JsonlSink

        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        self.sink = JsonlSink(self.out / PARTS / f"{self.label}.{worker}.jsonl")
        self.sink({"type": "fingerprint", "worker": worker, "fingerprint": fingerprint(self.facts),
                   "pinned": self.pinned, "implementations": [i.name for i in self.impls if not i.canary],
                   "unavailable": self.unavailable})

    def references(self, case):
        """The case's references, computed once (a case's items run back to back on one worker)."""
        from .case import case_spec
        from .memory import skip_reason
        from .runner import references

        if self.refs is None or self.refs.inputs.case != case:
            if self.sink is None:
                self._open()
            self.too_big = skip_reason(case)
            self.refs = None if self.too_big else references(case)
            # the same case record execute_plan streams, so build_report reads both alike
            self.sink({"type": "case", "case_id": case.id, "case": case.to_dict(), "spec": case_spec(case),
                       "input_sha256": self.refs.inputs.hashes() if self.refs else {},
                       "oracle_seconds": round(self.refs.seconds, 4) if self.refs else 0.0})
        return self.refs

    def _executor(self, impl):
        from .worker import Worker, rebuildable

        if not self.isolate or not rebuildable(impl):
            return None
        if self.worker is None:
            self.worker = Worker(self.facts.device, self.facts.kind)
        return self.worker.execute

    def run(self, case, impl):
        from .runner import ImplResult, run_one
        from .verdict import Status

        refs = self.references(case)
        if refs is None:
            result = ImplResult(case_id=case.id, impl=impl.name, status=Status.UNSUPPORTED, error=self.too_big,
                                error_kind="memory", canary=impl.canary)
        else:
            result = run_one(refs, impl, self.facts, self.tol, self.known, self.label, self._executor(impl))
        self.sink({"type": "result", **result.to_dict()})
        return result

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        if self.sink is not None:
            self.sink.close()
            self.sink = None


def _settings(config: pytest.Config) -> dict[str, Any]:
    return {"command": " ".join(["pytest", *config.invocation_params.args]),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "suite": ",".join(config.getoption("gqa_suite")) or None, "max_tokens": config.getoption("gqa_max_tokens"),
            "strict": config.getoption("gqa_strict"), "isolate": not config.getoption("gqa_in_process")}


def merge_parts(out: Path, settings: dict[str, Any]) -> tuple[dict[str, Any], Path] | None:
    """One report from every worker's part: <label>.json, .md and .jsonl, as `gqa-harness run` writes."""
    from .report import build_report, render_markdown
    from .runner import read_stream
    from .verdict import load_tolerances

    parts = sorted((out / PARTS).glob("*.jsonl"))
    records = [r for p in parts for r in read_stream(p)]
    heads = [r for r in records if r.get("type") == "fingerprint"]
    if not heads:
        return None
    fp = heads[0]["fingerprint"]
    label = fp.get("device_label", "unknown")
    settings = {**settings, "implementations": heads[0]["implementations"], "unavailable": heads[0]["unavailable"],
                "tolerances": load_tolerances().as_dict(),
                "pytest_workers": {h["worker"]: {"pinned": h["pinned"], "device": h["fingerprint"].get("device"),
                                                 "device_name": h["fingerprint"].get("device_name")} for h in heads}}
    body = [r for r in records if r.get("type") in ("case", "result")]
    report = build_report(body, fp, settings)
    (out / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in body))
    (out / f"{label}.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    (out / f"{label}.md").write_text(render_markdown(report))
    return report, out / f"{label}.md"


# --- items -------------------------------------------------------------------------------------


class GqaFailure(AssertionError):
    """A FAIL/ERROR verdict; its message is the report's evidence, shown without a traceback."""


class GqaCollection(pytest.Collector):
    def collect(self):  # pragma: no cover - items are made by make_items, not by walking files
        return []


class GqaItem(pytest.Item):
    def __init__(self, *, case, impl, suite_case=None, **kwargs):
        super().__init__(**kwargs)
        self.case, self.impl, self.suite_case = case, impl, suite_case

    def runtest(self) -> None:
        state: RunState = self.config.stash[_STATE]
        result = state.run(self.case, self.impl)
        for key, value in result_properties(result):
            self.user_properties.append((key, value))
        outcome(result, state, self.case)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, GqaFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, f"gqa::{self.name}"


def make_items(session: pytest.Session, state: RunState) -> list[GqaItem]:
    from .case import CaseError
    from .env import DeviceError
    from .implementations import RegistryError
    from .runner import canary_cases
    from .suites import SuiteCase, SuiteError, select_cases

    config = session.config
    try:
        chosen = select_cases(config.getoption("gqa_suite"), config.getoption("gqa_case"),
                              config.getoption("gqa_dtype"), config.getoption("gqa_max_tokens"))
        state.setup(config.getoption("gqa_device"), config.getoption("gqa_impl"))
    except (CaseError, SuiteError, RegistryError, DeviceError) as exc:
        raise pytest.UsageError(f"gqa-harness: {exc}") from None
    parent = GqaCollection.from_parent(session, name="gqa", nodeid="gqa")
    work = [(sc, impl) for sc in chosen for impl in state.impls if not impl.canary]
    canaries = [i for i in state.impls if i.canary]
    work += [(SuiteCase(c, "canary", ("canary",)), impl) for c in canary_cases([sc.case for sc in chosen])
             for impl in canaries]
    items = []
    for sc, impl in work:
        item = GqaItem.from_parent(parent, name=f"{sc.case.id}[{impl.name}]", case=sc.case, impl=impl, suite_case=sc)
        item.add_marker(pytest.mark.xdist_group(sc.case.id))
        for marker in item_markers(sc, state.facts.kind):
            item.add_marker(marker)
        item.extra_keyword_matches.update(k for k in (sc.name, *sc.tags, impl.name, sc.case.dtype) if k)
        items.append(item)
    return items


def item_markers(sc, device_kind: str) -> list[str]:
    marks = []
    if device_kind in ("cuda", "rocm"):
        marks += ["gpu", device_kind]
    if "slow" in sc.tags or sc.case.flops() > SLOW_FLOPS:
        marks.append("slow")
    return marks


# --- verdict -> pytest outcome -------------------------------------------------------------------


def result_properties(result) -> list[tuple[str, Any]]:
    """JUnit properties: the status, then per tensor its status and the error/scale at each level."""
    props: list[tuple[str, Any]] = [("gqa.case_id", result.case_id), ("gqa.impl", result.impl),
                                    ("gqa.status", str(result.status)), ("gqa.seconds", round(result.seconds, 4))]
    if result.error:
        props.append(("gqa.error", result.error))
    for name, verdict in result.tensors.items():
        props.append((f"gqa.{name}.status", str(verdict.status)))
        metrics = verdict.metrics
        if metrics is None:
            continue
        for level in ("tensor", "slice", "row"):
            summary = metrics.summary(level)
            props.append((f"gqa.{name}.{level}.ratio", _round(summary.get("ratio"))))
        tensor = metrics.summary("tensor")
        for key in ("rel_err", "floor", "lowprec"):
            props.append((f"gqa.{name}.{key}", _round(tensor.get(key))))
    return props


def _round(x: Any) -> Any:
    return float(f"{x:.4g}") if isinstance(x, float) else x


def failure_message(result, case, device: str) -> str:
    """The evidence the Markdown report gives for this result, as one assertion message."""
    from .case import case_spec

    lines = [f"{result.case_id} [{result.impl}]: {result.status}"]
    if result.error:
        lines.append(f"  {result.error_kind or 'error'}: {result.error}")
    for name, verdict in result.tensors.items():
        if str(verdict.status) in ("FAIL", "ERROR", "KNOWN"):
            heads = ", ".join(f"b{b}h{h}" for b, h in verdict.failing_heads[:8])
            extra = f" (+{len(verdict.failing_heads) - 8})" if len(verdict.failing_heads) > 8 else ""
            severity = f" {verdict.severity}" if verdict.severity else ""
            lines.append(f"  {name} {verdict.status}{severity} at {verdict.rule or '-'} level: {verdict.reason}"
                         + (f"; failing heads {heads}{extra}" if heads else ""))
    lines.append(f"  reproduce: gqa-harness run --device {device} --case '{case_spec(case)}' --impl {result.impl}")
    return "\n".join(lines)


def outcome(result, state: RunState, case) -> None:
    status = str(result.status)
    if result.canary:
        if status != "FAIL":
            raise GqaFailure(f"the canary {result.impl} did not FAIL ({status}) on {state.facts.device}: this "
                             "pipeline cannot fail here, its PASSes mean nothing")
        return
    if status in ("FAIL", "ERROR") or (status == "KNOWN" and state.strict):
        raise GqaFailure(failure_message(result, case, state.facts.device))
    if status == "KNOWN":
        pytest.xfail(failure_message(result, case, state.facts.device).replace("\n", " |"))
    if status in ("UNSUPPORTED", "OUT_OF_RANGE"):
        reasons = [v.reason for v in result.tensors.values() if str(v.status) == status]
        pytest.skip(f"{status}: {result.error or '; '.join(reasons)}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("harness.plugin is a pytest plugin: pytest --gqa-suite smoke")

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
run.session.CaseRunner and reports.report.build_report.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from .core.case import CaseError, case_spec
from .core.generate import register_profiles
from .core.known import known_settings
from .core.results import ImplResult
from .core.suites import SuiteCase, SuiteError, select_cases
from .implementations import RegistryError
from .options import add_run_options
from .reports.explain import result_text
from .reports.merge import write_run
from .reports.store import JsonlSink, ReportError, read_stream
from .run.env import DeviceError
from .run.pinning import pin_worker
from .run.plan import canary_cases, case_sources, with_sources
from .run.session import CaseRunner, Session
from .run.shards import ShardError, shard_fingerprint, shard_selection

register_profiles()  # dev/ci/nightly exist before Hypothesis's own plugin loads --hypothesis-profile

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
    add_run_options(parser.getgroup("gqa-harness", "gqa-harness: SDPA cases as pytest items").addoption, "--gqa-")


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
    """Per process: the session, its case runner (which caches the current case's references) and
    the JSONL part file this process streams to."""

    out: Path
    pinned: dict[str, Any]
    strict: bool = False
    isolate: bool = True  # kernels in a spawn-started worker (worker.py), as `gqa-harness run` does
    started: str = ""
    session: Session | None = None
    impls: list = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    runner: CaseRunner | None = None
    sink: JsonlSink | None = None
    merged: tuple[dict[str, Any], Path] | None = None
    shard: dict[str, Any] | None = None  # --gqa-shard I/N: the shard's settings block (run/shards.py)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)  # case id -> its suite file and line

    def setup(self, device: str | None, impl_names: list[str]) -> None:
        self.session = Session.open(device)
        impls, self.unavailable = self.session.resolve(impl_names)
        self.impls = impls + self.session.canaries()

    def run(self, case, impl) -> ImplResult:
        if self.runner is None:
            worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
            self.sink = JsonlSink(self.out / PARTS / f"{self.session.label}.{worker}.jsonl")
            self.sink({"type": "fingerprint", "worker": worker, "shard": self.shard,
                       "fingerprint": shard_fingerprint(self.session.fingerprint(), self.shard),
                       "pinned": self.pinned, "implementations": [i.name for i in self.impls if not i.canary],
                       "unavailable": self.unavailable, "tolerances": self.session.tolerances.as_dict(),
                       **known_settings(self.session.known)})
            self.runner = CaseRunner(self.session, isolate=self.isolate, sink=with_sources(self.sink, self.sources))
        result = self.runner.run(case, impl)
        self.sink({"type": "result", **result.to_dict()})
        return result

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None
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
    records = [r for p in sorted((out / PARTS).glob("*.jsonl")) for r in read_stream(p)]
    heads = [r for r in records if r.get("type") == "fingerprint"]
    if not heads:
        return None
    fp = heads[0]["fingerprint"]
    settings = {**settings, "implementations": heads[0]["implementations"], "unavailable": heads[0]["unavailable"],
                "tolerances": heads[0]["tolerances"], "known_entries": heads[0]["known_entries"],
                "known_by_pattern": heads[0]["known_by_pattern"],
                "pytest_workers": {h["worker"]: {"pinned": h["pinned"], "device": h["fingerprint"].get("device"),
                                                 "device_name": h["fingerprint"].get("device_name")} for h in heads},
                "shard": heads[0].get("shard")}
    return write_run(out, records, fp, settings)


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
        # The suite entry that defines the case (0-based line, as pytest counts), so a failure's location,
        # and pytest-github-actions-annotate-failures' annotation, point at the TOML line.
        sc = self.suite_case
        if sc is not None and sc.line and sc.source:
            return Path(sc.source.rsplit(":", 1)[0]).resolve(), sc.line - 1, f"gqa::{self.name}"
        return self.path, None, f"gqa::{self.name}"


def make_items(session: pytest.Session, state: RunState) -> list[GqaItem]:
    config = session.config
    try:
        chosen, state.shard = shard_selection(
            select_cases(config.getoption("gqa_suite"), config.getoption("gqa_case"), config.getoption("gqa_dtype"),
                         config.getoption("gqa_max_tokens"), guard=config.getoption("gqa_guard")),
            config.getoption("gqa_shard"),
            config.getoption("gqa_shard_by_time"))
        state.sources = case_sources(chosen)
        state.setup(config.getoption("gqa_device"), config.getoption("gqa_impl"))
    except (CaseError, SuiteError, RegistryError, DeviceError, ShardError, ReportError) as exc:
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
        for marker in item_markers(sc, state.session.facts.kind):
            item.add_marker(marker)
        item.extra_keyword_matches.update(k for k in (sc.name, *sc.tags, impl.name, sc.case.dtype) if k)
        items.append(item)
    # Items made here, not by walking files: report them as collected, or pytest's header counts
    # "collected 0 items / N deselected / -N selected" and --co says "no tests collected".
    session.ihook.pytest_collectreport(report=pytest.CollectReport(parent.nodeid, "passed", None, items))
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


def failure_message(result: ImplResult, case, device: str) -> str:
    """The evidence the Markdown report gives for this result, as one assertion message."""
    return result_text(result.to_dict(), case_spec(case), device)


def outcome(result, state: RunState, case) -> None:
    status = str(result.status)
    if result.canary:
        if status != "FAIL":
            raise GqaFailure(f"the canary {result.impl} did not FAIL ({status}) on {state.session.device}: this "
                             "pipeline cannot fail here, its PASSes mean nothing")
        return
    if status in ("FAIL", "ERROR") or (status == "KNOWN" and state.strict):
        raise GqaFailure(failure_message(result, case, state.session.device))
    if status == "KNOWN":
        pytest.xfail(failure_message(result, case, state.session.device).replace("\n", " |"))
    if status in ("UNSUPPORTED", "OUT_OF_RANGE"):
        reasons = [v.reason for v in result.tensors.values() if str(v.status) == status]
        pytest.skip(f"{status}: {result.error or '; '.join(reasons)}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("harness.plugin is a pytest plugin: pytest --gqa-suite smoke")

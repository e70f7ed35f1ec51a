"""`gqa-harness search`: generated cases through the run pipeline, new failures shrunk by Hypothesis,
confirmed alone, deduplicated, written as regression entries; the example database and --resume.

The catalogue search runs every kernel of tests/search_kernels.py in one search (one oracle per
case for all of them); each must be found, shrunk into its corner, confirmed in a fresh process,
and its found.toml entry must FAIL under `gqa-harness run --suite`. The same budget against
correct implementations gives no finding. Budgets are example counts (--max-examples) with a
generous wall-time budget, so the tests do not depend on the machine's speed.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.core.case import Case, parse_case_spec
from harness.core.suites import load_suite_text, select_cases
from harness.implementations.user import implementation_from_callable
from harness.reports.store import load_report, read_stream
from harness.repro.shrink import Signature
from harness.run.session import Session
from harness.search.command import SearchProgress
from harness.search.engine import Limits, Search
from harness.search.findings import Finding, finding_from_record, found_toml, repro_command
from harness.search.space import SearchSpace, within
from harness.search.store import ExampleStore
from harness.strategies import judge
from tests import wrong_kernels
from tests.search_kernels import CORNERS, SEARCH_EXAMPLES, SEARCH_SEED, SEARCHES, SMALL_SPACE

REPO = Path(__file__).resolve().parent.parent
LABEL = "cpu-x86_64"
CORRECT = ["sdpa-math", "expanded-kv-math", "tests.wrong_kernels:fp32_reference"]


def _impls(names: list[str]) -> list[str]:
    return [arg for name in names for arg in ("--impl", name)]


def _findings(report: dict) -> list[Finding]:
    return [finding_from_record(r) for r in report["search"]["findings"]]


# ---- the catalogue: wrong only in corners the suites miss ------------------------------------------

SUITE_CAPS = (None, 256, 128)  # as written, and as the CPU workflows shorten them


@pytest.mark.parametrize("suite", ["smoke", "models", "edge"])
def test_no_case_of_the_suites_is_in_a_catalogue_kernels_corner(suite):
    for cap in SUITE_CAPS:
        cases = [sc.case for sc in select_cases([suite], [], None, cap)]
        hits = {name: [c.id for c in cases if corner(c)] for name, corner in CORNERS.items()}
        assert not any(hits.values()), (suite, cap, hits)


INSIDE_OUTSIDE = {
    "wide_window_off_by_one": ("b=1,hq=2,hkv=1,lq=200,d=32,mask=sliding-window", "b=1,hq=2,hkv=1,lq=120,d=32,mask=sliding-window"),
    "small_scale_clamped": ("b=1,hq=2,hkv=1,lq=16,d=32,scale=0.05", "b=1,hq=2,hkv=1,lq=16,d=32,scale=0.125"),
    "shared_mask_tail_unmasked": ("b=1,hq=2,hkv=1,lq=16,lk=128,d=32,mask=bool", "b=2,hq=2,hkv=1,lq=16,lk=128,d=32,mask=bool"),
    "noncontig_v_tail_dropped": ("b=1,hq=4,hkv=2,lq=16,lk=65,d=32,layout=v-noncontig",
                                 "b=1,hq=4,hkv=2,lq=16,lk=33,d=32,layout=v-noncontig"),
    "decode_prime_kv_drops_last_key": ("b=1,hq=2,hkv=1,lq=1,lk=13,d=32", "b=1,hq=2,hkv=1,lq=1,lk=257,d=32"),
    "value_channels_beyond_d_zeroed": ("b=1,hq=2,hkv=1,lq=16,d=32,dv=64", "b=1,hq=2,hkv=1,lq=16,d=32,dv=16"),
    "fp16_large_logits_rounded": ("b=1,hq=2,hkv=1,lq=32,d=128,dtype=fp16,values=large-logits",
                                  "b=1,hq=2,hkv=1,lq=32,d=64,dtype=fp16,values=large-logits"),
    "per_head_mask_truncated_group_sum": ("b=1,hq=8,hkv=1,lq=64,d=64,mask=bool,mask_per_head=true",
                                          "b=1,hq=4,hkv=1,lq=64,d=64,mask=bool,mask_per_head=true"),
    "noncontig_q_wide_head_drops_last_key": ("b=1,hq=2,hkv=1,lq=16,d=96,layout=blhd", "b=1,hq=2,hkv=1,lq=16,d=64,layout=blhd"),
}


@pytest.mark.parametrize("name", list(CORNERS))
def test_each_catalogue_kernel_fails_in_its_corner_and_passes_just_outside(name):
    assert set(INSIDE_OUTSIDE) == set(CORNERS)
    inside, outside = map(parse_case_spec, INSIDE_OUTSIDE[name])
    assert CORNERS[name](inside) and not CORNERS[name](outside)
    assert str(judge(inside, f"tests.search_kernels:{name}").status) == "FAIL"
    assert str(judge(outside, f"tests.search_kernels:{name}").status) == "PASS"


# ---- the catalogue search ------------------------------------------------------------------------

GROUPS = {group: (list(names), list(options)) for group, (names, options) in SEARCHES.items()}
EXAMPLES = {group: SEARCH_EXAMPLES[group] for group in SEARCHES}
SMALL = list(SMALL_SPACE)


def _group_search(out: Path, group: str, names: list[str]) -> tuple[int, dict]:
    space = GROUPS[group][1]
    code = main(["search", "--device", "cpu", *_impls(names), "--budget", "1800", "--max-examples",
                 str(EXAMPLES[group]), "--seed", str(SEARCH_SEED), "--shrink-budget", "30", "--quiet",
                 *space, "--out", str(out)])
    return code, load_report(out / f"{LABEL}.json")


def test_the_groups_cover_the_catalogue():
    assert sorted(k for names, _ in GROUPS.values() for k in names) == sorted(CORNERS)


@pytest.mark.catalogue
@pytest.mark.parametrize("group", list(GROUPS))
def test_search_finds_shrinks_and_confirms_each_catalogue_kernel_and_its_found_toml_fails_under_run(group, tmp_path):
    kernels = [f"tests.search_kernels:{k}" for k in GROUPS[group][0]]
    code, report = _group_search(tmp_path / "search", group, kernels)
    findings = _findings(report)
    print("\n" + "\n".join(f"{f.impl}: {f.signature} {f.case.id} after {f.found_after_examples} examples "
                           f"({f.found_after_s:.0f} s)" for f in findings))
    assert code == 1 and report["search"]["examples"] == EXAMPLES[group]
    for impl in kernels:
        mine = [f for f in findings if f.impl == impl]
        assert mine, f"{impl} not found in {EXAMPLES[group]} examples"
        corner = CORNERS[impl.split(":")[1]]
        for f in mine:
            assert corner(f.case) and f.confirmed and f.confirm_status == "FAIL", (impl, f.case.id)
            assert f.case.batch <= f.start.batch and f.case.q_heads <= f.start.q_heads, (f.start.id, f.case.id)
    # the regression entries: a suite whose every entry fails on its kernel
    found = tmp_path / "search" / "found.toml"
    entries = load_suite_text(found.read_text(), "found.toml")
    assert {e.case for e in entries} <= {f.case for f in findings} and len(entries) >= len(kernels)
    assert main(["run", "--device", "cpu", "--suite", str(found), *_impls(kernels), "--in-process", "--quiet",
                 "--out", str(tmp_path / "run")]) == 1
    statuses = {(r["case_id"], r["impl"]): r["status"] for r in load_report(tmp_path / "run" / f"{LABEL}.json")["results"]}
    assert all(statuses[(e.case.id, f.impl)] == "FAIL" for e in entries for f in findings if f.case == e.case)
    # the report is a run report: compare, diff and summary read it; Findings come first
    md = (tmp_path / "search" / f"{LABEL}.md").read_text()
    assert md.index("## Findings") < md.index("## Failures") and "gqa-harness repro --device cpu --case '" in md
    json_path = str(tmp_path / "search" / f"{LABEL}.json")
    assert main(["compare", json_path, "--out", str(tmp_path / "matrix")]) == 0
    assert main(["diff", json_path, json_path, "--noise", str(_noise(tmp_path))]) == 0
    assert main(["summary", str(tmp_path / "search")]) == 0


def _noise(tmp_path: Path) -> Path:
    path = tmp_path / "noise.json"
    path.write_text(json.dumps({"bands": {"tensor": 1.5, "slice": 1.5, "row": 1.5}}))
    return path


@pytest.mark.catalogue
@pytest.mark.parametrize("group", list(GROUPS))
def test_the_same_budget_gives_no_finding_on_correct_implementations(group, tmp_path):
    code, report = _group_search(tmp_path, group, CORRECT)
    assert report["search"]["findings"] == [], [f["summary"] for f in report["search"]["findings"]]
    assert report["search"]["examples"] == EXAMPLES[group] and code == 0
    assert report["summary"]["canary_failed_as_expected"]


# ---- the engine, in this process --------------------------------------------------------------


def _engine(tmp_path: Path, fn, *, examples: int, seed: int = 0, name: str = "k", records: list | None = None):
    """A search of one in-process kernel (no worker: the name is not importable), no canary."""
    session = Session.open("cpu")
    space = SearchSpace(profile="ci", max_tokens=32, max_batch=2, max_kv_heads=1)
    store = ExampleStore.open(tmp_path / "db", space.key(session.label, [name]))
    search = Search(session, [implementation_from_callable(fn, name)], space,
                    Limits(budget=600, max_examples=examples, shrink_budget=60), seed,
                    (records if records is not None else []).append, store)
    try:
        search.replay()
        search.explore_rounds()
    finally:
        search.close()
    return search.tally, store


def test_a_second_search_replays_earlier_failures_first_and_drops_them_once_fixed(tmp_path):
    first, store = _engine(tmp_path, wrong_kernels.ignores_scale, examples=40)
    assert first.findings and first.findings[0].case.scale is not None and store.entries()
    again, _ = _engine(tmp_path, wrong_kernels.ignores_scale, examples=1, seed=1)
    assert again.replayed == len(store.entries()) and again.replay_still_failing == again.replayed
    assert again.findings[0].replayed and again.findings[0].case == first.findings[0].case
    fixed, _ = _engine(tmp_path, wrong_kernels.math_sdpa, examples=1)
    assert fixed.replay_passing == fixed.replayed > 0 and not fixed.findings and store.entries() == []


def test_the_same_seed_draws_the_same_examples_and_another_seed_others(tmp_path):
    runs = []
    for seed in (5, 5, 6):
        records: list = []
        _engine(tmp_path / str(len(runs)), wrong_kernels.math_sdpa, examples=4, seed=seed, records=records)
        runs.append([r["case_id"] for r in records if r["type"] == "case"])
    assert runs[0] == runs[1] and runs[0] != runs[2] and len(runs[0]) == 4


class _Interrupting:
    """A wrong kernel (drops the caller's scale) that raises KeyboardInterrupt on its Nth call (never when
    N < 0); `made` counts its calls."""

    def __init__(self, calls: int):
        self.calls, self.made = calls, 0

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        self.calls -= 1
        self.made += 1
        if self.calls == 0:
            raise KeyboardInterrupt
        return wrong_kernels.ignores_scale(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


class _CallsAtFirstFailure(list):
    """The search's records, noting how many kernel calls were made when the first FAIL was recorded."""

    def __init__(self, kernel: _Interrupting):
        super().__init__()
        self.kernel, self.calls = kernel, None

    def append(self, record) -> None:
        if self.calls is None and record.get("type") == "result" and record.get("status") == "FAIL":
            self.calls = self.kernel.made
        super().append(record)


def test_a_failure_interrupted_while_shrinking_is_replayed_and_shrunk_by_the_next_search(tmp_path):
    counting = _Interrupting(calls=-1)  # never interrupts: counts the kernel's calls
    records = _CallsAtFirstFailure(counting)
    _engine(tmp_path / "measure", counting, examples=40, records=records)
    first = next(r for r in records if r["type"] == "finding")
    # the same search, killed a few kernel calls into shrinking that failure (a guarded case calls the
    # kernel twice per result: inside its guards and without them)
    with pytest.raises(KeyboardInterrupt):
        _engine(tmp_path, _Interrupting(calls=records.calls + 4), examples=40)
    tally, store = _engine(tmp_path, wrong_kernels.ignores_scale, examples=1)
    (finding,) = tally.findings
    assert finding.replayed and finding.start.id == first["start_id"] and finding.case.id == first["case_id"]
    assert [e.shrunk for e in store.entries()] == [True]


# ---- the command: bad arguments, --resume, progress -------------------------------------------------


def _fails(capsys, argv: list[str], *fragments: str) -> None:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gqa-harness: error: "), lines
    assert all(f in lines[0] for f in fragments), lines[0]


def test_bad_arguments_are_one_line_and_exit_2(capsys, tmp_path):
    base = ["search", "--device", "cpu", "--impl", "sdpa-math", "--out", str(tmp_path / "out")]
    _fails(capsys, [*base, "--budget", "0"], "--budget 0 must be a positive number of seconds")
    _fails(capsys, [*base, "--budget", "5", "--profile", "weekly"], "--profile 'weekly' is not one of dev, ci, nightly")
    _fails(capsys, [*base, "--budget", "5", "--dtype", "bf17"], "--dtype bf17")
    _fails(capsys, [*base, "--budget", "5", "--max-examples", "0"], "--max-examples 0 must be at least 1")
    _fails(capsys, [*base, "--budget", "5", "--max-kv-heads", "0"], "--max-kv-heads 0 must be at least 1")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _fails(capsys, ["search", "--device", "cpu", "--budget", "5", "--out", str(blocker / "out")], "--out", "cannot write")
    _fails(capsys, [*base, "--budget", "5", "--impl", "no.such:kernel"], "cannot import 'no.such'")


def test_resume_continues_a_killed_search_without_losing_findings(tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "harness.cli", "search", "--device", "cpu", "--impl", "tests.wrong_kernels:ignores_scale",
            "--budget", "600", "--seed", "3", "--quiet", "--out", str(out), *SMALL, "--max-tokens", "16"]
    proc = subprocess.Popen(argv, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stream = out / f"{LABEL}.jsonl"
    deadline = time.monotonic() + 300
    while not (stream.exists() and '"type": "finding"' in stream.read_text()) and proc.poll() is None:
        assert time.monotonic() < deadline, "no finding within 300 s"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the search and its workers, as a lost runner would
    proc.wait()
    before = read_stream(stream)
    found = [r for r in before if r["type"] == "finding"]
    examples = max(r["examples"] for r in before if r.get("event") == "progress")
    code = main(argv[3:] + ["--resume", "--max-examples", str(examples + 3)])
    report = load_report(out / f"{LABEL}.json")
    assert code == 1 and report["search"]["examples"] >= examples + 3
    after = report["search"]["findings"]
    assert after[: len(found)] == [{k: v for k, v in f.items()} for f in found]
    assert len({(f["impl"], f["summary"], f["class_text"]) for f in after}) == len(after)  # nothing found twice


def test_progress_is_one_line_per_call_on_a_terminal_and_every_10_s_in_a_log():
    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

    class Fake:
        tally = type("T", (), {"examples": 3, "findings": []})()

        def elapsed(self):
            return 12.0

        def left(self):
            return 48.0

    clock, log = Clock(), io.StringIO()
    progress = SearchProgress(quiet=False, clock=clock, stream=log)
    for t in (0.0, 4.0, 9.0, 10.5, 11.0, 25.0):
        clock.now = t
        progress(Fake())
    assert log.getvalue().splitlines() == ["[search] 3 examples, 0 findings, 12 s elapsed, 48 s of exploring left"] * 3


# ---- findings: signature, class, regression entry -------------------------------------------------


def _finding(case: Case, cls, **extra) -> Finding:
    fields = dict(number=1, impl="k:x", signature=Signature("dk", "accuracy", "beyond"), case=case, start=case,
                  case_class=cls, reason="dk: tensor error 3x", found_after_examples=4, found_after_s=2.0,
                  shrink_evaluations=9, shrink_s=1.0, shrink_complete=True, confirmed=True, confirm_status="FAIL")
    return Finding(**{**fields, **extra})


def test_case_classes_are_the_features_a_case_adds_to_the_plainest_one_and_contain_by_feature():
    space = SearchSpace()
    plain = Case(1, 2, 1, 8, 8, 32)
    per_head = plain.replace(mask="bool", mask_per_head=True, scale=0.05, dtype="fp16")
    assert space.case_class(plain) == ()
    assert space.case_class(per_head) == (("dtype", "fp16"), ("mask", "bool"), ("mask_per_head", "True"),
                                          ("scale", "set"))
    additive = space.case_class(per_head.replace(mask="additive", scale=0.3))
    assert within(additive, space.case_class(per_head)) and not within(space.case_class(plain), additive)


def test_found_toml_loads_as_a_suite_with_each_finding_named_and_its_run_command(tmp_path):
    case = parse_case_spec("b=1,hq=8,hkv=1,lq=1,lk=1,d=64,mask=bool,mask_per_head=true,s=1")
    wider = _finding(case.replace(mask="none", mask_per_head=False), (), number=2)  # the same failure, any mask
    text = found_toml([_finding(case, (("mask", "bool"),)), _finding(case, (), number=3, impl="k:y", confirmed=False)],
                      LABEL, "2.13.0+cpu", "cpu")
    (entry,) = load_suite_text(text, "found.toml")  # the unconfirmed one is left out
    assert entry.case == case and entry.name == "f1-k-x-dk-accuracy" and "search" in entry.tags
    assert "gqa-harness run --device cpu --case 'b=1,hq=8,hkv=1,lq=1,lk=1,d=64" in entry.notes
    assert repro_command(_finding(case, ()), "cpu").endswith("--impl k:x --tensor dk --out gqa-repro/f1-k-x-dk-accuracy")
    assert "# Finding 1 is left out: the same failure as finding 2" in found_toml(
        [_finding(case, (("mask", "bool"),)), wider], LABEL, "2.13.0+cpu", "cpu")
    record = _finding(case, (("mask", "bool"),)).to_record()
    assert finding_from_record(json.loads(json.dumps(record))) == _finding(case, (("mask", "bool"),))

"""`gqa-harness`: argument parsing and dispatch; the work is in run/, reports/, repro/ and lab/."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tabulate import tabulate

from .core.case import CaseError, case_spec, parse_case_spec
from .core.known import KnownFailuresError, known_settings
from .core.suites import SuiteError, select_cases
from .implementations import RegistryError, builtin_implementations
from .lab.audit import audit_command
from .lab.bench import BenchConfig, bench_command
from .lab.calibrate import calibrate_command
from .lab.diffaudit import differential_audit_command
from .options import build_parser
from .reports.bugs import bug_summaries
from .reports.annotate import annotations
from .reports.compare import build_matrix, render_matrix, write_matrix
from .reports.diff import diff_reports, measure_noise, noise_for, parse_renames, render_diff
from .reports.explain import result_text
from .reports.merge import MergeError, merge_shards, merged_line
from .reports.ledger import fixed_in_run, known_command
from .reports.report import build_report, exit_status, render_markdown
from .reports.store import (ReportError, StreamError, load_report, open_stream, read_stream_checked, stream_path,
                            write_report)
from .reports.summary import SUMMARY_LIMIT, SummaryError, summarize
from .repro.issue import write_repro
from .repro.script import ReproError
from .repro.shrink import ShrinkError, judge_with, shrink
from .run.env import DeviceError, device_facts, fingerprint, keep_freed_blocks
from .run.order import replay
from .run.plan import RunPlan, case_sources, execute_plan, partial_note, plan_digest, resume_done
from .run.session import Session
from .run.stages import StageClock
from .run.shards import ShardError, shard_fingerprint, shard_selection
from .run.worker import Call
from .search.command import options_from_args, search_command
from .search.space import SearchError

USAGE_EXIT = 2
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # per (case, implementation); beyond it a wait is no longer a budget


class UsageError(Exception):
    pass


BAD_INPUT = (UsageError, CaseError, SuiteError, RegistryError, DeviceError, KnownFailuresError, SummaryError,
             StreamError, ReportError, ReproError, ShrinkError, ShardError, MergeError, SearchError)


class Progress:
    """One line per case-implementation on a TTY (overwritten), every ~10 s in CI logs."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.start = time.monotonic()
        self.last = 0.0
        self.failures = 0
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int, result) -> None:
        if result.status.value in ("FAIL", "ERROR") and not result.canary:
            self.failures += 1
        if self.quiet:
            return
        now = time.monotonic()
        if not self.tty and now - self.last < 10 and done != total:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / done * (total - done) if done else 0.0
        line = f"[{done}/{total}] {elapsed:.0f}s elapsed, ETA {eta:.0f}s, failures {self.failures}"
        print(("\r" + line) if self.tty else line, end="" if self.tty and done != total else "\n",
              file=sys.stderr, flush=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _terminated(signum, frame):
    raise KeyboardInterrupt


def cmd_run(args) -> int:
    if args.repeat < 1:
        raise UsageError(f"--repeat {args.repeat} must be at least 1")
    if args.timeout is not None and not 0 < args.timeout <= MAX_TIMEOUT_S:
        raise UsageError(f"--timeout {args.timeout:g} must be a positive number of seconds up to {MAX_TIMEOUT_S:g}")
    suites = args.suite or ([] if args.case else ["smoke"])
    chosen, shard = shard_selection(select_cases(suites, args.case, args.dtype, args.max_tokens, guard=args.guard),
                                    args.shard,
                                    args.shard_by_time)
    cases = [sc.case for sc in chosen]
    if not cases and shard is None:  # a shard may get no case of a small selection: its report says so
        raise UsageError("no cases selected")
    session = Session.open(args.device)
    impls, unavailable = session.resolve(args.impl)
    out = Path(args.out)
    plan = RunPlan(cases=tuple(cases), impls=tuple(impls), canaries=() if args.no_canary else tuple(session.canaries()),
                   isolate=not args.in_process, timeout=args.timeout, repeat=args.repeat, shuffle=args.shuffle,
                   log_dir=out / "worker-logs", sources=case_sources(chosen))  # worker logs beside the report
    stream = stream_path(out, session.label)
    fp = shard_fingerprint(session.fingerprint(), shard)
    sink, resumed = open_stream(stream, fp, args.resume, plan_digest(plan), args.force)
    for line in resumed.skipped[:5]:
        print(f"gqa-harness: --resume passed over {stream}: {line}", file=sys.stderr)
    done = resume_done(plan, resumed.records)
    started = _now()
    finished = False
    clock = StageClock() if args.stages else None
    wall = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _terminated)  # a killed job still writes its partial report
    try:
        execute_plan(session, plan, sink, Progress(args.quiet), done, clock=clock, prior=resumed.records)
        finished = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        sink.close()
        if clock is not None:  # this pass's own split, partial or not (a resumed run's covers what it ran)
            (out / "stages.json").write_text(json.dumps(
                {"wall_s": round(time.perf_counter() - wall, 3), "finished": finished, "stages": clock.to_dict()},
                indent=1))
        settings = {"command": " ".join(["gqa-harness", *sys.argv[1:]]), "started": started, "finished": _now(),
                    "suite": ",".join(args.suite) or None, "max_tokens": args.max_tokens,
                    "implementations": [i.name for i in impls], "unavailable": unavailable,
                    "tolerances": session.tolerances.as_dict(), **known_settings(session.known),
                    "strict": args.strict, "shard": shard}
        records, skipped = read_stream_checked(stream)
        if skipped or resumed.forced:
            settings["stream"] = {"lines_passed_over": skipped, "resumed_over_another_plan": resumed.forced}
        if not finished:
            settings["partial"] = partial_note(plan, records)
        report = build_report(records, fp, settings)
        md = write_report(out, report, render_markdown(report))
    counts = report["summary"]["counts"]
    code = exit_status(report, args.strict)
    if args.json:
        print(json.dumps({**report["summary"], "device_label": session.label, "exit_status": code, "report": str(md),
                          "bugs": bug_summaries(report)}))
    else:
        print(f"{session.label}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"; report {md}")
    for line in fixed_in_run(report):
        print(line, file=sys.stderr)
    if os.environ.get("GITHUB_ACTIONS") == "true" and not args.json:  # in a workflow: the worst failures annotated
        print("".join(f"{a}\n" for a in annotations([report])), end="")
    if report["results"] and not report["summary"]["canary_failed_as_expected"] and plan.canaries:
        errored = any(r["status"] == "ERROR" for r in report["results"] if r.get("canary"))
        print(f"the canary {'ERRORED' if errored else 'passed'} on {session.device}: this pipeline was not shown able "
              "to fail here, its PASSes mean nothing", file=sys.stderr)
    return code


def _parse_call(text: str) -> Call:
    spec, sep, impl = text.rpartition("@")
    if not sep or not spec or not impl:
        raise UsageError(f"{text!r} is not CASE_SPEC@IMPLEMENTATION")
    return Call(parse_case_spec(spec), impl)


def cmd_replay(args) -> int:
    calls = [_parse_call(c) for c in args.call]
    session = Session.open(args.device)
    result = replay(session, calls)
    print(result_text(result.to_dict(), case_spec(calls[-1].case), session.device))
    return 1 if str(result.status) in ("FAIL", "ERROR") else 0


def cmd_env(args) -> int:
    print(json.dumps(fingerprint(device_facts(args.device)), indent=1))
    return 0


def cmd_implementations(args) -> int:
    facts = device_facts(args.device)
    rows = []
    for impl in builtin_implementations().values():
        reason = impl.available(facts)
        rows.append([impl.name, "yes" if reason is None else "no", reason or impl.description])
    print(tabulate(rows, headers=["implementation", f"on {facts.device}", "description / why not"], tablefmt="github"))
    return 0


def cmd_summary(args) -> int:
    code, printed = summarize([Path(p) for p in args.paths], args.suffix, args.prefix,
                              args.limit if args.limit is not None else SUMMARY_LIMIT, dict(os.environ), args.annotations)
    sys.stdout.write(printed)
    return code


def cmd_compare(args) -> int:
    matrix = build_matrix(args.reports)
    for line in matrix.refused:
        print(f"gqa-harness compare: refused {line}", file=sys.stderr)
    if args.out:
        md, js = write_matrix(matrix, Path(args.out))
        print(f"{len(matrix.rows)} rows, {len(matrix.devices)} device(s); wrote {md} and {js}")
    else:
        print(render_matrix(matrix))
    return 0


def cmd_diff(args) -> int:
    baseline, new = load_report(args.baseline), load_report(args.new)
    result = diff_reports(baseline, new, noise_for(Path(args.baseline), baseline, args.noise), partial=args.partial,
                          renames=parse_renames(args.rename))
    text = render_diff(result, args.baseline, args.new)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        out.with_suffix(".json").write_text(json.dumps(result.to_dict(), indent=1, allow_nan=False))
    print(text)
    return result.exit_status


def cmd_noise(args) -> int:
    bands = measure_noise(load_report(args.report), args.report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(bands.to_dict(), indent=1))
    print(f"noise bands {bands.bands}; wrote {args.out}")
    return 0


def cmd_merge(args) -> int:
    report, md = merge_shards([Path(d) for d in args.dirs], Path(args.out), args.partial,
                              " ".join(["gqa-harness", *sys.argv[1:]]))
    print(merged_line(report, md))
    return 0


def cmd_known(args) -> int:
    paths = [Path(p) for p in args.reports] or [p for p in (Path("gqa-report"), Path("reports")) if p.exists()]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UsageError(f"no such report path: {missing[0]}")
    if not args.days >= 0:
        raise UsageError(f"--days {args.days:g} must be zero or more")
    if args.file and not Path(args.file).is_file():
        raise UsageError(f"--file {args.file}: no such known-failures file")
    for path in paths:
        if path.is_file():
            load_report(path)  # a file named on the command line that is not a report is an error, not skipped
    return known_command(paths, args.days, Path(args.file) if args.file else None, args.check)


def _shrunk(args, case, impl, session):
    with judge_with(impl, session, timeout=args.budget) as judge:  # a hang costs one candidate, within budget
        result = shrink(case, impl, judge, args.tensor, args.budget, min_excess=args.min_excess, seeds=args.seeds)
    print(f"{impl.name}: {result.signature} on {case.id} → {result.case.id} ({result.evaluations} evaluations, "
          f"{result.seconds:.0f} s, {'locally minimal' if result.locally_minimal else 'time budget reached'})",
          file=sys.stderr)
    return result


def cmd_shrink(args) -> int:
    session = Session.open(args.device)
    case, ((impl,), _) = parse_case_spec(args.case), session.resolve([args.impl])
    result = _shrunk(args, case, impl, session)
    text = json.dumps(result.to_dict(), indent=1, ensure_ascii=False)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    print(f"next: gqa-harness repro --device {session.device} --case '{case_spec(result.case)}' --impl {impl.name} "
          f"--tensor {result.signature.tensor or 'out'}", file=sys.stderr)
    return 0


def cmd_repro(args) -> int:
    session = Session.open(args.device)
    case, ((impl,), _) = parse_case_spec(args.case), session.resolve([args.impl])
    after = [(call.case, session.resolve([call.impl])[0][0]) for call in map(_parse_call, args.after)]
    if args.shrink and after:
        raise UsageError("--shrink with --after is not supported: shrink judges each case alone")
    shrunk = _shrunk(args, case, impl, session) if args.shrink else None
    repro = write_repro(shrunk.case if shrunk else case, impl, session, Path(args.out),
                        tensor=shrunk.signature.tensor or None if shrunk else args.tensor, title=args.title,
                        note=args.note, shrunk=shrunk, collect_env=args.collect_env, plots=args.plots, after=after,
                        compare=load_report(args.compare) if args.compare else None)
    print(repro.script_output)
    if not repro.reproduces:
        print(f"gqa-harness repro: {repro.script} exits {repro.script_exit} here without its BUG line: it does not "
              "reproduce the failure", file=sys.stderr)
        return 1
    print(f"wrote {repro.script} (exits {repro.script_exit} while the bug is present) and {repro.issue}")
    return 0


def _positive(args, *names: str) -> None:
    if any(getattr(args, n) < 1 for n in names) or args.first_seed < 0:
        raise UsageError("--seeds and --threads must be at least 1 and --first-seed non-negative")


def cmd_search(args) -> int:
    opts = options_from_args(args, " ".join(["gqa-harness", *sys.argv[1:]]))
    previous = signal.signal(signal.SIGTERM, _terminated)  # a killed search still writes its report
    try:
        return search_command(opts)
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_audit(args) -> int:
    _positive(args, "seeds", "threads")
    if args.differential:
        return differential_audit_command(args.device, args.suite, args.seeds, args.first_seed, Path(args.out),
                                          args.quiet, args.threads)
    return audit_command(args.device, args.suite, args.seeds, args.first_seed, args.impl, Path(args.out), args.quiet,
                         args.threads)


def cmd_calibrate(args) -> int:
    _positive(args, "seeds", "threads")
    torch.set_num_threads(args.threads)
    return calibrate_command(args.device, args.suite if args.suite is not None else ["smoke"], args.seeds,
                             args.first_seed, not args.no_grid, Path(args.out), args.quiet)


def cmd_bench(args) -> int:
    try:
        lengths = tuple(int(x) for x in args.memory_lengths.split(",") if x.strip())
        sizes = tuple(int(x) for x in args.gemm_sizes.split(",") if x.strip())
    except ValueError:
        raise UsageError("--memory-lengths and --gemm-sizes take comma lists of integers") from None
    if args.length < 1 or args.repeats < 1 or not sizes or any(n < 1 for n in (*lengths, *sizes)):
        raise UsageError("--length, --repeats, --memory-lengths and --gemm-sizes must be positive")
    if (args.threads is not None and args.threads < 1) or args.simulate_threads < 1 or args.long_max_tokens < -1:
        raise UsageError("--threads and --simulate-threads must be at least 1, --long-max-tokens at least -1")
    cfg = BenchConfig(length=args.length, repeats=args.repeats, memory_lengths=lengths,
                      suite=None if args.suite == "none" else args.suite, device=args.device, gemm_sizes=sizes,
                      threads=args.threads, long_max_tokens=None if args.long_max_tokens == -1 else args.long_max_tokens,
                      simulate_threads=args.simulate_threads, suite_only=args.suite_only,
                      suite_max_tokens=args.max_tokens)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    if args.suite_only and cfg.suite is None:
        raise UsageError("--suite-only needs a suite (--suite NAME, not none)")
    return bench_command(cfg, args.json, Path(args.out) if args.out else None, args.quiet)


COMMANDS = {"run": cmd_run, "replay": cmd_replay, "env": cmd_env, "implementations": cmd_implementations,
            "summary": cmd_summary, "compare": cmd_compare, "diff": cmd_diff, "merge": cmd_merge, "noise": cmd_noise, "known": cmd_known,
            "shrink": cmd_shrink, "repro": cmd_repro, "audit": cmd_audit, "calibrate": cmd_calibrate,
            "bench": cmd_bench, "search": cmd_search}


def main(argv: list[str] | None = None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    keep_freed_blocks()
    try:
        return COMMANDS[args.command](args)
    except BAD_INPUT as exc:
        if args.debug:
            raise
        print(f"gqa-harness: error: {exc}", file=sys.stderr)
        return USAGE_EXIT
    except KeyboardInterrupt:
        print("gqa-harness: interrupted; the partial report was written", file=sys.stderr)
        return 130
    except OSError as exc:  # our own files (kernels' errors are results): a full disk, an unwritable --out
        if args.debug:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"gqa-harness: error: cannot write{where}: {exc.strerror or exc}; what was written is kept, "
              "continue with --resume once it can be written", file=sys.stderr)
        return USAGE_EXIT


if __name__ == "__main__":
    sys.exit(main())

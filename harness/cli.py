"""`gqa-harness`: argument parsing and dispatch; the work is in run/, reports/, repro/ and lab/."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tabulate import tabulate

from . import __version__
from .core.case import CaseError, case_spec, parse_case_spec
from .core.known import KnownFailuresError
from .core.suites import SuiteError, select_cases
from .implementations import RegistryError, builtin_implementations
from .lab.audit import audit_command
from .lab.bench import BenchConfig, bench_command
from .lab.calibrate import calibrate_command
from .options import add_run_options
from .reports.compare import build_matrix, render_matrix, write_matrix
from .reports.diff import diff_reports, measure_noise, noise_for, render_diff
from .reports.explain import result_text
from .reports.ledger import fixed_in_run, known_command
from .reports.report import build_report, exit_status, render_markdown
from .reports.store import ReportError, StreamError, load_report, open_stream, read_stream, stream_path, write_report
from .reports.summary import SUMMARY_LIMIT, SummaryError, summarize
from .repro.issue import write_repro
from .repro.script import ReproError
from .repro.shrink import ShrinkError, judge_with, shrink
from .run.env import DeviceError, device_facts, fingerprint
from .run.order import replay
from .run.plan import RunPlan, execute_plan
from .run.session import Session
from .run.worker import Call

USAGE_EXIT = 2


class UsageError(Exception):
    pass


BAD_INPUT = (UsageError, CaseError, SuiteError, RegistryError, DeviceError, KnownFailuresError, SummaryError,
             StreamError, ReportError, ReproError, ShrinkError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gqa-harness", description=__doc__)
    p.add_argument("--version", action="version", version=f"gqa-harness {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run cases through every implementation and write the report")
    add_run_options(run.add_argument)
    run.add_argument("--no-canary", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    run.add_argument("--resume", action="store_true", help="continue the stream in --out, skipping finished results")
    run.add_argument("--repeat", type=int, default=1, metavar="N",
                     help="run each kernel N times on the same inputs; report bitwise non-determinism")
    run.add_argument("--shuffle", type=int, default=None, metavar="SEED", help="random work order, to surface "
                     "order-dependent failures")
    run.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                     help="budget per (case, implementation) (default: scaled by the case's FLOPs)")

    replay_p = sub.add_parser("replay", help="run calls in order in one fresh worker; the last one is judged "
                              "(an order-dependent failure's reproduce command)")
    replay_p.add_argument("--device", default=None)
    replay_p.add_argument("--call", action="append", required=True, help="CASE_SPEC@IMPLEMENTATION, in order")

    for name, text in (("env", "print the environment fingerprint"),
                       ("implementations", "what runs on this device, and why the rest do not")):
        sub.add_parser(name, help=text).add_argument("--device", default=None)

    _report_parsers(sub)
    _failure_parsers(sub)
    _lab_parsers(sub)
    return p


def _report_parsers(sub) -> None:
    """Commands on saved reports: summary, compare, diff, noise, known."""
    summ = sub.add_parser("summary", help="CI: report Markdown into $GITHUB_STEP_SUMMARY (1 MiB cap), artifact name")
    summ.add_argument("paths", nargs="+", help="report directories or <label>.md/.json files")
    summ.add_argument("--suffix", default="", help="makes the artifact name unique, e.g. the runner label")
    summ.add_argument("--prefix", default="gqa-report", help="artifact name prefix (default: gqa-report)")
    summ.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    cmp = sub.add_parser("compare", help="merge per-device reports into one cross-device matrix")
    cmp.add_argument("reports", nargs="+", help="report JSON files (<label>.json), one or more per device")
    cmp.add_argument("--out", default=None, help="write FILE.md and FILE.json (default: Markdown on stdout)")
    dif = sub.add_parser("diff", help="CI gate: exit 1 when NEW regressed against BASELINE")
    dif.add_argument("baseline", help="baseline report, e.g. reports/baselines/cpu-x86_64.json")
    dif.add_argument("new", help="the new report of the same device")
    dif.add_argument("--noise", default=None, help="noise-band file (default: <baseline>.noise.json beside it)")
    dif.add_argument("--out", default=None, help="also write FILE.md and FILE.json")
    noise = sub.add_parser("noise", help="measure diff's noise band from a multi-seed report")
    noise.add_argument("report", help="report of a multi-seed run (reports/baselines/noise-suite.toml)")
    noise.add_argument("--out", required=True, help="noise-band JSON, e.g. reports/baselines/cpu-x86_64.noise.json")
    known = sub.add_parser("known", help="known-failure entries: active, FIXED, or not matched by recent reports")
    known.add_argument("reports", nargs="*", help="report JSONs or directories (default: gqa-report, reports)")
    known.add_argument("--days", type=float, default=30.0, help="window for 'recent' (default 30 days)")
    known.add_argument("--file", default=None, help="known-failures TOML (default: cases/known-failures.toml)")
    known.add_argument("--check", action="store_true", help="exit 1 if any entry is FIXED or stale")


def _failure_parsers(sub) -> None:
    """shrink and repro: commands on one failing (case, implementation)."""
    for name, text in (("shrink", "find a smaller case that fails the same way"),
                       ("repro", "write a standalone repro script and an issue body for a failure")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--case", required=True, help="the failing case, e.g. b=1,hq=32,hkv=1,lq=128,d=64")
        cmd.add_argument("--impl", required=True, help="built-in name or package.module:function")
        cmd.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the GPU if there is one)")
        cmd.add_argument("--tensor", default=None, choices=("out", "dq", "dk", "dv"),
                         help="the failing tensor to keep (default: the worst one)")
        cmd.add_argument("--budget", type=float, default=300.0, help="shrink time budget in seconds (default 300)")
        cmd.add_argument("--min-excess", type=float, default=1.0, help="shrink keeps only candidates at least this "
                         "many times beyond the factor (default 1: any failure), for bugs that grow with size")
        cmd.add_argument("--seeds", type=int, default=1, help="shrink also tries each smaller shape at seeds "
                         "0..N-1, for failures that show on a few rows of some draws (default 1: the case's seed)")
    sub.choices["shrink"].add_argument("--out", default=None, help="write the result as JSON")
    rep = sub.choices["repro"]
    rep.add_argument("--shrink", action="store_true", help="shrink the case first")
    rep.add_argument("--after", action="append", default=[], metavar="SPEC@IMPL",
                     help="a call that preceded an order-dependent failure (its report's notes.order.after), "
                          "replayed first; repeatable, in order")
    rep.add_argument("--out", default="gqa-repro", help="directory for repro.py, issue.md (default: gqa-repro)")
    rep.add_argument("--title", default=None, help="issue title (default: generated)")
    rep.add_argument("--note", default="", help="a paragraph for 'Describe the bug'")
    rep.add_argument("--collect-env", action="store_true", help="add `python -m torch.utils.collect_env` output")
    rep.add_argument("--plots", action="store_true", help="per-(batch, head) heat map and error-vs-position PNGs "
                     "(needs the `plots` extra: matplotlib)")


def _lab_parsers(sub) -> None:
    """audit, calibrate, bench: measure the harness itself."""
    audit = sub.add_parser("audit", help="false-alarm audit: known-good kernels over many seeds, margin per level")
    audit.add_argument("--device", default=None)
    audit.add_argument("--suite", default="smoke", help="cases/NAME.toml (default: smoke; cases/audit.toml is a "
                       "small corpus heavy in ill-conditioned inputs)")
    audit.add_argument("--seeds", type=int, default=19, help="seeds per case (default 19: ~1,000 runs of smoke)")
    audit.add_argument("--first-seed", type=int, default=10_000, help="seeds are FIRST.. (distinct from calibration's)")
    audit.add_argument("--impl", action="append", default=[], help="built-in to audit instead of the known-good set")
    audit.add_argument("--out", default="gqa-report", help="writes audit-<device>.json/.md here")
    audit.add_argument("--quiet", action="store_true")
    audit.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: many small cases)")
    cal = sub.add_parser("calibrate", help="measure error/scale of the low-precision designs and known-good kernels")
    cal.add_argument("--device", default=None)
    cal.add_argument("--suite", action="append", default=None, help="corpus suite(s) besides the axis grid (default: smoke)")
    cal.add_argument("--seeds", type=int, default=3, help="seeds per case (default 3)")
    cal.add_argument("--first-seed", type=int, default=1000, help="seeds are FIRST.. (distinct from the audit's 10000..)")
    cal.add_argument("--no-grid", action="store_true", help="leave out the axis grid (group size, length, head dim, B*H)")
    cal.add_argument("--out", default="reports/calibration", help="writes <device>.json/.md here")
    cal.add_argument("--quiet", action="store_true")
    cal.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: many small cases)")
    bench = sub.add_parser("bench", help="oracle throughput vs fp64 GEMM, oracle peak memory, suite wall time")
    bench.add_argument("--device", default=None, help="device for the suite timing (the oracle is always CPU)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--length", type=int, default=1024, help="sequence length of the throughput shapes")
    bench.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    bench.add_argument("--memory-lengths", default="1024,2048,4096,8192,16384", help="kv lengths for peak memory")
    bench.add_argument("--suite", default="smoke", help="suite to time ('none' to skip)")
    bench.add_argument("--gemm-sizes", default="512,1024,2048", help="square fp64 GEMM sizes; the best rate is the yardstick")
    bench.add_argument("--out", default=None, help="also write bench.json/.md here")
    bench.add_argument("--quiet", action="store_true")


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
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError(f"--timeout {args.timeout:g} must be a positive number of seconds")
    suites = args.suite or ([] if args.case else ["smoke"])
    cases = [sc.case for sc in select_cases(suites, args.case, args.dtype, args.max_tokens)]
    if not cases:
        raise UsageError("no cases selected")
    session = Session.open(args.device)
    impls, unavailable = session.resolve(args.impl)
    out = Path(args.out)
    plan = RunPlan(cases=tuple(cases), impls=tuple(impls), canaries=() if args.no_canary else tuple(session.canaries()),
                   isolate=not args.in_process, timeout=args.timeout, repeat=args.repeat, shuffle=args.shuffle,
                   log_dir=out / "worker-logs")  # each worker's stdout/stderr, beside the report
    stream = stream_path(out, session.label)
    sink, done = open_stream(stream, session.fingerprint(), args.resume)
    started = _now()
    previous = signal.signal(signal.SIGTERM, _terminated)  # a killed job still writes its partial report
    try:
        execute_plan(session, plan, sink, Progress(args.quiet), done)
    finally:
        signal.signal(signal.SIGTERM, previous)
        sink.close()
        settings = {"command": " ".join(["gqa-harness", *sys.argv[1:]]), "started": started, "finished": _now(),
                    "suite": ",".join(args.suite) or None, "max_tokens": args.max_tokens,
                    "implementations": [i.name for i in impls], "unavailable": unavailable,
                    "tolerances": session.tolerances.as_dict(), "strict": args.strict}
        report = build_report(read_stream(stream), session.fingerprint(), settings)
        md = write_report(out, report, render_markdown(report))
    counts = report["summary"]["counts"]
    print(f"{session.label}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"; report {md}")
    for line in fixed_in_run(report):
        print(line, file=sys.stderr)
    if report["results"] and not report["summary"]["canary_failed_as_expected"] and plan.canaries:
        print(f"the canary passed on {session.device}: this pipeline cannot fail here, its PASSes mean nothing",
              file=sys.stderr)
    return exit_status(report, args.strict)


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
                              args.limit if args.limit is not None else SUMMARY_LIMIT, dict(os.environ))
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
    result = diff_reports(baseline, new, noise_for(Path(args.baseline), baseline, args.noise))
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


def cmd_known(args) -> int:
    paths = [Path(p) for p in args.reports] or [p for p in (Path("gqa-report"), Path("reports")) if p.exists()]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UsageError(f"no such report path: {missing[0]}")
    return known_command(paths, args.days, Path(args.file) if args.file else None, args.check)


def _shrunk(args, case, impl, session):
    result = shrink(case, impl, judge_with(impl, session), args.tensor, args.budget, min_excess=args.min_excess,
                    seeds=args.seeds)
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
                        note=args.note, shrunk=shrunk, collect_env=args.collect_env, plots=args.plots, after=after)
    print(repro.script_output)
    if not repro.reproduces:
        print(f"gqa-harness repro: {repro.script} exits 0 here: it does not reproduce the failure", file=sys.stderr)
        return 1
    print(f"wrote {repro.script} (exits {repro.script_exit} while the bug is present) and {repro.issue}")
    return 0


def _positive(args, *names: str) -> None:
    if any(getattr(args, n) < 1 for n in names) or args.first_seed < 0:
        raise UsageError("--seeds and --threads must be at least 1 and --first-seed non-negative")


def cmd_audit(args) -> int:
    _positive(args, "seeds", "threads")
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
    cfg = BenchConfig(length=args.length, repeats=args.repeats, memory_lengths=lengths,
                      suite=None if args.suite == "none" else args.suite, device=args.device, gemm_sizes=sizes)
    return bench_command(cfg, args.json, Path(args.out) if args.out else None, args.quiet)


COMMANDS = {"run": cmd_run, "replay": cmd_replay, "env": cmd_env, "implementations": cmd_implementations,
            "summary": cmd_summary, "compare": cmd_compare, "diff": cmd_diff, "noise": cmd_noise, "known": cmd_known,
            "shrink": cmd_shrink, "repro": cmd_repro, "audit": cmd_audit, "calibrate": cmd_calibrate,
            "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())

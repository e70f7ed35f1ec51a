"""`gqa-harness`: argument parsing only; the work is in runner.py and report.py."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from . import __version__

USAGE_EXIT = 2


class UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gqa-harness", description=__doc__)
    p.add_argument("--version", action="version", version=f"gqa-harness {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run cases through every implementation and write the report")
    run.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the GPU if there is one)")
    run.add_argument("--suite", default=None, help="cases/NAME.toml (default: smoke)")
    run.add_argument("--case", action="append", default=[], help="inline case, e.g. b=2,hq=32,hkv=8,lq=128,d=128")
    run.add_argument("--impl", action="append", default=[], help="built-in name or package.module:function")
    run.add_argument("--dtype", default=None, help="comma list to keep, e.g. bf16,fp16")
    run.add_argument("--max-tokens", type=int, default=None,
                     help="cap q/kv lengths at N (ratio and head geometry kept), e.g. models on a CPU")
    run.add_argument("--strict", action="store_true", help="KNOWN failures fail the run too")
    run.add_argument("--out", default="gqa-report", help="output directory (default: gqa-report)")
    run.add_argument("--no-canary", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    run.add_argument("--resume", action="store_true", help="continue the stream in --out, skipping finished results")
    run.add_argument("--repeat", type=int, default=1, metavar="N",
                     help="run each kernel N times on the same inputs; report bitwise non-determinism")
    run.add_argument("--shuffle", type=int, default=None, metavar="SEED", help="random work order, to surface "
                     "order-dependent failures")
    run.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                     help="budget per (case, implementation) (default: scaled by the case's FLOPs)")
    run.add_argument("--in-process", action="store_true",
                     help="run kernels in this process: no crash/hang isolation, no order check")

    env = sub.add_parser("env", help="print the environment fingerprint")
    env.add_argument("--device", default=None)

    impls = sub.add_parser("implementations", help="what runs on this device, and why the rest do not")
    impls.add_argument("--device", default=None)

    summ = sub.add_parser("summary", help="CI: report Markdown into $GITHUB_STEP_SUMMARY (1 MiB cap), artifact name")
    summ.add_argument("paths", nargs="+", help="report directories or <label>.md/.json files")
    summ.add_argument("--suffix", default="", help="makes the artifact name unique, e.g. the runner label")
    summ.add_argument("--prefix", default="gqa-report", help="artifact name prefix (default: gqa-report)")
    summ.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _select_cases(args) -> list:
    from .suites import select_cases

    suites = [args.suite or "smoke"] if args.suite or not args.case else []
    cases = [sc.case for sc in select_cases(suites, args.case, args.dtype, args.max_tokens)]
    if not cases:
        raise UsageError("no cases selected")
    return cases


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


def cmd_run(args) -> int:
    from .env import device_facts, device_label, fingerprint, pin_math_reduction
    from .implementations import canaries, resolve
    from .known import load_known
    from .report import build_report, exit_status, render_markdown
    from .runner import RunPlan, execute_plan, open_stream, read_stream
    from .verdict import load_tolerances

    facts = device_facts(args.device)
    cases = _select_cases(args)
    impls, unavailable = resolve(args.impl, facts)
    pin_math_reduction(False)
    label = device_label(facts)
    plan = RunPlan(cases=cases, impls=impls, canaries=[] if args.no_canary else canaries(facts), facts=facts,
                   tol=load_tolerances(), known=load_known(), device_label=label)
    _reliability_options(plan, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stream = out / f"{label}.jsonl"
    sink, done = open_stream(stream, fingerprint(facts), args.resume)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    previous = signal.signal(signal.SIGTERM, _terminated)  # a killed job still writes its partial report
    try:
        execute_plan(plan, sink, Progress(args.quiet), done)
    finally:
        signal.signal(signal.SIGTERM, previous)
        sink.close()
        settings = {"command": " ".join(["gqa-harness", *sys.argv[1:]]), "started": started,
                    "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "suite": args.suite, "max_tokens": args.max_tokens, "implementations": [i.name for i in impls], "unavailable": unavailable,
                    "tolerances": plan.tol.as_dict(), "strict": args.strict}
        report = build_report(read_stream(stream), fingerprint(facts), settings)
        (out / f"{label}.json").write_text(json.dumps(report, indent=1, allow_nan=False))
        (out / f"{label}.md").write_text(render_markdown(report))
    code = exit_status(report, args.strict)
    counts = report["summary"]["counts"]
    print(f"{label}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) +
          f"; report {out / (label + '.md')}")
    if report["results"] and not report["summary"]["canary_failed_as_expected"] and plan.canaries:
        print(f"the canary passed on {facts.device}: this pipeline cannot fail here, its PASSes mean nothing",
              file=sys.stderr)
    return code


def _reliability_options(plan, args) -> None:
    if args.repeat < 1:
        raise UsageError(f"--repeat {args.repeat} must be at least 1")
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError(f"--timeout {args.timeout:g} must be a positive number of seconds")
    plan.isolate, plan.timeout, plan.repeat, plan.shuffle = not args.in_process, args.timeout, args.repeat, args.shuffle


def _terminated(signum, frame):
    raise KeyboardInterrupt


def cmd_env(args) -> int:
    from .env import device_facts, fingerprint

    print(json.dumps(fingerprint(device_facts(args.device)), indent=1))
    return 0


def cmd_implementations(args) -> int:
    from tabulate import tabulate

    from .env import device_facts
    from .implementations import builtin_implementations

    facts = device_facts(args.device)
    rows = []
    for impl in builtin_implementations().values():
        reason = impl.available(facts)
        rows.append([impl.name, "yes" if reason is None else "no", reason or impl.description])
    print(tabulate(rows, headers=["implementation", f"on {facts.device}", "description / why not"], tablefmt="github"))
    return 0


def cmd_summary(args) -> int:
    import os

    from .ci import SUMMARY_LIMIT, summarize

    code, printed = summarize([Path(p) for p in args.paths], args.suffix, args.prefix,
                              args.limit if args.limit is not None else SUMMARY_LIMIT, dict(os.environ))
    sys.stdout.write(printed)
    return code


COMMANDS = {"run": cmd_run, "env": cmd_env, "implementations": cmd_implementations, "summary": cmd_summary}


def bad_input_types() -> tuple[type[BaseException], ...]:
    from .case import CaseError
    from .ci import SummaryError
    from .env import DeviceError
    from .implementations import RegistryError
    from .known import KnownFailuresError
    from .runner import StreamError
    from .suites import SuiteError

    return (UsageError, CaseError, SuiteError, RegistryError, DeviceError, KnownFailuresError, SummaryError, StreamError)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except bad_input_types() as exc:
        if args.debug:
            raise
        print(f"gqa-harness: error: {exc}", file=sys.stderr)
        return USAGE_EXIT
    except KeyboardInterrupt:
        print("gqa-harness: interrupted; the partial report was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

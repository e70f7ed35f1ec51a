"""`gqa-harness search`: options checked, the session and stream opened, the search run, the report written.

Writes into --out (default gqa-search): `<label>.jsonl` (the stream: a start record, every
example's results, progress, findings), `<label>.json`/`.md` (the report), `found.toml` and, unless
--db names another place, the example database `hypothesis-db/`. `--resume` continues the stream:
findings, examples and elapsed time are read back, the database is replayed first as always.
"""

from __future__ import annotations

import secrets
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..reports.report import exit_status
from ..reports.store import open_stream, read_stream, stream_path
from ..run.session import Session
from .engine import Limits, Search, prior_from_records
from .output import FOUND, search_section, write_search_report
from .space import SearchError, SearchSpace, parse_dtypes
from .store import ExampleStore

PROGRESS_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal


@dataclass(frozen=True)
class SearchOptions:
    space: SearchSpace
    limits: Limits
    device: str | None = None
    impls: tuple[str, ...] = ()
    seed: int | None = None
    out: Path = Path("gqa-search")
    db: Path | None = None
    resume: bool = False
    quiet: bool = False
    command: str = "gqa-harness search"


def options_from_args(args: Any, command: str) -> SearchOptions:
    """The parsed arguments, checked: one SearchError line for each thing wrong."""
    if not args.budget > 0:
        raise SearchError(f"--budget {args.budget:g} must be a positive number of seconds")
    if not args.shrink_budget > 0:
        raise SearchError(f"--shrink-budget {args.shrink_budget:g} must be a positive number of seconds")
    for name in ("max_examples", "max_findings"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SearchError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.seed is not None and args.seed < 0:
        raise SearchError(f"--seed {args.seed} must be a non-negative integer")
    if args.timeout is not None and not args.timeout > 0:
        raise SearchError(f"--timeout {args.timeout:g} must be a positive number of seconds")
    sizes = {name: value for name in ("max_tokens", "max_batch", "max_kv_heads")
             if (value := getattr(args, name)) is not None}
    space = SearchSpace(dtypes=parse_dtypes(args.dtype), profile=args.profile, **sizes)
    limits = Limits(budget=args.budget, max_examples=args.max_examples, max_findings=args.max_findings,
                    shrink_budget=args.shrink_budget, timeout=args.timeout)
    return SearchOptions(space=space, limits=limits, device=args.device, impls=tuple(args.impl), seed=args.seed,
                         out=Path(args.out), db=Path(args.db) if args.db else None, resume=args.resume,
                         quiet=args.quiet, command=command)


def writable(path: Path, option: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".gqa-write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SearchError(f"{option} {path}: cannot write there ({exc.strerror or type(exc).__name__})") from None


class SearchProgress:
    """Examples tried, findings, time left: one overwritten line on a terminal, a line every 10 s in CI."""

    def __init__(self, quiet: bool, clock=time.monotonic, stream=sys.stderr):
        self.quiet, self.clock, self.stream = quiet, clock, stream
        self.tty = stream.isatty()
        self.last = float("-inf")

    def line(self, search: Search) -> str:
        t = search.tally
        return (f"[search] {t.examples} examples, {len(t.findings)} findings, {search.elapsed():.0f} s elapsed, "
                f"{search.left():.0f} s of exploring left")

    def __call__(self, search: Search) -> None:
        now = self.clock()
        if self.quiet or (not self.tty and now - self.last < PROGRESS_EVERY):
            return
        self.last = now
        print(("\r" + self.line(search)) if self.tty else self.line(search), end="" if self.tty else "\n",
              file=self.stream, flush=True)


def _seed(opts: SearchOptions, records: list[dict[str, Any]]) -> int:
    """--seed; else the resumed search's; else 0 under the derandomized ci profile; else a fresh one."""
    start = next((r for r in records if r.get("type") == "search" and r.get("event") == "start"), {})
    if opts.seed is not None:
        return opts.seed
    if "seed" in start:
        return int(start["seed"])
    return 0 if opts.space.profile == "ci" else secrets.randbelow(1 << 32)


def _check_resume(records: list[dict[str, Any]], key: str, stream: Path) -> None:
    start = next((r for r in records if r.get("type") == "search" and r.get("event") == "start"), None)
    if start is not None and start.get("key") != key:
        raise SearchError(f"--resume: {stream} is a search of other implementations, dtypes or profile; "
                          "use another --out or drop --resume")


def search_command(opts: SearchOptions) -> int:
    writable(opts.out, "--out")
    if opts.db is not None:
        writable(opts.db, "--db")
    session = Session.open(opts.device)
    impls, unavailable = session.resolve(list(opts.impls))
    key = opts.space.key(session.label, [i.name for i in impls])
    stream = stream_path(opts.out, session.label)
    records = read_stream(stream) if opts.resume and stream.exists() else []
    _check_resume(records, key.decode(), stream)
    seed = _seed(opts, records)
    sink, _ = open_stream(stream, session.fingerprint(), opts.resume)
    sink({"type": "search", "event": "start", "seed": seed, "key": key.decode(), "impls": [i.name for i in impls]})
    store = ExampleStore.open(opts.db or opts.out / "hypothesis-db", key)
    progress = SearchProgress(opts.quiet)
    search = Search(session, impls, opts.space, opts.limits, seed, sink, store, prior_from_records(records),
                    log_dir=opts.out / "worker-logs", progress=progress)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    interrupted = True
    try:
        search.run()
        interrupted = False
    finally:
        search.close()
        sink.close()
        if progress.tty and not opts.quiet:
            print(file=sys.stderr)
        settings = {"command": opts.command, "started": started,
                    "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "suite": None,
                    "implementations": [i.name for i in impls], "unavailable": unavailable,
                    "tolerances": session.tolerances.as_dict(), "strict": False}
        section = search_section(search.tally, opts.limits, opts.space, seed, search.elapsed(), interrupted)
        md, report = write_search_report(opts.out, read_stream(stream), session.fingerprint(), settings, section,
                                 search.tally.findings)
    t = search.tally
    print(f"{session.label}: searched {t.examples} examples in {search.elapsed():.0f} s, {len(t.findings)} findings "
          f"({section['confirmed']} confirmed); report {md}, regressions {opts.out / FOUND}")
    return max(exit_status(report), 1 if section["confirmed"] else 0)

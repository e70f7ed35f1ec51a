"""Every option, declared once. The run options: `gqa-harness run` adds them as --NAME, the pytest
plugin as --gqa-NAME (pytest-benchmark's pattern: one builder taking the parser's add function and
a prefix). The other subcommands' options follow; cli.py only dispatches."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from . import __version__

RUN_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("suite", dict(action="append", default=[], metavar="NAME",
                   help="cases/NAME.toml, a directory of them, or one file in it; repeatable (default: smoke "
                        "when no --case is given)")),
    ("case", dict(action="append", default=[], metavar="SPEC",
                  help="inline case, e.g. b=2,hq=32,hkv=8,lq=128,d=128; repeatable")),
    ("device", dict(default=None, help="cpu, cuda or cuda:N (default: the GPU if there is one)")),
    ("impl", dict(action="append", default=[], metavar="IMPL",
                  help="built-in name or package.module:function; repeatable (default: every built-in)")),
    ("dtype", dict(default=None, help="comma list of dtypes to keep, e.g. bf16,fp16")),
    ("max-tokens", dict(type=int, default=None,
                        help="cap q/kv lengths at N (ratio and head geometry kept), e.g. models on a CPU")),
    ("guard", dict(default=None, choices=("none", "nan", "sentinel"),
                   help="guard bands around every input on the device (out-of-bounds reads and writes): nan or "
                        "sentinel; none switches them off (default: as each suite says; edge uses nan)")),
    ("out", dict(default="gqa-report", help="report directory (default: gqa-report)")),
    ("strict", dict(action="store_true", help="KNOWN failures fail too")),
    ("in-process", dict(action="store_true",
                        help="run kernels in this process: no crash/hang isolation, no order check")),
    ("shard", dict(default=None, metavar="I/N",
                   help="run shard I of N: cases by a stable hash of their id (all implementations of a case in "
                        "one shard); `gqa-harness merge` joins the N reports")),
    ("shard-by-time", dict(default=None, metavar="REPORT",
                           help="with --shard: balance the shards by the per-case seconds REPORT recorded")),
)


def add_run_options(add: Callable[..., Any], prefix: str = "--") -> None:
    for name, kwargs in RUN_OPTIONS:
        add(prefix + name, **kwargs)


class OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors in one line, like every other bad input (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = OneLineParser(prog="gqa-harness", description=description)
    p.add_argument("--version", action="version", version=f"gqa-harness {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run cases through every implementation and write the report")
    add_run_options(run.add_argument)
    run.add_argument("--no-canary", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    run.add_argument("--force", action="store_true",
                     help="with --resume: continue a stream started with another plan, recording the difference")
    run.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout (for scripts)")
    run.add_argument("--resume", action="store_true", help="continue the stream in --out, skipping finished results")
    run.add_argument("--repeat", type=int, default=1, metavar="N",
                     help="run each kernel N times on the same inputs; report bitwise non-determinism")
    run.add_argument("--shuffle", type=int, default=None, metavar="SEED", help="random work order, to surface "
                     "order-dependent failures")
    run.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                     help="budget per (case, implementation) (default: scaled by the case's FLOPs)")
    run.add_argument("--stages", action="store_true", help="also write stages.json beside the report: where the "
                     "run's wall and CPU time went, stage by stage (as bench --suite-only)")

    replay_p = sub.add_parser("replay", help="run calls in order in one fresh worker; the last one is judged "
                              "(an order-dependent failure's reproduce command)")
    replay_p.add_argument("--device", default=None)
    replay_p.add_argument("--call", action="append", required=True, help="CASE_SPEC@IMPLEMENTATION, in order")

    for name, text in (("env", "print the environment fingerprint"),
                       ("implementations", "what runs on this device, and why the rest do not")):
        sub.add_parser(name, help=text).add_argument("--device", default=None)

    _report_parsers(sub)
    _failure_parsers(sub)
    _search_parser(sub)
    _lab_parsers(sub)
    return p


def _report_parsers(sub) -> None:
    """Commands on saved reports: summary, compare, diff, noise, known."""
    summ = sub.add_parser("summary", help="CI: report Markdown into $GITHUB_STEP_SUMMARY (1 MiB cap), artifact name")
    summ.add_argument("paths", nargs="+", help="report directories or <label>.md/.json files")
    summ.add_argument("--suffix", default="", help="makes the artifact name unique, e.g. the runner label")
    summ.add_argument("--prefix", default="gqa-report", help="artifact name prefix (default: gqa-report)")
    summ.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    summ.add_argument("--annotations", type=int, default=10, metavar="N", help="print GitHub ::error annotations for "
                      "the N worst failures and ::warning for FIXED known failures (default 10, GitHub's per-step "
                      "limit; 0: none)")
    cmp = sub.add_parser("compare", help="merge per-device reports into one cross-device matrix")
    cmp.add_argument("reports", nargs="+", help="report JSON files (<label>.json), one or more per device")
    cmp.add_argument("--out", default=None, help="write FILE.md and FILE.json (default: Markdown on stdout)")
    dif = sub.add_parser("diff", help="CI gate: exit 1 when NEW regressed against BASELINE")
    dif.add_argument("baseline", help="baseline report, e.g. reports/baselines/cpu-x86_64.json")
    dif.add_argument("new", help="the new report of the same device")
    dif.add_argument("--noise", default=None, help="noise-band file (default: <baseline>.noise.json beside it, else "
                     "the band from the committed calibration, reports/calibration/)")
    dif.add_argument("--out", default=None, help="also write FILE.md and FILE.json")
    dif.add_argument("--partial", action="store_true", help="compare only the cases NEW ran (one shard gates its job)")
    dif.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                     help="the baseline's implementation OLD is NEW in the new report (e.g. a renamed module); repeatable")
    merge = sub.add_parser("merge", help="join the shards of one device (run --shard I/N) into one report")
    merge.add_argument("dirs", nargs="+", metavar="DIR", help="each shard's report directory (its --out)")
    merge.add_argument("--out", default="gqa-report", help="directory for the merged report (default: gqa-report)")
    merge.add_argument("--partial", action="store_true", help="merge the shards present even when some are missing "
                       "or interrupted (the report says which)")
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
    rep.add_argument("--compare", default=None, metavar="REPORT",
                     help="another device's report JSON: its verdict on the same case joins the triage table")
    rep.add_argument("--plots", action="store_true", help="per-(batch, head) heat map and error-vs-position PNGs "
                     "(needs the `plots` extra: matplotlib)")


def _search_parser(sub) -> None:
    """search: generated cases against the implementations, each new failure shrunk (docs/cases.md)."""
    s = sub.add_parser("search", help="generated cases against every implementation for a wall-time budget; each "
                       "new failure shrunk, confirmed alone and written to found.toml")
    s.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the GPU if there is one)")
    s.add_argument("--impl", action="append", default=[], metavar="IMPL",
                   help="built-in name or package.module:function; repeatable (default: every built-in)")
    s.add_argument("--dtype", default=None, help="comma list of dtypes to draw (default: bf16,fp16)")
    s.add_argument("--budget", type=float, required=True, metavar="SECONDS",
                   help="wall time for trying new examples (a shrink under way may add --shrink-budget)")
    s.add_argument("--max-examples", type=int, default=None, metavar="N", help="stop after N examples")
    s.add_argument("--max-findings", type=int, default=None, metavar="N", help="stop after N findings")
    s.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="longest q/kv length drawn (default 512)")
    s.add_argument("--max-batch", type=int, default=None, metavar="N", help="largest batch drawn (default 4)")
    s.add_argument("--max-kv-heads", type=int, default=None, metavar="N",
                   help="most kv heads drawn (default 4; query heads are a group of up to 16 per kv head)")
    s.add_argument("--shrink-budget", type=float, default=120.0, metavar="SECONDS",
                   help="wall time for shrinking one failure (default 120)")
    s.add_argument("--profile", default="dev", help="dev, ci or nightly: the fp64 memory bound per case (16 MiB, "
                   "8 MiB, 256 MiB); ci also fixes the seed to 0 (default: dev)")
    s.add_argument("--seed", type=int, default=None, help="seed of the example generation (default: random, "
                   "recorded in the report; 0 under --profile ci)")
    s.add_argument("--out", default="gqa-search", help="report directory, found.toml and the example database "
                   "(default: gqa-search)")
    s.add_argument("--db", default=None, help="example database directory (default: OUT/hypothesis-db)")
    s.add_argument("--resume", action="store_true", help="continue the search in --out, keeping its findings")
    s.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="budget per (case, implementation) (default: scaled by the case's FLOPs)")
    s.add_argument("--quiet", action="store_true", help="no progress lines")


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
    audit.add_argument("--differential", action="store_true",
                       help="audit the differential rules (trends, GQA vs expanded) over a family suite instead "
                            "(use --suite families); writes differential-audit-<device>.json/.md")
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
    bench.add_argument("--suite-only", action="store_true", help="only the suite's wall and CPU split by stage")
    bench.add_argument("--max-tokens", type=int, default=None, help="cap the suite's lengths (as run --max-tokens)")
    bench.add_argument("--gemm-sizes", default="512,1024,2048", help="square fp64 GEMM sizes; the best rate is the yardstick")
    bench.add_argument("--threads", type=int, default=None, help="torch threads for the whole bench (default: torch's)")
    bench.add_argument("--long-max-tokens", type=int, default=16384,
                       help="cap the long suite's lengths for its peak-memory rows (-1: full size, 0: skip)")
    bench.add_argument("--simulate-threads", type=int, default=16, help="thread count of the work-split simulation")
    bench.add_argument("--out", default=None, help="also write bench.json/.md here")
    bench.add_argument("--quiet", action="store_true")

"""Per catalogue kernel (tests/search_kernels.py): how long `gqa-harness search` takes to find it, what it
shrinks to, and examples per minute; then the correct implementations searched with the same budgets.

    python -m tests.search_catalogue [--out DIR] [--shrink-budget S]    # ~10-20 minutes on 2 CPU cores
    python -m tests.search_catalogue --part suites                       # each kernel on smoke/models/edge

The kernels of each space of tests/search_kernels.py are searched together, as tests/test_search.py
does (one oracle per example for all; seed 0, SEARCH_EXAMPLES of the group), in a fresh `gqa-harness search`
process; a kernel's time to find is its first finding's `found_after_s` (from the search's start:
worker start-up, canary and earlier shrinks included), then its found.toml runs under `run --suite`.
Prints one Markdown table (docs/benchmarks-calibration.md keeps it) and exits 1 when a kernel is not
found or a correct implementation gives a finding.

`--part suites` shows that no kernel of the catalogue can fail smoke, models or edge: on every case of
them (models capped at 256 and 128 tokens, as the CPU workflows run it, and as written), each kernel's
out/dQ/dK/dV, called as `run` calls it, equal the math backend's bitwise, so each gets sdpa-math's
verdict. Much cheaper than `run` (no oracle, no verdict); exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from harness.core.inputs import make_inputs
from harness.core.suites import select_cases
from harness.implementations.user import implementation_from_callable
from harness.run.execute import run_implementation
from tests import search_kernels, wrong_kernels
from tests.search_kernels import CORNERS, SEARCH_EXAMPLES, SEARCH_SEED, SEARCHES

ROOT = Path(__file__).resolve().parent.parent
LABEL = "cpu-x86_64"
CORRECT = ("sdpa-math", "expanded-kv-math", "tests.wrong_kernels:fp32_reference")


def search(impls: list[str], options: tuple[str, ...], out: Path, shrink_budget: float, first_only: bool,
           examples: int) -> dict:
    """One `gqa-harness search` in a fresh process; its report's search section (examples per minute in it)."""
    argv = [sys.executable, "-m", "harness.cli", "search", "--device", "cpu", "--budget", "1800",
            "--max-examples", str(examples), "--seed", str(SEARCH_SEED), "--shrink-budget", str(shrink_budget),
            "--quiet", *options, "--out", str(out)]
    argv += [a for impl in impls for a in ("--impl", impl)] + (["--max-findings", "1"] if first_only else [])
    subprocess.run(argv, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
    return json.loads((out / f"{LABEL}.json").read_text())["search"]


def run_found(out: Path, impls: list[str]) -> set[str]:
    """The implementations failing an entry of the search's found.toml under `gqa-harness run --suite`."""
    if "[[case]]" not in (out / "found.toml").read_text():
        return set()  # no confirmed finding: nothing to run
    argv = [sys.executable, "-m", "harness.cli", "run", "--device", "cpu", "--suite", str(out / "found.toml"),
            "--in-process", "--quiet", "--out", str(out / "found-run")] + [a for i in impls for a in ("--impl", i)]
    subprocess.run(argv, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
    results = json.loads((out / "found-run" / f"{LABEL}.json").read_text())["results"]
    return {r["impl"] for r in results if r["status"] == "FAIL"}


def kernel_row(name: str, mine: list[dict], s: dict, fails_in_run: bool) -> str:
    if not mine:
        return f"| `{name}` | not found in {s['examples']} examples | | | | |"
    f = mine[0]
    shrink = f"{f['shrink_s']:.0f} s, {f['shrink_evaluations']} runs" + ("" if f["shrink_complete"] else ", cut off")
    confirmed = "confirmed" if f["confirmed"] else f"NOT confirmed ({f['confirm_status']})"
    return (f"| `{name}` | {f['found_after_s']:.0f} s ({f['found_after_examples']} examples) | `{f['spec']}` | "
            f"{f['summary']}, {confirmed} | {shrink} | {'FAIL' if fails_in_run else 'not FAIL'} |")


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def suites_check() -> list[str]:
    """Every case of smoke/models/edge: (suite, cases, kernels differing from the math backend bitwise)."""
    math = implementation_from_callable(wrong_kernels.math_sdpa, "math")
    kernels = [implementation_from_callable(getattr(search_kernels, name), name) for name in CORNERS]
    lines = ["| suite | cases | kernels differing from math (bitwise) |", "|---|---|---|"]
    for suite, cap in (("smoke", None), ("edge", None), ("models", 128), ("models", 256), ("models", None)):
        cases = [sc.case for sc in select_cases([suite], [], None, cap)]
        differing = []
        for case in cases:
            inputs = make_inputs(case)
            want = run_implementation(math, inputs, "cpu").tensors
            for k in kernels:
                got = run_implementation(k, inputs, "cpu").tensors
                if not all(_same(got.get(t), want.get(t)) for t in ("out", "dq", "dk", "dv")):
                    differing.append(f"{k.name} on {case.id}")
        lines.append(f"| {suite}{f' --max-tokens {cap}' if cap else ''} | {len(cases)} | {', '.join(differing) or 'none'} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.search_catalogue", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where the searches write (default: a temp dir)")
    parser.add_argument("--shrink-budget", type=float, default=60.0, help="seconds per shrink (default 60)")
    parser.add_argument("--only", action="append", default=[], metavar="KERNEL", help="these kernels only; repeatable")
    parser.add_argument("--part", choices=("kernels", "correct", "both", "suites"), default="both",
                        help="the catalogue kernels, the correct implementations, both (default), or the suites check")
    args = parser.parse_args(argv)
    if args.part == "suites":
        lines = suites_check()
        print("\n".join(lines))
        return 1 if any(not line.endswith("| none |") for line in lines[2:]) else 0
    out = args.out or Path(tempfile.mkdtemp(prefix="gqa-catalogue-"))
    lines = ["| kernel | time to find (examples) | shrunk case | failure | shrink | found.toml under run |",
             "|---|---|---|---|---|---|"]
    missed = 0
    for group, (names, options) in SEARCHES.items() if args.part != "correct" else ():
        names = [n for n in names if not args.only or n in args.only]
        if not names:
            continue
        impls = [f"tests.search_kernels:{n}" for n in names]
        s = search(impls, options, out / group, args.shrink_budget, first_only=False, examples=SEARCH_EXAMPLES[group])
        failing = run_found(out / group, impls)
        for name, impl in zip(names, impls):
            mine = [f for f in s["findings"] if f["impl"] == impl]
            missed += not mine or impl not in failing
            lines.append(kernel_row(name, mine, s, impl in failing))
            print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", "| correct implementations, space | examples | findings | examples/min |", "|---|---|---|---|"]
    for group, (_, options) in SEARCHES.items() if args.part != "kernels" else ():
        s = search(list(CORRECT), options, out / f"correct-{group}", args.shrink_budget, first_only=False,
                   examples=SEARCH_EXAMPLES[group])
        missed += bool(s["findings"])
        lines.append(f"| {', '.join(CORRECT)}; {group} (`{' '.join(options)}`) | {s['examples']} | "
                     f"{len(s['findings'])} | {s['examples_per_minute']} |")
    print("\n".join(lines))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

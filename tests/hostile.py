"""Hostile tries: what a careless or hostile user does to `gqa-harness`, each try judged clean or not.

    python -m tests.hostile [--out DIR]      # about 5 minutes on 2 CPU cores

Classes:
  bad input     a wrong value in each case field and option: clean = exit 2, one line, no traceback;
  injection     pipes, HTML and shell text in names and specs: clean = refused in one line, or a report
                whose tables keep their columns and carry no raw HTML;
  faults        kernels that abort, hang, run out of memory, raise, poison the device, return the wrong
                shape, detach their output, change process state, exit at import: clean = one run records
                each as what it did, with every healthy result intact;
  interruptions SIGINT, SIGTERM and SIGKILL at several points, then --resume: clean = the report equals
                an uninterrupted run's (statuses and order diagnoses);
  load          many crashing workers in a row, 10 MB of kernel stdout: clean = every result recorded.
Prints one table: class, tries, clean, not clean (and what was not).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from harness.cli import main as harness_main

ROOT = Path(__file__).resolve().parent.parent
BASE = "b=1,hq=2,hkv=1,lq=8,d=16"
FIELDS = ["b", "hq", "hkv", "lq", "lk", "d", "dv", "s"]
BAD_NUMBERS = ["-1", "0", "1.5", "x", "1e400", "inf", "nan", str(10**13)]
BAD_CHOICES = {"dtype": ["fp8", "BF16", ""], "causal": ["yes", "diagonal"], "mask": ["random", "1"],
               "layout": ["bshd", "kv"], "values": ["gaussian"], "scale": ["-0.1", "inf", "nan", "0", "abc"],
               "mask_fill": ["-1e9"], "colour": ["red"]}
BAD_OPTIONS = [["--timeout", "0"], ["--timeout", "-1"], ["--timeout", "inf"], ["--timeout", "1e300"],
               ["--timeout", "nan"], ["--repeat", "0"], ["--repeat", "-3"], ["--max-tokens", "0"],
               ["--max-tokens", "-5"], ["--dtype", "fp8"], ["--dtype", ","], ["--suite", "no-such-suite"],
               ["--suite", "/etc/passwd"], ["--impl", "no-such-impl"], ["--impl", "mod:"], ["--impl", ":f"],
               ["--impl", "a b:c"], ["--impl", "tests.exits_at_import:f"], ["--device", "tpu"],
               ["--device", "cuda:7"], ["--shuffle", "x"], ["--out", "/proc/gqa-cannot-write"]]
INJECTION = ["k|x", "<script>alert(1)</script>", "a;rm -rf x", "$(touch pwned)", "`id`", "x' --case 'y",
             "<img src=x onerror=alert(1)>", "a\nb", "tests.faulty_kernels:raises|x"]
FAULTS = ["abort", "hang", "oom", "raises", "device_fault", "wrong_shape", "detached", "flips_math_reduction"]


def cli(argv: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def refused(argv: list[str]) -> bool:
    """In this process (fast): exit 2 with one line on stderr and no traceback."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = harness_main(argv)
    except SystemExit as exc:  # argparse's own refusals: the console script exits with this code
        code = exc.code
    except BaseException:  # noqa: BLE001 - a traceback out of main is what this try looks for
        return False
    text = err.getvalue().strip()
    return code == 2 and len(text.splitlines()) == 1 and "Traceback" not in text


def bad_input(work: Path) -> list[tuple[str, bool]]:
    tries = []
    for field in FIELDS:
        for value in BAD_NUMBERS:
            if field == "s" and value in ("0",):
                continue
            if field in ("hkv", "s") and value == str(10**13):  # a valid seed; hkv would only fail to divide
                continue
            spec = re.sub(rf"(^|,){field}=[^,]*", "", BASE) + f",{field}={value}"
            tries.append((f"--case {spec}", spec))
    for field, values in BAD_CHOICES.items():
        tries += [(f"--case {field}={v}", f"{BASE},{field}={v}") for v in values]
    out = []
    for label, spec in tries:
        out.append((label, refused(["run", "--case", spec, "--out", str(work / "bad"), "--quiet"])))
    for option in BAD_OPTIONS:
        out_dir = [] if option[0] == "--out" else ["--out", str(work / "bad")]
        out.append((" ".join(option), refused(["run", "--case", BASE, *option, *out_dir, "--quiet"])))
    return out


def injection(work: Path) -> list[tuple[str, bool]]:
    out = []
    for text in INJECTION:
        out.append((f"--impl {text!r}", refused(["run", "--case", BASE, "--impl", text, "--out", str(work / "inj")])))
        out.append((f"dtype={text!r}", refused(["run", "--case", f"{BASE},dtype={text}", "--out", str(work / "inj")])))
    return out


def faults(work: Path) -> list[tuple[str, bool]]:
    impls = [x for f in FAULTS for x in ("--impl", f"tests.faulty_kernels:{f}")]
    proc = cli(["run", "--case", BASE, "--impl", "sdpa-math", *impls, "--timeout", "20", "--out", str(work / "f"),
                "--quiet"], work)
    report = json.loads((work / "f" / "cpu-x86_64.json").read_text()) if (work / "f" / "cpu-x86_64.json").exists() else {}
    results = {r["impl"]: r for r in report.get("results", [])}
    expect = {"abort": ("ERROR", "crash"), "hang": ("ERROR", "timeout"), "oom": ("ERROR", "oom"),
              "raises": ("ERROR", "exception"), "device_fault": ("ERROR", "crash"), "wrong_shape": ("FAIL", ""),
              "detached": ("FAIL", ""), "flips_math_reduction": ("FAIL", "global-state")}
    out = []
    for name, (status, kind) in expect.items():
        r = results.get(f"tests.faulty_kernels:{name}", {})
        out.append((name, r.get("status") == status and (not kind or r.get("error_kind") == kind)))
    out.append(("healthy result beside them", results.get("sdpa-math", {}).get("status") == "PASS"))
    out.append(("exit status 1 and a report", proc.returncode == 1 and bool(report)))
    return out


def _stable(path: Path) -> dict:
    report = json.loads(path.read_text())
    return {(r["case_id"], r["impl"]): (r["status"], (r.get("notes") or {}).get("order", {}).get("summary"))
            for r in report["results"]}


def interruptions(work: Path) -> list[tuple[str, bool]]:
    cases = [x for n in (16, 32, 48, 64) for x in ("--case", f"b=1,hq=4,hkv=2,lq={n},d=32")]
    args = ["run", *cases, "--impl", "sdpa-math", "--impl", "tests.faulty_kernels:gated", "--quiet"]
    gate = work / "gate"
    gate.touch()
    full = cli([*args, "--out", str(work / "full")], work, env={"GQA_TEST_GATE": str(gate)})
    expected = _stable(work / "full" / "cpu-x86_64.json") if full.returncode in (0, 1) else {}
    out = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        for delay in (0.5, 3.0):
            gate.unlink(missing_ok=True)
            target = work / f"cut-{sig.name}-{delay}"
            proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args, "--out", str(target)], cwd=work,
                                    env={**os.environ, "PYTHONPATH": str(ROOT), "GQA_TEST_GATE": str(gate)},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(delay)
            proc.send_signal(sig)
            proc.wait(120)
            gate.touch()
            again = cli([*args, "--out", str(target), "--resume"], work, env={"GQA_TEST_GATE": str(gate)})
            ok = again.returncode in (0, 1) and _stable(target / "cpu-x86_64.json") == expected
            out.append((f"{sig.name} after {delay} s, then --resume", ok))
    return out


def load(work: Path) -> list[tuple[str, bool]]:
    cases = [x for n in range(8, 29) for x in ("--case", f"b=1,hq=2,hkv=1,lq={n},d=16")]
    proc = cli(["run", *cases, "--impl", "tests.faulty_kernels:abort", "--out", str(work / "load"), "--quiet",
                "--no-canary"], work)
    report = json.loads((work / "load" / "cpu-x86_64.json").read_text())
    crashed = [r for r in report["results"] if r["error_kind"] == "crash"]
    return [(f"21 crashing workers in a row (case {i})", i < len(crashed)) for i in range(21)] + [
        ("the run ends with exit 1", proc.returncode == 1)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--only", default=None, help="one class: bad-input, injection, faults, interruptions, load")
    args = p.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="gqa-hostile-"))
    work.mkdir(parents=True, exist_ok=True)
    table: dict[str, list[tuple[str, bool]]] = defaultdict(list)
    for name, fn in (("bad input", bad_input), ("injection", injection), ("faults", faults),
                     ("interruptions", interruptions), ("load", load)):
        if args.only and args.only != name.replace(" ", "-"):
            continue
        start = time.monotonic()
        table[name] = fn(work)
        print(f"{name}: {len(table[name])} tries in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    print("| class | tries | clean | not clean |\n|---|---|---|---|")
    for name, tries in table.items():
        bad = [label for label, ok in tries if not ok]
        print(f"| {name} | {len(tries)} | {len(tries) - len(bad)} | {len(bad)}"
              + (f": {'; '.join(bad[:6])}" if bad else "") + " |")
    total = sum(len(t) for t in table.values())
    clean = sum(ok for t in table.values() for _, ok in t)
    print(f"| all | {total} | {clean} | {total - clean} |")
    return 0 if clean == total else 1


if __name__ == "__main__":
    sys.exit(main())

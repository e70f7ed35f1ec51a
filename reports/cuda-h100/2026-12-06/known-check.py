#!/usr/bin/env python3
"""Re-judge this run's failing tensors against cases/known-failures.toml as it stands now, the way
harness/core/verdict.apply_known does (entries in file order: the first that matches names the tensor, the
first that absorbs it makes it KNOWN). Prints every tensor whose verdict or entry changes from the report's,
then the tensors that stay FAIL. Usage: python reports/cuda-h100/2026-12-06/known-check.py [REPORT.json[.gz] ...]
(default: the three regression parts beside this script). Exit 0 always; read the output."""
import gzip, json, sys
from collections import Counter
from pathlib import Path

from harness.core.known import load_known

here = Path(__file__).resolve().parent
files = sys.argv[1:] or [str(here / f"regressions-part{i}.json.gz") for i in range(3)]
known = load_known()
changed, still_fail, counts = [], [], Counter()
for f in files:
    with (gzip.open if f.endswith(".gz") else open)(f, "rt") as fh:
        report = json.load(fh)
    fp = report["fingerprint"]
    label, versions = fp["device_label"], fp.get("versions")
    if versions is None:  # reports older than the fingerprint's `versions`: torch, CUDA and cuDNN (91900 -> 9.19.0)
        n = fp.get("cudnn")
        versions = {"torch": fp.get("torch"), "cuda": fp.get("cuda"),
                    "cudnn": f"{n // 10000}.{n // 100 % 100}.{n % 100}" if isinstance(n, int) else None}
    for r in report["results"]:
        if r["canary"] or r["status"] not in ("FAIL", "KNOWN", "PASS"):
            continue
        c = report["cases"][r["case_id"]]["case"]
        group = c["q_heads"] // c["kv_heads"]
        for t, tv in r["tensors"].items():
            entries = [e for e in known if e.matches(r["case_id"], r["impl"], t, label, versions, group)]
            old = (tv["status"], tv["known_entry"])
            if tv["status"] == "PASS":
                new = ("PASS", entries[0].id if entries else "")
            else:  # FAIL or KNOWN: a failure, re-judged
                ratios = {lv: m["ratio"] for lv, m in tv["metrics"]["levels"].items()} if tv.get("metrics") else {}
                absorber = next((e for e in entries if ratios and e.absorbs(tv["rule"], tv["severity"], ratios, t, group)), None)
                new = ("KNOWN", absorber.id) if absorber else ("FAIL", entries[0].id if entries else "")
            counts[(Path(f).name.split(".")[0], new[1] or "-", new[0])] += 1
            if new != old:
                changed.append((r["case_id"], r["impl"], t, f"{old[0]} {old[1] or '-'}", f"{new[0]} {new[1] or '-'}"))
            if new[0] == "FAIL":
                lv = tv["metrics"]["levels"] if tv.get("metrics") else {}
                still_fail.append((r["case_id"], r["impl"], t, tv["rule"], tv["severity"],
                                   "/".join(f"{lv[k]['ratio']:.3g}" for k in ("tensor", "slice", "row")) if lv else "-"))
print("## Verdicts that change (report -> now)\n")
print("| case | impl | tensor | in the report | now |\n|---|---|---|---|---|")
for row in changed:
    print("| " + " | ".join(row) + " |")
print("\n## Still FAIL (rule, severity, error/scale tensor/slice/row)\n")
print("| case | impl | tensor | rule | severity | ratios |\n|---|---|---|---|---|---|")
for row in still_fail:
    print("| " + " | ".join(row) + " |")
print("\n## Tensors per (report, entry, verdict now)\n")
print("| report | entry | verdict | tensors |\n|---|---|---|---|")
for (rep, entry, status), n in sorted(counts.items()):
    if entry != "-" or status != "PASS":
        print(f"| {rep} | {entry} | {status} | {n} |")

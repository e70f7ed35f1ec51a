"""Parts of one run joined into one report: the shards of a device (`gqa-harness merge DIR...`) and the
pytest-xdist workers' parts (the plugin), through one function, `write_run`.

A shard directory holds one run's `<label>.json` (its settings carry the shard block run/shards.py
wrote) and its `<label>.jsonl` stream. The merged report is built from the streams, each line checked
(store.read_stream_strict), and is of the same form as `gqa-harness run`'s, so diff, compare,
summary and known read it as they read any report. Merge refuses, with one line (exit 2):
  * shards of different devices, of different fingerprints (host facts such as the CPU, the GPU
    index or the platform string aside: HOST_KEYS), or of different selections (suite version,
    --dtype, --max-tokens, implementations, tolerances, shard count or cut);
  * a shard given twice, two shards holding the same case, a missing shard, and a shard whose
    stream lacks results for cases it was assigned (an interrupted run), unless --partial;
  * a corrupt stream or report, which it names (never overridden by --partial).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import build_report, render_markdown
from .store import StreamError, load_report, read_stream_strict, stream_path, write_report, write_stream

# Facts of one machine of a pool that may differ between shards of one device report.
HOST_KEYS = ("shard", "device", "cpu", "cpu_threads", "platform", "collect_env", "HIP_VISIBLE_DEVICES",
             "CUDA_VISIBLE_DEVICES")
# Settings every shard of one run must share.
SAME_SETTINGS = ("suite", "max_tokens", "implementations", "tolerances", "strict")
SAME_CUT = ("count", "selection", "by")


class MergeError(ValueError):
    """Shards that cannot be joined into one report (bad input: exit 2)."""


def combine(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The case and result records of several streams as one run's: a case once; a canary result (every
    shard runs the canary) once, the one that did not FAIL if any did not, so a blind pipeline shows."""
    cases: dict[str, dict[str, Any]] = {}
    results: list[dict[str, Any]] = []
    canaries: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        if r.get("type") == "case":
            cases.setdefault(r["case_id"], r)
        elif r.get("type") == "result" and r.get("canary"):
            key = (r["case_id"], r["impl"])
            if key not in canaries or canaries[key]["status"] == "FAIL":
                canaries[key] = r
        elif r.get("type") == "result":
            results.append(r)
    return [*cases.values(), *results, *canaries.values()]


def write_run(out: Path, records: list[dict[str, Any]], fingerprint: dict[str, Any],
              settings: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """One run's <label>.json, .md and .jsonl in `out` from the records of its parts."""
    body = combine(records)
    report = build_report(body, fingerprint, settings)
    write_stream(stream_path(out, fingerprint.get("device_label", "unknown")), body)
    return report, write_report(out, report, render_markdown(report))


# --- shards ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRun:
    directory: Path
    json: Path
    report: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def block(self) -> dict[str, Any]:
        return self.report["settings"]["shard"]

    @property
    def name(self) -> str:
        return f"shard {self.block['shard']} ({self.directory})"


def load_shard(directory: Path) -> ShardRun:
    """One shard's directory: its one report (validated) and its stream (every line checked)."""
    if not directory.is_dir():
        raise MergeError(f"{directory}: not a directory (give each shard's report directory)")
    files = sorted(directory.glob("*.json"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise MergeError(f"{directory}: a shard's directory holds one report <label>.json, found {found}")
    report = load_report(files[0])
    if not isinstance(report["settings"].get("shard"), dict):
        raise MergeError(f"{files[0]}: not a shard's report (it ran without --shard I/N)")
    stream = files[0].with_suffix(".jsonl")
    if not stream.is_file():
        raise StreamError(f"{stream}: missing: merge joins the shards' streams")
    records = read_stream_strict(stream)
    streamed = {(r["case_id"], r["impl"]) for r in records if r.get("type") == "result"}
    reported = {(r["case_id"], r["impl"]) for r in report["results"]}
    if streamed != reported:
        raise StreamError(f"{stream}: corrupt stream: {len(streamed)} results where its report {files[0].name} has "
                          f"{len(reported)}")
    return ShardRun(directory, files[0], report, records)


def _differs(a: dict[str, Any], b: dict[str, Any], keys) -> str | None:
    return next((k for k in keys if a.get(k) != b.get(k)), None)


def _check_same(shards: list[ShardRun]) -> None:
    first = shards[0]
    fp0 = first.report["fingerprint"]
    for s in shards[1:]:
        fp = s.report["fingerprint"]
        if fp.get("device_label") != fp0.get("device_label"):
            raise MergeError(f"shards of different devices: {first.name} is {fp0.get('device_label')}, {s.name} is "
                             f"{fp.get('device_label')}")
        key = _differs(fp0, fp, sorted((set(fp0) | set(fp)) - set(HOST_KEYS)))
        if key:
            raise MergeError(f"shards of different fingerprints: {key} is {fp0.get(key)!r} in {first.name}, "
                             f"{fp.get(key)!r} in {s.name}")
        key = _differs(first.report["settings"], s.report["settings"], SAME_SETTINGS)
        cut = _differs(first.block, s.block, SAME_CUT)
        if key or cut:
            what = f"settings {key}" if key else f"shard {cut}"
            raise MergeError(f"shards of different suite versions or selections ({what} differs): {first.name} and "
                             f"{s.name}; shard every part from one commit and one command")


def _missing_results(s: ShardRun) -> list[str]:
    """The cases assigned to a shard that lack a result of some implementation (an interrupted run)."""
    have = {(r["case_id"], r["impl"]) for r in s.report["results"]}
    impls = s.report["settings"].get("implementations") or sorted({i for _, i in have})
    return [cid for cid in s.block["assigned"] if any((cid, i) not in have for i in impls)]


def check_shards(shards: list[ShardRun], partial: bool) -> tuple[list[int], list[int]]:
    """Refuse what cannot be one report; returns the shard indices present and missing."""
    _check_same(shards)
    counts = Counter(s.block["index"] for s in shards)
    twice = sorted(i for i, n in counts.items() if n > 1)
    if twice:
        dirs = " and ".join(str(s.directory) for s in shards if s.block["index"] == twice[0])
        raise MergeError(f"shard {twice[0]}/{shards[0].block['count']} given twice: {dirs}")
    owner: dict[str, ShardRun] = {}
    for s in shards:
        for cid in s.block["assigned"]:
            if cid in owner:
                raise MergeError(f"overlapping shards: {owner[cid].name} and {s.name} both ran case {cid}")
            owner[cid] = s
    count = shards[0].block["count"]
    present = sorted(counts)
    missing = [i for i in range(1, count + 1) if i not in counts]
    if missing and not partial:
        raise MergeError(f"missing shard(s) {', '.join(f'{i}/{count}' for i in missing)} of {count}: give every "
                         "shard's directory, or --partial for a report of the cases present")
    for s in shards:
        lacking = _missing_results(s)
        if lacking and not partial:
            raise MergeError(f"{s.name} has no result for {len(lacking)} of its {len(s.block['assigned'])} cases "
                             f"(interrupted?), e.g. {lacking[0]}: re-run it, or --partial")
    return present, missing


def merged_settings(shards: list[ShardRun], present: list[int], missing: list[int], command: str) -> dict[str, Any]:
    first = shards[0].report["settings"]
    settings = {k: v for k, v in first.items()
                if k not in ("command", "started", "finished", "shard", "pytest_workers", "partial")}
    stamps = [s.report["settings"] for s in shards]
    notes = [t["partial"] for t in stamps if t.get("partial")]
    if notes:  # what the merged run as a whole did not reach, not the first shard's own note
        done = {(r["case_id"], r["impl"]) for s in shards for r in s.report["results"]}  # canaries once
        settings["partial"] = {"reason": f"{len(notes)} of {len(shards)} shard(s) stopped before the end",
                               "planned": len(done) + sum(n.get("planned", 0) - n.get("results", 0) for n in notes),
                               "results": len(done),
                               "canary_ran": any(r.get("canary") for s in shards for r in s.report["results"])}
    incomplete = bool(missing) or any(_missing_results(s) for s in shards)
    parts = [{"dir": str(s.directory), "shard": s.block["shard"], "command": s.report["settings"].get("command"),
              "started": s.report["settings"].get("started"), "finished": s.report["settings"].get("finished"),
              "results": len(s.report["results"]), "pytest_workers": s.report["settings"].get("pytest_workers"),
              "host": {k: s.report["fingerprint"].get(k) for k in HOST_KEYS if k in s.report["fingerprint"]}}
             for s in shards]
    return {**settings, "command": command,
            "started": min((t.get("started") or "" for t in stamps), default="") or None,
            "finished": max((t.get("finished") or "" for t in stamps), default="") or None,
            "merged": {"count": shards[0].block["count"], "present": present, "missing": missing,
                       "partial": incomplete, "selection": shards[0].block["selection"], "by": shards[0].block["by"],
                       "from": parts}}


def merge_shards(directories: list[Path], out: Path, partial: bool, command: str) -> tuple[dict[str, Any], Path]:
    """`gqa-harness merge`: the shards in `directories` as one report in `out`."""
    shards = sorted((load_shard(d) for d in directories), key=lambda s: s.block["index"])
    present, missing = check_shards(shards, partial)
    fingerprint = {k: v for k, v in shards[0].report["fingerprint"].items() if k != "shard"}
    settings = merged_settings(shards, present, missing, command)
    return write_run(out, [r for s in shards for r in s.records], fingerprint, settings)


def merged_line(report: dict[str, Any], markdown: Path) -> str:
    merged = report["settings"]["merged"]
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report["summary"]["counts"].items()))
    what = f"{len(merged['present'])} of {merged['count']} shard(s)" + (" (partial)" if merged["partial"] else "")
    return f"{report['fingerprint'].get('device_label')}: merged {what}: {counts}; report {markdown}"

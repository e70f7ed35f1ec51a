"""Shards: one selection of cases split over N runners (`--shard I/N`), each case in exactly one shard.

A case goes to the shard a stable hash of its id names (SHA-256 of the id, never Python's salted
`hash`), so every process that sees the same selection cuts it the same way, and all implementations
of a case (and its one oracle) stay in one shard. `--shard-by-time REPORT` balances by the seconds a
previous report recorded per case instead (its oracle plus every implementation): longest first into
the least-loaded shard (LPT); a case the report lacks is costed by its FLOPs at the report's median
seconds per FLOP. Every shard records the same `selection` digest (the ids of the whole selection),
its own assignment and the shard, so `gqa-harness merge` can tell a complete set from a mixed one.
"""

from __future__ import annotations

import hashlib
import heapq
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.case import Case
from ..core.suites import SuiteCase
from ..reports.store import load_report

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


class ShardError(ValueError):
    """A bad --shard / --shard-by-time (bad input: exit 2)."""


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    m = _SHARD.match(text)
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise ShardError(f"--shard {text!r} is not I/N with 1 <= I <= N, e.g. 2/4")
    return Shard(int(m[1]), int(m[2]))


def hash_shard(case_id: str, count: int) -> int:
    """The 1-based shard of `case_id` among `count`: the same in every process and Python."""
    return int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "big") % count + 1


def selection_digest(case_ids: list[str]) -> str:
    """What shards must share to be parts of one run: the ids of the whole selection."""
    return hashlib.sha256("\n".join(sorted(case_ids)).encode()).hexdigest()[:16]


def case_seconds(report: dict[str, Any]) -> dict[str, float]:
    """Per case of a saved report: its oracle's seconds plus every implementation's (canaries left out)."""
    seconds = {cid: float(c.get("oracle_seconds") or 0.0) for cid, c in report["cases"].items()}
    for r in report["results"]:
        if not r.get("canary") and r["case_id"] in seconds:
            seconds[r["case_id"]] += float(r.get("seconds") or 0.0)
    return {cid: s for cid, s in seconds.items() if s > 0}


def balanced(cases: list[Case], count: int, seconds: dict[str, float]) -> dict[str, int]:
    """Case id -> 1-based shard, longest first into the least-loaded shard (ties: lowest index)."""
    known = [c for c in cases if c.id in seconds]
    if not known:
        raise ShardError("--shard-by-time: the report has none of the selected cases; give a report of this "
                         "selection (same suite, --dtype and --max-tokens)")
    per_flop = statistics.median(seconds[c.id] / max(c.flops(), 1.0) for c in known)
    cost = {c.id: seconds.get(c.id, per_flop * max(c.flops(), 1.0)) for c in cases}
    loads = [(0.0, i) for i in range(1, count + 1)]
    out = {}
    for cid in sorted(cost, key=lambda k: (-cost[k], k)):
        load, index = heapq.heappop(loads)
        out[cid] = index
        heapq.heappush(loads, (load + cost[cid], index))
    return out


def assign(cases: list[Case], count: int, seconds: dict[str, float] | None = None) -> dict[str, int]:
    """Case id -> 1-based shard: by hash, or balanced by recorded seconds."""
    if seconds is not None:
        return balanced(cases, count, seconds)
    return {c.id: hash_shard(c.id, count) for c in cases}


def shard_selection(chosen: list[SuiteCase], shard_text: str | None,
                    by_time: str | None) -> tuple[list[SuiteCase], dict[str, Any] | None]:
    """The cases of this shard and its settings block (None and every case when not sharded)."""
    if shard_text is None:
        if by_time:
            raise ShardError("--shard-by-time needs --shard I/N")
        return chosen, None
    shard = parse_shard(shard_text)
    seconds = case_seconds(load_report(Path(by_time))) if by_time else None
    where = assign([sc.case for sc in chosen], shard.count, seconds)
    mine = [sc for sc in chosen if where[sc.case.id] == shard.index]
    block = {"shard": str(shard), "index": shard.index, "count": shard.count,
             "by": f"time ({by_time})" if by_time else "hash", "selection": selection_digest(list(where)),
             "selected": len(where), "assigned": [sc.case.id for sc in mine]}
    return mine, block


def shard_fingerprint(fingerprint: dict[str, Any], block: dict[str, Any] | None) -> dict[str, Any]:
    """The run's fingerprint, with the shard in it when sharded."""
    return {**fingerprint, "shard": block["shard"]} if block else fingerprint

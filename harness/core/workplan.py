"""How the oracle's work is cut into units for a thread pool, fixed by the case alone.

A unit is (batch, block of kv heads, part): part p of a head block takes the row chunks p, p + P,
p + 2P, ... (interleaved, so under causal masking every part sees short and long rows alike) and
accumulates its dK/dV into its own partial buffer; the P partials are summed in part order after
every unit has run. Nothing here depends on the thread count, so neither do the oracle's bits:
threads only change which unit runs when, and each unit's arithmetic is single-threaded.

The part count P is the smallest that gives about TARGET_UNITS units (enough to balance 16-32
threads), capped by the chunk count and by PARTIAL_BYTES of extra dK/dV partials (O(Lk) each, so
the oracle's memory stays O(rows x Lk) per block plus a bounded number of key-sized buffers).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

TARGET_UNITS = 32
PARTIAL_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Chunk:
    """Query rows [r0, r1) (indices into the rows computed) against keys [0, c1); keys [c0, c1) meet
    the causal diagonal of some row."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def cost(self) -> int:
        return (self.r1 - self.r0) * self.c1  # logits computed: the GEMMs and exp passes scale with it


@dataclass(frozen=True)
class Unit:
    batch: int
    h0: int
    h1: int
    part: int
    chunks: tuple[Chunk, ...]

    @property
    def cost(self) -> int:
        return (self.h1 - self.h0) * sum(c.cost for c in self.chunks)


@dataclass(frozen=True)
class WorkPlan:
    units: tuple[Unit, ...]  # in the order they are handed to the pool: costliest first
    parts: int

    @property
    def cost(self) -> int:
        return sum(u.cost for u in self.units)


def part_count(base_units: int, chunks: int, partial_bytes: int) -> int:
    """Parts per head block: enough for TARGET_UNITS units, at most one per chunk, and extra partials
    (parts - 1 of `partial_bytes` each, all head blocks together) within PARTIAL_BYTES."""
    want = -(-TARGET_UNITS // max(1, base_units))
    by_memory = 1 + PARTIAL_BYTES // max(1, partial_bytes)
    return max(1, min(want, chunks, by_memory))


def plan_work(batch: int, kv_heads: int, heads_per_block: int, chunks: list[Chunk], partial_bytes: int) -> WorkPlan:
    blocks = [(bi, h0, min(kv_heads, h0 + heads_per_block)) for bi in range(batch)
              for h0 in range(0, kv_heads, heads_per_block)]
    parts = part_count(len(blocks), len(chunks), partial_bytes)
    units = [Unit(bi, h0, h1, p, tuple(chunks[p::parts])) for bi, h0, h1 in blocks for p in range(parts)]
    # longest first (LPT) keeps the pool's tail short; the order changes no result
    units.sort(key=lambda u: -u.cost)
    return WorkPlan(tuple(units), parts)


@dataclass(frozen=True)
class Balance:
    """A plan on `threads` threads, simulated with unit costs as durations and the pool's own order."""

    threads: int
    units: int
    parts: int
    makespan: int
    ideal: int  # total cost / threads

    @property
    def efficiency(self) -> float:
        return self.ideal / self.makespan if self.makespan else 1.0

    def as_dict(self) -> dict[str, float | int]:
        return {"threads": self.threads, "units": self.units, "parts": self.parts,
                "efficiency": round(self.efficiency, 4), "busy_threads": min(self.threads, self.units)}


def simulate(plan: WorkPlan, threads: int) -> Balance:
    """Greedy list scheduling, as a thread pool fed in order does: each unit goes to the first free thread."""
    free = [0] * max(1, threads)
    for unit in plan.units:
        start = heapq.heappop(free)
        heapq.heappush(free, start + unit.cost)
    total = plan.cost
    return Balance(threads, len(plan.units), plan.parts, max(free), -(-total // max(1, threads)))

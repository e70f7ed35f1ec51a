"""How the oracle's work is cut into units for a thread pool, fixed by the case alone.

A unit is (batch, block of kv heads, part): part p of a head block takes the row chunks p, p + P,
p + 2P, ... (interleaved, so under causal masking every part sees short and long rows alike) and
accumulates its dK/dV into its own partial buffer; the P partials are summed in part order after
every unit has run. Nothing here depends on the thread count, so neither do the oracle's bits:
threads only change which unit runs when, and each unit's arithmetic is single-threaded.

The part count P is the smallest that gives about TARGET_UNITS units (enough to balance 16-32
threads), capped by the chunk count and by PARTIAL_BYTES of extra dK/dV partials (O(Lk) each, so
the oracle's memory stays O(rows x Lk) per block plus a bounded number of key-sized buffers).

Tiny blocks are merged across batch elements: when one block holds all of a batch element's kv heads
and rows (one chunk, one part) but its logits are far below the block budget, consecutive batch
elements share a unit, about TARGET_UNITS units in all (issue 17: b=100000 decode cases were 100,000
units, each a few dozen torch calls, which cost minutes of Python for microseconds of arithmetic).
A merged unit is the same arithmetic on a longer leading (batch x head) dimension: its GEMMs are the
same per-matrix GEMMs and its elementwise passes the same per element, so the oracle's bits equal
the per-batch plan's (tests/test_workplan_merge.py pins that, and the thread independence). One kv
head (MQA) is the exception: a one-head block's GEMMs are batches of one, which torch runs as single
GEMMs (a matrix-vector one where the keys or rows are 1) with other bits than a batched GEMM's. Such
a unit is not stacked: it runs its batch elements' blocks one after another, which saves the pool's
per-unit cost but not the per-block one.
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
    """Batch elements [batch, batch + batches), kv heads [h0, h1), the row chunks of one part."""

    batch: int
    h0: int
    h1: int
    part: int
    chunks: tuple[Chunk, ...]
    batches: int = 1  # > 1 only for merged tiny blocks (every head, one chunk, one part)
    stacked: bool = True  # merged batch elements as one block (False: one block each, in turn)

    @property
    def cost(self) -> int:
        return self.batches * (self.h1 - self.h0) * sum(c.cost for c in self.chunks)


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


def batches_per_unit(batch: int, block_bytes: int, budget_bytes: int) -> int:
    """Batch elements merged into one unit: enough for about TARGET_UNITS units, while the merged
    logits block (`block_bytes` per element) stays within `budget_bytes` (in cache)."""
    by_units = -(-batch // TARGET_UNITS)
    by_bytes = budget_bytes // max(1, block_bytes)
    return max(1, min(by_units, by_bytes))


def plan_work(batch: int, kv_heads: int, heads_per_block: int, chunks: list[Chunk], partial_bytes: int,
              block_bytes: int = 0, budget_bytes: int = 0) -> WorkPlan:
    """`block_bytes`: one block's logits (of one batch element); with `budget_bytes`, tiny blocks that
    each hold a whole batch element are merged across batch elements (0: never merged)."""
    whole = heads_per_block >= kv_heads and len(chunks) == 1
    step = batches_per_unit(batch, block_bytes, budget_bytes) if whole and block_bytes and budget_bytes else 1
    blocks = [(bi, min(step, batch - bi), h0, min(kv_heads, h0 + heads_per_block)) for bi in range(0, batch, step)
              for h0 in range(0, kv_heads, heads_per_block)]
    parts = part_count(len(blocks), len(chunks), partial_bytes)
    stacked = kv_heads > 1  # a batch of one-head blocks' GEMMs would not be their single GEMMs (see above)
    units = [Unit(bi, h0, h1, p, tuple(chunks[p::parts]), nb, stacked)
             for bi, nb, h0, h1 in blocks for p in range(parts)]
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


def lanes(plan: WorkPlan, threads: int) -> tuple[tuple[Unit, ...], ...]:
    """The units dealt to at most `threads` lanes, longest first, each to the least loaded lane (ties to
    the lowest): greedy list scheduling with unit costs as durations. A lane runs its units in turn on
    one thread; which lane a unit lands in changes no result."""
    count = max(1, min(threads, len(plan.units)))
    load = [(0, i) for i in range(count)]
    dealt: list[list[Unit]] = [[] for _ in range(count)]
    for unit in plan.units:
        cost, i = heapq.heappop(load)
        dealt[i].append(unit)
        heapq.heappush(load, (cost + unit.cost, i))
    return tuple(tuple(lane) for lane in dealt)


def simulate(plan: WorkPlan, threads: int) -> Balance:
    """The lanes' balance: the busiest lane's cost against an even split."""
    makespan = max((sum(u.cost for u in lane) for lane in lanes(plan, threads)), default=0)
    return Balance(threads, len(plan.units), plan.parts, makespan, -(-plan.cost // max(1, threads)))

"""Where a run's time goes: wall and CPU seconds summed per stage of the per-case pipeline.

Stages: the references' steps (inputs, oracle, lowprec, dterm, yardsticks: core/references.py), the
kernel call as the worker timed it (kernel), what the call cost beyond it (transfer: encoding the outputs,
the pipe, decoding; the whole call when the kernel ran in this process), judging (metrics and verdict),
the stream's records (stream), the differential pairs at a case's end (pairs), the order checks at the
run's end (order) and the trend rules (families). CPU seconds are this process's (all its threads) and,
for the kernel, the worker's: on a shared machine they say more than wall seconds do.
Opt-in: a run without a clock measures nothing (`gqa-harness bench` passes one).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

STAGES = ("inputs", "oracle", "lowprec", "dterm", "yardsticks", "kernel", "transfer", "judge", "stream", "pairs",
          "order", "families")


@dataclass
class StageClock:
    """Mutable on purpose: one accumulator a run adds to as it goes."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, wall: float, cpu: float) -> None:
        self.wall[stage] = self.wall.get(stage, 0.0) + wall
        self.cpu[stage] = self.cpu.get(stage, 0.0) + cpu

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - wall, time.process_time() - cpu)

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args, **kwargs):
            with self.timed(stage):
                return fn(*args, **kwargs)
        return timed

    def to_dict(self) -> dict[str, dict[str, float]]:
        order = [s for s in STAGES if s in self.wall] + sorted(s for s in self.wall if s not in STAGES)
        return {s: {"wall_s": round(self.wall[s], 4), "cpu_s": round(self.cpu.get(s, 0.0), 4)} for s in order}


@contextmanager
def maybe(clock: StageClock | None, stage: str) -> Iterator[None]:
    """`clock.timed(stage)`, or nothing when the run keeps no clock."""
    if clock is None:
        yield
    else:
        with clock.timed(stage):
            yield

"""Everything a case is judged against, computed once on the CPU and shared by every implementation:
the inputs, the fp64 oracle, the low-precision reference designs, the per-row noise (cancellation.py), and each tensor's
yardstick (metrics.py: everything the metrics need that does not depend on the implementation)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .cancellation import row_noise
from .case import Case
from .inputs import Inputs, make_inputs
from .lowprec import lowprec_reference
from .metrics import Yardstick, yardstick
from .oracle import oracle


@dataclass(frozen=True)
class References:
    inputs: Inputs
    oracle: dict[str, torch.Tensor]
    lowprec: dict[str, list[torch.Tensor]]
    seconds: float
    row_noise: dict[str, torch.Tensor] = field(default_factory=dict)  # cancellation.row_noise
    yardsticks: dict[str, Yardstick] = field(default_factory=dict)  # per tensor, shared by every implementation
    stages: dict[str, tuple[float, float]] = field(default_factory=dict)  # stage -> (wall, CPU) seconds

    @property
    def case(self) -> Case:
        return self.inputs.case

    @property
    def rows(self) -> torch.Tensor | None:
        """The query rows out and dQ of the oracle hold (a long case's checked rows), None for all."""
        return self.inputs.sample.checked if self.inputs.sample is not None else None


class _Laps:
    """Wall and CPU seconds of each step of `references`, for the run's stage split (lab/bench.py)."""

    def __init__(self) -> None:
        self.stages: dict[str, tuple[float, float]] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, stage: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.stages[stage] = (wall - self._wall, cpu - self._cpu)
        self._wall, self._cpu = wall, cpu


def references(case: Case) -> References:
    start = time.perf_counter()
    laps = _Laps()
    inputs = make_inputs(case)
    laps.lap("inputs")
    rows = inputs.sample.checked if inputs.sample is not None else None  # long: the row-sampled oracle
    truth = oracle(inputs, rows=rows).tensors()
    laps.lap("oracle")
    lp = lowprec_reference(inputs, rows).tensors()
    laps.lap("lowprec")
    noise = row_noise(inputs, truth["out"], rows)
    laps.lap("dterm")
    sticks = {name: yardstick(name, t, lp[name], inputs, noise.get(name)) for name, t in truth.items()}
    laps.lap("yardsticks")
    return References(inputs, truth, lp, time.perf_counter() - start, noise, sticks, laps.stages)

"""Everything a case is judged against, computed once on the CPU and shared by every implementation:
the inputs, the fp64 oracle, the low-precision reference designs and the D-term row noise."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .cancellation import d_term_noise
from .case import Case
from .inputs import Inputs, make_inputs
from .lowprec import lowprec_reference
from .oracle import oracle


@dataclass(frozen=True)
class References:
    inputs: Inputs
    oracle: dict[str, torch.Tensor]
    lowprec: dict[str, list[torch.Tensor]]
    seconds: float
    row_noise: dict[str, torch.Tensor] = field(default_factory=dict)  # cancellation.d_term_noise

    @property
    def case(self) -> Case:
        return self.inputs.case

    @property
    def rows(self) -> torch.Tensor | None:
        """The query rows out and dQ of the oracle hold (a long case's checked rows), None for all."""
        return self.inputs.sample.checked if self.inputs.sample is not None else None


def references(case: Case) -> References:
    start = time.perf_counter()
    inputs = make_inputs(case)
    rows = inputs.sample.checked if inputs.sample is not None else None  # long: the row-sampled oracle
    truth = oracle(inputs, rows=rows).tensors()
    lp = lowprec_reference(inputs, rows).tensors()
    noise = d_term_noise(inputs, truth["out"], rows) if case.grads else {}
    return References(inputs, truth, lp, time.perf_counter() - start, noise)

"""Memory budgets: cases whose references cannot fit are skipped up front; after an OOM, bigger siblings.

Estimates, not measurements: they only have to keep a run from being killed by the host's
OOM killer (which would take every result with it) and from re-running a kernel on cases
certain to run out of device memory after a smaller one already did.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.case import Case
from ..core.inputs import TORCH_DTYPES
from ..core.sampling import sample_rows
from ..core.workplan import PARTIAL_BYTES

# fp64 q, k, v, dO, out, dQ, dK, dV for the oracle, the same again in fp32 for each of the
# low-precision designs (4, with per-head dK/dV for one), plus the chunked logits blocks.
_REFERENCE_COPIES = 8
_BLOCK_BYTES = 6 * 64 * 2**20


def tensor_elements(case: Case) -> int:
    b, d, dv = case.batch, case.head_dim, case.value_dim
    q_side = b * case.q_heads * case.q_len * (2 * d + 2 * dv)  # q, dq, out, dO
    kv_side = b * case.kv_heads * case.kv_len * 2 * (d + dv)  # k, v, dk, dv
    return q_side + kv_side


def reference_bytes(case: Case) -> int:
    """Host memory the inputs, the fp64 oracle and the low-precision references need at once."""
    if case.long:
        return long_reference_bytes(case)
    per_head_dkdv = case.batch * case.q_heads * case.kv_len * (case.head_dim + case.value_dim) * 4
    return tensor_elements(case) * 8 * _REFERENCE_COPIES + per_head_dkdv + _BLOCK_BYTES


def long_reference_bytes(case: Case) -> int:
    """A long case's (row-sampled) references: the q side only for the checked rows, the kv side whole;
    fp64-sized copies of K and V (k, k·scale, v, dK/dV accumulators, the results the oracle and the four
    designs keep): about 10 with gradients, 2 forward only; plus the inputs as drawn (fp32, then dtype)."""
    b, d, dv = case.batch, case.head_dim, case.value_dim
    rows = len(sample_rows(case).checked)
    kv = b * case.kv_heads * case.kv_len * (d + dv)
    q_rows = b * case.q_heads * rows * (2 * d + 2 * dv) * 8 * _REFERENCE_COPIES
    inputs = (b * case.q_heads * case.q_len * (d + dv) + kv) * 6
    per_head_dkdv = b * case.q_heads * case.kv_len * (d + dv) * 4 if case.grads else 0
    # a structured bool mask is whole (Lq x Lk) with its comparison temporaries: ~3 bytes an element
    mask = b * (case.q_heads if case.mask_per_head else 1) * case.q_len * case.kv_len * 3 if case.has_mask else 0
    return kv * 8 * (10 if case.grads else 2) + q_rows + inputs + per_head_dkdv + mask + PARTIAL_BYTES + _BLOCK_BYTES


def device_bytes(case: Case) -> int:
    """What the largest kernel (math: full logits and probabilities, kept for backward) allocates."""
    item = TORCH_DTYPES[case.dtype].itemsize
    logits = case.batch * case.q_heads * case.q_len * case.kv_len * 4 * 3
    return tensor_elements(case) * item + logits


def available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def skip_reason(case: Case, available: int | None = None) -> str | None:
    """Why `case` cannot be judged here (its references would not fit in host memory), or None."""
    available = available_host_bytes() if available is None else available
    need = reference_bytes(case)
    if available is not None and need > available:
        return f"skipped: inputs and references need ~{_gib(need)} of host memory, {_gib(available)} available"
    return None


@dataclass
class OomTracker:
    """Per implementation, the smallest case (by device bytes) that ran out of memory."""

    smallest: dict[str, tuple[int, str]] = field(default_factory=dict)

    def record(self, impl: str, case: Case) -> None:
        need = device_bytes(case)
        if impl not in self.smallest or need < self.smallest[impl][0]:
            self.smallest[impl] = (need, case.id)

    def skip_reason(self, impl: str, case: Case) -> str | None:
        """A bigger sibling of a case this implementation already ran out of memory on."""
        if impl not in self.smallest:
            return None
        need, oom_case = self.smallest[impl]
        if device_bytes(case) >= need:
            return (f"skipped after OOM: needs ~{_gib(device_bytes(case))} on the device, "
                    f"at least as much as {oom_case}, which ran out of memory")
        return None

"""Which query rows a long case checks: the row sample behind the row-sampled oracle.

A long case (Case.long) gets grad_out zero on every query row outside `rows`. The kernel under test
still computes everything; the oracle computes only the sampled rows, their output and dQ, and the
dK/dV those rows feed, which is the exact gradient of that grad_out (the other rows' dS is zero). So
every unsampled row's dQ must be exactly zero, and a kernel writing anything there fails
(verdict.py). The output of a `second` sample of rows (forward only: grad_out is zero there too) is
checked as well; every other row's output is left unchecked, and the report says so.

Rows are chosen where kernels break: the first and last rows, tile boundaries (multiples of 64 and
128, +-1), causal and mask edges, the rows where row x Lk crosses 2^31 and 2^32 (a 32-bit offset
into a mask or bias, pytorch#162588), and random rows from the case seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .case import Case

TILES = (64, 128)
TILE_PICKS = 6  # random tile boundaries besides the first and last two
RANDOM_ROWS = 32
SECOND_ROWS = 64
_SEED_SALT = 0x5A3D  # the sample's random stream is apart from the inputs' (same seed, other draws)


@dataclass(frozen=True, eq=False)  # tensors: compared by identity, not element by element
class RowSample:
    rows: torch.Tensor  # sorted int64 query rows whose grad_out is kept: output and dQ checked
    second: torch.Tensor  # sorted rows, disjoint from `rows`: output checked, dQ must be zero
    q_len: int

    @property
    def checked(self) -> torch.Tensor:
        """Every row whose output the oracle computes, sorted: rows and the second sample."""
        return torch.cat([self.rows, self.second]).sort().values

    def describe(self) -> str:
        unchecked = self.q_len - len(self.rows) - len(self.second)
        return (f"row-sampled oracle: output and dQ on {len(self.rows)} of {self.q_len} query rows, output also on "
                f"a second sample of {len(self.second)}, {unchecked} rows' output left unchecked; dQ must be exactly "
                f"zero on the {self.q_len - len(self.rows)} rows whose grad_out is zero")


def _near(rows: list[int], *centres: int) -> list[int]:
    return rows + [c + delta for c in centres for delta in (-1, 0, 1)]


def edge_rows(case: Case) -> list[int]:
    """Rows next to where the row's visible keys change shape: causal and mask edges, 32-bit offsets."""
    lq, lk = case.q_len, case.kv_len
    rows: list[int] = []
    if case.causal == "bottom-right" and lq > lk:
        rows = _near(rows, lq - lk)  # the first row that sees a key
    if case.causal == "top-left" and lq > lk:
        rows = _near(rows, lk - 1)  # from here on every row sees every key
    if case.mask == "block-diagonal":
        blocks = max(2, min(4, lq, lk))
        rows = _near(rows, *[-(-i * lq // blocks) for i in range(1, blocks)])
    if case.mask == "sliding-window":
        window = max(1, lk // 4)
        rows = _near(rows, -(-window * lq // lk))  # the window starts to slide
    for bits in (31, 32):  # row * Lk crosses a 32-bit signed / unsigned index
        rows = _near(rows, -(-(1 << bits) // lk))
    return rows


def tile_rows(lq: int, gen: torch.Generator) -> list[int]:
    rows: list[int] = []
    for tile in TILES:
        last = (lq - 1) // tile * tile
        rows = _near(rows, tile, 2 * tile, last, last - tile)
    starts = lq // TILES[0]
    if starts > 1:
        picks = torch.randint(1, starts, (TILE_PICKS,), generator=gen).tolist()
        rows = _near(rows, *[p * TILES[0] for p in picks])
    return rows


def sample_rows(case: Case) -> RowSample:
    """The case's row sample; a pure function of the case (its seed draws the random rows)."""
    lq = case.q_len
    gen = torch.Generator().manual_seed(case.seed ^ _SEED_SALT)
    wanted = [0, 1, lq - 2, lq - 1, *tile_rows(lq, gen), *edge_rows(case)]
    wanted += torch.randint(0, lq, (RANDOM_ROWS,), generator=gen).tolist()
    rows = torch.tensor(sorted({r for r in wanted if 0 <= r < lq}), dtype=torch.int64)
    rest = torch.ones(lq, dtype=torch.bool)
    rest[rows] = False
    left = rest.nonzero().reshape(-1)
    pick = torch.randperm(len(left), generator=gen)[:SECOND_ROWS]
    return RowSample(rows, left[pick].sort().values, lq)


def zero_unsampled(grad_out: torch.Tensor, sample: RowSample) -> torch.Tensor:
    """grad_out with every row outside the sample set to zero (in place; returned)."""
    keep = torch.zeros(grad_out.shape[2], dtype=torch.bool)
    keep[sample.rows] = True
    return grad_out.masked_fill_(~keep[:, None], 0.0)

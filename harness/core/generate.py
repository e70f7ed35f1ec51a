"""Hypothesis strategies that generate only valid cases, and the suite entry that rebuilds one.

Generated cases are valid by construction (kv heads divide query heads, padding masks only
with batch >= 2, stride-0 expanded K/V only with one kv head, ...) and bounded in memory:
lengths are drawn so the fp64 oracle's tensors fit the budget of the active profile.
Lengths lean on boundaries: tile edges (multiples of 16/32/64/128, +-1), primes, 1 and the longest,
and every choice shrinks towards the plainest case, so a failure shrinks to a small case
in its class. Profiles (`--hypothesis-profile NAME` or HYPOTHESIS_PROFILE): `dev` (quick,
random), `ci` (derandomized: no seed to print, so the `@reproduce_failure` blob is),
`nightly` (many examples, a larger memory budget).
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

from .case import ALIASES, CAUSAL, FIELDS, LAYOUTS, MASK_FILLS, MASKS, VALUES, Case

MIB = 1 << 20
BUDGETS = {"dev": 16 * MIB, "ci": 8 * MIB, "nightly": 256 * MIB}  # fp64 oracle bytes per case
HEAD_DIMS = (64, 8, 16, 32, 80, 96, 128, 203, 256)  # the first is where shrinking ends
PRIMES = (2, 3, 5, 7, 13, 31, 61, 97, 127, 131, 257, 509)
GROUPS = (1, 2, 3, 4, 6, 7, 8, 16)  # ascending: Hypothesis shrinks sampled_from towards the first; 6 and 7 as Qwen2.5's 12/2 and 28/4

_COMMON = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
PROFILES = {"dev": dict(max_examples=25), "ci": dict(max_examples=40, derandomize=True, database=None),
            "nightly": dict(max_examples=1000)}


def register_profiles(environ: dict[str, str] | None = None) -> None:
    """Register dev/ci/nightly (before --hypothesis-profile loads one) and load $HYPOTHESIS_PROFILE if it is one."""
    for name, values in PROFILES.items():
        settings.register_profile(name, **values, **_COMMON)
    chosen = (os.environ if environ is None else environ).get("HYPOTHESIS_PROFILE")
    if chosen in PROFILES:
        settings.load_profile(chosen)


def budget() -> int:
    """Memory budget of the active profile (dev's when the profile is not one of ours)."""
    return BUDGETS.get(settings.get_current_profile_name(), BUDGETS["dev"])


def case_bytes(case: Case) -> int:
    """fp64 bytes the oracle and the low-precision reference hold for a case, roughly: every input,
    output and gradient, plus scores, probabilities and dS over the whole (Lq, Lk) grid."""
    b, hq, hkv, lq, lk = case.batch, case.q_heads, case.kv_heads, case.q_len, case.kv_len
    d, dv = case.head_dim, case.value_dim
    elems = b * hq * lq * (2 * d + 2 * dv) + 2 * b * hkv * lk * (d + dv) + 3 * b * hq * lq * lk
    if case.has_mask:
        elems += b * (hq if case.mask_per_head else 1) * lq * lk
    return 8 * elems


TILES = (16, 32, 64, 128)  # tile widths of flash-style, cuDNN and CPU blocked kernels


@st.composite
def tile_edges(draw, max_len: int) -> int:
    """A length at a tile edge: a multiple of 16, 32, 64 or 128, one less or one more (a last tile of
    one element, a tile exactly full, one short), within 1..max_len. Larger tiles are drawn as often as
    smaller ones, so a 64- or 128-key tail is not drowned by the many multiples of 16."""
    tiles = [t for t in TILES if t - 1 <= max_len] or [TILES[0]]  # below 15: max_len, the clamped edge
    tile = draw(st.sampled_from(tiles))
    n = tile * draw(st.integers(1, max(1, (max_len + 1) // tile))) + draw(st.sampled_from((0, 1, -1)))
    return min(max(n, 1), max_len)


@st.composite
def uniform_lengths(draw, max_len: int) -> int:
    """About uniform over 1..max_len, drawn as an offset 1..16 and the whole 16-element tiles before it: the
    shrinker lowers the tiles and keeps the offset, so a failure that needs a tail (n = 1 mod 32, say) found
    by this draw shrinks along its class to the smallest such length, which one integer draw does not."""
    offset = draw(st.integers(1, min(16, max_len)))
    return offset + 16 * draw(st.integers(0, (max_len - offset) // 16))


def lengths(max_len: int) -> st.SearchStrategy[int]:
    """A sequence length up to max_len, drawn uniformly only part of the time: general fuzzing practice
    puts boundary values beside the uniform draw, since real kernel bugs live at the edges. Besides the
    uniform draw: tile edges (multiples of 16/32/64/128 and +-1, which include the classes where real
    kernels broke: = 1 mod 32, = 64 mod 128), primes (no tile divides them), and the two ends of the
    range (1: decode or a single key; max_len: the longest case, where a window or tail is widest)."""
    max_len = max(1, max_len)
    return st.one_of(
        uniform_lengths(max_len),
        tile_edges(max_len),
        st.sampled_from([p for p in PRIMES if p <= max_len] or [1]),
        st.sampled_from(sorted({1, max_len})),
    )


@st.composite
def cases(draw, *, memory: int | None = None, dtypes: tuple[str, ...] = ("bf16", "fp16"), max_len: int = 512,
          max_batch: int = 4, max_kv_heads: int = 4, head_dims: tuple[int, ...] = HEAD_DIMS, masks: bool = True,
          layouts: bool = True, values: bool = True, scales: bool = True, guard: str = "nan") -> Case:
    """A valid Case within `memory` bytes (default: the active profile's budget).
    Switch off masks/layouts/values/scales to search a plainer space. `guard`: generated cases run inside
    NaN guard bands by default (run/guards.py), so an out-of-bounds read or write is caught where found."""
    memory = memory or budget()
    kv_heads = draw(st.integers(1, max_kv_heads))
    group = draw(st.sampled_from(GROUPS))
    batch = draw(st.integers(1, max_batch))
    head_dim = draw(st.sampled_from(head_dims))
    v_head_dim = draw(st.one_of(st.none(), st.sampled_from(head_dims))) if values else None
    q_heads = kv_heads * group
    # the longest square grid the budget allows with these heads (3 score-sized fp64 buffers + mask)
    fit = int((memory / (8 * 4 * batch * q_heads)) ** 0.5)
    limit = max(1, min(max_len, fit))
    # How the lengths relate, as in real workloads: self-attention (equal), chunked prefill or cross-attention
    # (independent), and decode (one query over the cache), drawn as a class of its own rather than left to
    # q_len = 1 and an independent kv_len coinciding.
    relation = draw(st.sampled_from(("equal", "independent", "decode")))
    q_len = 1 if relation == "decode" else draw(lengths(limit))
    kv_len = q_len if relation == "equal" else draw(lengths(limit))
    fields: dict[str, Any] = dict(batch=batch, q_heads=q_heads, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len,
                                  head_dim=head_dim, v_head_dim=v_head_dim, dtype=draw(st.sampled_from(dtypes)),
                                  causal=draw(st.sampled_from(CAUSAL)), seed=draw(st.integers(0, 1 << 16)),
                                  guard=guard)
    if masks:
        allowed = [m for m in MASKS if m != "padding" or batch >= 2]
        mask = draw(st.sampled_from(allowed))
        if mask != "none":
            fields.update(mask=mask, mask_fill=draw(st.sampled_from(MASK_FILLS)), mask_per_head=draw(st.booleans()))
    if layouts:
        fields["layout"] = draw(st.sampled_from([lay for lay in LAYOUTS if lay != "kv-expanded" or kv_heads == 1]))
    if values:
        fields["values"] = draw(st.sampled_from(VALUES))
    if scales:
        fields["scale"] = draw(st.one_of(st.none(), st.sampled_from([0.125, 0.05, 0.3, 1.0])))
    case = Case(**fields)
    assume(case_bytes(case) <= memory)  # wide head dims can still tip a long case over
    return case


# --- what a failing generated case prints --------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def case_toml(case: Case, name: str = "generated") -> str:
    """A ready-to-paste cases/*.toml entry that rebuilds exactly this case."""
    short = {v: k for k, v in ALIASES.items()}
    defaults = Case(1, 1, 1, 1, 1, 1)
    lines = ["[[case]]", f"name = {_toml_value(name)}"]
    for field in FIELDS:
        value = getattr(case, field)
        required = field in ("batch", "q_heads", "kv_heads", "q_len", "kv_len", "head_dim")
        if value is not None and (required or value != getattr(defaults, field)):
            lines.append(f"{short.get(field, field)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"

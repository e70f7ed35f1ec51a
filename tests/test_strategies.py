"""Generated cases: valid and bounded; a subtly wrong kernel is found, shrunk, and printed as a repro."""

from __future__ import annotations

import re

import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

from harness.core.case import parse_case_spec
from harness.core.generate import TILES, tile_edges
from harness.strategies import BUDGETS, budget, case_bytes, case_toml, cases, check, lengths, repro
from harness.core.suites import load_suite_text

# A plain search space: the wrong kernels below are wrong in one class only; shrinking should land
# on the smallest case of that class, not wander through masks and layouts.
PLAIN = dict(max_len=160, max_batch=2, max_kv_heads=2, head_dims=(64, 32, 128), masks=False, layouts=False,
             values=False, scales=False)


@settings(max_examples=200, database=None)
@given(cases())
def test_generated_cases_are_valid_bounded_and_round_trip_through_toml_and_spec(case):
    assert case.q_heads % case.kv_heads == 0
    assert case_bytes(case) <= budget()
    (entry,) = load_suite_text(case_toml(case), "generated.toml")
    assert entry.case == case
    assert parse_case_spec(re.search(r"--case '([^']*)'", repro(case, "sdpa-math")).group(1)) == case


def test_profiles_dev_ci_nightly_are_registered_and_ci_is_derandomized_with_the_blob_printed():
    ci = settings.get_profile("ci")
    assert ci.derandomize and ci.database is None and ci.print_blob and ci.deadline is None
    assert settings.get_profile("nightly").max_examples > settings.get_profile("dev").max_examples
    assert BUDGETS["nightly"] > BUDGETS["ci"]


def _shrunk(kernel: str):
    """Search PLAIN cases for a failure of `kernel`; return the shrunk case and what Hypothesis printed."""

    @settings(settings.get_profile("ci"), max_examples=40)
    @given(cases(**PLAIN))
    def search(case):
        check(case, kernel)

    with pytest.raises(AssertionError) as err:
        search()
    notes = "\n".join(getattr(err.value, "__notes__", []))
    toml = notes[notes.index("[[case]]"):notes.index("# reproduce:")]
    (entry,) = load_suite_text(toml, "shrunk.toml")
    return entry.case, str(err.value), notes


def test_a_kernel_wrong_only_for_kv_len_1_mod_32_is_found_and_shrunk_to_the_smallest_such_case():
    case, message, notes = _shrunk("tests.wrong_kernels:drops_last_key_when_kv_len_1_mod_32")
    print(f"\nshrunk: {case.id}\n{notes}")
    assert case.kv_len % 32 == 1 and case.kv_len > 1, case.id
    assert case.kv_len <= 65 and case.batch == 1 and case.q_heads <= 2, case.id
    assert "FAIL" in message and "x the correct-kernel scale" in message
    assert "gqa-harness run --device cpu --case '" in notes and "--impl tests.wrong_kernels:drops_last_key" in notes
    assert "@reproduce_failure(" in notes  # ci is derandomized: the blob, not a seed, replays it


@pytest.mark.slow
def test_a_kernel_wrong_only_for_bottom_right_causal_with_lq_ne_lk_is_found_and_shrunk():
    case, _, notes = _shrunk("tests.wrong_kernels:causal_off_by_one_when_lengths_differ")
    print(f"\nshrunk: {case.id}\n{notes}")
    assert case.q_len != case.kv_len and case.causal == "bottom-right", case.id
    assert case.batch == 1 and case.q_heads <= 2, case.id


@settings(settings.get_profile("ci"), max_examples=6)
@given(cases(memory=2 << 20))
def test_the_math_backend_passes_generated_cases_of_every_kind(case):
    # a generated case that fails a correct backend would be a harness defect, not a finding
    result = check(case, "sdpa-math")
    assert str(result.status) in ("PASS", "UNSUPPORTED", "OUT_OF_RANGE"), case.id


# ---- boundary-biased lengths: where tiled kernels break, drawn beside the uniform draw -------------

def _found(strategy, condition):
    return find(strategy, condition, settings=settings(database=None, max_examples=300, derandomize=True))


@settings(max_examples=100, database=None)
@given(st.integers(1, 600), st.data())
def test_a_tile_edge_is_a_multiple_of_16_to_128_or_one_off_it_within_1_to_max_len(max_len, data):
    n = data.draw(tile_edges(max_len))
    assert 1 <= n <= max_len
    assert n == max_len or min(abs(n - t * round(n / t)) for t in TILES) <= 1, (max_len, n)


@pytest.mark.parametrize("max_len, wanted", [(65, 65), (160, 160), (160, 129), (512, 257), (512, 1)])
def test_lengths_draw_the_ends_of_the_range_and_tile_tails(max_len, wanted):
    assert _found(lengths(max_len), lambda n: n == wanted) == wanted


def test_cases_draw_decode_one_query_over_several_keys_and_lengths_that_differ():
    decode = _found(cases(memory=8 << 20, max_len=65, max_batch=1, max_kv_heads=1),
                    lambda c: c.q_len == 1 and c.kv_len > 1)
    assert decode.q_len == 1 and decode.kv_len == 2  # shrunk: one query over two keys
    apart = _found(cases(memory=8 << 20, max_len=65), lambda c: c.q_len > 1 and c.kv_len > 1 and c.q_len != c.kv_len)
    assert apart.q_len != apart.kv_len

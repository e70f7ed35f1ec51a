"""The case corpus: every file loads, each class is covered, malformed input is one line naming file, line, field."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from harness.core.case import Case
from harness.core.suites import (CASES_DIR, SuiteError, available_suites, cap_lengths, load_suite, load_suite_text,
                            select_cases, suite_metadata, suite_paths)

REPO = Path(__file__).resolve().parent.parent
SUITE_FILES = sorted(p for p in CASES_DIR.rglob("*.toml") if p.name != "known-failures.toml")
VENDORS = {"rocm", "cuda", "mps", "cpu", "calibration"}


@pytest.mark.parametrize("path", SUITE_FILES, ids=lambda p: str(p.relative_to(CASES_DIR)))
def test_every_file_in_cases_loads(path):
    assert load_suite_text(path.read_text(), str(path))


def test_suite_names_cover_files_and_the_regressions_directory():
    assert {"smoke", "models", "edge", "regressions"} <= set(available_suites())
    assert len(suite_paths("regressions")) >= 20
    one = suite_paths("regressions")[0]
    assert load_suite(f"regressions/{one.stem}") == load_suite(str(one))


# --- the curated suites --------------------------------------------------------------------


def _by_name(suite: str) -> dict[str, list[Case]]:
    out: dict[str, list[Case]] = {}
    for sc in load_suite(suite):
        out.setdefault(sc.name, []).append(sc.case)
    return out


@pytest.mark.parametrize("model, hq, hkv, d", [
    ("llama3-8b", 32, 8, 128), ("llama3-70b", 64, 8, 128), ("mistral-7b", 32, 8, 128), ("qwen2.5-1.5b", 12, 2, 128),
    ("qwen2.5-7b", 28, 4, 128), ("gemma2-9b", 16, 8, 256), ("falcon-7b", 71, 1, 64), ("llama2-7b", 32, 32, 128),
    ("gpt-oss-20b", 64, 8, 64),
])
def test_models_has_each_model_geometry_in_prefill_and_decode(model, hq, hkv, d):
    named = _by_name("models")
    prefill, decode = named[f"{model}-prefill"], named[f"{model}-decode"]
    for case in prefill + decode:
        assert (case.q_heads, case.kv_heads, case.head_dim) == (hq, hkv, d)
        assert {c.dtype for c in prefill} == {"bf16", "fp16"}
    assert all(c.q_len == c.kv_len and c.causal == "top-left" for c in prefill)
    assert all(c.q_len == 1 and c.kv_len >= 1024 for c in decode)


def _classes(cases: list[Case]) -> set[str]:
    """The corner classes of upstream-bugs.md 2.2 that a list of cases covers."""
    primes = {2, 3, 5, 7, 13, 31, 61, 97, 127, 131, 257}
    found: set[str] = set()
    for c in cases:
        lengths = {c.q_len, c.kv_len}
        found |= {"len-1"} if 1 in lengths else set()
        found |= {"len-prime"} if lengths & primes else set()
        found |= {"len-1-mod-32"} if any(n % 32 == 1 and n > 1 for n in lengths) else set()
        found |= {"len-64-mod-128"} if any(n % 128 == 64 for n in lengths) else set()
        found |= {"lq<lk"} if c.q_len < c.kv_len and c.causal != "none" else set()
        found |= {"lq>lk"} if c.q_len > c.kv_len and c.causal != "none" else set()
        found |= {f"d{c.head_dim}"}
        found |= {"many-bh"} if c.batch * c.q_heads >= 128 else set()
        found |= {f"mask-{c.mask}"} | ({f"fill-{c.mask_fill}"} if c.has_mask else set())
        found |= {"mask-per-head-gqa"} if c.mask_per_head and c.group_size > 1 else set()
        found |= {"dv-differs"} if c.value_dim != c.head_dim else set()
        found |= {f"layout-{c.layout}", f"values-{c.values}"}
    return found


EDGE_CLASSES = ({"len-1", "len-prime", "len-1-mod-32", "len-64-mod-128", "lq<lk", "lq>lk", "many-bh", "dv-differs",
                 "mask-per-head-gqa"}
                | {f"d{d}" for d in (8, 16, 96, 203, 256, 512)}
                | {f"mask-{m}" for m in ("padding", "block-diagonal", "sliding-window", "fully-masked-rows", "additive", "bool")}
                | {f"fill-{f}" for f in ("-inf", "-65504", "finfo.min")}
                | {f"layout-{lay}" for lay in ("blhd", "v-noncontig", "kv-expanded", "grad-out-noncontig")}
                | {f"values-{v}" for v in ("normal", "uniform", "large-logits", "negative-lse", "outlier-channels")})


def test_edge_covers_every_class_of_the_issue_in_both_low_precision_dtypes():
    cases = [sc.case for sc in load_suite("edge")]
    for dtype in ("bf16", "fp16"):
        missing = (EDGE_CLASSES | {"d80"}) - _classes([c for c in cases if c.dtype == dtype])
        assert not missing, f"{dtype}: {sorted(missing)}"


def test_smoke_covers_every_edge_class_at_small_sizes():
    cases = [sc.case for sc in load_suite("smoke")]
    assert not EDGE_CLASSES - _classes(cases), sorted(EDGE_CLASSES - _classes(cases))
    assert {1, 2, 4, 8, 16} <= {c.group_size for c in cases} and any(c.kv_heads == 1 for c in cases)
    assert {c.causal for c in cases} == {"none", "top-left", "bottom-right"}
    assert max(c.flops() for c in cases) < 2e9


def test_each_regression_file_cites_its_upstream_bug_signature_and_vendor():
    for path in suite_paths("regressions"):
        meta = suite_metadata(path)
        assert all(u.startswith("https://github.com/") for u in meta["upstream"]), path.name
        assert len(meta["signature"]) > 30, path.name
        assert VENDORS & set(meta["tags"]), path.name
        assert all(VENDORS & set(sc.tags) for sc in load_suite(str(path))), path.name


# --- grid expansion and ids ------------------------------------------------------------------


def test_grid_expansion_is_a_cartesian_product_with_ids_independent_of_order():
    a = load_suite_text('[[case]]\nb = 2\nhq = 8\nhkv = [2, 4]\nlq = 16\nd = 32\ndtype = ["bf16", "fp16"]\n', "a.toml")
    b = load_suite_text('[[case]]\ndtype = ["fp16", "bf16"]\nd = 32\nlq = 16\nhkv = [4, 2]\nhq = 8\nb = 2\n', "b.toml")
    assert len(a) == 4 and sorted(sc.case.id for sc in a) == sorted(sc.case.id for sc in b)
    assert "b2-h8x2-q16-k16-d32-fp16-s0" in {sc.case.id for sc in a}


def test_suite_tags_are_added_to_every_entry_and_name_notes_source_kept():
    (sc,) = load_suite_text('[suite]\ntags = ["rocm"]\n[[case]]\nname = "x"\ntags = ["ck"]\nnotes = "n"\n'
                            'b = 1\nhq = 1\nhkv = 1\nlq = 4\nd = 8\n', "t.toml")
    assert (sc.name, sc.tags, sc.notes, sc.source) == ("x", ("rocm", "ck"), "n", "t.toml:3")


# --- malformed input: one line, file, line, field ------------------------------------------------

OK = "b = 2\nhq = 8\nhkv = 2\nlq = 16\nd = 32\n"
MALFORMED = {
    "toml-syntax": ("[[case]]\nb = 2\nhq = \n", "t.toml: malformed TOML", None),
    "unknown-top-level": ("[[cases]]\n" + OK, "unknown top-level key(s) cases", None),
    "no-entries": ("[suite]\ndescription = \"x\"\n", "no [[case]] entries", None),
    "entry-not-a-table": ("case = [1, 2]\n", "entry 1 is not a table", None),
    "unknown-field": ("[[case]]\n" + OK + "heads = 4\n", "unknown case field 'heads'", 7),
    "wrong-type": ("[[case]]\n" + OK.replace("lq = 16", 'lq = "long"'), "q_len='long' must be an integer", 5),
    "bad-choice": ("[[case]]\n" + OK + 'layout = "bshd"\n', "layout='bshd' is not one of", 7),
    "heads-do-not-divide": ("[[case]]\n" + OK.replace("hkv = 2", "hkv = 3"), "kv_heads=3 does not divide q_heads=8", 4),
    "missing-field": ("[[case]]\n" + OK.replace("d = 32\n", ""), "case is missing head_dim", 1),
    "empty-grid": ("[[case]]\n" + OK + "dtype = []\n", "field 'dtype' is an empty list", 7),
    "nested-grid": ("[[case]]\n" + OK + "hkv = [[1, 2]]\n".replace("hkv", "s"), "field 's' nests lists", 7),
    "table-value": ("[[case]]\n" + OK + "[case.mask]\nkind = 1\n", "field 'mask' is a table", None),
    "name-type": ("[[case]]\nname = 3\n" + OK, "name=3 must be a string", 2),
    "tags-type": ("[[case]]\ntags = \"rocm\"\n" + OK, "tags='rocm' must be a list of strings", 2),
    "notes-type": ("[[case]]\nnotes = [1]\n" + OK, "notes=[1] must be a string", 2),
    "invalid-combination": ("[[case]]\n" + OK.replace("b = 2", "b = 1") + 'mask = "padding"\n', "mask='padding' needs batch >= 2", 7),
    "duplicate-id": ("[[case]]\n" + OK + "[[case]]\n" + OK, "duplicate case id b2-h8x2-q16-k16-d32-bf16-s0 (first made at t.toml:1)", 7),
    "suite-unknown-key": ("[suite]\nowner = \"x\"\n[[case]]\n" + OK, "[suite] has unknown key 'owner'", None),
    "suite-wrong-type": ("[suite]\nupstream = \"https://x\"\n[[case]]\n" + OK, "[suite] upstream must be a list of strings", None),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_suite_is_one_line_naming_file_line_and_field(kind):
    text, expected, line = MALFORMED[kind]
    with pytest.raises(SuiteError) as err:
        load_suite_text(text, "t.toml")
    message = str(err.value)
    assert "\n" not in message and message.startswith("t.toml"), message
    assert expected in message, message
    if line is not None:
        assert message.startswith(f"t.toml:{line}"), message


def test_unknown_suite_names_the_available_ones():
    with pytest.raises(SuiteError, match=r"unknown suite 'nope' \(available: .*smoke"):
        load_suite("nope")


# --- selection and the --max-tokens cap ----------------------------------------------------------


def test_cap_shortens_lengths_keeping_head_geometry_ratio_and_decode():
    prefill = Case(2, 64, 8, 1024, 1024, 128, causal="top-left")
    chunk = Case(2, 32, 8, 256, 1024, 128, causal="bottom-right")
    decode = Case(4, 71, 1, 1, 4096, 64)
    assert cap_lengths(prefill, 128) == prefill.replace(q_len=128, kv_len=128)
    assert cap_lengths(chunk, 128) == chunk.replace(q_len=32, kv_len=128)
    assert cap_lengths(decode, 128) == decode.replace(kv_len=128)
    assert cap_lengths(Case(1, 1, 1, 20, 30, 8), 128) == Case(1, 1, 1, 20, 30, 8)


def test_select_filters_dtypes_caps_and_deduplicates_by_id():
    chosen = select_cases(["models"], dtypes="bf16", max_tokens=64)
    assert chosen and all(sc.case.dtype == "bf16" and max(sc.case.q_len, sc.case.kv_len) <= 64 for sc in chosen)
    assert len({sc.case.id for sc in chosen}) == len(chosen)
    assert {(sc.case.q_heads, sc.case.kv_heads) for sc in chosen} >= {(71, 1), (64, 8), (12, 2), (28, 4)}
    inline = select_cases([], ["b=1,hq=2,hkv=1,lq=512,d=8"], max_tokens=100)
    assert [sc.case.q_len for sc in inline] == [100] and inline[0].source == "--case"
    with pytest.raises(SuiteError, match="--max-tokens=0 must be a positive integer"):
        select_cases(["smoke"], max_tokens=0)
    with pytest.raises(SuiteError, match="--dtype fp8 is not one of"):
        select_cases(["smoke"], dtypes="fp8")


def test_run_max_tokens_caps_the_cases_it_runs(tmp_path):
    suite = tmp_path / "long.toml"
    suite.write_text('[[case]]\nb = 1\nhq = 4\nhkv = 2\nlq = 1\nlk = 4096\nd = 16\n')
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--device", "cpu", "--suite", str(suite),
                           "--max-tokens", "48", "--impl", "sdpa-math", "--no-canary", "--quiet", "--in-process",
                           "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "cpu-x86_64.json").read_text())
    assert list(report["cases"]) == ["b1-h4x2-q1-k48-d16-bf16-s0"] and report["settings"]["max_tokens"] == 48


def test_toml_files_parse_with_the_standard_library_alone():
    # the corpus is plain TOML: other tools can read it without the harness
    for path in SUITE_FILES:
        data = tomllib.loads(path.read_text())
        assert "case" in data or "family" in data

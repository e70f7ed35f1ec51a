"""Bad input: one line naming the problem, exit 2, no traceback (--debug shows it)."""

from __future__ import annotations

import pytest
import torch

from harness.cli import main

SMALL = "b=1,hq=4,hkv=2,lq=16,d=32"


def _fails(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    assert lines[0].startswith("gqa-harness: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _run(*extra: str) -> list[str]:
    return ["run", "--device", "cpu", "--quiet", "--in-process", *extra]


def test_unknown_suite(capsys):
    _fails(capsys, _run("--suite", "no-such-suite"), "unknown suite 'no-such-suite'", "available:")


def test_malformed_toml(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[case]\nb = 2\n")
    _fails(capsys, _run("--suite", str(bad)), "bad.toml", "malformed TOML")


def test_unknown_key_in_a_suite(capsys, tmp_path):
    bad = tmp_path / "keys.toml"
    bad.write_text("[[case]]\nb = 1\nheads = 4\nhq = 4\nhkv = 2\nlq = 16\nd = 32\n")
    _fails(capsys, _run("--suite", str(bad)), "keys.toml:3", "unknown case field 'heads'")


def test_unknown_key_in_a_case(capsys):
    _fails(capsys, _run("--case", SMALL + ",heads=4"), "unknown case field 'heads'")


def test_value_out_of_range(capsys):
    _fails(capsys, _run("--case", "b=0,hq=4,hkv=2,lq=16,d=32"), "batch=0 must be a positive integer")


def test_heads_that_do_not_divide(capsys):
    _fails(capsys, _run("--case", "b=1,hq=32,hkv=3,lq=16,d=32"), "kv_heads=3 does not divide q_heads=32")


def test_unknown_dtype_in_a_case(capsys):
    _fails(capsys, _run("--case", SMALL + ",dtype=bf17"), "dtype='bf17' is not one of")


def test_unknown_dtype_filter(capsys):
    _fails(capsys, _run("--case", SMALL, "--dtype", "fp8"), "--dtype fp8")


def test_unknown_device(capsys):
    _fails(capsys, ["run", "--device", "tpu", "--case", SMALL], "device 'tpu'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_device_that_is_not_there(capsys):
    _fails(capsys, ["run", "--device", "cuda:3", "--case", SMALL], "'cuda:3' is not there")


def test_unknown_implementation(capsys):
    _fails(capsys, _run("--case", SMALL, "--impl", "sdpa-nosuch"), "unknown implementation 'sdpa-nosuch'")


def test_impl_that_does_not_import(capsys):
    _fails(capsys, _run("--case", SMALL, "--impl", "no_such_module_xyz:attention"),
           "cannot import 'no_such_module_xyz'")


def test_impl_with_the_wrong_signature(capsys):
    _fails(capsys, _run("--case", SMALL, "--impl", "tests.faulty_kernels:wrong_signature"),
           "tests.faulty_kernels:wrong_signature", "lacks")


def test_impl_that_is_missing_from_its_module(capsys):
    _fails(capsys, _run("--case", SMALL, "--impl", "tests.faulty_kernels:nothing_here"), "no attribute")


@pytest.mark.parametrize("flag, value, fragment", [("--repeat", "0", "--repeat 0"), ("--timeout", "-1", "--timeout -1")])
def test_reliability_options_out_of_range(capsys, flag, value, fragment):
    _fails(capsys, _run("--case", SMALL, flag, value), fragment)


def test_resume_onto_a_stream_from_another_environment(capsys, tmp_path):
    (tmp_path / "cpu-x86_64.jsonl").write_text('{"type": "run", "fingerprint": {"device_label": "cpu-x86_64", '
                                               '"torch": "1.0.0"}}\n')
    _fails(capsys, _run("--case", SMALL, "--out", str(tmp_path), "--resume"), "--resume", "torch='1.0.0'")


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="does not divide"):
        main(["--debug", *_run("--case", "b=1,hq=32,hkv=3,lq=16,d=32")])

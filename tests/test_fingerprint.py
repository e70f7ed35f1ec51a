"""The fingerprint carries what triage needs (collect_env's fields, AOTriton from the wheel's config.h, package
versions, the ROCm flash settings), known-failure entries can range on every one of those versions, and
every entry must cite an upstream link or a reports/findings/ directory."""

from __future__ import annotations

import pytest

from harness.core.known import VERSION_KEYS, KnownFailuresError, load_known
from harness.run.env import (COLLECT_ENV_FIELDS, aotriton_version, collect_env_facts, device_facts,
                             environment_versions, fingerprint, package_version)
from harness.run.session import Session

ENTRY = '''
[[known]]
id = "e"
case = "*"
impl = ["*"]
tensors = ["dk"]
max_ratio = 2.0
evidence = "figures"
{extra}
'''


def test_aotriton_version_is_read_from_the_wheel_s_config_header(tmp_path):
    assert aotriton_version(tmp_path) is None  # a CUDA or CPU wheel ships none
    header = tmp_path / "include" / "aotriton" / "config.h"
    header.parent.mkdir(parents=True)
    header.write_text("#pragma once\n#define AOTRITON_VERSION_MAJOR 0\n#define AOTRITON_VERSION_MINOR 11\n"
                      "#define AOTRITON_VERSION_PATCH 1\n")
    assert aotriton_version(tmp_path) == "0.11.1"
    header.write_text("#define AOTRITON_VERSION_MAJOR_INT 0\n#define AOTRITON_VERSION_MINOR_INT 10\n")
    assert aotriton_version(tmp_path) == "0.10"


def test_every_version_a_known_failure_can_range_on_is_in_the_environment_and_the_fingerprint():
    versions = environment_versions({"TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL": "1"})
    assert set(versions) == set(VERSION_KEYS)
    assert versions["aotriton_experimental"] == "1" and versions["torch"].startswith("2.")
    assert package_version("torch") == versions["torch"].split("+")[0] or package_version("torch") == versions["torch"]
    assert package_version("no-such-package-here") is None
    fp = fingerprint(device_facts("cpu"))
    assert set(fp["versions"]) == set(VERSION_KEYS) and fp["versions"]["torch"] == fp["torch"]
    assert set(fp["collect_env"]) <= set(COLLECT_ENV_FIELDS) and "torch" in fp["collect_env"]["pip_packages"]
    assert collect_env_facts() is collect_env_facts()  # collected once per process
    assert set(VERSION_KEYS) <= set(Session.open("cpu").versions)


def test_an_entry_can_range_on_the_new_versions(tmp_path):
    path = tmp_path / "known.toml"
    path.write_text(ENTRY.format(extra='aotriton = ">=0.11"\nxformers = "0.0.3*"\ncite = "https://example.org/x"'))
    (entry,) = load_known(path)
    base = dict.fromkeys(VERSION_KEYS)
    assert entry.matches("c", "i", "dk", "cpu-x86_64", {**base, "aotriton": "0.11.1", "xformers": "0.0.31"})
    assert not entry.matches("c", "i", "dk", "cpu-x86_64", {**base, "aotriton": "0.10", "xformers": "0.0.31"})
    assert not entry.matches("c", "i", "dk", "cpu-x86_64", {**base, "xformers": "0.0.31"})  # no AOTriton here


@pytest.mark.parametrize("extra,problem", [
    ("", "cites neither an upstream link nor a reports/findings/ directory"),
    ('cite = []', "cites neither"),
    ('cite = ["see the forum"]', "is neither an http(s) link nor a reports/findings/<dir> path"),
    ('cite = ["reports/findings/no-such-finding"]', "no such directory"),
    ('cite = ["reports/findings/"]', "is neither"),
])
def test_an_entry_that_cites_neither_a_link_nor_a_findings_directory_is_refused(tmp_path, extra, problem):
    path = tmp_path / "known.toml"
    path.write_text(ENTRY.format(extra=extra))
    with pytest.raises(KnownFailuresError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        load_known(path)


def test_the_committed_entries_cite_their_evidence_and_both_forms_are_accepted(tmp_path):
    entries = load_known()
    assert entries and all(e.cite for e in entries)
    assert all(c.startswith(("https://", "http://", "reports/findings/")) for e in entries for c in e.cite)
    path = tmp_path / "known.toml"
    for ok in ('cite = ["reports/findings/cpu-flash-gqa-dkdv-group-sum"]', 'cite = "http://bugs.example/1"'):
        path.write_text(ENTRY.format(extra=ok))
        assert load_known(path)[0].cite

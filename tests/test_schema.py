"""The JSON Schemas shipped in harness/reports/schema/: every committed file validates, the store refuses
a broken one with one line naming the first violation, the validator agrees with the `jsonschema`
reference implementation where that is installed (check-jsonschema brings it in .ci/run), and the
check-jsonschema lines of .ci/run cover every committed report."""

from __future__ import annotations

import copy
import glob
import json
import re
import shlex
from pathlib import Path

import pytest

from harness.reports.schema import KINDS, SchemaError, first_error, load_schema, schema_path
from harness.reports.store import ReportError, StreamError, load_json, load_report, read_stream_strict

REPO = Path(__file__).resolve().parent.parent
SCHEMA_DIR = REPO / "harness" / "reports" / "schema"


def _kind(data) -> str | None:
    """What a committed JSON under reports/ is, by its content."""
    if not isinstance(data, dict):
        return None
    if {"schema_version", "fingerprint", "settings", "cases", "results"} <= set(data):
        return "report"
    if str(data.get("schema", "")).startswith("gqa-harness-"):
        return data["schema"].removeprefix("gqa-harness-").split("/")[0]
    if {"runs", "alarms", "peaks"} <= set(data):
        return "audit"
    if "bands" in data:
        return "noise"
    return None  # compare matrices, repro metadata: not reports


def committed() -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {k: [] for k in KINDS}
    for path in sorted((REPO / "reports").rglob("*.json")):
        kind = _kind(json.loads(path.read_text()))
        if kind:
            out[kind].append(path)
    return out


def ci_validations() -> dict[str, set[Path]]:
    """schema kind -> the files .ci/run checks against it (its check-jsonschema --schemafile lines)."""
    text = (REPO / ".ci" / "run").read_text()
    out: dict[str, set[Path]] = {}
    for line in text.splitlines():
        if "check-jsonschema --schemafile" not in line:
            continue
        args = shlex.split(line.split("check-jsonschema", 1)[1].replace('"$schemas"', str(SCHEMA_DIR)))
        kind = Path(args[args.index("--schemafile") + 1]).name.removesuffix(".schema.json")
        files = [a for a in args[args.index("--schemafile") + 2:] if not a.startswith("-")]
        out.setdefault(kind, set()).update(Path(p).resolve() for f in files for p in glob.glob(str(REPO / f)))
    return out


def test_every_committed_file_of_each_kind_is_valid():
    found = committed()
    assert found["report"] and found["bench"] and found["calibration"] and found["audit"] and found["noise"]
    for kind, paths in found.items():
        for path in paths:
            assert first_error(json.loads(path.read_text()), kind) is None, path
    # the gzipped reports (tens of MB decompressed) are checked by .ci/run's check-jsonschema


def test_ci_run_validates_every_committed_report_with_check_jsonschema():
    checked = ci_validations()
    for kind, paths in committed().items():
        missing = {p.resolve() for p in paths} - checked.get(kind, set())
        assert not missing, f".ci/run does not check these {kind} files: {sorted(map(str, missing))}"
    text = (REPO / ".ci" / "run").read_text()
    assert "git ls-files 'reports/*.json.gz'" in text and "gzip -dc" in text and '"$gz"/*.json' in text
    assert list((REPO / "reports").rglob("*.json.gz"))  # every gzipped report: decompressed, then checked


def test_the_store_refuses_a_broken_report_with_one_line_naming_the_first_violation(tmp_path):
    good = json.loads((REPO / "reports" / "baselines" / "cpu-x86_64.json").read_text())
    for mutate, expected in [
        (lambda r: r["results"][3].update(status="MAYBE"), "results[3].status: \"MAYBE\" is not one of PASS"),
        (lambda r: r["results"][0]["tensors"]["dk"].update(excess="big"), "results[0].tensors.dk.excess: \"big\" is "
                                                                         "not of type number or null"),
        (lambda r: r["results"][1].pop("impl"), "results[1]: missing required 'impl'"),
        (lambda r: r["fingerprint"].update(device_label=""), "fingerprint.device_label: \"\" is shorter than 1"),
    ]:
        broken = copy.deepcopy(good)
        mutate(broken)
        path = tmp_path / "r.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(ReportError) as err:
            load_report(path)
        assert str(err.value) == f"{path}: not a valid report ({expected})" or expected in str(err.value), err.value
        assert "\n" not in str(err.value)


def test_lab_files_load_through_the_store_with_their_schema(tmp_path):
    assert load_json(REPO / "reports" / "bench" / "cpu-x86_64.json", "bench")["schema"] == "gqa-harness-bench/1"
    audit = json.loads((REPO / "reports" / "audit" / "audit-cpu-x86_64.json").read_text())
    audit["runs"] = -1
    (tmp_path / "a.json").write_text(json.dumps(audit))
    with pytest.raises(ReportError, match=r"not a valid audit file \(runs: -1 is less than 0\)"):
        load_json(tmp_path / "a.json", "audit")


def test_a_corrupt_stream_is_named_with_its_line(tmp_path):
    stream = tmp_path / "s.jsonl"
    good = [{"type": "run", "fingerprint": {}}, {"type": "case", "case_id": "c", "case": {}, "spec": "b=1"},
            {"type": "result", "case_id": "c", "impl": "i", "status": "PASS", "tensors": {}}]
    stream.write_text("".join(json.dumps(r) + "\n" for r in good))
    assert read_stream_strict(stream) == good
    stream.write_text(stream.read_text() + '{"type": "result", "case_id": "c", "impl"')
    with pytest.raises(StreamError, match=r"s\.jsonl:4: corrupt stream \(not JSON"):
        read_stream_strict(stream)
    bad = [*good[:2], dict(good[2], status="GREAT")]
    stream.write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(StreamError, match=r"s\.jsonl:3: corrupt stream \(status: \"GREAT\" is not one of"):
        read_stream_strict(stream)


def test_a_schema_with_a_keyword_outside_the_subset_is_refused(monkeypatch, tmp_path):
    (tmp_path / "report.schema.json").write_text(json.dumps({"type": "object", "oneOf": [{"type": "object"}]}))
    monkeypatch.setattr("harness.reports.schema.SCHEMA_DIR", tmp_path)
    load_schema.cache_clear()
    try:
        with pytest.raises(SchemaError, match="oneOf"):
            load_schema("report")
    finally:
        monkeypatch.undo()
        load_schema.cache_clear()


def test_the_schemas_ship_with_the_package():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'"harness\.reports\.schema" = \["\*\.json"\]', pyproject)
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.schema.json")) == sorted(f"{k}.schema.json" for k in KINDS)


def test_the_validator_agrees_with_the_jsonschema_reference_implementation():
    jsonschema = pytest.importorskip("jsonschema")  # installed with check-jsonschema (.ci/run)
    referencing = pytest.importorskip("referencing")
    schemas = {k: json.loads(schema_path(k).read_text()) for k in KINDS}
    registry = referencing.Registry().with_resources(
        (f"{k}.schema.json", referencing.Resource.from_contents(s)) for k, s in schemas.items())
    for kind, schema in schemas.items():
        jsonschema.Draft202012Validator.check_schema(schema)
    samples = [(kind, json.loads(p.read_text())) for kind, paths in committed().items() for p in paths[:2]]
    broken = []
    for kind, data in samples:
        if kind == "report":
            b = copy.deepcopy(data)
            b["results"][0]["status"] = "MAYBE"
            broken.append((kind, b))
            b = copy.deepcopy(data)
            b["schema_version"] = 2
            broken.append((kind, b))
        elif kind == "calibration":
            b = copy.deepcopy(data)
            b["samples"][5]["dtype"] = "fp8"
            broken.append((kind, b))
    stream = [("stream", {"type": "case", "case_id": "c", "case": {}, "spec": ""}),
              ("stream", {"type": "result", "case_id": "c", "impl": "i", "status": "X", "tensors": {}}),
              ("stream", {"type": "nope"})]
    for kind, data in [*samples, *broken, *stream]:
        validator = jsonschema.Draft202012Validator(schemas[kind], registry=registry)
        assert validator.is_valid(data) == (first_error(data, kind) is None), (kind, first_error(data, kind))

"""The report's JSON text: the fast table rendering gives json.dumps(indent=1)'s bytes exactly."""

from __future__ import annotations

import json

import pytest

from harness.reports import jsontext

TABLE = [[0.0, -0.0, 1.5, 1e-300, 1e22, 0.1234], [], [2.0]]


@pytest.mark.parametrize("obj", [
    TABLE,
    {"results": [{"tensors": {"out": {"metrics": {"slice_ratio": TABLE, "levels": {"row": {"index": [0, 1]}}}}}}]},
    {"a": [TABLE, [[1.0]], [[1, 2.0]], [[None, 1.0]], [["x"]]], "b": (TABLE,), "c": [], "d": [[]], "e": "\u00e9"},
    [[1.0, 2.0], "tail", {"k": [[3.0]]}],
], ids=["table", "report-shaped", "mixed", "list-of-things"])
def test_the_text_is_json_dumps_indent_1_byte_for_byte(obj):
    assert jsontext.dumps(obj) == json.dumps(obj, indent=1, allow_nan=False)


def test_non_finite_floats_still_raise_as_json_dumps_does():
    with pytest.raises(ValueError):
        jsontext.dumps({"t": [[1.0, float("nan")]]})

"""The package's shape: layers import only downwards, every function-level import says why, no module
grows past 400 lines, and run set-up (tolerances, pinned process state) happens in one place."""

from __future__ import annotations

import ast
from pathlib import Path

HARNESS = Path(__file__).resolve().parent.parent / "harness"
# lowest first; a module may import its own layer and those below it
LAYERS = ["core", "implementations", "reports", "run", "repro", "search", "lab", "faces"]
FACES = {"cli", "plugin", "options", "strategies", "__init__"}


def _layer(path: Path) -> str:
    rel = path.relative_to(HARNESS)
    return "faces" if rel.parent == Path(".") and rel.stem in FACES else rel.parts[0]


def _module_of(path: Path) -> list[str]:
    return ["harness", *path.relative_to(HARNESS).with_suffix("").parts]


def _imported(path: Path, node: ast.ImportFrom) -> str:
    """The dotted module a relative `from` import names."""
    base = _module_of(path)[:-1] if path.name != "__init__.py" else _module_of(path)[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level else []
    return ".".join([*base, *(node.module.split(".") if node.module else [])])


def _modules():
    return [p for p in HARNESS.rglob("*.py")]


def _layer_of_module(dotted: str) -> str | None:
    parts = dotted.split(".")
    if parts[0] != "harness" or len(parts) == 1:
        return None
    return parts[1] if parts[1] in LAYERS else "faces"


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in _modules():
        mine = LAYERS.index(_layer(path))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = _layer_of_module(_imported(path, node) if node.level else node.module or "")
                if target and LAYERS.index(target) > mine:
                    upward.append(f"{path.relative_to(HARNESS)} imports {target} ({node.module})")
    assert not upward, upward


def test_function_level_imports_are_few_and_each_says_why():
    found = []
    for path in _modules():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        found.append((path.relative_to(HARNESS), lines[inner.lineno - 1]))
    assert len(found) < 20, found
    assert all("#" in line for _, line in found), [f for f in found if "#" not in f[1]]


def test_no_module_over_400_lines():
    assert not [p for p in _modules() if len(p.read_text().splitlines()) > 400]


def test_tolerances_and_process_state_are_set_up_in_one_place():
    calls = {name: [] for name in ("load_tolerances", "pin_math_reduction", "pin_process_state")}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if name in calls:
                    calls[name].append(str(path.relative_to(HARNESS)))
    assert calls["load_tolerances"] == ["run/session.py"]
    assert calls["pin_math_reduction"] == ["run/env.py"]  # inside pin_process_state
    assert sorted(calls["pin_process_state"]) == ["run/session.py", "run/worker.py"]  # the session's process, each worker

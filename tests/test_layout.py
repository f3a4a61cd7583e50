"""The package's floors: no module imports from a floor above its own, and no private name crosses a module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "budgetune"

# Bottom to top. A package (or top-level module) may import from its own floor and the floors below.
FLOORS = [
    {"errors", "fileio", "textcheck"},
    {"config", "metrics", "tasks"},
    {"hardware", "data"},
    {"adalora"},
    {"modeling"},
    {"budget"},
    {"inference"},
    {"training"},
    {"recipes", "serve"},
    {"cli", "__main__", "__init__"},
]


def floor_of(unit: str) -> int:
    for i, units in enumerate(FLOORS):
        if unit in units:
            return i
    raise AssertionError(f"budgetune.{unit} has no floor in tests/test_layout.py: place it")


def unit_of(module: str) -> str:
    """budgetune.training.train -> training; budgetune.config -> config."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names, line) for every budgetune import in a file, lazy ones included."""
    out = []
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == "budgetune":
            names = [a.name for a in n.names]
            if n.module == "budgetune":
                out += [(f"budgetune.{a}", [], n.lineno) for a in names]
            else:
                out.append((n.module, names, n.lineno))
        elif isinstance(n, ast.Import):
            out += [(a.name, [], n.lineno) for a in n.names if a.name.startswith("budgetune.")]
    return out


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


FILES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_import_runs_up_a_floor(path):
    me = floor_of(unit_of(module_name(path)))
    upward = [f"line {line}: {mod} (floor {floor_of(unit_of(mod))})" for mod, _, line in imports(path)
              if floor_of(unit_of(mod)) > me]
    assert not upward, f"{path.relative_to(SRC)} (floor {me}) imports upward: {upward}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_private_name_crosses_a_module(path):
    private = [f"line {line}: {name} from {mod}" for mod, names, line in imports(path)
               for name in names if name.startswith("_") and name != "__version__"]
    assert not private, f"{path.relative_to(SRC)} imports private names: {private}"


def test_every_package_says_what_it_owns():
    for init in SRC.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc.split()) >= 12, f"{init.relative_to(SRC)}: a one-paragraph docstring saying what it owns"


def test_the_layering_test_can_fail(tmp_path):
    """floor_of refuses what it cannot place, and an upward import is seen."""
    with pytest.raises(AssertionError):
        floor_of("nowhere")
    f = tmp_path / "x.py"
    f.write_text("from budgetune.cli import main\n")
    assert [m for m, _, _ in imports(f)] == ["budgetune.cli"]
    assert floor_of(unit_of("budgetune.cli")) > floor_of(unit_of("budgetune.config"))


MAX_FUNCTION_LINES = 60


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'name (line N): L lines' for every function (nested ones included) longer than `limit` lines."""
    return [f"{n.name} (line {n.lineno}): {n.end_lineno - n.lineno + 1} lines"
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > limit]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_function_is_longer_than_a_screen(path):
    long = long_functions(path)
    assert not long, f"{path.relative_to(SRC)}: functions over {MAX_FUNCTION_LINES} lines, split them: {long}"


def test_the_length_test_can_fail(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def short():\n    pass\n\n\ndef long():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert long_functions(f) == [f"long (line 5): {MAX_FUNCTION_LINES + 1} lines"]

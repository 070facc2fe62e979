"""The floors of docs/architecture.md hold: a package imports only from packages on lower floors.

Every module under longloom/ is parsed with `ast` (imports inside functions included, since a lazy
import is still a dependency); an import of a package on the same or a higher floor fails the test,
naming the file, the line and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "longloom"

# Lowest first; the packages on one floor do not import each other. Keep in step with
# docs/architecture.md ("Floors").
FLOORS: list[set[str]] = [
    {"runtime"},
    {"config"},
    {"attention"},
    {"parallel"},
    {"data", "checkpointing"},
    {"offload"},
    {"models"},
    {"training", "conversion"},
    {"launch", "evaluation"},
    {"preflight"},
    {"cli"},
    {"__main__"},
]
FLOOR_OF = {name: index for index, floor in enumerate(FLOORS) for name in floor}


def _unit(module: str) -> str | None:
    """'longloom.offload.memory' -> 'offload'; None for the package root `longloom` itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every longloom import in the file, at any depth."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return [(line, module) for line, module in found if module.split(".")[0] == "longloom"]


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_package_has_a_floor():
    units = {_unit(_module_name(path)) for path in _modules()} - {None}
    assert units <= set(FLOOR_OF), f"add these to FLOORS and docs/architecture.md: {units - set(FLOOR_OF)}"


def test_no_import_runs_up_the_floors():
    violations = []
    for path in _modules():
        unit = _unit(_module_name(path))
        if unit is None:  # longloom/__init__.py runs on every import: it may only use the lowest floor
            unit = "runtime"
        for line, module in _imports(path):
            target = _unit(module)
            if target is None or target == unit:
                continue
            if FLOOR_OF[target] >= FLOOR_OF[unit]:
                violations.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line} imports {module} "
                    f"({unit} is on floor {FLOOR_OF[unit]}, {target} on floor {FLOOR_OF[target]})"
                )
    assert not violations, "imports that run up (or across) the floors:\n" + "\n".join(violations)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import longloom.models.llama\n", ["longloom.models.llama"]),
        ("def f():\n    from longloom.training import trainer\n", ["longloom.training"]),
        ("from . import memory\n", ["longloom.offload"]),
        ("from ..models.tiled_mlp import x\n", ["longloom.models.tiled_mlp"]),
    ],
)
def test_the_parser_sees_every_kind_of_import(tmp_path, monkeypatch, source, expected):
    # A stand-in longloom/offload/probe.py, so relative imports resolve as they would in the package.
    root = tmp_path / "longloom" / "offload"
    root.mkdir(parents=True)
    probe = root / "probe.py"
    probe.write_text(source)
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path / "longloom")
    assert [module for _, module in _imports(probe)] == expected

"""attention/reference.py is the tests' ground truth: production code must not depend on it.

A production path that imported the reference would make "distributed result == reference" partly a
comparison of the reference with itself, and put test-only code on the training path.
"""

from __future__ import annotations

import ast
from pathlib import Path

import longloom

REFERENCE = "longloom.attention.reference"
PACKAGE_ROOT = Path(longloom.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module an `import` / `from ... import` anywhere in `source` names (function bodies included),
    relative imports resolved against `module`; `from a import b` names both `a` and `a.b`."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_the_import_scan_sees_every_way_of_importing_the_reference():
    module = "longloom.attention.blocks"
    for source in (
        "from longloom.attention.reference import attention_with_lse",
        "import longloom.attention.reference as ref",
        "from longloom.attention import reference",
        "from .reference import check_heads",
        "from . import reference",
        "from ..attention.reference import attention_scores",
        "def f():\n    if True:\n        from longloom.attention.reference import reference_attention\n",
    ):
        assert REFERENCE in imported_modules(source, module), source
    assert REFERENCE not in imported_modules("from longloom.attention.local import check_heads", module)


def test_no_production_module_imports_the_test_reference():
    offenders = []
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        module = _module_name(path)
        if module == REFERENCE:
            continue
        if REFERENCE in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            offenders.append(str(path.relative_to(PACKAGE_ROOT.parent)))
    assert not offenders, (
        f"{offenders} import {REFERENCE}, the tests' ground truth; import the helpers from "
        "longloom.attention.local (or another production module) instead"
    )

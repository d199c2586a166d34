"""The test doubles (`testing/`) stay out of the product: no product module imports them and
the wheel's package list leaves them out."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("core", "storage", "cluster", "bots", "web", "atelier")


def _imports_of(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement in ``path`` names (relative imports left out)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _testing_imports(paths: list[Path]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in paths
        for line, name in _imports_of(path)
        if name == "testing" or name.startswith("testing.")
    ]


def test_no_product_module_imports_the_test_doubles() -> None:
    sources = [p for package in PRODUCT for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(sources) > 100  # the walk found the packages
    assert _testing_imports(sources) == []


def test_the_scan_sees_an_import_of_the_doubles() -> None:
    # The scan above would pass on any tree if it never matched: it matches the benches.
    found = _testing_imports([ROOT / "bench" / "telegram_load.py"])
    assert any(line.endswith("imports testing.telegram") for line in found), found


def test_the_wheel_leaves_the_doubles_out() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = config["packages"]["find"]
    packages = find_packages(
        str(ROOT), include=found.get("include", ("*",)), exclude=found.get("exclude", ())
    )
    assert "bots.telegram" in packages and "web.gallery" in packages
    assert [p for p in packages if p.split(".")[0] in ("testing", "tests", "bench")] == []

"""The layer contracts (../shared/DESIGN.md): imports only point left,
core <- storage <- cluster <- engine / bots / web <- atelier, and the job side never loads torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each product package may import of ours (every import counts: top level, inside a
# function, or under TYPE_CHECKING). ``testing`` (the platforms' fakes) is for tests and benches.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "storage": {"core"},
    "cluster": {"core", "storage"},
    "engine": {"core", "cluster"},
    "bots": {"core", "storage", "cluster"},
    "web": {"core", "storage", "cluster"},
    "atelier": {"core", "storage", "cluster", "engine", "bots", "web"},
}
# The engine sees the job side's shared vocabulary only, never its machinery.
ENGINE_MAY_IMPORT_FROM_CLUSTER = {
    "cluster.registry", "cluster.availability", "cluster.adapters", "cluster.hub",
    "cluster.contract", "cluster.device_classes",
}
OURS = {*ALLOWED, "testing", "tests", "bench"}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from cluster import registry` names a module too
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _violations() -> list[str]:
    out = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            where = path.relative_to(ROOT)
            for module in sorted(_imports(path)):
                top = module.split(".")[0]
                if top not in OURS or top == package:
                    continue
                if top not in allowed:
                    out.append(f"{where} imports {module} ({package} may import "
                               f"{', '.join(sorted(allowed)) or 'none of ours'})")
                elif package == "engine" and top == "cluster" and module != "cluster":
                    head = ".".join(module.split(".")[:2])
                    if head not in ENGINE_MAY_IMPORT_FROM_CLUSTER:
                        out.append(f"{where} imports {module}: the engine may use only "
                                   f"{', '.join(sorted(ENGINE_MAY_IMPORT_FROM_CLUSTER))}")
    return out


def test_imports_point_only_left() -> None:
    assert _violations() == []


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The scanner reads lazy and TYPE_CHECKING imports too (what a rule that only looked at
    the top of a file would miss)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from engine.pipelines import Pipeline\n"
        "def f():\n    from cluster import dispatcher\n"
    )
    assert {"engine.pipelines", "cluster.dispatcher"} <= _imports(probe)


@pytest.mark.parametrize("modules", [
    # the job side: what runs the queue never needs torch, Diffusers or the engine room
    "cluster.dispatcher, cluster.client, cluster.batchrun, cluster.placement, cluster.settling, "
    "cluster.autoscale, cluster.reconcile, cluster.contract, cluster.availability",
    # the front ends
    "web.app, bots.telegram.app, bots.discord.bot",
])
def test_the_job_side_and_front_ends_never_load_torch(modules: str) -> None:
    code = (
        f"import sys, {modules}; "
        "print(sorted(m for m in ('engine', 'torch', 'diffusers', 'transformers') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
        cwd=ROOT,
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr

"""The import contract between layers: airflow -> engine -> flows -> rules / vault.

Every import statement of the product package counts, at any depth (function bodies included:
a deferred import is still a dependency). The contract lives here, in one table, and runs with
the suite (so in CI)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from support import REPO

PACKAGE = REPO / "include" / "clinical_crm"

# layer -> the layers it must never import (the arrows point down only)
FORBIDDEN = {
    "airflow": set(),
    "engine": {"airflow"},
    "flows": {"engine", "airflow"},
    "vault": {"flows", "engine", "airflow", "rules"},
    "rules": {"flows", "engine", "airflow"},
}


def layer_of(module: str) -> str | None:
    """The layer of a clinical_crm module name; None for the package's entry points (the CLI,
    preflight), which sit on top and may use any layer."""
    parts = module.split(".")
    if parts[0] != "clinical_crm":
        return None
    head = parts[1] if len(parts) > 1 else ""
    if head in ("airflow", "engine", "flows", "vault"):
        return head
    if head in ("__main__", "preflight", ""):
        return None
    return "rules"  # rules, values, checks, outcomes, config, errors, times, settings


def imported(source: str, module: str) -> list[tuple[int, str]]:
    """(line, module) of every clinical_crm import in `source` (of module `module`), at any depth."""
    found = []
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, base)]
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names if base == "clinical_crm"]
    return [(line, name) for line, name in found if name.split(".")[0] == "clinical_crm"]


def violations(source: str, module: str) -> list[str]:
    mine = layer_of(module)
    if mine is None:
        return []
    return [f"{module}:{line}: the {mine} layer imports {name} ({layer_of(name)} layer)"
            for line, name in imported(source, module) if layer_of(name) in FORBIDDEN[mine]]


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found.append((name, path))
    return found


def test_every_import_points_down_the_layers():
    problems = [v for name, path in modules() for v in violations(path.read_text(), name)]
    assert problems == []


def test_the_package_has_every_layer():
    layers = {layer_of(name) for name, _ in modules()}
    assert {"airflow", "engine", "flows", "vault", "rules"} <= layers


@pytest.mark.parametrize("source", [
    "def stage():\n    from clinical_crm.engine import extract\n",
    "def stage():\n    import clinical_crm.engine.staging\n",
    "from clinical_crm import engine\n",
    "def f():\n    from ..engine.load import upsert\n",
])
def test_a_flow_importing_the_engine_anywhere_breaks_the_contract(source):
    assert violations(source, "clinical_crm.flows.ctms_to_crm")


def test_allowed_imports_pass():
    source = "from clinical_crm.flows.base import Flow\nfrom clinical_crm.vault import Query\nimport pandas\n"
    assert violations(source, "clinical_crm.flows.ctms_to_crm") == []
    assert violations("from clinical_crm.flows import build\n", "clinical_crm.engine.runner") == []

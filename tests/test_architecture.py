"""The shape of the package: small modules, no import cycles (lazy imports inside functions included;
imports under TYPE_CHECKING excluded, they never run), architecture notes that name each module's job, a README
that is a front door to docs/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "pytest_llmopt"
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    return {path.stem: path for path in sorted(PACKAGE.glob("*.py")) if path.stem != "__init__"}


def _imports(path: Path) -> set[str]:
    """Sibling modules ``path`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only or not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 1 and node.module:
            names.add(node.module.split(".")[0])
        elif node.level == 1:
            names |= {alias.name for alias in node.names}
        elif node.module and node.module.startswith("pytest_llmopt."):
            names.add(node.module.split(".")[1])
    return names & set(_modules())


def test_no_module_is_too_long() -> None:
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_import_cycles() -> None:
    graph = {name: _imports(path) for name, path in _modules().items()}
    cycles = []

    def visit(name: str, stack: list[str]) -> None:
        for nxt in sorted(graph[name]):
            if nxt in stack:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in done:
                visit(nxt, [*stack, nxt])
        done.add(name)

    done: set[str] = set()
    for name in graph:
        visit(name, [name])
    assert cycles == []


def test_architecture_notes_name_every_module() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert [name for name in _modules() if f"`{name}.py`" not in text] == []


def test_readme_is_a_front_door() -> None:
    """At most 150 lines, and every page of docs/ linked from it (the rest of what the README was lives there)."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert [page.name for page in sorted((ROOT / "docs").glob("*.md")) if f"docs/{page.name}" not in text] == []


def test_no_placeholder_in_what_ships() -> None:
    """A bound or check marked as not yet measured must not ship: every bound says where it was measured."""
    words = re.compile(r"\b(PLACEHOLDER|TODO|FIXME|XXX)\b", re.IGNORECASE)
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for folder in (PACKAGE, ROOT / "suites") for path in sorted(folder.glob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if words.search(line)]
    assert found == []


def test_suites_use_only_the_public_api() -> None:
    """The shipped suites import pytest_llmopt.api and nothing else of the package (so an internal rename never
    breaks a suite, theirs or a user's), and no module of the package imports the API back (it is the top)."""
    suites = sorted((ROOT / "suites").glob("test_*.py"))
    assert suites
    offenders = []
    for path in suites:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pytest_llmopt" and node.module != "pytest_llmopt.api":
                offenders.append(f"{path.name}:{node.lineno} from {node.module} import ...")
            if isinstance(node, ast.Import) and any(a.name.startswith("pytest_llmopt") and a.name != "pytest_llmopt.api" for a in node.names):
                offenders.append(f"{path.name}:{node.lineno} import {', '.join(a.name for a in node.names)}")
    assert not offenders, "suites must import from pytest_llmopt.api only:\n" + "\n".join(offenders)
    importers = [name for name, path in _modules().items() if "api" in _imports(path) and name != "api"]
    assert not importers, f"modules importing the public API: {importers}"

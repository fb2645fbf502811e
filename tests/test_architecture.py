"""The shape of the package: layers as folders and who may import whom, no import cycles (lazy imports inside
functions included; imports under TYPE_CHECKING excluded, they never run), architecture notes that name each layer
and module's job, a README that is a front door to docs/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "pytest_llmopt"
# The layers, bottom up: a module imports modules of its own layer or of a layer below, never above. The faces
# (plugin.py for pytest, api.py for suite authors, cli.py for the command line) stand on top and import no face.
LAYERS = ("common", "verdicts", "running", "wiring")
FACES = ("api", "plugin", "cli")


def _modules() -> dict[str, Path]:
    """Every module of the package by its name (names are unique across the layers)."""
    paths = [path for path in sorted(PACKAGE.rglob("*.py")) if path.stem != "__init__"]
    names = [path.stem for path in paths]
    assert len(names) == len(set(names)), "two modules of one name in different layers"
    return dict(zip(names, paths))


def _dotted(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports, at module level or inside functions."""
    modules = {_dotted(p): name for name, p in _modules().items()}
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    here = _dotted(path).split(".")[:-1]  # the package the module is in
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only or not isinstance(node, ast.ImportFrom):
            continue
        base = ".".join([*here[: len(here) - node.level + 1], *([node.module] if node.module else [])]) if node.level else node.module or ""
        if base in modules:
            names.add(modules[base])
        names |= {modules[f"{base}.{alias.name}"] for alias in node.names if f"{base}.{alias.name}" in modules}
    return names


def _layer(name: str) -> int:
    """A module's floor: its layer's index, the faces above every layer."""
    folder = _modules()[name].parent.name
    return LAYERS.index(folder) if folder in LAYERS else len(LAYERS)


def test_layers_are_folders_and_every_module_has_one() -> None:
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()) == sorted(LAYERS)
    assert sorted(name for name, path in _modules().items() if path.parent == PACKAGE) == sorted(FACES)


def test_no_module_imports_a_layer_above_its_own() -> None:
    """common < verdicts < running < wiring < the faces; and a face never imports another face."""
    against = [
        f"{name} ({_modules()[name].parent.name}) imports {other} ({_modules()[other].parent.name})"
        for name, path in _modules().items()
        for other in sorted(_imports(path))
        if _layer(other) > _layer(name) or (name in FACES and other in FACES)
    ]
    assert against == []


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


def test_architecture_notes_name_every_layer_and_module() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert [name for name in _modules() if f"`{name}.py`" not in text] == []
    assert [layer for layer in LAYERS if f"`{layer}/`" not in text] == []


def test_readme_is_a_front_door() -> None:
    """At most 150 lines, and every page of docs/ linked from it (the rest of what the README was lives there)."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert [page.name for page in sorted((ROOT / "docs").glob("*.md")) if f"docs/{page.name}" not in text] == []


def test_no_placeholder_in_what_ships() -> None:
    """A bound or check marked as not yet measured must not ship: every bound says where it was measured."""
    words = re.compile(r"\b(PLACEHOLDER|TODO|FIXME|XXX)\b", re.IGNORECASE)
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for folder in (PACKAGE, ROOT / "suites") for path in sorted(folder.rglob("*.py"))
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

"""Which way kvplane's imports point, read from the source with ``ast`` and checked against
the allow-list per layer in docs/architecture.md (the table is read from there).

Every import statement counts: top level, inside functions, under ``if TYPE_CHECKING:``.
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
Imports by string (``importlib.import_module`` in ``kvplane.cli``) are not seen.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kvplane"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

#: Programs inside a library layer (run with ``python -m``): the layer ``programs``.
PROGRAMS = frozenset({"kvplane.integrations.vllm.demo", "kvplane.integrations.vllm.testmodel"})


@cache
def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is_package) for every module under kvplane/."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = (path, is_package)
    return found


def imported_names(name: str) -> set[str]:
    """The kvplane modules ``name`` imports, anywhere in its source."""
    path, is_package = modules()[name]
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            submodules = {f"{target}.{a.name}" for a in node.names} & modules().keys()
            out.update(submodules)
            if len(submodules) < len(node.names):
                out.add(target)
    return {m for m in out if m in modules() and m != name}


@cache
def graph() -> dict[str, frozenset[str]]:
    return {name: frozenset(imported_names(name)) for name in modules()}


def area(name: str) -> str:
    """``kvplane.engine.backends.cpu`` -> ``engine``; ``kvplane.process`` -> ``process``."""
    if name in PROGRAMS:
        return "programs"
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "kvplane"


@cache
def allowed() -> dict[str, frozenset[str]]:
    """Layer -> the layers it may import, from docs/architecture.md's table."""
    table: dict[str, frozenset[str]] = {}
    for line in ARCHITECTURE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"`[\w.]+`", cells[0]):
            table[cells[0].strip("`")] = frozenset(re.findall(r"`([\w.]+)`", cells[1]))
    return table


def in_area(name: str, areas: Iterable[str]) -> bool:
    return area(name) in set(areas)


def cycles(edges: dict[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def violations(source_areas: Iterable[str], forbidden: Iterable[str]) -> list[str]:
    sources, banned = set(source_areas), set(forbidden)
    return sorted(
        f"{name} imports {dep}"
        for name, deps in graph().items()
        if in_area(name, sources)
        for dep in deps
        if in_area(dep, banned)
    )


def test_the_parser_sees_type_checking_and_function_level_imports():
    # kvplane.worker.service imports the handle under TYPE_CHECKING only; the engine CLI
    # imports the process inside its run(): if these went unseen, the rules below would
    # pass vacuously.
    assert "kvplane.engine.engine" in graph()["kvplane.worker.service"]
    assert "kvplane.process" in graph()["kvplane.engine_cli"]
    assert cycles({"a": frozenset({"b"}), "b": frozenset({"a"}), "c": frozenset()}) == [["a", "b"]]


def test_every_layer_has_a_row_in_the_table():
    layers = {area(name) for name in modules()}
    assert sorted(layers - allowed().keys()) == []
    assert sorted(allowed().keys() - layers) == []
    assert all(allowed()[layer] <= layers for layer in allowed())


def test_each_layer_imports_only_what_its_row_allows():
    assert (
        sorted(
            f"{name} imports {dep}"
            for name, deps in graph().items()
            for dep in deps
            if area(dep) != area(name) and area(dep) not in allowed()[area(name)]
        )
        == []
    )


def test_the_vllm_integration_is_library_code_apart_from_its_programs():
    assert violations(["integrations"], ["demo", "serve"]) == []
    assert all(name in modules() for name in PROGRAMS)


def test_no_cycle_between_subpackages():
    edges: dict[str, set[str]] = {}
    for name, deps in graph().items():
        edges.setdefault(area(name), set()).update(area(d) for d in deps if area(d) != area(name))
    assert cycles({k: frozenset(v) for k, v in edges.items()}) == []


def test_no_cycle_between_modules():
    assert cycles(graph()) == []

"""The dependency direction of DESIGN.md, read off the source: ``ingest`` imports nothing of
ours, connectors and routers import only ``ingest`` (never each other), only ``config`` wires
them, and no module imports itself back through others. Every import counts: a function's
lazy import or a ``TYPE_CHECKING`` one is a dependency too."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ingest", "routers", "connectors", "config")
#: what each layer may import from the others
ALLOWED = {
    "ingest": {"ingest"},
    "routers": {"ingest", "routers"},
    "connectors": {"ingest", "connectors"},
    "config": set(PACKAGES),
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ours that ``name`` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                parts = parts if is_package else parts[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            # ``import a.b.c`` depends on a.b.c (and its packages, which import nothing of ours)
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


MODULES = _modules()
GRAPH = {name: _imports(name, path, MODULES) for name, path in MODULES.items()}


def test_the_graph_is_read():
    assert len(MODULES) > 60
    assert "ingest.bus" in GRAPH["ingest.consume"]
    assert "routers.policy" in GRAPH["routers.decider"]


@pytest.mark.parametrize("layer", PACKAGES)
def test_a_layer_imports_only_what_it_may(layer: str):
    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if name.split(".")[0] == layer
        for target in targets
        if target.split(".")[0] not in ALLOWED[layer]
    )
    assert wrong == []


def test_the_routers_plumbing_imports_no_routing():
    """``routers.store`` (the database plumbing) and ``routers.csv`` (the directory's import
    and export) sit beneath the routing: of ``routers`` they import each other, the models
    and the settings, never the decider, the workers or the routing state. The import checks
    issue 15's and 16's columns with the parsers the router reads them with:
    ``routers.schedule`` and ``routers.public_holidays`` (hours, zones, holiday countries),
    ``routers.availability``'s ``parse_capacity`` and ``routers.first_response``."""
    beneath = ("routers.store", "routers.csv", "routers.models", "routers.settings")
    parsers = (
        "routers.schedule",
        "routers.public_holidays",
        "routers.availability",
        "routers.first_response",
    )

    def within(name: str, packages: tuple[str, ...]) -> bool:
        return any(name == p or name.startswith(f"{p}.") for p in packages)

    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if within(name, beneath[:2])
        for target in targets
        if within(target, ("routers",)) and not within(target, beneath + parsers)
    )
    assert wrong == []


def test_no_import_circle():
    """Tarjan's strongly connected components: any with more than one module is a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(GRAPH[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert circles == []


def test_no_module_over_400_lines():
    long = {
        name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 400
    }
    assert long == {}

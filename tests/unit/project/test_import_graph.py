"""No import cycles among the product's modules, counting every import a module names.

Imports under `if TYPE_CHECKING:` and inside functions count too: a cycle hidden that
way still means two modules that cannot be read (or split) one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("common", "node", "worker")


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that `path` imports, anywhere in its body."""
    named: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            named.add(node.module)
            named.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in named if name in modules and (ROOT / name.split(".")[0]).is_dir()}


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports (packages' empty __init__ left out)."""
    modules = _modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    for deps in graph.values():
        deps.difference_update(name for name in list(deps) if modules[name].name == "__init__.py")
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def test_the_finder_sees_a_cycle_through_a_type_checking_import() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_holds_every_module_and_real_edges() -> None:
    graph = import_graph()
    assert "node.ws.socket" in graph and "worker.main" in graph
    assert "common.transport.bus" in graph["worker.main"]


def test_common_node_and_worker_have_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_common_imports_neither_node_nor_worker() -> None:
    """Only the `fanout` command line, which starts either, reaches into node/ and worker/."""
    graph = import_graph()
    wrong = {
        (name, dep)
        for name, deps in graph.items()
        if name.startswith("common") and name != "common.cli"
        for dep in deps
        if not dep.startswith("common")
    }
    assert not wrong

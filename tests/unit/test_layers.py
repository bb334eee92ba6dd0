"""The package's layers: imports between its parts form no cycle, and data building never runs the model."""

from __future__ import annotations

import ast
from pathlib import Path

import knockout

ROOT = Path(knockout.__file__).parent


def _part(module: str) -> str:
    """``knockout.data.text`` -> ``data``; ``knockout.hooks`` -> ``hooks``."""
    return module.split(".")[1]


def import_graph() -> dict[str, set[str]]:
    """Part -> the parts it imports (module-level and function-level imports alike); the package root is left out."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts)
        if module == "knockout.__init__":
            continue
        part = _part(module)
        graph.setdefault(part, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if not name.startswith("knockout."):
                    continue
                target = name.split(".")[1]
                is_part = (ROOT / target).is_dir() or (ROOT / f"{target}.py").is_file()
                if is_part and target not in (part, "__init__"):
                    graph[part].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_layer_diagram_has_no_cycle():
    graph = import_graph()
    assert {"data", "stats", "ablation", "experiments", "reporting", "cli"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_data_does_not_run_the_model():
    """Batch building needs no hooks and no sites: the pre-out length of images is measured by the caller."""
    assert not {"hooks", "sites", "stats", "ablation", "evaluation"} & import_graph()["data"]


def test_reporting_reads_files_only():
    assert not {"hooks", "sites", "loading", "evaluation", "experiments"} & import_graph()["reporting"]


def module_graph() -> dict[str, set[str]]:
    """Module (file) -> the knockout modules it imports, module-level and function-level imports alike; a package's
    ``__init__`` is left out (it re-exports)."""
    modules = {".".join(p.relative_to(ROOT.parent).with_suffix("").parts) for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        if module.endswith("__init__"):
            continue
        graph[module] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name in modules and name != module:
                    graph[module].add(name)
    return graph


def test_no_import_cycle_between_files():
    graph = module_graph()
    assert {"knockout.runfolder", "knockout.experiments.engine", "knockout.stats.running"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_statistics_and_methods_write_files_without_the_run_folder():
    graph = module_graph()
    for module, imports in graph.items():
        if module.startswith(("knockout.stats.", "knockout.ablation.")):
            assert "knockout.runfolder" not in imports, module

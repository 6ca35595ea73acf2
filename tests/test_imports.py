"""The package's imports go one way: no module of thor_min imports itself back through others.

Every import statement counts, also those inside functions (a lazy import hides a circle, it does not
remove it). The graph is built from the source with `ast`, so nothing is imported to check it.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "thor_min"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """thor_min modules that `path` imports (`from thor_min import x` counts as importing thor_min.x)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative import: climb level - 1 packages up from this module's package
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules and name != module_name(path)}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, modules) - {"thor_min"} for path in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search with a colour per module)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_the_checker_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"], "a three-module circle must be reported"
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None, "a DAG has no circle"


def test_the_graph_sees_lazy_and_package_imports():
    graph = import_graph()
    assert "thor_min.tasks" in graph["thor_min.data"], "data imports the tiny world (from thor_min import tasks)"
    assert "thor_min.problem" in graph["thor_min.tasks"], "tasks imports Problem from its primitive module"
    assert "thor_min.report" in graph["thor_min.ablation"], "the lazy import of report in stage_eval must count"

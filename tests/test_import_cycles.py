"""No import cycles anywhere in the repository: the serving package, the training package, the
load tests and the operator, each alone and across them.

Every ``import``/``from ... import`` of each module is read with ``ast`` -- at the top level and
inside functions, classes and ``if TYPE_CHECKING`` blocks alike (a lazy import inside a function
is still a dependency, only a deferred one) -- and the graph of imports between the package's
own modules must be acyclic. (The layers between the serving package's sub-packages are
import-linter's contracts in pyproject.toml; this checks every module, inside layers too.) Run as
a script it prints the graph and any cycles: ``.venv/bin/python tests/test_import_cycles.py``.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Every package of the repository and its folder.
PACKAGES = {"mosmedai": ROOT / "services" / "mosmedai", "mosmedai_training": ROOT / "services" / "mosmedai_training",
            "mosmedai_load": ROOT / "load_tests" / "mosmedai_load",
            "mosmedai_operator": ROOT / "operators" / "mosmedai_operator"}


def module_names(package_dir: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (sub-packages included)."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join([package, *parts])] = path
    return names


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base.pop()
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's own modules that ``module`` imports, anywhere in its source."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        # `import a.b.c` loads a, a.b and a.b.c: the deepest of them that is ours is the edge
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            source = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                      else node.module or "")
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                add(submodule if submodule in modules else source)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            add(node.args[0].value)
    return found


def import_graph(packages: dict[str, Path] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the repository's modules it imports, over all the packages at once (so a cycle
    that passes through two packages is found too)."""
    modules = {name: path for package, folder in packages.items() for name, path in module_names(folder, package).items()}
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle, each as [a, b, ..., a] starting at its smallest module name."""
    cycles = []
    nodes = sorted(graph)
    for start_index, start in enumerate(nodes):
        allowed = set(nodes[start_index:])  # cycles through smaller names were found from those
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    cycles.append([*path, start])
                elif nxt in allowed and nxt not in path:
                    stack.append((nxt, [*path, nxt]))
    return sorted(cycles)


def test_the_repository_has_no_import_cycles():
    graph = import_graph()
    # every package is read, and edges between them are seen
    assert {"mosmedai_load.capacity", "mosmedai_training.evaluate", "mosmedai.ingress.app",
            "mosmedai_operator"} <= set(graph)
    assert "mosmedai.phantoms.chest_xray" in graph["mosmedai_training.evaluate"]
    assert find_cycles(graph) == []


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("import os\n\ndef f():\n    from pkg.b import g\n    return g\n")
    (package / "b.py").write_text("from . import c\n")
    (package / "c.py").write_text("import importlib\n\nclass C:\n    def m(self):\n"
                                  "        return importlib.import_module('pkg.a')\n")
    (package / "d.py").write_text("from .a import f\n")
    graph = import_graph({"pkg": package})
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}, "pkg.d": {"pkg.a"}}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_design_titles_cover_the_designs():
    from mosmedai_load import capacity, report

    assert set(report.DESIGN_TITLES) == set(capacity.DESIGNS)


def main(argv: list[str]) -> int:
    graph = import_graph()
    for name in sorted(graph):
        print(f"{name} -> {', '.join(sorted(graph[name])) or '-'}")
    cycles = find_cycles(graph)
    print(f"cycles: {len(cycles)}")
    for cycle in cycles:
        print("  " + " -> ".join(cycle))
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

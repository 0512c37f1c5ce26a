"""The package's layering, read from the source with `ast` (nothing is imported).

Why: arrows between layers drift one convenient import at a time, and a cycle
makes every file in it load-order sensitive.  These rules are the acceptance
criteria of the "one REAPI layer" step: storage and client meet only in shared
modules (`casbah.reapi`, `casbah.streams`, ...); no two files import each other
except through the kind registries, which load backends by name; no product file
grows past 450 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "casbah"

#: Modules that build the graph from config and load backends by name; a cycle through them is by design.
REGISTRIES = {"casbah.registry", "casbah.storage.loader"}

#: Longest product file, in lines.
MAX_LINES = 450
#: Over the limit today while another change splits them; the lead removes entries as those land.
OVER_LIMIT_FOR_NOW: set[str] = set()
OVER_LIMIT_PREFIXES_FOR_NOW: tuple[str, ...] = ()


def _product_files() -> dict[str, Path]:
    """Module name -> file, generated protos left out."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent)
        if "protos" in rel.parts:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _product_files()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> set[str]:
    """The product modules `module` imports anywhere in its file (function-level imports count:
    they are arrows too, only later ones).  Imports under `if TYPE_CHECKING:` are left out: they
    name a type for the checker and are never executed, so they are no arrow at run time."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                   for stmt in node.body for inner in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.add(full if full in MODULES else base)
    found = set()
    for name in names:
        while name and name not in MODULES:  # `from casbah.x import Name` is an arrow to casbah.x
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_was_read():
    # Guards the tests below against passing on an empty graph.
    assert len(GRAPH) > 50
    assert "casbah.storage.base" in GRAPH["casbah.storage.memory"]


def test_storage_does_not_import_client():
    wrong = {m: sorted(d for d in deps if _in(d, "casbah.client"))
             for m, deps in GRAPH.items() if _in(m, "casbah.storage")}
    assert {m: d for m, d in wrong.items() if d} == {}


def test_client_does_not_import_storage():
    wrong = {m: sorted(d for d in deps if _in(d, "casbah.storage"))
             for m, deps in GRAPH.items() if _in(m, "casbah.client")}
    assert {m: d for m, d in wrong.items() if d} == {}


def test_no_import_cycles_except_through_the_registries():
    without = {m: {d for d in deps if d not in REGISTRIES} for m, deps in GRAPH.items() if m not in REGISTRIES}
    assert _cycles(without) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_product_file_over_the_limit():
    over = {}
    for path in MODULES.values():
        rel = path.relative_to(ROOT.parent).as_posix()
        if rel in OVER_LIMIT_FOR_NOW or rel.startswith(OVER_LIMIT_PREFIXES_FOR_NOW):
            continue
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            over[rel] = lines
    assert over == {}

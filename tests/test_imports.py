"""fastcl's modules import one another without a cycle.

The graph is read from the source, not from a running interpreter: every import statement counts,
at module level or inside a function, because a function-level import hides a cycle from Python's
import machinery (it runs late) but not from a reader, who still has to hold both modules in mind
to understand either. An edge goes to the module an import names: ``from .a import f`` to ``a``
(``f`` a function there), ``from . import b`` to ``b`` (a submodule), ``from .. import _C`` to the
compiled extension, which imports nothing of ours.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "fastcl"
EXTENSIONS = (".so", ".pyd")


def modules(root: Path) -> dict[str, Path | None]:
    """Dotted name -> source file of every module under the package ``root`` (None: a compiled one)."""
    found: dict[str, Path | None] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix == ".py":
            parts = list(path.relative_to(root.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
        elif path.suffix in EXTENSIONS:
            found[".".join([*path.relative_to(root.parent).parent.parts, path.name.split(".")[0]])] = None
    return found


def _top_level_names(tree: ast.Module) -> set[str] | None:
    """Names a module binds outside functions and classes; None if it star-imports (any name may be bound)."""
    names: set[str] = set()
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(alias.name == "*" for alias in node.names):
                return None
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
            todo.extend(ast.iter_child_nodes(node))
        elif isinstance(node, ast.ExceptHandler):
            todo.extend(node.body)
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (anywhere in its source)."""
    known = modules(root)
    trees = {name: ast.parse(path.read_text()) for name, path in known.items() if path is not None}
    bound = {name: _top_level_names(tree) for name, tree in trees.items()}
    top = root.name

    def target(package: str, name: str) -> str:
        """``from package import name``: the submodule ``name`` unless ``package`` binds ``name`` itself."""
        sub = f"{package}.{name}"
        if sub in known:
            return sub
        names = bound.get(package, set())
        return package if names is None or name in names else sub

    graph: dict[str, set[str]] = {}
    for name, tree in trees.items():
        here = name if known[name].name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name.split(".")[0] == top)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    package = ".".join(base + ([node.module] if node.module else []))
                else:
                    package = node.module or ""
                if package.split(".")[0] != top:
                    continue
                edges.update(package if alias.name == "*" else target(package, alias.name) for alias in node.names)
        graph[name] = {e for e in edges if e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_fastcl_imports_have_no_cycle():
    graph = import_graph(PACKAGE)
    assert "fastcl.distributed.plan" in graph["fastcl.distributed.world"]  # the walk sees the imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    """comm <-> plan as fastcl.distributed had it: a top-level import one way, a lazy one back."""
    pkg = _package(tmp_path / "fastcl", {
        "__init__.py": "",
        "comm.py": "def plan():\n    from .plan import Plan\n    return Plan()\n",
        "plan.py": "from .comm import plan\n\n\nclass Plan:\n    pass\n",
        "ring.py": "from . import comm\n",
    })
    assert find_cycle(import_graph(pkg)) == ["fastcl.comm", "fastcl.plan", "fastcl.comm"]


def test_names_from_a_package_and_compiled_submodules_are_told_apart(tmp_path):
    """``from . import x``: the package's own ``x`` (an edge to the package) or a submodule; an
    extension module is a node without imports, so ``_ext -> _C`` closes no cycle through ``__init__``."""
    pkg = _package(tmp_path / "fastcl", {
        "__init__.py": "from . import _ext\nfrom .api import run\n\nVERSION = 1\n",
        "_ext.py": "from . import _C\n",
        "_C.cpython-311-x86_64-linux-gnu.so": "",
        "api.py": "def run():\n    from . import VERSION\n    return VERSION\n",
    })
    graph = import_graph(pkg)
    assert graph["fastcl._ext"] == {"fastcl._C"}
    assert graph["fastcl.api"] == {"fastcl"}
    assert find_cycle(graph) == ["fastcl", "fastcl.api", "fastcl"]

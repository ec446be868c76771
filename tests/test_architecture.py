"""The package's layering, read from its source with `ast`: no import cycles, no private names imported
from another package, and `effc show` offers exactly the compiler's pass list."""
from __future__ import annotations

import ast
from pathlib import Path

import effc
from effc.compiler import PIPELINE

PACKAGE = Path(effc.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, list[tuple[str, str]]]:
    """module -> [(imported module, imported name)], function-level imports included (a lazy import is
    still a dependency)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("effc")):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.append((sub, "") if sub in files else (target, alias.name))
            elif isinstance(node, ast.Import):
                edges += [(a.name, "") for a in node.names if a.name.startswith("effc")]
        graph[mod] = [(m, n) for m, n in edges if m in files and m != mod]
    return graph


def test_no_import_cycles():
    graph = {m: {t for t, _ in edges} for m, edges in _imports().items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_from_another_package():
    def package(mod):
        return mod.split(".")[1] if mod.count(".") else ""
    bad = [f"{mod} imports {name} from {target}" for mod, edges in _imports().items() for target, name in edges
           if name.startswith("_") and not name.startswith("__") and package(target) != package(mod)]
    assert not bad, "\n".join(bad)


def test_the_cli_shows_exactly_the_pipeline():
    from effc.tools.cli import STAGES
    assert STAGES[1:-2] == tuple(p.name for p in PIPELINE)
    assert len({p.name for p in PIPELINE}) == len(PIPELINE)


def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    """The checker itself finds a cycle when one is planted (a check that cannot fail proves nothing)."""
    pkg = tmp_path / "effc"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from . import y\n")
    (pkg / "a" / "y.py").write_text("def f():\n    from .x import g\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "effc.a.x" in str(e) and "effc.a.y" in str(e)
    else:
        raise AssertionError("a planted cycle was not found")

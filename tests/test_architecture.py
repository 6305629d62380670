"""The engine's shape: no import cycles inside dtm_core (imports inside functions included), the
engine never imports the UI, and the app and the CLI hold no engine logic of their own."""
import ast
import re
from pathlib import Path

from conftest import ROOT

PKG = ROOT / "dtm_core"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the dtm_core modules it imports, anywhere in its body."""
    mods = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                # "from . import x" names a submodule when one exists, else an attribute
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in mods else stem
                           for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith("dtm_core"):
                    graph[mod].add(t)
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = 2
        stack.pop()
        return None
    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def reachable(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()]:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_no_import_cycles_in_the_engine():
    graph = import_graph()
    assert len(graph) > 20 and "dtm_core.cli" in graph["dtm_core.__main__"]
    # every command goes through the one job layer (the app's too)
    commands = [m for m in graph if m.startswith("dtm_core.cli.") and m != "dtm_core.cli.options"]
    assert len(commands) >= 8
    for mod in commands:
        assert "dtm_core.jobs" in reachable(graph, mod), mod
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    # the check itself must be able to fail: a function-level import back is a cycle too
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(g) == ["a", "b", "c", "a"]
    src = "def f():\n    from .divergence import divergence\n"
    tree = ast.parse(src)
    assert any(isinstance(n, ast.ImportFrom) and n.module == "divergence" and n.level == 1
               for n in ast.walk(tree))


def test_engine_never_imports_the_ui():
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                assert not n.startswith(("gradio", "plotly", "ui", "app")), (path, n)


METHOD_BRANCH = re.compile(r"""(==|!=|\bin)\s*\(?\s*["'](none|magnitude|nm|wanda|int|w8a8)["']""")


def test_no_engine_branches_on_a_method_name():
    """Outside its own file in dtm_core/methods/, no code compares anything to a method's name:
    the engine and the UI ask the registry (the check must be able to fail: see below)."""
    assert METHOD_BRANCH.search('if spec.method == "wanda":')
    assert METHOD_BRANCH.search("if head in ('magnitude', 'wanda'):")
    files = [p for p in PKG.rglob("*.py") if p.parent.name != "methods"]
    files += list((ROOT / "ui").rglob("*.py")) + [ROOT / "app.py"]
    hits = [f"{p.name}: {m.group(0)}" for p in files for m in METHOD_BRANCH.finditer(p.read_text())]
    assert hits == []


def test_no_file_over_500_lines():
    files = list(PKG.rglob("*.py")) + list((ROOT / "ui").rglob("*.py")) + [ROOT / "app.py"]
    long = {str(p.relative_to(ROOT)): n for p in files
            if (n := len(p.read_text().splitlines())) > 500}
    assert len(files) > 60 and long == {}


def test_engine_is_in_packages_by_concern():
    """The top of dtm_core holds only the job layer and what every package uses; every other
    module lives in the package of its concern."""
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "distributed.py", "errors.py", "jobs.py",
                   "moved.py", "plugins.py", "progress.py", "registry.py"]
    packages = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["analysis", "cli", "compression", "measure", "models", "planning"]


LAYERS = ["models", "compression", "measure", "analysis", "planning"]


def test_packages_import_only_the_packages_below_them():
    """models < compression < measure < analysis < planning < jobs < cli: a package never
    imports one above it (the shared top-level modules errors, progress, distributed, plugins
    are below all of them), so a reader can walk the engine bottom up."""
    graph = import_graph()

    def rank(mod: str) -> int:
        part = mod.split(".")[1] if mod.count(".") else ""
        if part in LAYERS:
            return LAYERS.index(part) + 1
        return {"jobs": 10, "cli": 11, "__main__": 12, "registry": 11}.get(part, 0)
    upward = [f"{m} -> {n}" for m, deps in graph.items() for n in deps
              if rank(n) > rank(m)]
    assert upward == []

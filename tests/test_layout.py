"""The layout rule: the method at the root, the machinery below it, imports from the machinery to
the method and never back, no import cycle among the project's modules."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD = {"model", "kvshare", "distill", "data", "world"}      # and train, eval: the entry points
ROOT_FILES = METHOD | {"train", "eval"}


def project_modules():
    """{dotted name: path} of every project module but the tests."""
    found = {}
    for folder in ("", "scale", "plumbing", "tools"):
        for f in sorted(os.listdir(os.path.join(ROOT, folder) or ROOT)):
            if f.endswith(".py") and f != "__init__.py":
                name = f[:-3] if not folder else f"{folder}.{f[:-3]}"
                found[name] = os.path.join(ROOT, folder, f)
    return found


def imports_of(path, known):
    """The project modules a file imports (any nesting level)."""
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                 if isinstance(node, ast.ImportFrom) and node.module else [])
        for n in names:
            if n in known:
                out.add(n)
            elif n.split(".")[0] in ("scale", "plumbing", "tools") and n in known:
                out.add(n)
    return out


def test_the_root_holds_the_method():
    root_py = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert root_py == ROOT_FILES, sorted(root_py ^ ROOT_FILES)
    assert not os.path.exists(os.path.join(ROOT, "RESULTS.md"))
    assert os.path.isfile(os.path.join(ROOT, "docs", "RESULTS.md"))


def test_the_method_imports_only_the_method():
    modules = project_modules()
    for name in sorted(METHOD):
        outside = imports_of(modules[name], modules) - METHOD
        assert not outside, f"{name}.py imports {sorted(outside)}: the method imports only itself"


def test_no_import_cycle():
    # tools/*.py import each other by bare name (their folder is on sys.path): map those too
    modules = project_modules()
    known = {**modules, **{n.split(".")[1]: p for n, p in modules.items() if n.startswith("tools.")
                           and n.split(".")[1] not in modules}}
    graph = {n: {m if m in modules else f"tools.{m}" for m in imports_of(p, known)} - {n}
             for n, p in modules.items()}
    state = {}

    def visit(n, path):
        if state.get(n) == "done":
            return
        assert state.get(n) != "open", "import cycle: " + " -> ".join(path + [n])
        state[n] = "open"
        for m in sorted(graph.get(n, ())):
            visit(m, path + [n])
        state[n] = "done"
    for n in sorted(graph):
        visit(n, [])

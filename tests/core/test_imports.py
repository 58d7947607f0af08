"""The package's import graph: no cycles, and every import goes down the layers (the server never imports
the CLI, the engine never imports the server, the scheduler never imports the engine). Every import counts,
also one inside a function (a lazy import is still a dependency)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "niyama"

# Lowest first; a module may import its own layer or a lower one. A top-level module or a package by name.
LAYERS = [
    {"messages", "options", "qos", "request", "kv", "running", "predictor"},
    {"scheduler"},
    {"replica", "workload", "metrics"},
    {"sim", "loadgen"},
    {"engine", "cluster", "experiments", "routing"},
    {"server"},
    {"cli"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The niyama modules `name` imports: `from .x import y` names x, and also x.y when y is a module;
    `from . import y` names only the module y."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & MODULES.keys()
            out |= subs
            if len(subs) < len(node.names):
                out.add(target)
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def layer(name: str) -> int:
    parts = name.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for k, group in enumerate(LAYERS):
        if key in group:
            return k
    raise AssertionError(f"{name} is in no layer of tests/core/test_imports.py: add it where it belongs")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_graph_is_read():
    assert len(MODULES) > 80
    assert "niyama.engine.engine" in GRAPH["niyama.server.engine_core"] or \
        "niyama.engine" in GRAPH["niyama.server.engine_core"]
    assert "niyama.messages" in GRAPH["niyama.server.engine_core"]


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_go_down_the_layers():
    upward = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() if a != "niyama" for b in targets
                    if b != "niyama" and layer(b) > layer(a))
    assert upward == []


def test_the_engine_core_uses_only_the_engines_own_surface():
    """The server's engine loop reads nothing inside LLMEngine: no scheduler, replica, predictor, executor or
    allocator attribute anywhere in engine_core.py (LLMEngine offers stats, load_report, admit, ...)."""
    tree = ast.parse((PACKAGE / "server" / "engine_core.py").read_text())
    inner = {"scheduler", "replica", "predictor", "executor", "allocator", "kv", "decodes"}
    reached = sorted({f"line {n.lineno}: .{n.attr}" for n in ast.walk(tree)
                      if isinstance(n, ast.Attribute) and n.attr in inner})
    assert reached == []

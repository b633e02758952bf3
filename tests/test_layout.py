"""The package's shape is its architecture: each layer imports only the layers below it,
no modules import each other in a circle (imports inside functions included), and no
module outgrows 500 lines."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mergesearch"

# lowest first; a module may import its own layer and the ones below it
LAYERS = [
    {"errors", "fsutil", "config", "console", "progress"},  # foundations: no knowledge of merging
    {"methods"},  # merge methods: pure functions on tensors
    {"recipe", "sources"},  # one merge, its YAML and mergekit's; model references (folders, Hub IDs, adapters)
    {"engine"},  # checkpoints, placement, materializing and writing merges
    {"evaluate"},  # lm-eval defines the task, we compute
    {"runs"},  # the store (typed records), export, report
    {"search", "zoo"},  # the search (Optuna, Ray) and the bundled zoo
    {"cli"},  # the command line: nothing imports it
]


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node, except those under ``if TYPE_CHECKING:`` (names for type hints only,
    never imported when the program runs)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in ast.walk(child))
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports when it runs, anywhere in its body."""
    graph = {}
    for name, f in mods.items():
        deps = set()
        for node in _runtime_nodes(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mergesearch"):
                for a in node.names:  # `from mergesearch.x import y` imports the module x.y when there is one
                    deps.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("mergesearch")}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    if top == "__init__":
        return 0
    return next(k for k, names in enumerate(LAYERS) if top in names)


def test_every_module_belongs_to_a_layer():
    tops = {m.split(".")[1] for m in _modules() if "." in m}
    assert tops <= set().union(*LAYERS), tops - set().union(*LAYERS)


def test_each_layer_imports_only_the_layers_below_it():
    graph = _imports(_modules())
    upward = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if _layer(b) > _layer(a))
    assert upward == []


def test_no_import_circles():
    graph = _imports(_modules())
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_no_module_over_500_lines():
    long = {name: n for name, f in _modules().items() if (n := len(f.read_text().splitlines())) > 500}
    assert long == {}

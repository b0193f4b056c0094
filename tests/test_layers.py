"""The architecture, checked from the source (docs/architecture.md, "Architecture").

Every module under ``src/privseg`` is parsed with :mod:`ast` (nothing is imported). Each
package has a layer; a module imports only from its own layer or the ones below it, whether
the import is at module level or inside a function (a lazy import is still a dependency).
Packages do not import each other in a cycle, and no function is over 100 lines.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "privseg"

# bottom to top; a package may import from its own layer and every layer below it
LAYERS: dict[str, int] = {
    "data": 1,
    "models": 2, "train": 2,
    "privacy": 3,
    "federated": 4,
    "audit": 5,                  # membership tests, ledger, certificates: what verifies an erasure
    "unlearn": 6,
    "report": 7,
    "cli": 8, "console": 8,
    # the package's top-level modules
    "errors": 0, "utils": 0,     # shared helpers every layer may use
    "__init__": 0,               # privseg/__init__.py re-exports the errors only
    "cohorts": 7, "runs": 7,     # cohorts and runs as every entry point opens and drives them: they compose
                                 # data, train, federated, unlearn and audit, and the text reports use them
    "__main__": 8,               # `python -m privseg` is the command line
}
# within a layer, the directions the architecture rules out as well
FORBIDDEN_SAME_LAYER = {("models", "train")}  # models do not import train (checkpoints live in train)

# (importing module, imported module) pairs that break the layering on purpose; each with its reason.
ALLOWED: dict[tuple[str, str], str] = {}

MAX_FUNCTION_LINES = 100


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def _is_package(module: str) -> bool:
    return MODULES.get(module, Path()).name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if _is_package(module) else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, tree: ast.Module | None = None) -> list[tuple[int, str]]:
    """(line, imported privseg module) for every import in ``module`` (its source parsed as
    ``tree``, by default the file's), lazy ones included."""
    out = []
    for node in ast.walk(TREES[module] if tree is None else tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for a in node.names:  # `from privseg.console import erasure` imports a module
                sub = f"{target}.{a.name}"
                out.append((node.lineno, sub if sub in MODULES else target))
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))
              and getattr(node.func, "id", getattr(node.func, "attr", None)) in ("__import__", "import_module")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
    return sorted({(line, name) for line, name in out if name == "privseg" or name.startswith("privseg.")})


def package(module: str) -> str:
    """The layer-bearing part of a module name: privseg.train.loop -> train; privseg -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_layer():
    assert {package(m) for m in MODULES} <= set(LAYERS), set(map(package, MODULES)) - set(LAYERS)


def test_no_import_from_a_higher_layer():
    bad = []
    for module in MODULES:
        src = package(module)
        for line, target in imports(module):
            dst = package(target)
            if dst == src or (module, target) in ALLOWED or src not in LAYERS or dst not in LAYERS:
                continue  # a package without a layer fails test_every_package_has_a_layer
            if LAYERS[dst] > LAYERS[src] or (src, dst) in FORBIDDEN_SAME_LAYER:
                bad.append(f"{MODULES[module].relative_to(SRC.parent)}:{line}: {module} ({src}, layer "
                           f"{LAYERS[src]}) imports {target} ({dst}, layer {LAYERS[dst]})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], str] = {}
    for module in MODULES:
        for line, target in imports(module):
            a, b = package(module), package(target)
            if a != b and (module, target) not in ALLOWED:
                graph[a].add(b)
                where.setdefault((a, b), f"{MODULES[module].relative_to(SRC.parent)}:{line} imports {target}")
    cycles = _cycles(graph)
    detail = [f"{' <-> '.join(c)}: " + "; ".join(where[(a, b)] for a in c for b in c if (a, b) in where)
              for c in cycles]
    assert not cycles, "import cycles between packages:\n" + "\n".join(detail)


def test_no_function_over_100_lines():
    long = []
    for module, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{MODULES[module].relative_to(SRC.parent)}:{node.lineno}: {node.name} is {n} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_the_checks_see_what_they_should():
    """The checks themselves: lazy, relative and dynamic imports are found, and a planted cycle is one."""
    planted = ast.parse("import os\n"
                        "from privseg.console import erasure\n"
                        "def f():\n"
                        "    from privseg.unlearn.federated import erase\n"
                        "    from ..report import tracking\n"
                        "    return __import__('privseg.audit.mia', fromlist=['x'])\n")
    assert [t for _, t in imports("privseg.train.loop", planted)] == [
        "privseg.console.erasure", "privseg.unlearn.federated", "privseg.report.tracking", "privseg.audit.mia"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []

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

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = SRC / "privseg"

# bottom to top; a package may import from its own layer and every layer below it
LAYERS: dict[str, int] = {
    "data": 1,
    "models": 2, "train": 2,
    "privacy": 3,
    "federated": 4,
    "audit": 5,                  # membership tests, ledger, certificates: what verifies an erasure
    "unlearn": 6,                # the central unlearning engine and its strategies
    "erasure": 7,                # a forget request: federated (and central) erasure, verification, certificate record
    "report": 8,
    "export": 8,                 # the served model as bundle/TorchScript/ONNX, its card from the ledgers
    "cli": 9, "console": 9,
    # the package's top-level modules
    "errors": 0, "utils": 0,     # shared helpers every layer may use
    "__init__": 0,               # privseg/__init__.py re-exports the errors only
    "cohorts": 8, "runs": 8,     # cohorts and runs as every entry point opens and drives them: they compose
                                 # data, train, federated, unlearn, erasure and audit, and the text reports use them
    "__main__": 9,               # `python -m privseg` is the command line
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


def _import_cycles(edge) -> list[str]:
    """The cycles of the graph whose edges are ``edge(module, imported)`` (None: no edge) over every
    import, lazy ones included; each with the imports that make it."""
    graph: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], str] = {}
    for module in MODULES:
        for line, target in imports(module):
            e = edge(module, target)
            if e:
                graph[e[0]].add(e[1])
                where.setdefault(e, f"{MODULES[module].relative_to(SRC.parent)}:{line} imports {target}")
    return [f"{' <-> '.join(c)}: " + "; ".join(where[(a, b)] for a in c for b in c if (a, b) in where)
            for c in _cycles(graph)]


def test_no_import_cycle_between_packages():
    def edge(module: str, target: str) -> tuple[str, str] | None:
        a, b = package(module), package(target)
        return (a, b) if a != b and (module, target) not in ALLOWED else None

    cycles = _import_cycles(edge)
    assert not cycles, "import cycles between packages:\n" + "\n".join(cycles)


def test_no_import_cycle_between_files():
    """Nor between modules, even when an import inside a function hides it (a package's
    ``__init__`` only re-exports: an import of the package is left out)."""
    def edge(module: str, target: str) -> tuple[str, str] | None:
        files = target in MODULES and not _is_package(module) and not _is_package(target)
        return (module, target) if files and module != target else None

    cycles = _import_cycles(edge)
    assert not cycles, "import cycles between files:\n" + "\n".join(cycles)


def test_no_module_imports_a_private_name_of_another():
    """An underscore name is its module's own: what another module needs gets a public name."""
    private = []
    for module, tree in TREES.items():
        for node in ast.walk(tree):
            target = _resolve(module, node) if isinstance(node, ast.ImportFrom) else ""
            if target.startswith("privseg") and target != module:
                private += [f"{MODULES[module].relative_to(SRC.parent)}:{node.lineno} imports {target}.{a.name}"
                            for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, "imports of another module's private names:\n" + "\n".join(private)




def test_an_import_inside_a_function_says_why():
    """A ``# why:`` comment on the import's line or on the comment lines just above its block of imports."""
    silent = []
    for module, tree in TREES.items():  # every module: a lazy import says why (heavy optional dependency, layering)
        lines = MODULES[module].read_text().splitlines()
        lazy = {x.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                for x in ast.walk(f) if isinstance(x, (ast.Import, ast.ImportFrom))}
        for line in sorted(lazy):
            i = line - 1
            while i > 0 and (i + 1 in lazy or lines[i - 1].strip().startswith("#")) and "# why" not in lines[i]:
                i -= 1
            if "# why" not in lines[i]:
                silent.append(f"{MODULES[module].relative_to(SRC.parent)}:{line}: {lines[line - 1].strip()}")
    assert not silent, "imports inside functions that do not say why:\n" + "\n".join(silent)


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
                        "    from privseg.erasure.federated import erase\n"
                        "    from ..report import tracking\n"
                        "    return __import__('privseg.audit.mia', fromlist=['x'])\n")
    assert [t for _, t in imports("privseg.train.loop", planted)] == [
        "privseg.console.erasure", "privseg.erasure.federated", "privseg.report.tracking", "privseg.audit.mia"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# -- privseg.privacy knows nothing of Flower ---------------------------------------------------------------
# The DP math (clipping, noise, accounting, the ledger, the DP-FedAvg mechanism) is Flower-free; the Flower
# glue -- the strategy wrapper of client-level DP, the sites' DP step -- lives in privseg.federated.

def library_imports(tree: ast.Module, top: str) -> list[tuple[int, str]]:
    """(line, module) for every import of the library ``top`` in ``tree``, lazy and dynamic ones included."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.append((node.lineno, node.module or ""))
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))
              and getattr(node.func, "id", getattr(node.func, "attr", None)) in ("__import__", "import_module")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
    return sorted((line, name) for line, name in out if name == top or name.startswith(top + "."))


def test_privacy_does_not_import_flower():
    bad = [f"{MODULES[m].relative_to(SRC.parent)}:{line} imports {name}" for m in MODULES if package(m) == "privacy"
           for line, name in library_imports(TREES[m], "flwr")]
    assert not bad, "privseg.privacy imports Flower (its glue belongs in privseg.federated):\n" + "\n".join(bad)
    planted = ast.parse("import flwrx\n"
                        "def f():\n"
                        "    from flwr.app import Array\n"
                        "    import flwr\n"
                        "    return importlib.import_module('flwr.simulation')\n")
    assert [n for _, n in library_imports(planted, "flwr")] == ["flwr.app", "flwr", "flwr.simulation"]


# -- no block of six lines written twice (src and tests) -------------------------------------------------
REPEAT_LINES = 6
TESTS = Path(__file__).resolve().parents[1]  # tests/


def _significant(path: Path) -> list[tuple[int, str]]:
    """(line number, folded text) of the lines that carry code: no blanks, comments, imports or lone
    punctuation (what a copy shares that matters)."""
    out = []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        text = " ".join(line.split())
        if (not text or text.startswith(("#", "import ", "from ")) or not any(c.isalnum() for c in text)):
            continue
        out.append((no, text))
    return out


def repeated_blocks(paths: list[Path], size: int = REPEAT_LINES) -> list[str]:
    """Each run of ``size`` significant lines that stands again in another place (the same file counts
    when the two runs do not overlap)."""
    first: dict[tuple[str, ...], tuple[Path, int, int]] = {}
    out = []
    for path in paths:
        lines = _significant(path)
        for i in range(len(lines) - size + 1):
            block = tuple(text for _, text in lines[i:i + size])
            if block not in first:
                first[block] = (path, i, lines[i][0])
            elif first[block][0] != path or i - first[block][1] >= size:
                out.append(f"{path}:{lines[i][0]} repeats {first[block][0]}:{first[block][2]}")
    return out


def test_no_block_of_six_lines_repeated_in_src_or_tests():
    paths = sorted(PKG.rglob("*.py")) + sorted(TESTS.rglob("*.py"))
    found = repeated_blocks(paths)
    assert not found, "blocks of six or more lines written twice:\n" + "\n".join(found[:20])


def test_the_repeat_check_sees_a_copy(tmp_path):
    body = "\n".join(f"x{i} = f({i})" for i in range(6))
    (tmp_path / "a.py").write_text(body + "\n")
    (tmp_path / "b.py").write_text("y = 1\n\n# a comment\n" + body + "\n")
    found = repeated_blocks([tmp_path / "a.py", tmp_path / "b.py"])
    assert found == [f"{tmp_path / 'b.py'}:4 repeats {tmp_path / 'a.py'}:1"]
    assert repeated_blocks([tmp_path / "a.py"]) == []
    (tmp_path / "c.py").write_text(body.replace("x5", "z5") + "\n")  # five lines alike are not a copy
    assert repeated_blocks([tmp_path / "a.py", tmp_path / "c.py"]) == []


# -- the privacy spec's path: from --epsilon on the command line to the ledger ---------------------------
# The modules outside privseg.privacy that touch the spec (DPConfig) on its way from `privseg fl run/deploy
# --dp ... --epsilon E` to the site's ledger: the options, the command, the assembly that builds and checks
# the spec, the federated config that keeps it, and the one federated module that sends it to the sites and
# hands it to privseg.privacy.make_private. The ServerApp and ClientApp never read it themselves.
EPSILON_PATH = ["privseg.cli.ui", "privseg.cli.fl", "privseg.federated.assemble", "privseg.federated.config",
                "privseg.federated.private"]
# `privseg privacy train --dp patient`: the options, then privacy.central (train_private) books the ledger
CENTRAL_EPSILON_PATH = ["privseg.cli.ui", "privseg.cli.privacy"]
MAX_EPSILON_FILES = 5
SPEC_NAMES = {"DPConfig", "dp_from_options", "to_run_config", "from_run_config", "DP"}  # DP: the CLI option group


def touches_spec(tree: ast.Module) -> list[str]:
    """What in ``tree`` handles the privacy spec: the spec type, building it from options or from the
    run configuration, the CLI's DP option group, a config's ``.privacy`` field or a ``privacy=`` argument."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in SPEC_NAMES:
            found.append(node.id)
        elif isinstance(node, ast.Attribute) and (node.attr in SPEC_NAMES or (
                node.attr == "privacy" and not (isinstance(node.value, ast.Name) and node.value.id == "privseg"))):
            found.append("." + node.attr)
        elif isinstance(node, ast.alias) and node.name.split(".")[-1] in SPEC_NAMES:
            found.append(node.name)
        elif isinstance(node, ast.FunctionDef) and node.name in SPEC_NAMES:
            found.append(f"def {node.name}")
        elif isinstance(node, ast.keyword) and node.arg == "privacy":
            found.append("privacy=")
    return found


def test_epsilon_reaches_the_ledger_through_at_most_five_files():
    """Every module of the command line, the federated package, the train layer and the top-level
    run/cohort helpers that touches the privacy spec is on one of the two paths, each of at most five
    files outside privseg.privacy; a sixth module reading the spec on the way fails here."""
    assert len(EPSILON_PATH) <= MAX_EPSILON_FILES and len(CENTRAL_EPSILON_PATH) <= MAX_EPSILON_FILES
    on_the_way = [m for m in MODULES if package(m) in ("cli", "federated", "train", "runs", "cohorts")]
    touching = {m: touches_spec(TREES[m]) for m in on_the_way}
    touching = {m: what for m, what in touching.items() if what}
    assert set(touching) == set(EPSILON_PATH) | set(CENTRAL_EPSILON_PATH), (
        "modules touching the privacy spec on its way to the ledger: "
        + "; ".join(f"{m}: {sorted(set(w))}" for m, w in sorted(touching.items())))
    # a chain: each module and the next are linked by an import (one way or the other), and the last
    # one hands the spec to privseg.privacy (make_private, the ledger)
    for path in (EPSILON_PATH, CENTRAL_EPSILON_PATH):
        for a, b in zip(path, path[1:], strict=False):
            assert b in {t for _, t in imports(a)} or a in {t for _, t in imports(b)}, f"{a} and {b} are not linked"
        assert any(t.startswith("privseg.privacy") for _, t in imports(path[-1])), path[-1]
    planted = ast.parse("def f(cfg):\n    return cfg.privacy.epsilon\n")
    assert touches_spec(planted) == [".privacy"] and touches_spec(ast.parse("import privseg.privacy\n"
                                                                            "privseg.privacy.epsilon\n")) == []


# -- a thin command line ---------------------------------------------------------------------------------
# What is left in privseg/cli is parsing and printing: options with their help texts, the commands'
# docstrings (their --help), imports and blank lines. Run assembly, outcome checks, parameter parsing and
# serving the console live in the library, and the options that set a field of TrainConfig, DPConfig,
# FLConfig or ErasureRequest take their default and help from that field (cli.ui.options_from;
# docs/architecture.md). Issue 31 made 880 lines the ceiling (issue 15's 600 target is dropped).
CLI_MAX_LINES = 880


def cli_lines() -> int:
    return sum(len(p.read_text().splitlines()) for p in (PKG / "cli").glob("*.py"))


def test_the_cli_stays_thin():
    assert cli_lines() <= CLI_MAX_LINES, f"privseg/cli has {cli_lines()} lines (ceiling {CLI_MAX_LINES})"

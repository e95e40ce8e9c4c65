"""The dependency rule of the `harness` package, written down in LAYERS and checked with `ast`.

The README points here; the second test proves the checker on a fake package."""

from __future__ import annotations

import ast
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

LAYERS: tuple[str, ...] = (
    "harness harness.core",  # 0
    "harness.data",  # 1
    "harness.stats",  # 2
    "harness.models",  # 3
    "harness.generate | harness.judging",  # 4
    "harness.train",  # 5
    "harness.store",  # 6
    "harness.tasks",  # 7
    "harness.report",  # 8
    "harness.run",  # 9
    "harness.cli harness.__main__",  # 10
)
"""The layers of `harness`, lowest first; a module may import from its own package and lower layers.

Each entry is one layer. Names separated by spaces form one package for this rule (they may import
each other); packages separated by `|` are peers on the same layer and may not import each other.
A name covers that module and everything under it, except the root name `harness` alone, which
covers only the root `__init__.py` (so `harness.__main__` sits on the top layer with the CLI).

Checked for every import statement, wherever it appears (imports under `if TYPE_CHECKING:` are
ignored, since they never run):

1. no import from a higher layer, nor from a peer package on the same layer;
2. no import cycle between modules (imports inside functions count, so hidden cycles show);
3. no private name (`_x`, not `__x__`) taken from another harness module, neither
   `from harness.m import _x` nor `alias._x` where `alias` is an imported harness module;
4. an import inside a function is only there to keep a HEAVY third-party package off a light
   path: it imports a HEAVY package, or a harness module whose top-level imports reach one.

Modules loaded by name through importlib (the plug-in maps) are not import statements: fine.
"""

# Third-party packages that are slow to import; only these may be imported inside a function.
# Measured with `.venv/bin/python -X importtime -c "import X"` on the CPU dev box (Python 3.11,
# best of 5-10 runs, interpreter start-up excluded; the box is shared, so +-30%):
#   peft 3160 ms, torch 880-1280, sklearn.linear_model 990, scipy.stats 570-640 (scipy.sparse
#   150-190), openai 430-570, transformers 530, matplotlib.pyplot 300-510, pandas 290-300,
#   lm_eval.api.model 170-230 (bare lm_eval 25-35, but the project imports lm_eval.api.*),
#   huggingface_hub.hf_hub_download 100-150 (the bare package is lazy, 3 ms), gguf 80-130,
#   numpy 60-115, httpx2 (the openai client's HTTP library) 53-57.
#   vllm is not installed on CPU; it imports torch, so it is at least as slow.
# Left out as light: jinja2 28-46 ms and tqdm 30-41 ms (borderline, and both only ever imported
# at module top), safetensors 1 ms (and not imported by harness), the standard library
# (json 1 ms, subprocess 3 ms, importlib.metadata 19 ms).
HEAVY: frozenset[str] = frozenset(
    {
        "gguf",
        "httpx2",
        "huggingface_hub",
        "lm_eval",
        "matplotlib",
        "numpy",
        "openai",
        "pandas",
        "peft",
        "scipy",
        "sklearn",
        "torch",
        "transformers",
        "vllm",
    }
)

PACKAGE = "harness"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

KINDS: dict[str, str] = {
    "layer": "imports from a higher layer or a peer package (or outside LAYERS)",
    "cycle": "import cycles between modules",
    "private": "private names taken from another module",
    "inner": "imports inside a function that keep no heavy package off a light path",
}


@dataclass(frozen=True)
class Import:
    """One imported name of one import statement, resolved to an absolute module name."""

    line: int
    target: str  # a module of the package, or a third-party/stdlib dotted name
    internal: bool  # target is (or should be) a module of the package
    statement: str  # the statement as written, for messages
    in_function: bool
    private_name: str | None = None  # `_y` in `from pkg.m import _y`


@dataclass
class Module:
    """A module of the scanned package: its name, file, syntax tree and resolved imports."""

    name: str
    path: str  # relative to the package's parent, for messages
    tree: ast.Module
    imports: list[Import] = field(default_factory=list)


@dataclass(frozen=True)
class Violation:
    """One break of the rule, at a place in a file."""

    kind: str  # a key of KINDS
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nodes(node: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every node under `node` and whether it runs inside a function; skips TYPE_CHECKING bodies."""
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children: Sequence[ast.AST] = node.orelse
    else:
        children = list(ast.iter_child_nodes(node))
    for child in children:
        inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
        yield child, inner
        yield from _nodes(child, inner)


def _dotted(node: ast.expr) -> str | None:
    """`a.b.c` for a chain of attribute accesses on a name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def scan_package(root: Path, package: str) -> dict[str, Module]:
    """Parse every module under `root` (the folder of `package`) and resolve its imports."""
    modules: dict[str, Module] = {}
    for file in sorted(root.rglob("*.py")):
        parts = file.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join((package, *parts))
        rel = f"{package}/{file.relative_to(root).as_posix()}"
        modules[name] = Module(name, rel, ast.parse(file.read_text(), filename=str(file)))
    for module in modules.values():
        module.imports = list(_imports(module, package, modules))
    return modules


def _from_base(node: ast.ImportFrom, module: Module) -> str:
    """The absolute module that `from <base> import ...` names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    parts = module.name.split(".")
    if not module.path.endswith("/__init__.py"):
        parts = parts[:-1]  # a plain module's relative imports start from its package
    base = ".".join(parts[: len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def _imports(module: Module, package: str, modules: dict[str, Module]) -> Iterator[Import]:
    def internal(name: str) -> bool:
        return name == package or name.startswith(package + ".")

    for node, in_function in _nodes(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(
                    node.lineno, alias.name, internal(alias.name), ast.unparse(node), in_function
                )
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield Import(
                    node.lineno,
                    sub if sub in modules else base,
                    internal(base),
                    ast.unparse(node),
                    in_function,
                    alias.name if _is_private(alias.name) else None,
                )


def _unit_of(name: str, package: str, layers: Sequence[str]) -> tuple[int, int] | None:
    """(layer, peer index) of the LAYERS entry covering module `name` (longest name wins)."""
    best: tuple[int, int, int] | None = None  # (len, layer, peer)
    for layer, entry in enumerate(layers):
        for peer, names in enumerate(entry.split("|")):
            for prefix in names.split():
                covers = name == prefix or (prefix != package and name.startswith(prefix + "."))
                if covers and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), layer, peer)
    return None if best is None else best[1:]


def layer_violations(
    modules: dict[str, Module], package: str, layers: Sequence[str]
) -> list[Violation]:
    """Rule 1: imports reach only the importer's own package and lower layers."""
    found = []
    for module in modules.values():
        own = _unit_of(module.name, package, layers)
        if own is None:
            found.append(Violation("layer", module.path, 1, f"{module.name} is in no layer"))
            continue
        for imp in module.imports:
            if not imp.internal:
                continue
            if imp.target not in modules:
                msg = f"`{imp.statement}`: {imp.target} is not a module of {package}"
                found.append(Violation("layer", module.path, imp.line, msg))
                continue
            other = _unit_of(imp.target, package, layers)
            if other is None or other == own or other[0] < own[0]:
                continue  # a module in no layer is reported once, above
            how = "a peer on the same layer" if other[0] == own[0] else "a higher layer"
            msg = f"{module.name} (layer {own[0]}) imports {imp.target} (layer {other[0]}): {how}"
            found.append(Violation("layer", module.path, imp.line, msg))
    return found


def _graph(modules: dict[str, Module]) -> dict[tuple[str, str], tuple[str, int, bool]]:
    """Module-level import edges (every import, wherever it is) -> where the first one is."""
    edges: dict[tuple[str, str], tuple[str, int, bool]] = {}
    for module in modules.values():
        for imp in module.imports:
            if imp.internal and imp.target in modules and imp.target != module.name:
                edge = (module.name, imp.target)
                edges.setdefault(edge, (module.path, imp.line, imp.in_function))
    return edges


def _cycles(graph: dict[str, set[str]], limit: int = 500) -> Iterator[list[str]]:
    """Every elementary cycle once, as a path from its smallest module back to it."""
    callers: dict[str, set[str]] = {name: set() for name in graph}
    for src, dsts in graph.items():
        for dst in dsts:
            callers[dst].add(src)
    for start in sorted(graph):
        # The search keeps to modules after `start` that can get back to it: no dead ends.
        back = {start}
        todo = [start]
        while todo:
            for src in callers[todo.pop()]:
                if src > start and src not in back:
                    back.add(src)
                    todo.append(src)
        for count, cycle in enumerate(_paths_back(graph, [start], back)):
            if count >= limit:
                raise AssertionError(f"over {limit} import cycles through {start}")
            yield cycle


def _paths_back(graph: dict[str, set[str]], path: list[str], back: set[str]) -> Iterator[list[str]]:
    """The simple paths that extend `path` within `back` and return to its first module."""
    for nxt in sorted(graph[path[-1]]):
        if nxt == path[0]:
            yield [*path, nxt]
        elif nxt in back and nxt not in path:
            yield from _paths_back(graph, [*path, nxt], back)


def cycle_violations(modules: dict[str, Module]) -> list[Violation]:
    """Rule 2: no cycles in the module graph, imports inside functions included."""
    edges = _graph(modules)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for src, dst in edges:
        graph[src].add(dst)
    found = []
    for cycle in _cycles(graph):
        steps = [edges[pair] for pair in zip(cycle, cycle[1:], strict=False)]
        where = ", ".join(f"{p}:{n}{' (in a function)' if f else ''}" for p, n, f in steps)
        msg = f"{' -> '.join(cycle)}  [{where}]"
        found.append(Violation("cycle", steps[0][0], steps[0][1], msg))
    return found


def private_violations(modules: dict[str, Module]) -> list[Violation]:
    """Rule 3: no `from pkg.m import _x`, no `m._x` on an imported module of the package."""
    found = []
    for module in modules.values():
        taken: dict[tuple[int, str], list[str]] = {}  # (line, module) -> private names
        for imp in module.imports:
            if imp.internal and imp.private_name and imp.target != module.name:
                taken.setdefault((imp.line, imp.target), []).append(imp.private_name)
        for (line, target), names in taken.items():
            msg = f"`from {target} import` takes {', '.join(names)}"
            found.append(Violation("private", module.path, line, msg))
        bound = _module_bindings(module, modules)
        for node, _ in _nodes(module.tree):
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            dotted = _dotted(node.value)
            if dotted is None:
                continue
            head, _, rest = dotted.partition(".")
            if head not in bound:
                continue
            owner = f"{bound[head]}.{rest}" if rest else bound[head]
            if owner in modules and owner != module.name:
                msg = f"`{dotted}.{node.attr}` takes {node.attr} from {owner}"
                found.append(Violation("private", module.path, node.lineno, msg))
    return found


def _module_bindings(module: Module, modules: dict[str, Module]) -> dict[str, str]:
    """Names this module binds to modules of the package by importing them (any scope)."""
    bound: dict[str, str] = {}
    for node, _ in _nodes(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in modules:
                    bound[alias.asname] = alias.name
                elif not alias.asname and alias.name.split(".")[0] in modules:
                    bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, module)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
    return bound


def _heavy_reached(name: str, modules: dict[str, Module], heavy: frozenset[str]) -> str | None:
    """A HEAVY package that importing module `name` loads, following top-level imports only.

    Importing a module also runs its parent packages' `__init__`, so those are followed too.
    """
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen or current not in modules:
            continue
        seen.add(current)
        parent = current.rpartition(".")[0]
        if parent:
            todo.append(parent)
        for imp in modules[current].imports:
            if imp.in_function:
                continue
            if imp.internal:
                todo.append(imp.target)
            elif imp.target.split(".")[0] in heavy:
                return imp.target.split(".")[0]
    return None


def inner_import_violations(modules: dict[str, Module], heavy: frozenset[str]) -> list[Violation]:
    """Rule 4: an import inside a function keeps a HEAVY package off a light path."""
    found = []
    for module in modules.values():
        for imp in module.imports:
            if not imp.in_function:
                continue
            if not imp.internal:
                if imp.target.split(".")[0] in heavy:
                    continue
                why = f"{imp.target} is not a HEAVY package"
            elif imp.target not in modules or _heavy_reached(imp.target, modules, heavy):
                continue  # a missing module is a layer violation already
            else:
                why = f"{imp.target}'s top-level imports reach no HEAVY package"
            msg = f"`{imp.statement}` inside a function: {why}; import it at the top"
            found.append(Violation("inner", module.path, imp.line, msg))
    return found


def check_package(
    root: Path, package: str, layers: Sequence[str], heavy: frozenset[str]
) -> list[Violation]:
    """Every violation of the rule in the package at `root`, sorted by kind then place."""
    modules = scan_package(root, package)
    found = [
        *layer_violations(modules, package, layers),
        *cycle_violations(modules),
        *private_violations(modules),
        *inner_import_violations(modules, heavy),
    ]
    order = list(KINDS)  # one statement importing several names may repeat a violation
    return sorted(set(found), key=lambda v: (order.index(v.kind), v.path, v.line, v.message))


def format_violations(violations: Sequence[Violation]) -> str:
    """The violations grouped by kind, one per line, for a test failure."""
    where = f"LAYERS in tests/{Path(__file__).name}"
    lines = [f"{len(violations)} violations of the dependency rule ({where}):"]
    for kind, title in KINDS.items():
        group = [v for v in violations if v.kind == kind]
        if group:
            lines += ["", f"{kind}: {title} ({len(group)})", *(f"  {v}" for v in group)]
    return "\n".join(lines)


def test_harness_follows_the_dependency_rule() -> None:
    violations = check_package(ROOT, PACKAGE, LAYERS, HEAVY)
    if violations:
        pytest.fail(format_violations(violations), pytrace=False)


FAKE_LAYERS: tuple[str, ...] = (
    "fakepkg fakepkg.core",
    "fakepkg.models",
    "fakepkg.gen | fakepkg.judge",
    "fakepkg.run",
    "fakepkg.cli fakepkg.__main__",
)

FAKE_FILES: dict[str, str] = {
    "__init__.py": "",
    "__main__.py": "from fakepkg.cli import main\nmain()\n",
    "cli.py": "from fakepkg.run import b\n\ndef main():\n    return b\n",
    "stray.py": "",
    "core/__init__.py": "",
    "core/a.py": (
        "def load():\n"
        "    from fakepkg.run import b\n"  # line 2: upward, hides a cycle, light inner import
        "    return b\n"
        "_cache = {}\n"
    ),
    "core/hidden.py": "def _helper():\n    return 1\n_secret = 2\n",
    "models/__init__.py": "",
    "models/m.py": "import torch\n",
    "models/wrap.py": "from fakepkg.models import m\n",
    "gen/__init__.py": "from .x import thing\n",
    "gen/x.py": "thing = 1\n",
    "judge/__init__.py": "",
    "judge/y.py": "from fakepkg.gen import x\n",  # line 1: peer
    "run/__init__.py": "",
    "run/b.py": (
        "from typing import TYPE_CHECKING\n"
        "import fakepkg.core.a\n"
        "from fakepkg.core.hidden import _secret\n"  # line 3: private
        "from ..core import hidden as h\n"
        "from fakepkg.gone import thing\n"  # line 5: not a module
        "if TYPE_CHECKING:\n"
        "    from fakepkg.cli import main\n"
        "VALUE = h._helper() + _secret + len(h.__name__)\n"  # line 8: private attribute
        "CACHE = fakepkg.core.a._cache\n"  # line 9: private attribute
        "def load():\n"
        "    import json\n"  # line 11: light inner import
        "    import numpy\n"
        "    from ..models import wrap\n"
        "    return json, numpy, wrap\n"
    ),
}


def test_checker_reports_each_kind_of_violation(tmp_path: Path) -> None:
    root = tmp_path / "fakepkg"
    for rel, text in FAKE_FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)

    violations = check_package(root, "fakepkg", FAKE_LAYERS, HEAVY)

    report = format_violations(violations)
    assert {(v.kind, v.path, v.line) for v in violations} == {
        ("layer", "fakepkg/stray.py", 1),
        ("layer", "fakepkg/core/a.py", 2),
        ("layer", "fakepkg/judge/y.py", 1),
        ("layer", "fakepkg/run/b.py", 5),
        ("cycle", "fakepkg/core/a.py", 2),
        ("private", "fakepkg/run/b.py", 3),
        ("private", "fakepkg/run/b.py", 8),
        ("private", "fakepkg/run/b.py", 9),
        ("inner", "fakepkg/core/a.py", 2),
        ("inner", "fakepkg/run/b.py", 11),
    }, report
    assert len(violations) == 10, report
    messages = {kind: [v.message for v in violations if v.kind == kind] for kind in KINDS}
    assert messages["cycle"] == [
        "fakepkg.core.a -> fakepkg.run.b -> fakepkg.core.a  "
        "[fakepkg/core/a.py:2 (in a function), fakepkg/run/b.py:2]"
    ]
    assert any(
        "(layer 0) imports fakepkg.run.b (layer 3): a higher layer" in m for m in messages["layer"]
    )
    assert any("a peer on the same layer" in m for m in messages["layer"])
    assert any("fakepkg.gone is not a module" in m for m in messages["layer"])
    assert any("fakepkg.stray is in no layer" in m for m in messages["layer"])
    assert "`from fakepkg.core.hidden import` takes _secret" in messages["private"]
    assert any("`h._helper` takes _helper" in m for m in messages["private"])
    assert any("`fakepkg.core.a._cache` takes _cache" in m for m in messages["private"])
    assert any("fakepkg.run.b's top-level imports reach no HEAVY" in m for m in messages["inner"])
    assert any("json is not a HEAVY package" in m for m in messages["inner"])
    for kind, title in KINDS.items():
        assert f"{kind}: {title}" in report

"""The import layers of the package: every import in suncet/, plugins/ and cli/ (function-level
and annotation-only ones included) points down or across, never up, and no chain of imports
comes back to where it started."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# Lowest first. A module belongs to the longest prefix that names it; a module imports only
# from its own layer or those below it.
LAYERS = [
    ("foundations", ["suncet", "suncet.errors", "suncet.moved", "suncet.terminal"]),
    ("settings", ["suncet.config"]),
    ("plugin registry, processes", ["suncet.registry", "suncet.distributed"]),
    ("kernels", ["suncet.kernels"]),
    ("losses, data path, optimisation", ["suncet.losses", "suncet.data", "suncet.optim"]),
    ("methods, loggers, presets", ["suncet.methods", "suncet.ema", "suncet.loggers", "suncet.presets"]),
    ("engine", ["suncet.engine"]),
    ("plugins, tools", ["suncet.plugins", "suncet.compare", "suncet.sweep", "suncet.bench"]),
    ("command line", ["suncet.cli"]),
]
# Source folders and the package each installs as (pyproject.toml's wheel.packages).
ROOTS = {"suncet": REPO / "suncet", "suncet.plugins": REPO / "plugins", "suncet.cli": REPO / "cli"}


def modules() -> dict[str, Path]:
    found = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if "examples" in parts:  # example packages of their own, not part of suncet
                continue
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(module imported, line) for every import of a suncet module in ``path``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            edges += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for alias in node.names:
                # `from suncet.engine import rundir` imports the module suncet.engine.rundir.
                edges.append((f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base, node.lineno))
    return [(target, line) for target, line in edges if target == "suncet" or target.startswith("suncet.")]


def layer_of(module: str) -> int:
    best, rank = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or (prefix != "suncet" and module.startswith(prefix + "."))) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank is not None, f"{module} belongs to no layer: add it to LAYERS"
    return rank


def graph() -> dict[str, list[tuple[str, int]]]:
    known = modules()
    return {
        name: [(t, line) for t, line in imports(name, path, known) if t in known and t != name]
        for name, path in known.items()
    }


def test_the_walk_sees_the_package():
    edges = graph()
    assert len(edges) > 80 and "suncet.plugins.methods.simclr" in edges and "suncet.cli.train" in edges
    assert any(t == "suncet.methods" for t, _ in edges["suncet.engine.assemble"])
    assert any(t == "suncet.engine.run" for t, _ in edges["suncet.engine.state"])  # an annotation-only import counts


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [
        f"{name}:{line} imports {target} ({LAYERS[layer_of(target)][0]}, above {LAYERS[layer_of(name)][0]})"
        for name, targets in graph().items()
        for target, line in targets
        if layer_of(target) > layer_of(name)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_loop():
    edges = {name: sorted({t for t, _ in targets}) for name, targets in graph().items()}
    state: dict[str, str] = {}
    loops = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in edges[name]:
            if state.get(target) == "open":
                loops.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not loops, "\n".join(loops)


def test_the_settings_import_nothing_of_the_engine():
    assert {t for t, _ in graph()["suncet.config"]} <= {"suncet.errors"}
